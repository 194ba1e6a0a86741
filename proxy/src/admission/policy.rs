//! The policy contract as the host sees it: what a policy is told
//! ([`Event`], [`Snapshot`], [`RequestInfo`], [`CompletionReport`]), what it
//! answers ([`Decision`]), how it can fail ([`Fault`]), and the [`Policy`]
//! trait that the wasm host ([`super::wasm`]) and the built-in
//! [`super::fallback`] both implement. The scheduler drives a `dyn Policy`
//! and knows nothing of wasm.
//!
//! These mirror `wit/policy.wit` (`sluice:policy@0.2.0`, which adds the
//! upstream replicas to 0.1.0): times are µs on the scheduler's monotonic
//! clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Something that decides which queued requests enter the engine.
///
/// Called on the scheduler task, one event at a time, with the host's view
/// at that moment. An answer is validated as a whole before any of it is
/// applied; an `Err` or an invalid answer takes the policy out of service.
pub trait Policy: fmt::Debug + Send {
    /// Short name for logs and labels (a plugin's file stem).
    fn name(&self) -> &str;
    /// Delivers one event and returns what to release or refuse.
    fn call(&mut self, now: Snapshot<'_>, event: &Event) -> Result<Decision, Fault>;
    /// Whether the policy reads [`Snapshot::replicas`]. The scheduler asks
    /// the [`ReplicaSource`] for them only when it does, and otherwise
    /// passes none.
    fn sees_replicas(&self) -> bool {
        false
    }
}

/// One upstream replica as policies see it (WIT `replica`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaState {
    /// Stable for the life of the replica; what [`Admit::replica`] names.
    pub id: u32,
    /// For logs: its address or name.
    pub name: String,
    /// False while the router sends it nothing; naming it is an invalid decision.
    pub healthy: bool,
    /// Requests forwarded to it and not finished.
    pub in_flight: u32,
    /// The engine's running requests as last scraped (0 when unknown).
    pub engine_running: u32,
    /// The engine's waiting requests as last scraped (0 when unknown).
    pub engine_waiting: u32,
    /// The engine's KV-cache usage, 0.0 to 1.0 (0.0 when unknown).
    pub kv_usage: f32,
}

/// Where the scheduler reads the replicas from, on each policy call.
pub type ReplicaSource = Arc<dyn Fn() -> Vec<ReplicaState> + Send + Sync>;

/// What the policy is told about a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The tenant (see [`crate::headers::Tenants`]).
    pub tenant: String,
    /// Model name from the body.
    pub model: String,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// `max_tokens`, 0 when absent.
    pub max_tokens: u32,
    /// Predicted prefix-cache hit, in tokens.
    pub cached_tokens: u32,
    /// Hash of the shared prefix; 0 when unknown.
    pub prefix_group: u64,
    /// `X-Priority`.
    pub priority: i32,
    /// (replica id, predicted cached tokens on that replica); empty with one upstream.
    pub cached_by_replica: Vec<(u32, u32)>,
}
/// How an admitted request ended, as reported to the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompletionReport {
    /// 2xx and delivered whole.
    pub ok: bool,
    /// Queue wait.
    pub queue: Duration,
    /// Admission to first byte.
    pub ttft: Duration,
    /// Admission to end.
    pub e2e: Duration,
    /// Prompt tokens (from usage when known).
    pub prompt_tokens: u32,
    /// Output tokens (from usage when known).
    pub output_tokens: u32,
}
/// The host state a policy call sees (WIT `snapshot`). It borrows the
/// replicas, read once for the call, so that it stays `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot<'a> {
    /// Host monotonic clock (µs since the scheduler started).
    pub now_us: u64,
    /// Requests admitted and not finished.
    pub in_flight: u32,
    /// Requests waiting, including one just arriving.
    pub queued: u32,
    /// The upstream replicas; empty with one upstream, or when the policy
    /// does not [see them](Policy::sees_replicas).
    pub replicas: &'a [ReplicaState],
}
/// An event delivered to the policy.
#[derive(Debug, Clone)]
pub enum Event {
    /// `on-arrival`.
    Arrival {
        /// Request id.
        id: u64,
        /// What the policy sees.
        info: RequestInfo,
        /// Arrival time (µs, host clock).
        arrived_us: u64,
    },
    /// `on-completion`.
    Completion {
        /// Request id.
        id: u64,
        /// Timings.
        report: CompletionReport,
    },
    /// `on-cancel`.
    Cancel {
        /// Request id.
        id: u64,
    },
    /// `on-tick`.
    Tick,
}
impl Event {
    /// Index into per-event counters (arrival, completion, cancel, tick).
    pub fn index(&self) -> usize {
        match self {
            Self::Arrival { .. } => 0,
            Self::Completion { .. } => 1,
            Self::Cancel { .. } => 2,
            Self::Tick => 3,
        }
    }
}
/// One request released by a [`Decision`] (WIT `admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// The queued request.
    pub id: u64,
    /// The replica to send it to (a healthy one of the call's snapshot);
    /// `None`: the router chooses.
    pub replica: Option<u32>,
}

impl Admit {
    /// Releases `id` wherever the router chooses.
    pub fn id(id: u64) -> Self {
        Self { id, replica: None }
    }
}

/// What the policy answered (host-side copy of the WIT `decision`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Release these now, in order.
    pub admit: Vec<Admit>,
    /// Refuse these with a reason.
    pub reject: Vec<(u64, String)>,
    /// Ask for `on-tick` after this many µs.
    pub wake_after_us: Option<u64>,
}
/// Why a policy was taken out of service.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The guest trapped (including running out of memory).
    #[error("trap: {0}")]
    Trap(String),
    /// The call ran past its deadline.
    #[error("missed its deadline of {}", crate::units::format_duration(*.0))]
    Deadline(Duration),
    /// The answer named unknown, duplicate or already admitted ids, or a
    /// replica that is not in the snapshot or not healthy.
    #[error("invalid decision: {0}")]
    InvalidDecision(String),
}
impl Fault {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Trap(_) => "trap",
            Self::Deadline(_) => "deadline",
            Self::InvalidDecision(_) => "invalid_decision",
        }
    }
}
