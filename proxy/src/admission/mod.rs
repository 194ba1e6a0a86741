//! Admission: when each inference request may enter the engine.
//!
//! Requests wait in a bounded queue owned by one [scheduler](scheduler) task,
//! which asks the policy — a wasm component ([`wasm`]) or, after a plugin
//! fault, the built-in [`fallback`] cap — what to release. The request task
//! holds an [`Admission`] handle:
//!
//! 1. the per-tenant [`ratelimit`] answers 429 before anything is queued;
//! 2. `--max-queue` is checked next (429 with `Retry-After`, policy not asked);
//! 3. the request waits for its verdict up to `--queue-timeout` (then 503);
//!    a client that goes away while waiting becomes `on-cancel`;
//! 4. an admitted request holds a [`Permit`]; dropping or completing it
//!    reports `on-completion` exactly once.

pub mod fallback;
pub mod ratelimit;
pub mod scheduler;
pub mod wasm;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ProxyError;
use ratelimit::TenantLimiter;
use scheduler::Command;

/// What the policy is told about a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Tenant key (see [`crate::headers::tenant_key`]).
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

/// The request task's handle on admission; cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission {
    commands: mpsc::UnboundedSender<Command>,
    // Requests between arrival and verdict; checked against `max_queue` before sending.
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    queue_timeout: Duration,
    limiter: Option<Arc<TenantLimiter>>,
}

/// Held by an admitted request; reports its completion when consumed or dropped.
#[derive(Debug)]
pub struct Permit {
    id: u64,
    queue: Duration,
    prompt_tokens: u32,
    commands: mpsc::UnboundedSender<Command>,
    reported: bool,
}

impl Permit {
    /// The time this request spent queued.
    pub fn queue_wait(&self) -> Duration {
        self.queue
    }

    /// Reports the completion with its timings and, when the engine said, its tokens.
    pub fn complete(
        mut self,
        ok: bool,
        ttft: Duration,
        e2e: Duration,
        usage: Option<crate::usage::Usage>,
    ) {
        self.report(CompletionReport {
            ok,
            queue: self.queue,
            ttft,
            e2e,
            prompt_tokens: usage.map_or(self.prompt_tokens, |u| u.prompt_tokens),
            output_tokens: usage.map_or(0, |u| u.completion_tokens),
        });
    }

    fn report(&mut self, report: CompletionReport) {
        if !std::mem::replace(&mut self.reported, true) {
            // The scheduler outlives every permit unless the process is exiting.
            let _ = self.commands.send(Command::Complete {
                id: self.id,
                report,
            });
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A permit dropped unreported (error path, or a verdict nobody received).
        let queue = self.queue;
        self.report(CompletionReport {
            queue,
            ..CompletionReport::default()
        });
    }
}

/// Sends `on-cancel` if the waiting request is dropped before its verdict.
struct CancelOnDrop<'a> {
    id: u64,
    commands: &'a mpsc::UnboundedSender<Command>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::Cancel { id: self.id });
        }
    }
}

/// Decrements the queued count when the wait ends, however it ends.
struct QueuedSlot<'a>(&'a AtomicUsize);

impl Drop for QueuedSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Waits until the policy admits request `id`, or refuses it with the right error.
    pub async fn admit(&self, id: u64, info: RequestInfo) -> Result<Permit, ProxyError> {
        if let Some(limiter) = &self.limiter {
            limiter.check(&info.tenant)?;
        }
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if reserved.is_err() {
            metrics::counter!(crate::telemetry::REQUESTS_SHED, "reason" => "queue_full")
                .increment(1);
            return Err(ProxyError::QueueFull {
                max_queue: self.max_queue,
                retry_after: Duration::from_secs(1),
            });
        }
        let _slot = QueuedSlot(&self.queued);
        let (reply, verdict) = oneshot::channel();
        let arrived = Instant::now();
        self.commands
            .send(Command::Arrive {
                id,
                info,
                arrived,
                reply,
            })
            .map_err(|_| ProxyError::ShuttingDown)?;
        let mut cancel = CancelOnDrop {
            id,
            commands: &self.commands,
            armed: true,
        };
        let result = match tokio::time::timeout(self.queue_timeout, verdict).await {
            Ok(Ok(result)) => result,
            Ok(Err(_closed)) => Err(ProxyError::ShuttingDown),
            Err(_elapsed) => Err(ProxyError::QueueTimeout(self.queue_timeout)),
        };
        // Admitted or rejected by the scheduler: nothing to cancel. Otherwise
        // (timeout, shutdown) the guard tells the scheduler the request left.
        cancel.armed = matches!(
            result,
            Err(ProxyError::QueueTimeout(_)) | Err(ProxyError::ShuttingDown)
        );
        result
    }
}
