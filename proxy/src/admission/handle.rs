//! [`Admission`]: the request task's side of admission — the rate limit,
//! the queue bound, the wait for a verdict under `--queue-timeout`, and
//! `on-cancel` when the wait is abandoned.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::channel::{Command, Permit, SchedulerStatus};
use super::policy::{Policy, ReplicaSource, RequestInfo};
use super::ratelimit::TenantLimiter;
use super::scheduler;
use crate::error::ProxyError;

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

/// Settings for [`Admission::start`].
pub struct AdmissionConfig {
    /// In-flight cap of the fallback that replaces a faulty policy.
    pub fallback_limit: u32,
    /// Most requests waiting for a verdict (`--max-queue`).
    pub max_queue: usize,
    /// Longest wait for a verdict (`--queue-timeout`).
    pub queue_timeout: Duration,
    /// Per-tenant rate limit, checked before queueing.
    pub limiter: Option<Arc<TenantLimiter>>,
    /// The upstream replicas, read on each call of a policy that
    /// [sees them](Policy::sees_replicas); `None` with one upstream.
    pub replicas: Option<ReplicaSource>,
}

impl std::fmt::Debug for AdmissionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionConfig")
            .field("fallback_limit", &self.fallback_limit)
            .field("max_queue", &self.max_queue)
            .field("queue_timeout", &self.queue_timeout)
            .field("limiter", &self.limiter)
            .field("replicas", &self.replicas.as_ref().map(|_| "ReplicaSource"))
            .finish()
    }
}

impl Admission {
    /// Starts the scheduler task with `policy` and returns the handle
    /// request tasks use. Must run inside a tokio runtime.
    pub fn start(policy: Box<dyn Policy>, config: AdmissionConfig) -> Self {
        Self {
            commands: scheduler::spawn(policy, config.fallback_limit, config.replicas),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout,
            limiter: config.limiter,
        }
    }

    /// Hands the queue to a new, already initialised policy; answers with
    /// its name once the hand-over is done.
    pub async fn reload(&self, policy: Box<dyn Policy>) -> Result<String, ProxyError> {
        let (done, ack) = oneshot::channel();
        self.commands
            .send(Command::Reload { policy, done })
            .map_err(|_| ProxyError::ShuttingDown)?;
        ack.await.map_err(|_| ProxyError::ShuttingDown)
    }

    /// The scheduler's current state.
    pub async fn status(&self) -> Result<SchedulerStatus, ProxyError> {
        let (reply, status) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .map_err(|_| ProxyError::ShuttingDown)?;
        status.await.map_err(|_| ProxyError::ShuttingDown)
    }

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
