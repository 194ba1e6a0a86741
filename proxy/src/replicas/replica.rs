//! One upstream replica: where it is dialled, its connections and health,
//! what it is predicted to cache, and how loaded it is — here (requests in
//! flight through this proxy) and in the engine (its own running and
//! waiting counts, scraped).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;
use metrics::{Counter, counter};

use crate::config::UpstreamConfig;
use crate::kv_events::KvEventsHandle;
use crate::prefix::PrefixTracker;
use crate::scrape::UpstreamMetrics;
use crate::telemetry;
use crate::upstream::{Upstream, get_once};

/// How often a replica's `/health` is asked, when there are several.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// How long a prefix group sent to a replica counts as served there.
pub const GROUP_MEMORY: Duration = Duration::from_secs(60);

/// The prefix groups sent to a replica, and when they were last pruned.
#[derive(Debug)]
struct Groups {
    used: std::collections::HashMap<u64, GroupUse>,
    pruned: Instant,
}

/// A prefix group's requests on a replica.
#[derive(Debug, Clone, Copy)]
struct GroupUse {
    in_flight: u32,
    last: Instant,
}

/// One engine behind the proxy.
#[derive(Debug)]
pub struct Replica {
    /// Stable for the life of the process; never reused.
    pub id: u32,
    /// `host:port` as dialled: the `replica` label of its metrics.
    pub name: String,
    /// Its connections, timeouts and passive health (a failed connect).
    pub upstream: Arc<Upstream>,
    /// What it is predicted to hold in its prefix cache.
    pub prefix: Arc<PrefixTracker>,
    /// Its own `/metrics`, scraped.
    pub engine: Arc<UpstreamMetrics>,
    in_flight: AtomicU32,
    // Set by the `/health` probe: answered 5xx or not at all.
    unhealthy: AtomicBool,
    routed: [Counter; ROUTE_REASONS.len()],
    failovers: Counter,
    // Prediction checks against the engine's `cached_tokens`: exact, over, under.
    checks: [Counter; 3],
    // Tasks that watch the replica; stopped with it.
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    health_watched: AtomicBool,
    // Prefix groups sent here: in flight now, and when last.
    groups: std::sync::Mutex<Groups>,
    // Its KV-cache events, once followed (see [`super::kv`]).
    events: std::sync::OnceLock<KvEventsHandle>,
}

/// Why a request went to a replica (`sluice_replica_requests_total`'s `reason`).
pub const ROUTE_REASONS: [&str; 6] = [
    "prefix",
    "rendezvous",
    "least_loaded",
    "round_robin",
    "policy",
    "failover",
];

/// Index of a [`ROUTE_REASONS`] entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// It holds the most of the prompt (within the load band).
    Prefix,
    /// No replica holds the prompt: the prefix's rendezvous choice.
    Rendezvous,
    /// The fewest requests in flight and waiting.
    LeastLoaded,
    /// Its turn.
    RoundRobin,
    /// The admission policy named it.
    Policy,
    /// Another replica could not take the request before any of it was sent.
    Failover,
}

impl RouteReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        ROUTE_REASONS[self as usize]
    }
}

impl Replica {
    /// The replica at `authority`, configured as `host` (its `Host`
    /// header), predicted by `prefix`, its engine scraped into `engine`.
    pub fn new(
        id: u32,
        authority: String,
        host: HeaderValue,
        config: &UpstreamConfig,
        workers: usize,
        prefix: Arc<PrefixTracker>,
        engine: Arc<UpstreamMetrics>,
    ) -> Self {
        let label = authority.clone();
        let routed = ROUTE_REASONS.map(|reason| {
            counter!(telemetry::REPLICA_REQUESTS, "replica" => label.clone(), "reason" => reason)
        });
        let checks = ["exact", "over", "under"].map(|result| {
            counter!(telemetry::REPLICA_PREDICTIONS, "replica" => label.clone(), "result" => result)
        });
        Self {
            id,
            upstream: Upstream::at(authority.clone(), host, config, workers),
            name: authority,
            prefix,
            engine,
            in_flight: AtomicU32::new(0),
            unhealthy: AtomicBool::new(false),
            routed,
            failovers: counter!(telemetry::REPLICA_FAILOVERS, "replica" => label),
            checks,
            tasks: std::sync::Mutex::new(Vec::new()),
            health_watched: AtomicBool::new(false),
            events: std::sync::OnceLock::new(),
            groups: std::sync::Mutex::new(Groups {
                used: std::collections::HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Whether it may get new requests: its last connect did not fail and
    /// its `/health` did not fail.
    pub fn healthy(&self) -> bool {
        self.upstream.check_up().is_ok() && !self.unhealthy.load(Ordering::Acquire)
    }

    /// Requests in flight to it through this proxy.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Its load as routing weighs it: requests in flight through this
    /// proxy, or the engine's running and waiting requests if more (other
    /// proxies or clients share it; scraped, so a little stale).
    pub fn load(&self) -> u32 {
        let engine = self.engine.load();
        self.in_flight()
            .max(engine.running.saturating_add(engine.waiting))
    }

    /// Counts a request sent to it for `reason`; the returned guard holds
    /// its place in [`in_flight`](Self::in_flight) until dropped.
    pub fn take(self: &Arc<Self>, reason: RouteReason) -> Routed {
        self.take_group(reason, 0)
    }

    /// [`take`](Self::take) for a request of prefix group `group` (0: none),
    /// which counts as in flight here until the guard drops: requests of the
    /// same group that arrive meanwhile find the prefix being computed here
    /// (the engine shares it with them once it is), before any completion
    /// has told the tracker.
    pub fn take_group(self: &Arc<Self>, reason: RouteReason, group: u64) -> Routed {
        self.routed[reason as usize].increment(1);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if group != 0 {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            let used = groups.used.entry(group).or_insert(GroupUse {
                in_flight: 0,
                last: Instant::now(),
            });
            used.in_flight += 1;
            used.last = Instant::now();
        }
        Routed {
            replica: Arc::clone(self),
            group,
            reason,
            held: None,
        }
    }

    /// Whether a request of prefix group `group` is in flight here.
    pub fn computing(&self, group: u64) -> bool {
        group != 0
            && self
                .groups
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .used
                .get(&group)
                .is_some_and(|used| used.in_flight > 0)
    }

    /// The prefix groups sent here within the last [`GROUP_MEMORY`] (give
    /// or take a second): how many shared prompts it is serving. Groups
    /// older than that are forgotten at most once a second, so that a
    /// stream of prompts that share nothing costs one pass a second.
    pub fn groups_served(&self) -> usize {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now - groups.pruned >= Duration::from_secs(1) {
            groups
                .used
                .retain(|_, used| used.in_flight > 0 || now - used.last < GROUP_MEMORY);
            groups.pruned = now;
        }
        groups.used.len()
    }

    /// Counts a request that left it unsent for another replica.
    pub fn failed_over(&self) {
        self.failovers.increment(1);
    }

    /// Counts a prediction check: 0 exact (in whole blocks), 1 over, 2 under.
    pub fn checked(&self, result: usize) {
        if let Some(counter) = self.checks.get(result) {
            counter.increment(1);
        }
    }

    /// Stops `task` when the replica is dropped.
    pub fn own(&self, task: tokio::task::AbortHandle) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task);
        }
    }

    /// Keeps `events` as its KV-cache event subscriber (the first one given).
    pub fn follow_events(&self, events: KvEventsHandle) {
        let _ = self.events.set(events);
    }

    /// Its KV-cache events, when it publishes them.
    pub fn events(&self) -> Option<&KvEventsHandle> {
        self.events.get()
    }

    /// Whether its last `/health` check failed.
    pub fn failed_health(&self) -> bool {
        self.unhealthy.load(Ordering::Acquire)
    }

    /// Asks `/health` every [`HEALTH_EVERY`]: no answer within the connect
    /// timeout plus one second, or a 5xx, takes the replica out of routing
    /// until an answer under 500 comes (an upstream without `/health`
    /// answers 404, and is healthy).
    /// Does nothing if it is watched already.
    pub fn watch_health(self: &Arc<Self>, connect_timeout: Duration) {
        if self.health_watched.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let authority = self.name.clone();
        let task = tokio::spawn(async move {
            // Replicas start presumed healthy (a failed connect says
            // otherwise at once); the first check is one period in.
            let first = tokio::time::Instant::now() + HEALTH_EVERY;
            let mut ticker = tokio::time::interval_at(first, HEALTH_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let limit = connect_timeout + Duration::from_secs(1);
                let answer = get_once(&authority, "/health", false);
                let healthy = matches!(
                    tokio::time::timeout(limit, answer).await,
                    Ok(Some((status, _))) if status.as_u16() < 500
                );
                let Some(replica) = weak.upgrade() else {
                    return;
                };
                let was = !replica.unhealthy.swap(!healthy, Ordering::AcqRel);
                if was != healthy {
                    if healthy {
                        tracing::info!(replica = %replica.name, "replica healthy again");
                    } else {
                        tracing::warn!(replica = %replica.name, "replica failed its /health check; no new requests go to it");
                    }
                }
            }
        });
        self.own(task.abort_handle());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

/// A request's place in its replica's in-flight count, given back on drop.
#[derive(Debug)]
pub struct Routed {
    replica: Arc<Replica>,
    group: u64,
    reason: RouteReason,
    held: Option<u32>,
}

impl Routed {
    /// The replica.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Why it was chosen.
    pub fn reason(&self) -> RouteReason {
        self.reason
    }

    /// The prompt tokens the replica's tracker held when routing asked it
    /// (`None` when routing did not ask).
    pub fn held(&self) -> Option<u32> {
        self.held
    }

    /// Records what routing found the replica to hold.
    pub(super) fn holding(mut self, held: Option<u32>) -> Self {
        self.held = held;
        self
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.group != 0 {
            let mut groups = self
                .replica
                .groups
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(used) = groups.used.get_mut(&self.group) {
                used.in_flight = used.in_flight.saturating_sub(1);
            }
        }
    }
}
