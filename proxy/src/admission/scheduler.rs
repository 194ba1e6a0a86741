//! The scheduler task: the one owner of the admission queue and the policy.
//!
//! Every event — arrival, completion, cancel, a due tick, a reload — is a
//! [`Command`] handled in order on this task, so the queue, the in-flight set
//! and the policy instance need no locks. Each policy answer is validated as
//! a whole before any of it is applied: an answer naming an id that is not
//! queued, or naming one twice, is a fault. On a fault (trap, missed deadline,
//! invalid answer) the plugin is dropped and the built-in [`Fallback`] cap
//! takes over the same queue until a new plugin is loaded.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::fallback::Fallback;
use super::ratelimit::TenantLimiter;
use super::wasm::{Decision, Event, Fault, Snapshot, WasmPolicy};
use super::{Admission, CompletionReport, Permit, RequestInfo};
use crate::error::ProxyError;
use crate::telemetry;

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
        policy: Box<WasmPolicy>,
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

/// Which policy decides.
#[derive(Debug)]
enum Engine {
    Plugin(Box<WasmPolicy>),
    Fallback(Fallback),
}

struct Waiter {
    info: RequestInfo,
    arrived: Instant,
    reply: oneshot::Sender<Result<Permit, ProxyError>>,
}

/// The state owned by the scheduler task.
struct Scheduler {
    engine: Engine,
    fallback_limit: u32,
    // Waiting requests by id; ids grow with arrival, so iteration is FIFO.
    queue: BTreeMap<u64, Waiter>,
    in_flight: HashSet<u64>,
    commands: mpsc::UnboundedSender<Command>,
    epoch: Instant,
    next_tick: Option<Instant>,
    faults: u64,
}

/// Settings for [`spawn`].
#[derive(Debug)]
pub struct SchedulerConfig {
    /// The initial policy.
    pub policy: Box<WasmPolicy>,
    /// In-flight cap of the fallback.
    pub fallback_limit: u32,
    /// Queue bound.
    pub max_queue: usize,
    /// Admission wait limit.
    pub queue_timeout: Duration,
    /// Per-tenant limiter.
    pub limiter: Option<Arc<TenantLimiter>>,
}

/// Starts the scheduler task; returns the handle request tasks use.
pub fn spawn(config: SchedulerConfig) -> Admission {
    let (tx, rx) = mpsc::unbounded_channel();
    // Unbounded is safe here: arrivals are capped by `max_queue` before they
    // are sent, and every other command is tied to a queued or admitted request.
    let scheduler = Scheduler {
        engine: Engine::Plugin(config.policy),
        fallback_limit: config.fallback_limit,
        queue: BTreeMap::new(),
        in_flight: HashSet::new(),
        commands: tx.clone(),
        epoch: Instant::now(),
        next_tick: None,
        faults: 0,
    };
    metrics::gauge!(telemetry::POLICY_FALLBACK).set(0.0);
    tokio::spawn(scheduler.run(rx));
    Admission {
        commands: tx,
        queued: Arc::new(AtomicUsize::new(0)),
        max_queue: config.max_queue,
        queue_timeout: config.queue_timeout,
        limiter: config.limiter,
    }
}

impl Admission {
    /// Hands the queue to a new, already initialised policy.
    pub async fn reload(&self, policy: WasmPolicy) -> Result<String, ProxyError> {
        let (done, ack) = oneshot::channel();
        self.commands
            .send(Command::Reload {
                policy: Box::new(policy),
                done,
            })
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
}

impl Scheduler {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let tick = self.next_tick;
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                () = sleep_until(tick), if tick.is_some() => {
                    self.next_tick = None;
                    self.dispatch(Event::Tick);
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Arrive {
                id,
                info,
                arrived,
                reply,
            } => {
                let arrived_us = self.micros(arrived);
                self.queue.insert(
                    id,
                    Waiter {
                        info: info.clone(),
                        arrived,
                        reply,
                    },
                );
                self.dispatch(Event::Arrival {
                    id,
                    info,
                    arrived_us,
                });
            }
            Command::Cancel { id } => {
                // Unknown ids are normal: the request was admitted or rejected meanwhile.
                if self.queue.remove(&id).is_some() {
                    self.dispatch(Event::Cancel { id });
                }
            }
            Command::Complete { id, report } => {
                if self.in_flight.remove(&id) {
                    self.dispatch(Event::Completion { id, report });
                }
            }
            Command::Reload { policy, done } => {
                let name = policy.name().to_owned();
                self.engine = Engine::Plugin(policy);
                self.next_tick = None;
                metrics::gauge!(telemetry::POLICY_FALLBACK).set(0.0);
                tracing::info!(policy = %name, queued = self.queue.len(), in_flight = self.in_flight.len(), "policy reloaded; handing over the queue");
                // The new instance learns the queue as arrivals, oldest first.
                let queued: Vec<(u64, RequestInfo, Instant)> = self
                    .queue
                    .iter()
                    .map(|(id, w)| (*id, w.info.clone(), w.arrived))
                    .collect();
                for (id, info, arrived) in queued {
                    if !self.queue.contains_key(&id) {
                        continue; // admitted or rejected by an earlier replayed event
                    }
                    let arrived_us = self.micros(arrived);
                    self.dispatch(Event::Arrival {
                        id,
                        info,
                        arrived_us,
                    });
                }
                // A fault during hand-over already switched to the fallback.
                if matches!(self.engine, Engine::Plugin(_)) {
                    let _ = done.send(name);
                } else {
                    let _ = done.send(format!(
                        "{name} (faulted during hand-over; fallback active)"
                    ));
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
        self.publish_gauges();
    }

    fn status(&self) -> SchedulerStatus {
        let (policy, fallback) = match &self.engine {
            Engine::Plugin(p) => (format!("plugin {}", p.name()), false),
            Engine::Fallback(f) => (format!("fallback (concurrency cap {})", f.limit()), true),
        };
        SchedulerStatus {
            policy,
            fallback,
            queued: self.queue.len(),
            in_flight: self.in_flight.len(),
            faults: self.faults,
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            now_us: self.micros(Instant::now()),
            in_flight: self.in_flight.len() as u32,
            queued: self.queue.len() as u32,
        }
    }

    /// Asks the active policy about `event` and applies a valid answer.
    fn dispatch(&mut self, event: Event) {
        let snapshot = self.snapshot();
        let answer = match &mut self.engine {
            Engine::Plugin(policy) => policy.call(snapshot, &event),
            Engine::Fallback(fallback) => {
                let fallback = *fallback;
                Ok(fallback.decide(&self.queue_ids(), self.in_flight.len()))
            }
        };
        match answer.and_then(|d| self.validate(d)) {
            Ok(decision) => self.apply(decision),
            Err(fault) => self.fault(fault),
        }
    }

    fn queue_ids(&self) -> Vec<u64> {
        self.queue.keys().copied().collect()
    }

    /// Checks a whole answer before any of it takes effect.
    fn validate(&self, decision: Decision) -> Result<Decision, Fault> {
        let mut seen = HashSet::with_capacity(decision.admit.len() + decision.reject.len());
        let named = decision
            .admit
            .iter()
            .chain(decision.reject.iter().map(|(id, _)| id));
        for id in named {
            if !seen.insert(*id) {
                return Err(Fault::InvalidDecision(format!("id {id} named twice")));
            }
            if !self.queue.contains_key(id) {
                let why = if self.in_flight.contains(id) {
                    "already admitted"
                } else {
                    "not queued"
                };
                return Err(Fault::InvalidDecision(format!("id {id} is {why}")));
            }
        }
        Ok(decision)
    }

    fn apply(&mut self, decision: Decision) {
        for id in decision.admit {
            let Some(waiter) = self.queue.remove(&id) else {
                continue; // validated above; unreachable
            };
            let permit = Permit {
                id,
                queue: waiter.arrived.elapsed(),
                prompt_tokens: waiter.info.prompt_tokens,
                commands: self.commands.clone(),
                reported: false,
            };
            self.in_flight.insert(id);
            // If the client already left, the permit is dropped with the
            // unread reply and reports a failed completion: nothing leaks.
            let _ = waiter.reply.send(Ok(permit));
        }
        for (id, reason) in decision.reject {
            if let Some(waiter) = self.queue.remove(&id) {
                let _ = waiter.reply.send(Err(ProxyError::PolicyRejected(reason)));
            }
        }
        self.next_tick = decision
            .wake_after_us
            .map(|us| Instant::now() + Duration::from_micros(us));
    }

    /// Drops a faulty plugin and lets the fallback take over the same queue.
    fn fault(&mut self, fault: Fault) {
        self.faults += 1;
        let name = match &self.engine {
            Engine::Plugin(p) => p.name().to_owned(),
            Engine::Fallback(_) => "fallback".to_owned(),
        };
        tracing::error!(policy = %name, kind = fault.kind(), error = %fault, limit = self.fallback_limit,
            "admission policy fault; switching to the built-in concurrency cap until a plugin is reloaded");
        metrics::counter!(telemetry::POLICY_FAULTS, "kind" => fault.kind()).increment(1);
        metrics::gauge!(telemetry::POLICY_FALLBACK).set(1.0);
        let fallback = Fallback::new(self.fallback_limit);
        let decision = fallback.decide(&self.queue_ids(), self.in_flight.len());
        self.engine = Engine::Fallback(fallback);
        self.apply(decision);
    }

    fn publish_gauges(&self) {
        let hot = telemetry::hot();
        hot.queued.set(self.queue.len() as f64);
        hot.in_flight.set(self.in_flight.len() as f64);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
