//! The concurrency limiter, in plain Rust: no bindings, no clock.
//!
//! [`Limiter`] admits queued requests while fewer than `limit` are in
//! flight. What goes next is [`FairQueue`]'s order: higher priority first,
//! then tenants taking turns by weight, first in, first out within a
//! tenant. With `reserve=N`, the last N slots are kept for requests of
//! priority ≥ `reserve_priority`, so a backlog can never fill the engine
//! ahead of live traffic. With [`Key::Tenant`] every tenant has its own
//! limit (and its own reserve): a tenant at its limit waits without
//! holding up the others.
//!
//! The host may swap in a new instance while requests are in flight (hot
//! reload). Those requests are unknown here, but the host's
//! [`Snapshot::in_flight`] counts them: under [`Key::Global`] they hold
//! slots until they complete, so the limit holds across a reload. Under
//! [`Key::Tenant`] their tenants are unknown and they are not counted.
//!
//! # Replicas
//!
//! When the snapshot lists upstream replicas, `limit` applies to each
//! replica instead of to the whole proxy (and `reserve` to each replica's
//! slots): a request is admitted only to a healthy replica with fewer than
//! its slots in flight, and the decision names that replica. Among the
//! replicas with room, the one predicted to hold most of the request's
//! prompt in its prefix cache wins, then the one with fewest in flight,
//! then the lowest id. A replica's count is the larger of the host's
//! (`replica.in_flight`, which also counts requests this instance did not
//! admit) and this instance's own (which already counts what it admitted a
//! moment ago, before the host could forward it). Under `key=tenant` each
//! tenant's own limit still applies too. With no replicas in the snapshot
//! nothing of this applies: one limit for the proxy, as above.
//!
//! The limiter asks for a tick only while requests wait and every replica
//! is unhealthy (no completion would wake it when one recovers); otherwise
//! only a completion frees a slot.

use std::cmp::Reverse;
use std::rc::Rc;

use sluice_policy_sdk::{
    self as sdk, Completion, ConfigError, Decision, FairQueue, FastMap, Policy, Queued, Replica,
    Request, Snapshot,
};

/// How soon to look again while requests wait and no replica is healthy (µs).
pub const UNHEALTHY_RECHECK_US: u64 = 100_000;

use crate::config::{Config, Key};

/// The `concurrency` policy's state between events.
#[derive(Debug)]
pub struct Limiter {
    config: Config,
    /// Requests waiting, in admission order.
    queue: FairQueue,
    /// Requests this instance admitted that have not completed, with the
    /// key whose slot each holds.
    in_flight: FastMap<u64, Rc<str>>,
    /// Per key (the tenant, or `""` under [`Key::Global`]): requests of
    /// that key admitted and not completed. A key at zero is removed, so
    /// the map stays as small as the set of busy tenants.
    running: FastMap<Rc<str>, u32>,
    /// Requests the host had in flight that this instance did not admit
    /// (admitted before a hot reload).
    inherited: sdk::Inherited,
    /// Admitted requests this instance placed on a replica, with the replica.
    placed: FastMap<u64, u32>,
    /// Per replica: requests this instance placed there that have not
    /// completed. A replica at zero is removed.
    on_replica: FastMap<u32, u32>,
    /// Host contract violations seen since the last [`Limiter::take_warnings`].
    warnings: Vec<String>,
}

impl Limiter {
    /// A limiter with nothing queued and nothing in flight.
    pub fn new(config: Config) -> Self {
        Limiter {
            queue: FairQueue::new(config.weights.clone()),
            config,
            in_flight: FastMap::default(),
            running: FastMap::default(),
            inherited: sdk::Inherited::default(),
            placed: FastMap::default(),
            on_replica: FastMap::default(),
            warnings: Vec::new(),
        }
    }

    /// The configuration this limiter runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many requests are waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// How many requests this instance admitted that have not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Learns from a snapshot how many in-flight requests this instance did
    /// not admit. Only ever lowers the count after the first look, so a host
    /// that under-reports cannot hold slots forever.
    fn observe(&mut self, now: Snapshot) {
        let own = u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX);
        self.inherited.observe(now, own);
    }

    /// The key whose slot `queued` would take.
    fn key_of<'q>(&self, queued: &'q Queued) -> &'q str {
        match self.config.key {
            Key::Global => "",
            Key::Tenant => &queued.tenant,
        }
    }

    /// Admits, in queue order, every request whose key has a slot for its
    /// priority (one upstream: no replicas in the snapshot).
    fn admit(&mut self, decision: &mut Decision) {
        let held = match self.config.key {
            Key::Global => self.inherited.count(),
            Key::Tenant => 0,
        };
        loop {
            let (config, running) = (&self.config, &self.running);
            let has_slot = |q: &Queued| {
                let key = match config.key {
                    Key::Global => "",
                    Key::Tenant => &*q.tenant,
                };
                let busy = running.get(key).copied().unwrap_or(0);
                busy.saturating_add(held) < config.slots_for(q.priority)
            };
            let Some(queued) = self.queue.pop_where(has_slot) else {
                break;
            };
            let key = self.key_of(&queued);
            let shared: Rc<str> = match self.running.get_key_value(key) {
                Some((shared, _)) => Rc::clone(shared),
                None => Rc::from(key),
            };
            *self.running.entry(Rc::clone(&shared)).or_default() += 1;
            self.in_flight.insert(queued.id, shared);
            decision.admit.push(queued.id);
        }
    }

    /// Admits, in queue order, every request that has a healthy replica
    /// with a slot for its priority (and, under `key=tenant`, a slot of its
    /// tenant), each to the replica [`Limiter::place`] picks.
    fn admit_to_replicas(&mut self, replicas: &[Replica], decision: &mut Decision) {
        loop {
            let (config, running, own) = (&self.config, &self.running, &self.on_replica);
            let has_slot = |q: &Queued| {
                let slots = config.slots_for(q.priority);
                let tenant_ok = match config.key {
                    Key::Global => true,
                    Key::Tenant => running.get(&*q.tenant).copied().unwrap_or(0) < slots,
                };
                tenant_ok && place(replicas, own, q, slots).is_some()
            };
            let Some(queued) = self.queue.pop_where(has_slot) else {
                break;
            };
            let slots = self.config.slots_for(queued.priority);
            let Some(replica) = place(replicas, &self.on_replica, &queued, slots) else {
                break; // just checked by `has_slot`; unreachable
            };
            let key = self.key_of(&queued);
            let shared: Rc<str> = match self.running.get_key_value(key) {
                Some((shared, _)) => Rc::clone(shared),
                None => Rc::from(key),
            };
            *self.running.entry(Rc::clone(&shared)).or_default() += 1;
            self.in_flight.insert(queued.id, shared);
            *self.on_replica.entry(replica).or_default() += 1;
            self.placed.insert(queued.id, replica);
            decision.admit.push(queued.id);
            decision.placements.push((queued.id, replica));
        }
        if !self.queue.is_empty() && !replicas.iter().any(|r| r.healthy) {
            decision.wake_after_us = Some(UNHEALTHY_RECHECK_US);
        }
    }

    /// Frees the slot of admitted request `id`; false when it is not ours.
    fn release(&mut self, id: u64) -> bool {
        let Some(key) = self.in_flight.remove(&id) else {
            return false;
        };
        if let Some(replica) = self.placed.remove(&id)
            && let Some(busy) = self.on_replica.get_mut(&replica)
        {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.on_replica.remove(&replica);
            }
        }
        if let Some(busy) = self.running.get_mut(&key) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.running.remove(&key);
            }
        }
        true
    }

    fn decide(&mut self, now: Snapshot<'_>) -> Decision {
        let mut decision = Decision::default();
        if now.replicas.is_empty() {
            self.admit(&mut decision);
        } else {
            self.admit_to_replicas(now.replicas, &mut decision);
        }
        decision
    }
}

/// The replica for `queued` among those with fewer than `slots` in flight
/// (the larger of the host's count and this instance's, `own`): healthy,
/// most predicted cached tokens, then fewest in flight, then lowest id.
fn place(
    replicas: &[Replica],
    own: &FastMap<u32, u32>,
    queued: &Queued,
    slots: u32,
) -> Option<u32> {
    replicas
        .iter()
        .filter(|r| r.healthy)
        .map(|r| (r.id, r.in_flight.max(own.get(&r.id).copied().unwrap_or(0))))
        .filter(|&(_, busy)| busy < slots)
        .max_by_key(|&(id, busy)| (queued.cached_on(id), Reverse(busy), Reverse(id)))
        .map(|(id, _)| id)
}

impl Policy for Limiter {
    fn init(config: &sdk::Config) -> Result<Self, ConfigError> {
        Config::read(config).map(Limiter::new)
    }

    /// The configuration, e.g. `concurrency: limit=10 key=global`.
    fn describe(&self) -> String {
        self.config.to_string()
    }

    /// Request `req.id` joined the queue.
    fn on_arrival(&mut self, now: Snapshot, req: &Request) -> Decision {
        self.observe(now);
        let id = req.id;
        if self.in_flight.contains_key(&id) || !self.queue.push(req) {
            self.warnings.push(format!(
                "concurrency: duplicate arrival of request {id} ignored"
            ));
        }
        self.decide(now)
    }

    /// An admitted request finished, successfully or not: its slot is free.
    fn on_completion(&mut self, now: Snapshot, done: Completion) -> Decision {
        // The snapshot is not read here: whether its `in_flight` still counts
        // the request completing is the host's choice.
        let _ = now;
        let id = done.id;
        if self.release(id) {
            // The usual case.
        } else if self.queue.remove(id).is_some() {
            self.warnings.push(format!(
                "concurrency: completion of request {id}, which was never admitted; dropped from the queue"
            ));
        } else {
            if !self.inherited.completed() {
                self.warnings.push(format!(
                    "concurrency: completion of unknown request {id} ignored"
                ));
            }
        }
        self.decide(now)
    }

    /// A queued request left without being admitted; it is never admitted
    /// afterwards.
    fn on_cancel(&mut self, now: Snapshot, id: u64) -> Decision {
        self.observe(now);
        if self.queue.remove(id).is_some() {
            // The usual case.
        } else if self.release(id) {
            // The host promises a completion, not a cancel, for admitted
            // requests; free the slot so that it cannot leak.
            self.warnings.push(format!(
                "concurrency: cancel of admitted request {id}; counted as completed"
            ));
        } else {
            self.warnings.push(format!(
                "concurrency: cancel of unknown request {id} ignored"
            ));
        }
        self.decide(now)
    }

    /// A tick: nothing is timed here, but the snapshot may show that
    /// inherited requests have finished.
    fn on_tick(&mut self, now: Snapshot) -> Decision {
        self.observe(now);
        self.decide(now)
    }

    /// Messages about events that broke the host contract (an unknown id, a
    /// duplicate arrival), for the host's log. Drains them.
    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limit: u32, key: Key) -> Config {
        Config {
            limit,
            key,
            ..Config::default()
        }
    }

    /// A snapshot whose `in_flight` agrees with the limiter's own count.
    fn snap(l: &Limiter) -> Snapshot<'static> {
        Snapshot::at(0).with_in_flight(l.in_flight() as u32)
    }

    /// Request `id` from `tenant`.
    fn arrival(id: u64, tenant: &str) -> Request {
        Request {
            tenant: tenant.to_owned(),
            ..Request::new(id)
        }
    }

    fn arrive(l: &mut Limiter, id: u64, tenant: &str) -> Vec<u64> {
        let now = snap(l);
        let d = l.on_arrival(now, &arrival(id, tenant));
        assert_eq!(d.wake_after_us, None);
        assert!(d.reject.is_empty());
        d.admit
    }

    fn complete(l: &mut Limiter, id: u64) -> Vec<u64> {
        let now = snap(l);
        l.on_completion(now, Completion::new(id)).admit
    }

    fn cancel(l: &mut Limiter, id: u64) -> Vec<u64> {
        let now = snap(l);
        l.on_cancel(now, id).admit
    }

    fn with_in_flight(in_flight: u32) -> Snapshot<'static> {
        Snapshot::at(0).with_in_flight(in_flight)
    }

    #[test]
    fn init_reads_the_config_and_describes_it() {
        let l = sdk::Config::parse([("key", "tenant")], Limiter::init).unwrap();
        assert_eq!(l.describe(), "concurrency: limit=10 key=tenant");
        let err = sdk::Config::parse([("max_batch", "8")], Limiter::init).unwrap_err();
        assert!(err.to_string().starts_with("unknown key `max_batch`"));
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_in_order() {
        let mut l = Limiter::new(config(2, Key::Global));
        assert_eq!(arrive(&mut l, 1, "a"), [1]);
        assert_eq!(arrive(&mut l, 2, "b"), [2]);
        assert_eq!(arrive(&mut l, 3, "a"), [] as [u64; 0]);
        assert_eq!(arrive(&mut l, 4, "c"), [] as [u64; 0]);
        assert_eq!((l.in_flight(), l.queued()), (2, 2));
        // Any completion frees the one shared slot for the oldest waiter.
        assert_eq!(complete(&mut l, 2), [3]);
        assert_eq!(complete(&mut l, 1), [4]);
        assert_eq!(complete(&mut l, 3), [] as [u64; 0]);
        assert_eq!(complete(&mut l, 4), [] as [u64; 0]);
        assert_eq!((l.in_flight(), l.queued()), (0, 0));
        assert!(l.running.is_empty());
        assert!(l.take_warnings().is_empty());
    }

    #[test]
    fn the_default_limit_is_ten() {
        let mut l = Limiter::new(Config::default());
        for id in 1..=10 {
            assert_eq!(arrive(&mut l, id, ""), [id]);
        }
        assert!(arrive(&mut l, 11, "").is_empty());
    }

    #[test]
    fn a_cancelled_request_is_never_admitted() {
        let mut l = Limiter::new(config(1, Key::Global));
        arrive(&mut l, 1, "");
        arrive(&mut l, 2, "");
        arrive(&mut l, 3, "");
        assert!(cancel(&mut l, 2).is_empty());
        assert_eq!(l.queued(), 1);
        assert_eq!(complete(&mut l, 1), [3]);
        assert!(complete(&mut l, 3).is_empty());
        assert!(l.take_warnings().is_empty());
    }

    #[test]
    fn a_cancel_does_not_free_a_slot() {
        let mut l = Limiter::new(config(1, Key::Global));
        arrive(&mut l, 1, "");
        arrive(&mut l, 2, "");
        arrive(&mut l, 3, "");
        assert!(cancel(&mut l, 3).is_empty());
        assert!(cancel(&mut l, 2).is_empty());
        assert_eq!((l.in_flight(), l.queued()), (1, 0));
    }

    #[test]
    fn per_tenant_limits_are_independent() {
        let mut l = Limiter::new(config(1, Key::Tenant));
        assert_eq!(arrive(&mut l, 1, "a"), [1]);
        assert!(arrive(&mut l, 2, "a").is_empty());
        // Tenant a is at its limit; b is not held up behind it.
        assert_eq!(arrive(&mut l, 3, "b"), [3]);
        assert!(arrive(&mut l, 4, "a").is_empty());
        assert!(arrive(&mut l, 5, "b").is_empty());
        assert_eq!(arrive(&mut l, 6, "c"), [6]);
        // A completion frees its own tenant's slot, FIFO within the tenant.
        assert_eq!(complete(&mut l, 3), [5]);
        assert_eq!(complete(&mut l, 1), [2]);
        assert_eq!(complete(&mut l, 2), [4]);
        assert!(complete(&mut l, 6).is_empty());
        assert_eq!(l.running.len(), 2);
        complete(&mut l, 4);
        complete(&mut l, 5);
        assert!(l.running.is_empty());
    }

    #[test]
    fn the_empty_tenant_is_a_tenant_like_any_other() {
        let mut l = Limiter::new(config(1, Key::Tenant));
        assert_eq!(arrive(&mut l, 1, ""), [1]);
        assert!(arrive(&mut l, 2, "").is_empty());
        assert_eq!(arrive(&mut l, 3, "x"), [3]);
    }

    #[test]
    fn the_global_key_ignores_tenants() {
        let mut l = Limiter::new(config(1, Key::Global));
        assert_eq!(arrive(&mut l, 1, "a"), [1]);
        assert!(arrive(&mut l, 2, "b").is_empty());
    }

    #[test]
    fn cancelling_a_tenants_only_waiter_forgets_the_tenant() {
        let mut l = Limiter::new(config(1, Key::Tenant));
        arrive(&mut l, 1, "a");
        arrive(&mut l, 2, "b");
        arrive(&mut l, 3, "b");
        assert!(cancel(&mut l, 3).is_empty());
        complete(&mut l, 2);
        assert_eq!(l.running.len(), 1);
        assert!(l.running.contains_key("a"));
        assert!(l.queue.is_empty());
    }

    #[test]
    fn unknown_ids_and_duplicates_are_ignored_with_a_warning() {
        let mut l = Limiter::new(config(1, Key::Global));
        assert_eq!(arrive(&mut l, 1, ""), [1]);
        assert!(arrive(&mut l, 1, "").is_empty());
        arrive(&mut l, 2, "");
        assert!(arrive(&mut l, 2, "").is_empty());
        assert!(cancel(&mut l, 99).is_empty());
        assert!(complete(&mut l, 98).is_empty());
        assert_eq!(l.take_warnings().len(), 4);
        assert_eq!((l.in_flight(), l.queued()), (1, 1));
        assert_eq!(complete(&mut l, 1), [2]);
    }

    #[test]
    fn a_completion_of_a_queued_request_drops_it() {
        let mut l = Limiter::new(config(1, Key::Global));
        arrive(&mut l, 1, "");
        arrive(&mut l, 2, "");
        assert!(complete(&mut l, 2).is_empty());
        assert_eq!(l.queued(), 0);
        assert_eq!(l.take_warnings().len(), 1);
    }

    #[test]
    fn a_cancel_of_an_admitted_request_frees_its_slot() {
        let mut l = Limiter::new(config(1, Key::Tenant));
        arrive(&mut l, 1, "a");
        arrive(&mut l, 2, "a");
        assert_eq!(cancel(&mut l, 1), [2]);
        assert_eq!(l.take_warnings().len(), 1);
    }

    #[test]
    fn after_a_reload_inherited_requests_hold_global_slots() {
        let mut l = Limiter::new(config(2, Key::Global));
        // The host replays its queue while 3 requests of the old instance run.
        assert!(
            l.on_arrival(with_in_flight(3), &arrival(10, ""))
                .admit
                .is_empty()
        );
        assert!(
            l.on_arrival(with_in_flight(3), &arrival(11, ""))
                .admit
                .is_empty()
        );
        assert!(
            l.on_completion(with_in_flight(3), Completion::new(1))
                .admit
                .is_empty()
        );
        assert_eq!(
            l.on_completion(with_in_flight(2), Completion::new(2)).admit,
            [10]
        );
        assert_eq!(
            l.on_completion(with_in_flight(2), Completion::new(3)).admit,
            [11]
        );
        assert!(l.take_warnings().is_empty());
    }

    #[test]
    fn the_inherited_count_follows_the_host_downwards_only() {
        let mut l = Limiter::new(config(2, Key::Global));
        assert!(
            l.on_arrival(with_in_flight(4), &arrival(10, ""))
                .admit
                .is_empty()
        );
        // The host's count is the truth: the old requests are gone.
        assert_eq!(l.on_tick(with_in_flight(0)).admit, [10]);
        // A higher report later does not bring them back.
        assert_eq!(
            l.on_arrival(with_in_flight(5), &arrival(11, "")).admit,
            [11]
        );
    }

    #[test]
    fn per_tenant_limits_ignore_inherited_requests() {
        let mut l = Limiter::new(config(1, Key::Tenant));
        assert_eq!(
            l.on_arrival(with_in_flight(9), &arrival(10, "a")).admit,
            [10]
        );
        // Their completions are still expected, not warnings.
        assert!(
            l.on_completion(with_in_flight(9), Completion::new(1))
                .admit
                .is_empty()
        );
        assert!(l.take_warnings().is_empty());
    }

    fn request(id: u64, tenant: &str, priority: i32) -> Request {
        Request {
            tenant: tenant.to_owned(),
            priority,
            ..Request::new(id)
        }
    }

    fn arrive_with(l: &mut Limiter, id: u64, tenant: &str, priority: i32) -> Vec<u64> {
        let now = snap(l);
        l.on_arrival(now, &request(id, tenant, priority)).admit
    }

    #[test]
    fn a_higher_priority_is_admitted_next_even_behind_a_backlog() {
        let mut l = Limiter::new(config(1, Key::Global));
        assert_eq!(arrive(&mut l, 1, ""), [1]);
        for id in 2..=101 {
            assert!(arrive(&mut l, id, "").is_empty());
        }
        assert!(arrive_with(&mut l, 500, "", 10).is_empty());
        assert_eq!(complete(&mut l, 1), [500]);
        assert_eq!(complete(&mut l, 500), [2]);
    }

    #[test]
    fn reserved_slots_go_only_to_high_priority() {
        let mut l = Limiter::new(Config {
            reserve: sdk::Reserve {
                slots: 2,
                priority: 1,
            },
            ..config(4, Key::Global)
        });
        // A backlog fills the two unreserved slots and waits.
        for id in 1..=10 {
            let admitted = arrive(&mut l, id, "batch");
            assert_eq!(admitted.is_empty(), id > 2, "{id}");
        }
        // Live requests still find room, at once.
        assert_eq!(arrive_with(&mut l, 100, "live", 1), [100]);
        assert_eq!(arrive_with(&mut l, 101, "live", 5), [101]);
        assert!(arrive_with(&mut l, 102, "live", 1).is_empty());
        // A freed slot goes to the waiting live request first; the backlog
        // gets one only while fewer than limit - reserve are in flight.
        assert_eq!(complete(&mut l, 100), [102]);
        assert!(complete(&mut l, 1).is_empty());
        assert!(complete(&mut l, 101).is_empty());
        assert_eq!(complete(&mut l, 102), [3]);
        assert_eq!(l.in_flight(), 2);
    }

    #[test]
    fn a_tenants_burst_shares_the_slots_with_anothers_trickle() {
        let mut l = Limiter::new(config(1, Key::Global));
        arrive(&mut l, 0, "burst");
        for id in 1..=50 {
            arrive(&mut l, id, "burst");
        }
        arrive(&mut l, 100, "trickle");
        arrive(&mut l, 101, "trickle");
        // Turns alternate, so the trickle waits one turn, not fifty.
        let mut order = Vec::new();
        let mut running = 0;
        for _ in 0..6 {
            let next = complete(&mut l, running);
            running = next[0];
            order.push(running);
        }
        assert_eq!(order, [1, 100, 2, 101, 3, 4]);
    }

    #[test]
    fn weights_set_the_shares() {
        let mut l = Limiter::new(Config {
            weights: sdk::Weights::parse("live:3").unwrap(),
            ..config(1, Key::Global)
        });
        arrive(&mut l, 0, "batch");
        for id in 1..=20 {
            arrive(&mut l, id, "batch");
            arrive(&mut l, 100 + id, "live");
        }
        let (mut running, mut live) = (0, 0);
        for _ in 0..20 {
            running = complete(&mut l, running)[0];
            live += usize::from(running >= 100);
        }
        assert_eq!(live, 15, "3 turns of 4 go to the tenant of weight 3");
    }

    /// A deterministic xorshift generator, enough to shuffle events.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random arrivals, cancels and completions against the host's rules:
    /// every admission names a queued id once; no key exceeds its limit;
    /// each tenant is FIFO; and the limiter is work-conserving (after every
    /// event, a key with waiters is at its limit).
    #[test]
    fn random_events_keep_the_contract() {
        const TENANTS: [&str; 4] = ["", "a", "b", "c"];
        for seed in 1..=40u64 {
            for key in [Key::Global, Key::Tenant] {
                let limit = 1 + (seed % 5) as u32;
                let mut l = Limiter::new(config(limit, key));
                let mut rng = Rng(seed * 104_729);
                let mut next_id = 1u64;
                // (id, key) in arrival order.
                let mut queued: Vec<(u64, &str)> = Vec::new();
                let mut running: Vec<(u64, &str)> = Vec::new();
                let mut tenant_of = std::collections::HashMap::new();
                let key_of = |tenant: &'static str| match key {
                    Key::Global => "",
                    Key::Tenant => tenant,
                };
                for step in 0..600 {
                    let now = Snapshot::at(step).with_in_flight(running.len() as u32);
                    let d = match rng.below(10) {
                        0..=4 if step < 450 => {
                            let tenant = TENANTS[rng.below(4) as usize];
                            queued.push((next_id, key_of(tenant)));
                            tenant_of.insert(next_id, tenant);
                            next_id += 1;
                            l.on_arrival(now, &arrival(next_id - 1, tenant))
                        }
                        5 if !queued.is_empty() => {
                            let (id, _) = queued.remove(rng.below(queued.len() as u64) as usize);
                            l.on_cancel(now, id)
                        }
                        _ if !running.is_empty() => {
                            let (id, _) = running.remove(rng.below(running.len() as u64) as usize);
                            l.on_completion(now, Completion::new(id))
                        }
                        _ => l.on_tick(now),
                    };
                    assert_eq!(d.wake_after_us, None);
                    for id in d.admit {
                        let pos = queued
                            .iter()
                            .position(|&(q, _)| q == id)
                            .unwrap_or_else(|| panic!("seed {seed}: {id} is not queued"));
                        let (_, k) = queued.remove(pos);
                        let tenant = tenant_of[&id];
                        assert!(
                            queued[..pos].iter().all(|&(q, _)| tenant_of[&q] != tenant),
                            "seed {seed}: {id} overtook an older request of its tenant"
                        );
                        running.push((id, k));
                    }
                    for k in TENANTS.map(key_of) {
                        let running = running.iter().filter(|&&(_, r)| r == k).count();
                        let waiting = queued.iter().any(|&(_, q)| q == k);
                        assert!(running <= limit as usize, "seed {seed}: over the limit");
                        assert!(
                            !waiting || running == limit as usize,
                            "seed {seed}: {k:?} waits with a free slot"
                        );
                    }
                }
                while let Some((id, _)) = running.pop() {
                    let now = Snapshot::at(0).with_in_flight(running.len() as u32 + 1);
                    for id in l.on_completion(now, Completion::new(id)).admit {
                        let pos = queued.iter().position(|&(q, _)| q == id).unwrap();
                        running.push(queued.remove(pos));
                    }
                }
                assert!(queued.is_empty(), "seed {seed}: stuck");
                assert!(l.running.is_empty() && l.queue.is_empty() && l.in_flight.is_empty());
                assert!(l.take_warnings().is_empty(), "seed {seed}");
            }
        }
    }

    /// Request `id` with `cached` tokens predicted per replica.
    fn cached(id: u64, cached: &[(u32, u32)]) -> Request {
        Request {
            cached_by_replica: cached.to_vec(),
            ..Request::new(id)
        }
    }

    /// Delivers `req` with `replicas`; returns (id, replica) per admission.
    fn arrive_at(l: &mut Limiter, replicas: &[Replica], req: &Request) -> Vec<(u64, u32)> {
        let now = snap(l).with_replicas(replicas);
        placed(l.on_arrival(now, req))
    }

    fn complete_at(l: &mut Limiter, replicas: &[Replica], id: u64) -> Vec<(u64, u32)> {
        let now = snap(l).with_replicas(replicas);
        placed(l.on_completion(now, Completion::new(id)))
    }

    /// Every admission of `d` with its replica; each must name one.
    fn placed(d: Decision) -> Vec<(u64, u32)> {
        d.admit
            .iter()
            .map(|&id| (id, d.replica_of(id).expect("a replica is named")))
            .collect()
    }

    #[test]
    fn with_replicas_the_limit_applies_to_each() {
        let mut l = Limiter::new(config(1, Key::Global));
        let replicas = [Replica::new(1), Replica::new(2)];
        // Ties go to the lowest id; the next request to the other replica.
        assert_eq!(arrive_at(&mut l, &replicas, &Request::new(1)), [(1, 1)]);
        assert_eq!(arrive_at(&mut l, &replicas, &Request::new(2)), [(2, 2)]);
        assert!(arrive_at(&mut l, &replicas, &Request::new(3)).is_empty());
        // A completion frees its replica's slot.
        assert_eq!(complete_at(&mut l, &replicas, 2), [(3, 2)]);
        assert_eq!(complete_at(&mut l, &replicas, 1), []);
        assert_eq!(complete_at(&mut l, &replicas, 3), []);
        assert!(l.on_replica.is_empty() && l.placed.is_empty());
        assert!(l.take_warnings().is_empty());
    }

    #[test]
    fn the_replica_with_most_cached_tokens_wins_then_the_least_busy() {
        let mut l = Limiter::new(config(2, Key::Global));
        let replicas = [
            Replica::new(1).with_in_flight(1),
            Replica::new(2),
            Replica::new(3),
        ];
        // The cache beats load: replica 1 is the busiest but holds the prefix.
        let warm = cached(1, &[(1, 300), (3, 100)]);
        assert_eq!(arrive_at(&mut l, &replicas, &warm), [(1, 1)]);
        // No prediction: the least busy, then the lowest id.
        assert_eq!(arrive_at(&mut l, &replicas, &Request::new(2)), [(2, 2)]);
        assert_eq!(arrive_at(&mut l, &replicas, &Request::new(3)), [(3, 3)]);
        // Once the host counts 2 on replica 1, it is full: the next best cache.
        let replicas = [
            Replica::new(1).with_in_flight(2),
            Replica::new(2).with_in_flight(1),
            Replica::new(3).with_in_flight(1),
        ];
        let warm = cached(4, &[(1, 300), (3, 100)]);
        assert_eq!(arrive_at(&mut l, &replicas, &warm), [(4, 3)]);
    }

    #[test]
    fn the_hosts_count_holds_slots_ours_counts_what_it_cannot_see_yet() {
        let mut l = Limiter::new(config(2, Key::Global));
        // Requests this instance never admitted fill replica 1.
        let replicas = [Replica::new(1).with_in_flight(2), Replica::new(2)];
        assert_eq!(
            arrive_at(&mut l, &replicas, &cached(1, &[(1, 50)])),
            [(1, 2)]
        );
        // The host does not show 1 on replica 2 yet; ours does.
        assert_eq!(arrive_at(&mut l, &replicas, &Request::new(2)), [(2, 2)]);
        assert!(arrive_at(&mut l, &replicas, &Request::new(3)).is_empty());
        // Replica 1's requests finish (the host's count drops): 3 goes there.
        let replicas = [Replica::new(1), Replica::new(2).with_in_flight(2)];
        let now = snap(&l).with_replicas(&replicas);
        assert_eq!(placed(l.on_tick(now)), [(3, 1)]);
    }

    #[test]
    fn an_unhealthy_replica_gets_nothing() {
        let mut l = Limiter::new(config(1, Key::Global));
        let replicas = [Replica::new(1).unhealthy(), Replica::new(2)];
        let warm = cached(1, &[(1, 999)]);
        assert_eq!(arrive_at(&mut l, &replicas, &warm), [(1, 2)]);
        let now = snap(&l).with_replicas(&replicas);
        let d = l.on_arrival(now, &Request::new(2));
        assert!(d.is_empty(), "replica 1 has room but is unhealthy: {d:?}");
        // With every replica down, it asks to look again: no completion may come.
        let down = [Replica::new(1).unhealthy(), Replica::new(2).unhealthy()];
        let d = l.on_completion(snap(&l).with_replicas(&down), Completion::new(1));
        assert_eq!(
            (d.admit.len(), d.wake_after_us),
            (0, Some(UNHEALTHY_RECHECK_US))
        );
        let d = l.on_tick(snap(&l).with_replicas(&replicas));
        assert_eq!(placed(d), [(2, 2)]);
    }

    #[test]
    fn with_replicas_a_tenant_keeps_its_own_limit_and_reserve_applies_per_replica() {
        let mut l = Limiter::new(Config {
            reserve: sdk::Reserve {
                slots: 1,
                priority: 1,
            },
            ..config(2, Key::Tenant)
        });
        let replicas = [Replica::new(1), Replica::new(2)];
        // Tenant a: one unreserved slot per replica, two replicas, but its
        // own limit (less the reserve) is 1.
        assert_eq!(arrive_at(&mut l, &replicas, &arrival(1, "a")), [(1, 1)]);
        assert!(arrive_at(&mut l, &replicas, &arrival(2, "a")).is_empty());
        assert_eq!(arrive_at(&mut l, &replicas, &arrival(3, "b")), [(3, 2)]);
        // Both replicas have used their unreserved slot: priority 1 only.
        assert!(arrive_at(&mut l, &replicas, &arrival(4, "c")).is_empty());
        let urgent = request(5, "c", 1);
        assert_eq!(arrive_at(&mut l, &replicas, &urgent), [(5, 1)]);
    }

    #[test]
    fn without_replicas_no_replica_is_named() {
        let mut l = Limiter::new(config(1, Key::Global));
        let d = l.on_arrival(snap(&l), &cached(1, &[(1, 10)]));
        assert_eq!((d.admit, d.placements), (vec![1], vec![]));
    }
}
