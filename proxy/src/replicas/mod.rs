//! The replicas behind the proxy: which engines there are, which are
//! healthy, and which one each admitted request goes to.
//!
//! - [`replica`]: one engine — its connections ([`crate::upstream`]), its
//!   `/health`, its scraped load ([`crate::scrape`]), its own prefix
//!   tracker, and its counters labelled `replica`.
//! - [`route`]: `--route prefix|least-loaded|round-robin`.
//! - [`kv`]: each replica's KV-cache events, found at its
//!   `/kv_event_sources` and mirrored into its tracker.
//! - [`discovery`]: `--upstream` URLs to addresses; host names are resolved
//!   again every `--resolve-interval`, so replicas behind a headless
//!   Service come and go.
//!
//! [`ReplicaSet`] holds the current list (replaced whole when discovery
//! changes it; requests keep the replica they were routed to). With one
//! replica nothing changes from a single upstream: its tracker is the
//! proxy's own and every request goes to it.
//!
//! A request is sent at most once: it moves to another replica only when
//! none of it can have reached the engine (the connect failed, or a new
//! connection closed before the request was written).

pub mod discovery;
pub mod kv;
pub mod replica;
pub mod route;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderValue;

pub use replica::{Replica, RouteReason, Routed};
pub use route::Query;

use crate::config::{KvEvents, RouteMode, UpstreamConfig};
use crate::error::ProxyError;
use crate::prefix::{Prediction, PrefixTracker};
use crate::scrape;

/// Where a replica is: dialled at `authority`, sent `host` as `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `ip:port` (or `host:port` when resolving is left to the connect).
    pub authority: String,
    /// The `Host` header, from the URL as configured.
    pub host: HeaderValue,
}

/// The replicas and how requests are spread over them.
#[derive(Debug)]
pub struct ReplicaSet {
    current: RwLock<Arc<[Arc<Replica>]>>,
    mode: RouteMode,
    turn: AtomicUsize,
    next_id: AtomicU32,
    config: UpstreamConfig,
    workers: usize,
    scrape_interval: Option<Duration>,
    /// The proxy's tracker: hashes prompts, and is the first replica's.
    hasher: Arc<PrefixTracker>,
}

impl ReplicaSet {
    /// The replicas at `addresses` (the first one's tracker is `hasher`),
    /// each scraped every `scrape_interval`; with several, each one's
    /// `/health` is watched. Must run inside a tokio runtime.
    pub fn new(
        addresses: Vec<Address>,
        config: &UpstreamConfig,
        workers: usize,
        scrape_interval: Option<Duration>,
        hasher: Arc<PrefixTracker>,
    ) -> Arc<Self> {
        let set = Arc::new(Self {
            current: RwLock::new(Arc::from(Vec::new())),
            mode: config.route,
            turn: AtomicUsize::new(0),
            next_id: AtomicU32::new(0),
            config: config.clone(),
            workers,
            scrape_interval,
            hasher,
        });
        set.replace(addresses);
        set
    }

    /// The replicas now.
    pub fn all(&self) -> Arc<[Arc<Replica>]> {
        self.current
            .read()
            .map(|r| Arc::clone(&r))
            .unwrap_or_else(|e| Arc::clone(&e.into_inner()))
    }

    /// The routing mode.
    pub fn mode(&self) -> RouteMode {
        self.mode
    }

    /// Makes `addresses` the replicas: ones already known keep their state
    /// (connections, tracker, counters), new ones start cold, and ones gone
    /// are dropped once their last request ends. An empty list is ignored
    /// (a failed resolution keeps what was known).
    pub fn replace(&self, addresses: Vec<Address>) {
        if addresses.is_empty() {
            return;
        }
        let before = self.all();
        if before.len() == addresses.len()
            && before
                .iter()
                .zip(&addresses)
                .all(|(r, a)| r.name == a.authority)
        {
            return;
        }
        let several = addresses.len() > 1;
        let replicas: Vec<Arc<Replica>> = addresses
            .into_iter()
            .map(|address| {
                before
                    .iter()
                    .find(|r| r.name == address.authority)
                    .cloned()
                    .unwrap_or_else(|| self.start_replica(address))
            })
            .collect();
        for replica in &replicas {
            if several {
                replica.watch_health(self.config.connect_timeout);
            }
        }
        let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        if !before.is_empty() {
            tracing::info!(replicas = ?names, "replicas changed");
        }
        let replicas: Arc<[Arc<Replica>]> = Arc::from(replicas);
        if let Ok(mut current) = self.current.write() {
            *current = replicas;
        }
    }

    fn start_replica(&self, address: Address) -> Arc<Replica> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = if id == 0 {
            Arc::clone(&self.hasher)
        } else {
            Arc::new(self.hasher.sibling())
        };
        let engine = scrape::start(
            &address.authority,
            &address.authority,
            self.scrape_interval,
            Arc::clone(&prefix),
        );
        let replica = Arc::new(Replica::new(
            id,
            address.authority,
            address.host,
            &self.config,
            self.workers,
            prefix,
            engine,
        ));
        if let (KvEvents::Auto, Some(interval)) = (self.config.kv_events, self.scrape_interval) {
            kv::discover(&replica, interval);
        }
        replica
    }

    /// Fails fast with 503 when no replica may take a request.
    pub fn check_up(&self) -> Result<(), ProxyError> {
        let all = self.all();
        if all.iter().any(|r| r.healthy()) {
            return Ok(());
        }
        Err(all_down(&all))
    }

    /// The replica for `query`, leaving out the ids in `tried`; 503 when
    /// none is healthy.
    pub fn choose(&self, query: Query<'_>, tried: &[u32]) -> Result<Routed, ProxyError> {
        let all = self.all();
        if let [only] = &*all {
            if tried.is_empty() {
                only.upstream.check_up()?;
                return Ok(only.take(RouteReason::RoundRobin));
            }
            return Err(all_down(&all));
        }
        let candidates: Vec<&Arc<Replica>> = all
            .iter()
            .filter(|r| !tried.contains(&r.id) && r.healthy())
            .collect();
        if candidates.is_empty() {
            return Err(all_down(&all));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let choice = route::choose(self.mode, &candidates, query, turn);
        let reason = if tried.is_empty() {
            choice.reason
        } else {
            RouteReason::Failover
        };
        let group = query.prediction.map_or(0, |p| p.prefix_group);
        Ok(choice
            .replica
            .take_group(reason, group)
            .holding(choice.held))
    }

    /// Each replica's predicted cached tokens for `prediction`, by id;
    /// empty with one replica.
    pub fn held_tokens(&self, prediction: &Prediction) -> Vec<(u32, u32)> {
        let all = self.all();
        if all.len() < 2 {
            return Vec::new();
        }
        all.iter()
            .map(|r| (r.id, r.prefix.held_tokens(prediction)))
            .collect()
    }

    /// Sets each replica's in-flight and health gauges (called when
    /// `/metrics` is scraped).
    pub fn sample(&self) {
        for replica in self.all().iter() {
            let name = replica.name.clone();
            metrics::gauge!(crate::telemetry::REPLICA_IN_FLIGHT, "replica" => name.clone())
                .set(f64::from(replica.in_flight()));
            metrics::gauge!(crate::telemetry::REPLICA_HEALTHY, "replica" => name)
                .set(if replica.healthy() { 1.0 } else { 0.0 });
        }
    }

    /// Waits until every replica's first scrape has been tried, at most `limit`.
    pub async fn first_scrapes(&self, limit: Duration) {
        let all = self.all();
        let waits = all.iter().map(|r| r.engine.first_attempt(limit));
        futures_util::future::join_all(waits).await;
    }
}

fn all_down(all: &[Arc<Replica>]) -> ProxyError {
    let upstream = match all {
        [only] => only.name.clone(),
        _ => format!("all {} replicas", all.len()),
    };
    ProxyError::UpstreamDown {
        upstream,
        retry_after: crate::upstream::PROBE_INTERVAL,
    }
}
