//! The messages between request tasks and the scheduler task: every
//! [`Command`], and the [`Permit`] an admitted request holds, which sends
//! the one completion report for it.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::policy::{CompletionReport, Policy, RequestInfo};
use crate::error::ProxyError;

/// A message to the scheduler task.
#[derive(Debug)]
pub enum Command {
    /// A request joined the queue and waits on `reply`.
    Arrive {
        /// Request id.
        id: u64,
        /// What the policy sees.
        info: RequestInfo,
        /// Arrival time.
        arrived: Instant,
        /// Where the verdict goes.
        reply: oneshot::Sender<Result<Permit, ProxyError>>,
    },
    /// A waiting request left (client gone or queue timeout).
    Cancel {
        /// Request id.
        id: u64,
    },
    /// An admitted request ended.
    Complete {
        /// Request id.
        id: u64,
        /// Its timings.
        report: CompletionReport,
    },
    /// Replace the policy with an already validated instance.
    Reload {
        /// The new policy.
        policy: Box<dyn Policy>,
        /// Acknowledged once the queue has been handed over.
        done: oneshot::Sender<String>,
    },
    /// Report the scheduler's state.
    Status {
        /// Where the status goes.
        reply: oneshot::Sender<SchedulerStatus>,
    },
}

/// A point-in-time view of the scheduler, for `/stats` and tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SchedulerStatus {
    /// "plugin NAME" or "fallback (concurrency cap N)".
    pub policy: String,
    /// Whether the fallback is active.
    pub fallback: bool,
    /// Requests waiting.
    pub queued: usize,
    /// Requests admitted and not finished.
    pub in_flight: usize,
    /// Faults since start.
    pub faults: u64,
}

/// Held by an admitted request; reports its completion when consumed or dropped.
#[derive(Debug)]
pub struct Permit {
    id: u64,
    queue: Duration,
    prompt_tokens: u32,
    // The replica the policy named; None: the router chooses.
    replica: Option<u32>,
    commands: mpsc::UnboundedSender<Command>,
    reported: bool,
}

impl Permit {
    /// A permit for request `id`, admitted after waiting `queue`, to
    /// `replica` when the policy named one.
    pub(super) fn new(
        id: u64,
        queue: Duration,
        prompt_tokens: u32,
        replica: Option<u32>,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            id,
            queue,
            prompt_tokens,
            replica,
            commands,
            reported: false,
        }
    }
}

impl Permit {
    /// The time this request spent queued.
    pub fn queue_wait(&self) -> Duration {
        self.queue
    }

    /// The replica the policy admitted this request to (a healthy one of
    /// the snapshot it decided on); `None`: the router chooses.
    pub fn replica(&self) -> Option<u32> {
        self.replica
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
