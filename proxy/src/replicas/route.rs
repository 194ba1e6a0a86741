//! Which replica an admitted request goes to (`--route`).
//!
//! - `prefix` (default): among the healthy replicas whose load is within a
//!   band of the least loaded ([`within_band`]), the one predicted to hold
//!   the most of the prompt, or computing its prefix group now (a request
//!   of the group is in flight there). A prefix no replica holds goes to
//!   the replica serving the fewest prefix groups lately, so shared prompts
//!   spread evenly and each cache holds its share; ties go to the least
//!   loaded, then to the group's rendezvous choice (highest
//!   `hash(group, replica name)`). The band keeps one popular prefix from
//!   piling onto one replica: past it, the prefix is warmed on a second one.
//! - `least-loaded`: the fewest requests in flight and waiting.
//! - `round-robin`: each healthy replica in turn.
//!
//! Load is [`Replica::load`]: requests in flight through this proxy, or the
//! engine's running and waiting requests if more.
//!
//! tower's `balance::p2c` was considered: it picks two replicas at random
//! and keeps the less loaded, which suits `least-loaded` but cannot weigh a
//! per-request prediction, and it drives `Service`s through `poll_ready`,
//! where Sluice's admission has already decided *when* and only *where* is
//! left. The choice here is a pure function of the replicas' state.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::replica::{Replica, RouteReason};
use crate::config::RouteMode;
use crate::prefix::Prediction;

/// The request, as routing sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<'a> {
    /// Its prefix prediction (completions and chat); `None` for other routes.
    pub prediction: Option<&'a Prediction>,
    /// The replica the admission policy named, if any.
    pub named: Option<u32>,
}

/// Where a request goes, and why.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The replica.
    pub replica: Arc<Replica>,
    /// Why it was chosen.
    pub reason: RouteReason,
    /// The prompt tokens it holds, when choosing asked its tracker (so the
    /// request's prediction need not ask again).
    pub held: Option<u32>,
}

impl Choice {
    fn of(replica: &Arc<Replica>, reason: RouteReason) -> Self {
        Self {
            replica: Arc::clone(replica),
            reason,
            held: None,
        }
    }
}

/// Picks a replica among `candidates` (healthy, not yet tried; never
/// empty) for `query`; `turn` is a counter for round-robin and ties.
pub fn choose(
    mode: RouteMode,
    candidates: &[&Arc<Replica>],
    query: Query<'_>,
    turn: usize,
) -> Choice {
    if let Some(named) = query.named
        && let Some(replica) = candidates.iter().find(|r| r.id == named)
    {
        return Choice::of(replica, RouteReason::Policy);
    }
    let rotate = |i: usize| candidates[(i + turn) % candidates.len()];
    match mode {
        RouteMode::RoundRobin => Choice::of(rotate(0), RouteReason::RoundRobin),
        RouteMode::LeastLoaded => {
            Choice::of(least_loaded(candidates, turn), RouteReason::LeastLoaded)
        }
        RouteMode::Prefix => by_prefix(candidates, query.prediction, turn),
    }
}

fn least_loaded<'a>(candidates: &[&'a Arc<Replica>], turn: usize) -> &'a Arc<Replica> {
    let n = candidates.len();
    (0..n)
        .map(|i| candidates[(i + turn) % n])
        .min_by_key(|r| r.load())
        .unwrap_or(candidates[0])
}

/// Whether a replica with `load` (and `waiting` requests queued in its
/// engine) may take a request for a prefix it holds, when the least loaded
/// replica has `least`: within half again the least plus [`BAND_QUEUED`]
/// while its engine queues requests, plus [`BAND_BATCHING`] while it does
/// not (a batching engine takes more requests at little cost, and sending
/// a prefix elsewhere warms it in a second cache, at the expense of the
/// prefixes that cache held).
pub fn within_band(load: u32, waiting: u32, least: u32) -> bool {
    let slack = if waiting > 0 {
        BAND_QUEUED
    } else {
        BAND_BATCHING
    };
    load <= least.saturating_add(least / 2).saturating_add(slack)
}

/// The band's slack over the least loaded while the engine queues requests.
pub const BAND_QUEUED: u32 = 2;

/// The band's slack while the engine runs everything it is sent.
pub const BAND_BATCHING: u32 = 32;

fn by_prefix(candidates: &[&Arc<Replica>], prediction: Option<&Prediction>, turn: usize) -> Choice {
    let Some(prediction) = prediction.filter(|p| p.prefix_group != 0) else {
        return Choice::of(least_loaded(candidates, turn), RouteReason::LeastLoaded);
    };
    let loads: Vec<u32> = candidates.iter().map(|r| r.load()).collect();
    let least = loads.iter().copied().min().unwrap_or(0);
    let in_band = || {
        candidates
            .iter()
            .zip(&loads)
            .filter(|&(r, &load)| within_band(load, r.engine.load().waiting, least))
    };
    // How much of the prompt each replica holds, and its warmth: what it
    // holds, or one token where its prefix group is being computed now.
    let warmth = |r: &Arc<Replica>| {
        let held = r.prefix.held_tokens(prediction);
        match held {
            0 if r.computing(prediction.prefix_group) => (held, 1),
            _ => (held, held),
        }
    };
    let warmest = in_band()
        .map(|(r, &load)| (r, warmth(r), load))
        .filter(|&(_, (_, warm), _)| warm > 0)
        // Warmest; then least loaded; then the lower id.
        .max_by_key(|&(r, (_, warm), load)| {
            (warm, std::cmp::Reverse(load), std::cmp::Reverse(r.id))
        });
    if let Some((replica, (held, _), _)) = warmest {
        return Choice {
            held: Some(held),
            ..Choice::of(replica, RouteReason::Prefix)
        };
    }
    // A prefix no replica holds or computes: the replica serving the fewest
    // shared prompts (so they spread evenly, and a replica's cache holds
    // its share), then the least loaded, then the prefix's rendezvous choice.
    let home = in_band().min_by_key(|&(r, &load)| {
        let weight = rendezvous(prediction.prefix_group, &r.name);
        (r.groups_served(), load, std::cmp::Reverse(weight))
    });
    match home {
        // No replica in the band holds any of it.
        Some((replica, _)) => Choice {
            held: Some(0),
            ..Choice::of(replica, RouteReason::Rendezvous)
        },
        None => Choice::of(least_loaded(candidates, turn), RouteReason::LeastLoaded),
    }
}

/// The rendezvous weight of `group` on the replica `name`: the same in
/// every proxy process (a fixed hash, no per-process key).
pub fn rendezvous(group: u64, name: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    group.hash(&mut hasher);
    name.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Prompt;
    use crate::prefix::PrefixTracker;
    use crate::replicas::replica::Routed;

    fn replica(id: u32) -> Arc<Replica> {
        let config = crate::cli::load(["proxy"]).unwrap().upstream;
        Arc::new(Replica::new(
            id,
            format!("10.0.0.{id}:8000"),
            http::HeaderValue::from_static("vllm"),
            &config,
            1,
            Arc::new(PrefixTracker::new(1024, 16)),
            Arc::default(),
        ))
    }

    fn prompt(ids: u32) -> Prompt {
        Prompt::Tokens(vec![(0..ids).collect()])
    }

    fn busy(replica: &Arc<Replica>, requests: usize) -> Vec<Routed> {
        (0..requests)
            .map(|_| replica.take(RouteReason::LeastLoaded))
            .collect()
    }

    #[test]
    fn the_replica_holding_the_prefix_wins_within_the_load_band() {
        let (a, b) = (replica(0), replica(1));
        let hasher = PrefixTracker::new(1024, 16);
        let prediction = hasher.lookup(&prompt(100));
        b.prefix.insert(&prediction.with_cached(0));
        let query = Query {
            prediction: Some(&prediction),
            named: None,
        };
        let Choice {
            replica: chosen,
            reason,
            ..
        } = choose(RouteMode::Prefix, &[&a, &b], query, 0);
        assert_eq!((chosen.id, reason), (1, RouteReason::Prefix));
        let held = b.prefix.held_tokens(&prediction);
        assert!(held > 0);
        assert_eq!(
            choose(RouteMode::Prefix, &[&a, &b], query, 0).held,
            Some(held)
        );
        // Busier, but within the band (its engine queues nothing): still b.
        let _held = busy(&b, 32);
        assert_eq!(choose(RouteMode::Prefix, &[&a, &b], query, 0).replica.id, 1);
        // Past the band: the prefix is warmed on a as well.
        let _more = busy(&b, 1);
        let Choice {
            replica: chosen,
            reason,
            ..
        } = choose(RouteMode::Prefix, &[&a, &b], query, 0);
        assert_eq!((chosen.id, reason), (0, RouteReason::Rendezvous));
        // And a's requests now count for the group: the next goes there too.
        let _on_a = a.take_group(RouteReason::Rendezvous, prediction.prefix_group);
        let _held_more = busy(&b, 2);
        let Choice {
            replica: chosen,
            reason,
            ..
        } = choose(RouteMode::Prefix, &[&a, &b], query, 0);
        assert_eq!((chosen.id, reason), (0, RouteReason::Prefix));
        // Computing it there is not holding it yet.
        assert_eq!(choose(RouteMode::Prefix, &[&a, &b], query, 0).held, Some(0));
    }

    #[test]
    fn a_new_prefix_goes_to_the_replica_serving_fewest_prefixes() {
        let (a, b) = (replica(0), replica(1));
        let hasher = PrefixTracker::new(1024, 16);
        let _other = a.take_group(RouteReason::Rendezvous, 42);
        let prediction = hasher.lookup(&prompt(64));
        let query = Query {
            prediction: Some(&prediction),
            named: None,
        };
        assert_eq!(a.groups_served(), 1);
        let Choice {
            replica: chosen,
            reason,
            ..
        } = choose(RouteMode::Prefix, &[&a, &b], query, 0);
        assert_eq!((chosen.id, reason), (1, RouteReason::Rendezvous));
    }

    #[test]
    fn a_new_prefix_goes_to_the_same_replica_from_any_turn() {
        let replicas: Vec<Arc<Replica>> = (0..4).map(replica).collect();
        let all: Vec<&Arc<Replica>> = replicas.iter().collect();
        let hasher = PrefixTracker::new(1024, 16);
        let prediction = hasher.lookup(&prompt(64));
        let query = Query {
            prediction: Some(&prediction),
            named: None,
        };
        let first = choose(RouteMode::Prefix, &all, query, 0);
        assert_eq!(first.held, Some(0), "a new prefix is held nowhere");
        assert_eq!(first.reason, RouteReason::Rendezvous);
        for turn in 1..8 {
            assert_eq!(
                choose(RouteMode::Prefix, &all, query, turn).replica.id,
                first.replica.id
            );
        }
        // Short prompts have no prefix group: least loaded.
        let short = hasher.lookup(&prompt(3));
        let query = Query {
            prediction: Some(&short),
            named: None,
        };
        assert_eq!(
            choose(RouteMode::Prefix, &all, query, 0).reason,
            RouteReason::LeastLoaded
        );
    }

    #[test]
    fn least_loaded_round_robin_and_a_named_replica() {
        let (a, b) = (replica(0), replica(1));
        let _held = busy(&a, 1);
        let none = Query::default();
        assert_eq!(
            choose(RouteMode::LeastLoaded, &[&a, &b], none, 0)
                .replica
                .id,
            1
        );
        assert_eq!(
            choose(RouteMode::RoundRobin, &[&a, &b], none, 0).replica.id,
            0
        );
        assert_eq!(
            choose(RouteMode::RoundRobin, &[&a, &b], none, 1).replica.id,
            1
        );
        let named = Query {
            prediction: None,
            named: Some(0),
        };
        let Choice {
            replica: chosen,
            reason,
            ..
        } = choose(RouteMode::LeastLoaded, &[&a, &b], named, 0);
        assert_eq!((chosen.id, reason), (0, RouteReason::Policy));
        // A named replica that is not a candidate (down, tried) is ignored.
        let gone = Query {
            prediction: None,
            named: Some(7),
        };
        assert_eq!(
            choose(RouteMode::LeastLoaded, &[&a, &b], gone, 0).reason,
            RouteReason::LeastLoaded
        );
    }

    #[test]
    fn the_band_is_narrow_only_while_the_engine_queues() {
        assert!(within_band(32, 0, 0) && !within_band(33, 0, 0));
        assert!(within_band(47, 0, 10) && !within_band(48, 0, 10));
        assert!(within_band(17, 3, 10) && !within_band(18, 3, 10));
    }
}
