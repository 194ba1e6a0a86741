//! The scheduler task: the one owner of the admission queue and the policy.
//!
//! Every event — arrival, completion, cancel, a due tick, a reload — is a
//! [`Command`] handled in order on this task, so the queue, the in-flight set
//! and the policy instance need no locks. Each policy answer is validated as
//! a whole before any of it is applied: an answer naming an id that is not
//! queued, or naming one twice, or admitting to a replica that is not a
//! healthy one of the snapshot the policy was given, is a fault. On a fault (trap, missed deadline,
//! invalid answer) the plugin is dropped and the built-in [`Fallback`] cap
//! takes over the same queue until a new plugin is loaded.
//!
//! A policy takes over the queue the same way whether it was reloaded or is
//! the fallback: it is told of every waiting request as an arrival, oldest
//! first ([`Scheduler::install`]).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::channel::{Command, Permit, SchedulerStatus};
use super::fallback::Fallback;
use super::policy::{
    Decision, Event, Fault, Policy, ReplicaSource, ReplicaState, RequestInfo, Snapshot,
};
use crate::error::ProxyError;
use crate::telemetry;

struct Waiter {
    info: RequestInfo,
    arrived: Instant,
    reply: oneshot::Sender<Result<Permit, ProxyError>>,
}

/// The state owned by the scheduler task.
struct Scheduler {
    policy: Box<dyn Policy>,
    // Whether `policy` is the built-in fallback (after a fault).
    fallback_active: bool,
    fallback_limit: u32,
    // Bumped whenever a policy is installed: a hand-over stops replaying
    // arrivals to a policy that was replaced meanwhile.
    generation: u64,
    // Waiting requests by id; ids grow with arrival, so iteration is FIFO.
    queue: BTreeMap<u64, Waiter>,
    in_flight: HashSet<u64>,
    commands: mpsc::UnboundedSender<Command>,
    epoch: Instant,
    next_tick: Option<Instant>,
    faults: u64,
    // Read once per call, and only for a policy that sees replicas.
    replicas: Option<ReplicaSource>,
}

/// Starts the scheduler task with `policy`; returns where to send commands.
///
/// The channel is unbounded: arrivals are capped by `--max-queue` before
/// they are sent, and every other command is tied to a queued or admitted
/// request. The task ends when every sender is gone.
pub fn spawn(
    policy: Box<dyn Policy>,
    fallback_limit: u32,
    replicas: Option<ReplicaSource>,
) -> mpsc::UnboundedSender<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    let scheduler = Scheduler {
        policy,
        fallback_active: false,
        fallback_limit,
        generation: 0,
        queue: BTreeMap::new(),
        in_flight: HashSet::new(),
        commands: tx.clone(),
        epoch: Instant::now(),
        next_tick: None,
        faults: 0,
        replicas,
    };
    metrics::gauge!(telemetry::POLICY_FALLBACK).set(0.0);
    tokio::spawn(scheduler.run(rx));
    tx
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
                tracing::info!(policy = %name, queued = self.queue.len(), in_flight = self.in_flight.len(), "policy reloaded; handing over the queue");
                metrics::gauge!(telemetry::POLICY_FALLBACK).set(0.0);
                self.fallback_active = false;
                self.install(policy);
                // A fault during hand-over already switched to the fallback.
                if self.fallback_active {
                    let _ = done.send(format!(
                        "{name} (faulted during hand-over; fallback active)"
                    ));
                } else {
                    let _ = done.send(name);
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
        self.publish_gauges();
    }

    /// Makes `policy` the one that decides, and tells it of the waiting
    /// requests as arrivals, oldest first.
    fn install(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
        self.generation += 1;
        self.next_tick = None;
        let generation = self.generation;
        let queued: Vec<(u64, RequestInfo, Instant)> = self
            .queue
            .iter()
            .map(|(id, w)| (*id, w.info.clone(), w.arrived))
            .collect();
        for (id, info, arrived) in queued {
            if self.generation != generation {
                return; // a fault replaced the policy, which had the queue replayed to it
            }
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
    }

    fn status(&self) -> SchedulerStatus {
        let policy = if self.fallback_active {
            format!("fallback (concurrency cap {})", self.fallback_limit.max(1))
        } else {
            format!("plugin {}", self.policy.name())
        };
        SchedulerStatus {
            policy,
            fallback: self.fallback_active,
            queued: self.queue.len(),
            in_flight: self.in_flight.len(),
            faults: self.faults,
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// The replicas for the next call: read from the source only when the
    /// active policy sees them (no allocation otherwise).
    fn replicas(&self) -> Vec<ReplicaState> {
        match &self.replicas {
            Some(source) if self.policy.sees_replicas() => source(),
            _ => Vec::new(),
        }
    }

    fn snapshot<'a>(&self, replicas: &'a [ReplicaState]) -> Snapshot<'a> {
        Snapshot {
            now_us: self.micros(Instant::now()),
            in_flight: self.in_flight.len() as u32,
            queued: self.queue.len() as u32,
            replicas,
        }
    }

    /// Asks the active policy about `event` and applies a valid answer.
    fn dispatch(&mut self, event: Event) {
        let replicas = self.replicas();
        let snapshot = self.snapshot(&replicas);
        let answer = self.policy.call(snapshot, &event);
        match answer.and_then(|d| self.validate(d, &replicas)) {
            Ok(decision) => self.apply(decision),
            Err(fault) => self.fault(fault),
        }
    }

    /// Checks a whole answer before any of it takes effect, against the
    /// `replicas` the policy was shown.
    fn validate(&self, decision: Decision, replicas: &[ReplicaState]) -> Result<Decision, Fault> {
        for admit in &decision.admit {
            let Some(named) = admit.replica else {
                continue;
            };
            match replicas.iter().find(|r| r.id == named) {
                Some(replica) if replica.healthy => {}
                Some(_) => {
                    return Err(Fault::InvalidDecision(format!(
                        "id {} admitted to unhealthy replica {named}",
                        admit.id
                    )));
                }
                None => {
                    return Err(Fault::InvalidDecision(format!(
                        "id {} admitted to replica {named}, which is not in the snapshot",
                        admit.id
                    )));
                }
            }
        }
        let mut seen = HashSet::with_capacity(decision.admit.len() + decision.reject.len());
        let named = decision
            .admit
            .iter()
            .map(|a| &a.id)
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
        for admit in decision.admit {
            let id = admit.id;
            let Some(waiter) = self.queue.remove(&id) else {
                continue; // validated above; unreachable
            };
            let permit = Permit::new(
                id,
                waiter.arrived.elapsed(),
                waiter.info.prompt_tokens,
                admit.replica,
                self.commands.clone(),
            );
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

    /// Drops a faulty policy and lets the fallback take over the same queue.
    fn fault(&mut self, fault: Fault) {
        self.faults += 1;
        let name = self.policy.name().to_owned();
        tracing::error!(policy = %name, kind = fault.kind(), error = %fault, limit = self.fallback_limit,
            "admission policy fault; switching to the built-in concurrency cap until a plugin is reloaded");
        metrics::counter!(telemetry::POLICY_FAULTS, "kind" => fault.kind()).increment(1);
        metrics::gauge!(telemetry::POLICY_FALLBACK).set(1.0);
        self.fallback_active = true;
        self.install(Box::new(Fallback::new(self.fallback_limit)));
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
