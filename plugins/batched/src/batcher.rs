//! The batch-coalescing scheduler, in plain Rust: no bindings, no clock.
//!
//! [`Batcher`] holds arrivals until `max_batch` are queued or `window_ms`
//! has passed since the oldest queued one, then admits them together, at
//! most `max_batch` per wave, in [`FairQueue`] order: higher priority
//! first, then tenants taking turns by weight, oldest first within a
//! tenant. Under [`Waves::Gather`] the next wave waits until every request
//! of the current one has completed; under [`Waves::Overlap`] it does not.
//!
//! With `reserve=N`, requests of priority ≥ `reserve_priority` do not wait
//! for a wave: up to N of them run at once beside the waves, admitted on
//! arrival, and they never hold a wave open. More wait in the queue, where
//! their priority puts them first in the next wave.
//!
//! Time comes in with every event ([`Snapshot::now_us`]); a batch that is
//! not yet full asks for a tick when the oldest request's window ends
//! ([`Decision::wake_after_us`]). A tick that comes early re-arms for the
//! rest of the window; one that comes late releases at once.
//!
//! The host may swap in a new instance while requests are in flight (hot
//! reload). Those requests are unknown here, but the host's
//! [`Snapshot::in_flight`] counts them: under [`Waves::Gather`] they are
//! treated as the wave in progress, so the first wave of a new instance
//! waits for them as it would for its own.

use std::collections::HashSet;

use sluice_policy_sdk::{
    self as sdk, Completion, ConfigError, Decision, FairQueue, Policy, Request, Snapshot,
};

use crate::config::{Config, Waves};

/// The longest wake-up asked for, in µs. A longer wait is re-armed by the
/// (early) tick, so a huge `window_ms` never hands the host an absurd timer.
pub const MAX_WAKE_US: u64 = 60_000_000;

/// The `batched` policy's state between events.
#[derive(Debug)]
pub struct Batcher {
    config: Config,
    /// `config.window_us()`, computed once.
    window_us: u64,
    /// Requests waiting for admission, in admission order. Each one's
    /// `arrived_us` is when its window started: its arrival on the host
    /// clock, never later than the event that announced it.
    queue: FairQueue,
    /// Requests this instance admitted in waves that have not completed.
    /// Under [`Waves::Gather`] this is exactly the current wave.
    in_flight: HashSet<u64>,
    /// Requests admitted to reserved slots, outside the waves, not completed.
    reserved: HashSet<u64>,
    /// Requests the host had in flight that this instance did not admit
    /// (admitted before a hot reload).
    inherited: sdk::Inherited,
    /// Host contract violations seen since the last [`Batcher::take_warnings`].
    warnings: Vec<String>,
}

impl Batcher {
    /// A scheduler with nothing queued and nothing in flight.
    pub fn new(config: Config) -> Self {
        Batcher {
            window_us: config.window_us(),
            queue: FairQueue::new(config.weights.clone()),
            config,
            in_flight: HashSet::new(),
            reserved: HashSet::new(),
            inherited: sdk::Inherited::default(),
            warnings: Vec::new(),
        }
    }

    /// The configuration this scheduler runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many requests are waiting for a wave.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// How many requests this instance admitted that have not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.reserved.len()
    }

    /// Learns from a snapshot how many in-flight requests this instance did
    /// not admit. Only ever lowers the count after the first look, so a
    /// host that under-reports cannot make a wave wait forever.
    fn observe(&mut self, now: Snapshot) {
        let own = u32::try_from(self.in_flight()).unwrap_or(u32::MAX);
        self.inherited.observe(now, own);
    }

    /// Whether a wave is still running (under [`Waves::Gather`], the next one waits).
    fn wave_open(&self) -> bool {
        !self.in_flight.is_empty() || self.inherited.count() > 0
    }

    /// Admits what the reserved slots allow, then every wave that is ready
    /// at `now_us`, and says when to look again.
    fn release(&mut self, now_us: u64) -> Decision {
        let mut decision = Decision::default();
        let reserve = self.config.reserve;
        let slots = usize::try_from(reserve.slots).unwrap_or(usize::MAX);
        while self.reserved.len() < slots {
            let Some(queued) = self.queue.pop_where(|q| reserve.admits(q.priority)) else {
                break;
            };
            self.reserved.insert(queued.id);
            decision.admit.push(queued.id);
        }
        let max_batch = usize::try_from(self.config.max_batch).unwrap_or(usize::MAX);
        while let Some(oldest_us) = self.queue.oldest_arrival_us() {
            if self.config.waves == Waves::Gather && self.wave_open() {
                // The last completion of the wave calls `release` again.
                break;
            }
            let deadline = oldest_us.saturating_add(self.window_us);
            if self.queue.len() < max_batch && now_us < deadline {
                decision.wake_after_us = Some((deadline - now_us).min(MAX_WAKE_US));
                break;
            }
            for _ in 0..self.queue.len().min(max_batch) {
                let Some(queued) = self.queue.pop() else {
                    break;
                };
                self.in_flight.insert(queued.id);
                decision.admit.push(queued.id);
            }
        }
        decision
    }

    /// Counts admitted request `id` as done; false when it is not ours.
    fn finish(&mut self, id: u64) -> bool {
        self.in_flight.remove(&id) || self.reserved.remove(&id)
    }
}

impl Policy for Batcher {
    fn init(config: &sdk::Config) -> Result<Self, ConfigError> {
        Config::read(config).map(Batcher::new)
    }

    /// The configuration, e.g. `batched: max_batch=50 window_ms=10 waves=1`.
    fn describe(&self) -> String {
        self.config.to_string()
    }

    /// Request `req.id` joined the queue; its window starts at `req.arrived_us`
    /// (earlier than now when the host replays its queue after a reload).
    fn on_arrival(&mut self, now: Snapshot, req: &Request) -> Decision {
        let id = req.id;
        self.observe(now);
        let known = self.in_flight.contains(&id) || self.reserved.contains(&id);
        let since = Request {
            arrived_us: req.arrived_us.min(now.now_us),
            ..req.clone()
        };
        if known || !self.queue.push(&since) {
            self.warnings.push(format!(
                "batched: duplicate arrival of request {id} ignored"
            ));
        }
        self.release(now.now_us)
    }

    /// An admitted request finished, successfully or not: either way it no
    /// longer holds its wave open.
    fn on_completion(&mut self, now: Snapshot, done: Completion) -> Decision {
        let id = done.id;
        // The snapshot is not read here: whether its `in_flight` still counts
        // the request completing is the host's choice.
        if self.finish(id) {
            // The usual case.
        } else if self.queue.remove(id).is_some() {
            self.warnings.push(format!(
                "batched: completion of request {id}, which was never admitted; dropped from the queue"
            ));
        } else {
            if !self.inherited.completed() {
                self.warnings.push(format!(
                    "batched: completion of unknown request {id} ignored"
                ));
            }
        }
        self.release(now.now_us)
    }

    /// A queued request left without being admitted. It is never admitted
    /// afterwards, and it is not a member of any wave.
    fn on_cancel(&mut self, now: Snapshot, id: u64) -> Decision {
        self.observe(now);
        if self.queue.remove(id).is_some() {
            // The usual case.
        } else if self.finish(id) {
            // The host promises a completion, not a cancel, for admitted
            // requests; count it as done so that a wave cannot hang on it.
            self.warnings.push(format!(
                "batched: cancel of admitted request {id}; counted as completed"
            ));
        } else {
            self.warnings
                .push(format!("batched: cancel of unknown request {id} ignored"));
        }
        self.release(now.now_us)
    }

    /// The wake-up asked for earlier is due (or not quite: the host's timer
    /// may fire early or late; either is handled).
    fn on_tick(&mut self, now: Snapshot) -> Decision {
        self.observe(now);
        self.release(now.now_us)
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

    const MS: u64 = 1_000;

    fn config(max_batch: u32, window_ms: u64, waves: Waves) -> Config {
        Config {
            max_batch,
            window_ms,
            waves,
            ..Config::default()
        }
    }

    fn at(now_us: u64) -> Snapshot<'static> {
        Snapshot::at(now_us)
    }

    /// A snapshot whose `in_flight` agrees with the batcher's own count.
    fn snap(b: &Batcher, now_us: u64) -> Snapshot<'static> {
        Snapshot::at(now_us).with_in_flight(b.in_flight() as u32)
    }

    /// Request `id`, which arrived at `arrived_us`.
    fn arrival(id: u64, arrived_us: u64) -> Request {
        Request {
            arrived_us,
            ..Request::new(id)
        }
    }

    fn arrive(b: &mut Batcher, now_us: u64, id: u64) -> Decision {
        let now = snap(b, now_us);
        b.on_arrival(now, &arrival(id, now_us))
    }

    fn complete(b: &mut Batcher, now_us: u64, id: u64) -> Decision {
        let now = snap(b, now_us);
        b.on_completion(now, Completion::new(id))
    }

    fn cancel(b: &mut Batcher, now_us: u64, id: u64) -> Decision {
        let now = snap(b, now_us);
        b.on_cancel(now, id)
    }

    fn tick(b: &mut Batcher, now_us: u64) -> Decision {
        let now = snap(b, now_us);
        b.on_tick(now)
    }

    fn admits(ids: &[u64]) -> Decision {
        Decision {
            admit: ids.to_vec(),
            ..Decision::default()
        }
    }

    fn waits(us: u64) -> Decision {
        Decision {
            wake_after_us: Some(us),
            ..Decision::default()
        }
    }

    #[test]
    fn init_reads_the_config_and_describes_it() {
        let b = sdk::Config::parse([("max_batch", "8")], Batcher::init).unwrap();
        assert_eq!(b.describe(), "batched: max_batch=8 window_ms=10 waves=1");
        let err = sdk::Config::parse([("limit", "8")], Batcher::init).unwrap_err();
        assert!(err.to_string().starts_with("unknown key `limit`"));
    }

    #[test]
    fn an_arrival_waits_for_its_window_and_asks_for_a_tick_when_it_ends() {
        let mut b = Batcher::new(config(4, 10, Waves::Gather));
        assert_eq!(arrive(&mut b, 100, 1), waits(10 * MS));
        // Later arrivals keep the oldest request's deadline.
        assert_eq!(arrive(&mut b, 100 + 3 * MS, 2), waits(7 * MS));
        assert_eq!(tick(&mut b, 100 + 10 * MS), admits(&[1, 2]));
        assert_eq!(b.queued(), 0);
        assert_eq!(b.in_flight(), 2);
    }

    #[test]
    fn a_full_batch_is_admitted_at_once() {
        let mut b = Batcher::new(config(3, 10, Waves::Overlap));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 1, 2);
        assert_eq!(arrive(&mut b, 2, 3), admits(&[1, 2, 3]));
        // The next request starts a new window.
        assert_eq!(arrive(&mut b, 5, 4), waits(10 * MS));
    }

    #[test]
    fn an_early_tick_rearms_for_the_rest_of_the_window() {
        let mut b = Batcher::new(config(50, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        assert_eq!(tick(&mut b, 9_999), waits(1));
        assert_eq!(tick(&mut b, 10_000), admits(&[1]));
    }

    #[test]
    fn a_late_tick_releases_at_once() {
        let mut b = Batcher::new(config(50, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 2 * MS, 2);
        assert_eq!(tick(&mut b, 500 * MS), admits(&[1, 2]));
    }

    #[test]
    fn a_tick_with_nothing_queued_does_nothing() {
        let mut b = Batcher::new(Config::default());
        assert_eq!(tick(&mut b, 0), Decision::default());
        arrive(&mut b, 0, 1);
        tick(&mut b, 10 * MS);
        assert_eq!(tick(&mut b, 20 * MS), Decision::default());
    }

    #[test]
    fn an_arrival_after_the_window_releases_everything_queued() {
        // The tick was lost or is late: the next event notices the deadline.
        let mut b = Batcher::new(config(50, 10, Waves::Overlap));
        arrive(&mut b, 0, 1);
        assert_eq!(arrive(&mut b, 11 * MS, 2), admits(&[1, 2]));
    }

    #[test]
    fn gather_waits_for_every_member_of_the_wave() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        assert_eq!(arrive(&mut b, 0, 2), admits(&[1, 2]));
        // A full batch queues up behind the running wave, with no tick.
        assert_eq!(arrive(&mut b, MS, 3), Decision::default());
        assert_eq!(arrive(&mut b, MS, 4), Decision::default());
        assert_eq!(arrive(&mut b, MS, 5), Decision::default());
        assert_eq!(complete(&mut b, 2 * MS, 1), Decision::default());
        // A failed request finishes its wave like a successful one.
        assert_eq!(complete(&mut b, 3 * MS, 2), admits(&[3, 4]));
        assert_eq!(b.queued(), 1);
        assert_eq!(complete(&mut b, 4 * MS, 4), Decision::default());
        // The window of 5 (from 1 ms) has ended by now: it goes alone.
        assert_eq!(complete(&mut b, 12 * MS, 3), admits(&[5]));
    }

    #[test]
    fn gather_rearms_the_window_when_a_wave_ends_early() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 0, 2);
        arrive(&mut b, 4 * MS, 3);
        complete(&mut b, 5 * MS, 1);
        // 3 has waited 2 ms of its 10.
        assert_eq!(complete(&mut b, 6 * MS, 2), waits(8 * MS));
        assert_eq!(tick(&mut b, 14 * MS), admits(&[3]));
    }

    #[test]
    fn overlap_releases_waves_while_earlier_ones_run() {
        let mut b = Batcher::new(config(2, 10, Waves::Overlap));
        arrive(&mut b, 0, 1);
        assert_eq!(arrive(&mut b, 0, 2), admits(&[1, 2]));
        arrive(&mut b, MS, 3);
        assert_eq!(arrive(&mut b, MS, 4), admits(&[3, 4]));
        assert_eq!(arrive(&mut b, MS, 5), waits(10 * MS));
        assert_eq!(tick(&mut b, 11 * MS), admits(&[5]));
        assert_eq!(b.in_flight(), 5);
        for id in 1..=5 {
            assert_eq!(complete(&mut b, 12 * MS, id), Decision::default());
        }
    }

    #[test]
    fn a_cancelled_request_is_never_admitted() {
        let mut b = Batcher::new(config(3, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 0, 2);
        assert_eq!(cancel(&mut b, MS, 2), waits(9 * MS));
        arrive(&mut b, MS, 3);
        // Not full: 2 no longer counts.
        assert_eq!(b.queued(), 2);
        assert_eq!(tick(&mut b, 10 * MS), admits(&[1, 3]));
        assert!(b.take_warnings().is_empty());
    }

    #[test]
    fn cancelling_the_oldest_moves_the_window_to_the_next() {
        let mut b = Batcher::new(config(50, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 4 * MS, 2);
        assert_eq!(cancel(&mut b, 5 * MS, 1), waits(9 * MS));
        // The old deadline passes without a release.
        assert_eq!(tick(&mut b, 10 * MS), waits(4 * MS));
        assert_eq!(tick(&mut b, 14 * MS), admits(&[2]));
    }

    #[test]
    fn cancelling_everything_cancels_the_tick() {
        let mut b = Batcher::new(Config::default());
        arrive(&mut b, 0, 1);
        assert_eq!(cancel(&mut b, MS, 1), Decision::default());
        assert_eq!(tick(&mut b, 10 * MS), Decision::default());
    }

    #[test]
    fn a_cancel_while_a_wave_runs_is_not_a_wave_member() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 0, 2);
        arrive(&mut b, MS, 3);
        arrive(&mut b, MS, 4);
        // 3 leaves the queue; the wave is still {1, 2}.
        assert_eq!(cancel(&mut b, 2 * MS, 3), Decision::default());
        assert_eq!(complete(&mut b, 3 * MS, 1), Decision::default());
        assert_eq!(complete(&mut b, 4 * MS, 2), waits(7 * MS));
        assert_eq!(tick(&mut b, 11 * MS), admits(&[4]));
        // The wave {4} ends with 4 alone.
        arrive(&mut b, 12 * MS, 5);
        assert_eq!(complete(&mut b, 30 * MS, 4), admits(&[5]));
    }

    #[test]
    fn a_cancel_of_an_admitted_request_cannot_hang_the_wave() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        arrive(&mut b, 0, 2);
        arrive(&mut b, MS, 3);
        complete(&mut b, 2 * MS, 1);
        assert_eq!(cancel(&mut b, 20 * MS, 2), admits(&[3]));
        assert_eq!(b.take_warnings().len(), 1);
    }

    #[test]
    fn unknown_ids_and_duplicates_are_ignored_with_a_warning() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        assert_eq!(arrive(&mut b, 0, 1), waits(10 * MS));
        assert_eq!(arrive(&mut b, 0, 1), waits(10 * MS));
        assert_eq!(b.queued(), 1);
        assert_eq!(cancel(&mut b, 0, 99), waits(10 * MS));
        assert_eq!(complete(&mut b, 0, 98), waits(10 * MS));
        assert_eq!(b.take_warnings().len(), 3);
        assert!(b.take_warnings().is_empty());
    }

    #[test]
    fn a_completion_of_a_queued_request_drops_it() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        assert_eq!(complete(&mut b, MS, 1), Decision::default());
        assert_eq!(b.queued(), 0);
        assert_eq!(b.take_warnings().len(), 1);
    }

    #[test]
    fn a_replayed_arrival_keeps_the_time_it_already_waited() {
        let mut b = Batcher::new(config(50, 10, Waves::Overlap));
        // The host replays oldest first.
        assert_eq!(
            b.on_arrival(at(100 * MS), &arrival(1, 80 * MS)),
            admits(&[1])
        );
        assert_eq!(
            b.on_arrival(at(100 * MS), &arrival(2, 94 * MS)),
            waits(4 * MS)
        );
    }

    #[test]
    fn an_arrival_stamped_in_the_future_starts_its_window_now() {
        let mut b = Batcher::new(config(50, 10, Waves::Overlap));
        assert_eq!(b.on_arrival(at(MS), &arrival(1, 50 * MS)), waits(10 * MS));
    }

    #[test]
    fn a_zero_window_admits_at_once() {
        let mut b = Batcher::new(config(50, 0, Waves::Overlap));
        assert_eq!(arrive(&mut b, 0, 1), admits(&[1]));
        assert_eq!(arrive(&mut b, 0, 2), admits(&[2]));
        // Under gather, arrivals during a wave make up the next one.
        let mut b = Batcher::new(config(50, 0, Waves::Gather));
        assert_eq!(arrive(&mut b, 0, 1), admits(&[1]));
        assert_eq!(arrive(&mut b, 0, 2), Decision::default());
        assert_eq!(arrive(&mut b, 0, 3), Decision::default());
        assert_eq!(complete(&mut b, MS, 1), admits(&[2, 3]));
    }

    #[test]
    fn max_batch_one_admits_one_by_one() {
        let mut b = Batcher::new(config(1, 10, Waves::Gather));
        assert_eq!(arrive(&mut b, 0, 1), admits(&[1]));
        assert_eq!(arrive(&mut b, 0, 2), Decision::default());
        assert_eq!(complete(&mut b, MS, 1), admits(&[2]));
    }

    #[test]
    fn a_wave_never_exceeds_max_batch() {
        let mut b = Batcher::new(config(3, 10, Waves::Gather));
        for id in 1..=3 {
            arrive(&mut b, 0, id);
        }
        for id in 4..=10 {
            arrive(&mut b, MS, id);
        }
        assert_eq!(b.queued(), 7);
        complete(&mut b, 2 * MS, 1);
        complete(&mut b, 2 * MS, 2);
        assert_eq!(complete(&mut b, 2 * MS, 3), admits(&[4, 5, 6]));
        for id in 4..=6 {
            complete(&mut b, 3 * MS, id);
        }
        assert_eq!(b.in_flight(), 3);
        assert_eq!(b.queued(), 1);
    }

    fn arrive_as(b: &mut Batcher, now_us: u64, id: u64, tenant: &str, priority: i32) -> Decision {
        let now = snap(b, now_us);
        let req = Request {
            tenant: tenant.into(),
            priority,
            ..arrival(id, now_us)
        };
        b.on_arrival(now, &req)
    }

    #[test]
    fn higher_priority_goes_first_into_the_next_wave() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        arrive(&mut b, 0, 1);
        assert_eq!(arrive(&mut b, 0, 2), admits(&[1, 2]));
        for id in 3..=102 {
            arrive(&mut b, 1, id);
        }
        arrive_as(&mut b, 2, 500, "", 10);
        complete(&mut b, 3, 1);
        assert_eq!(complete(&mut b, 3, 2), admits(&[500, 3]));
    }

    #[test]
    fn reserved_slots_admit_high_priority_beside_the_waves() {
        let mut b = Batcher::new(Config {
            reserve: sdk::Reserve {
                slots: 1,
                priority: 1,
            },
            ..config(2, 10, Waves::Gather)
        });
        arrive(&mut b, 0, 1);
        assert_eq!(arrive(&mut b, 0, 2), admits(&[1, 2]));
        arrive(&mut b, 1, 3);
        // A live request does not wait for the running wave…
        assert_eq!(arrive_as(&mut b, 1, 100, "live", 1).admit, [100]);
        // …but a second one waits for the reserved slot, ahead of the backlog.
        assert!(arrive_as(&mut b, 1, 101, "live", 1).admit.is_empty());
        assert_eq!(complete(&mut b, 2, 100).admit, [101]);
        // The reserved request still running does not hold the next wave:
        // request 3's window (from 1 µs) is all it waits for.
        complete(&mut b, 3, 1);
        assert_eq!(complete(&mut b, 3, 2), waits(10 * MS - 2));
        assert_eq!(tick(&mut b, 10 * MS + 1), admits(&[3]));
    }

    #[test]
    fn tenants_share_each_wave() {
        let mut b = Batcher::new(config(4, 0, Waves::Gather));
        assert_eq!(arrive(&mut b, 0, 1), admits(&[1]));
        for id in 2..=10 {
            arrive(&mut b, 0, id);
        }
        arrive_as(&mut b, 0, 100, "other", 0);
        arrive_as(&mut b, 0, 101, "other", 0);
        // The next wave takes turns between the tenants, oldest first in each.
        assert_eq!(complete(&mut b, 1, 1), admits(&[2, 100, 3, 101]));
    }

    #[test]
    fn a_huge_window_asks_for_a_bounded_tick() {
        let mut b = Batcher::new(config(50, u64::MAX, Waves::Gather));
        assert_eq!(arrive(&mut b, 0, 1), waits(MAX_WAKE_US));
        assert_eq!(tick(&mut b, MAX_WAKE_US), waits(MAX_WAKE_US));
    }

    #[test]
    fn after_a_reload_the_first_wave_waits_for_the_inherited_one() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        // The host replays its queue while 3 requests of the old instance run.
        let now = Snapshot::at(0).with_in_flight(3);
        assert_eq!(b.on_arrival(now, &arrival(10, 0)), Decision::default());
        assert_eq!(b.on_arrival(now, &arrival(11, 0)), Decision::default());
        // Completions of the old requests are not warnings.
        assert_eq!(
            b.on_completion(now, Completion::new(1)),
            Decision::default()
        );
        assert_eq!(
            b.on_completion(now, Completion::new(2)),
            Decision::default()
        );
        assert_eq!(b.on_completion(now, Completion::new(3)), admits(&[10, 11]));
        assert!(b.take_warnings().is_empty());
    }

    #[test]
    fn the_inherited_count_follows_the_host_downwards_only() {
        let mut b = Batcher::new(config(2, 10, Waves::Gather));
        let with = |in_flight| Snapshot::at(20 * MS).with_in_flight(in_flight);
        assert_eq!(b.on_arrival(with(5), &arrival(10, 0)), Decision::default());
        // The host now reports fewer (its count is the truth): they are gone.
        assert_eq!(b.on_tick(with(0)), admits(&[10]));
        // A later, higher report does not resurrect them: only 10 is running.
        assert_eq!(
            b.on_arrival(with(9), &arrival(11, 20 * MS)),
            Decision::default()
        );
        assert_eq!(
            b.on_completion(with(1), Completion::new(10)),
            waits(10 * MS)
        );
    }

    #[test]
    fn overlap_ignores_inherited_requests() {
        let mut b = Batcher::new(config(1, 10, Waves::Overlap));
        let now = Snapshot::at(0).with_in_flight(7);
        assert_eq!(b.on_arrival(now, &arrival(1, 0)), admits(&[1]));
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

    /// Random arrivals, cancels, completions and ticks against the host's
    /// rules: every admission names a queued id once, in arrival order, in
    /// waves of at most `max_batch`; gather never overlaps waves; and once
    /// arrivals stop, every request is admitted or cancelled.
    #[test]
    fn random_events_keep_the_contract() {
        for seed in 1..=40u64 {
            for waves in [Waves::Gather, Waves::Overlap] {
                let max_batch = 1 + (seed % 7) as u32;
                let window_ms = seed % 4;
                let mut b = Batcher::new(config(max_batch, window_ms, waves));
                let mut rng = Rng(seed * 7919);
                let mut now = 0u64;
                let mut next_id = 1u64;
                let mut queued: Vec<u64> = Vec::new();
                let mut running: Vec<u64> = Vec::new();
                let mut last_admitted = 0u64;
                let mut wake: Option<u64> = None;
                let mut apply = |d: Decision,
                                 now: u64,
                                 queued: &mut Vec<u64>,
                                 running: &mut Vec<u64>,
                                 wake: &mut Option<u64>| {
                    assert!(d.reject.is_empty());
                    if waves == Waves::Gather && !d.admit.is_empty() {
                        assert!(running.is_empty(), "seed {seed}: waves overlap");
                        assert!(d.admit.len() <= max_batch as usize);
                    }
                    for id in d.admit {
                        let pos = queued.iter().position(|&q| q == id).unwrap_or_else(|| {
                            panic!("seed {seed}: admitted {id}, which is not queued")
                        });
                        assert_eq!(pos, 0, "seed {seed}: admission out of order");
                        assert!(id > last_admitted);
                        last_admitted = id;
                        queued.remove(pos);
                        running.push(id);
                    }
                    *wake = d.wake_after_us.map(|us| now + us);
                };
                for step in 0..400 {
                    now += rng.below(3 * MS);
                    if wake.is_some_and(|due| due <= now) {
                        let d = b.on_tick(Snapshot::at(now).with_in_flight(running.len() as u32));
                        apply(d, now, &mut queued, &mut running, &mut wake);
                    }
                    let snapshot = Snapshot::at(now).with_in_flight(running.len() as u32);
                    let d = match rng.below(10) {
                        0..=4 if step < 300 => {
                            queued.push(next_id);
                            next_id += 1;
                            b.on_arrival(snapshot, &arrival(next_id - 1, now))
                        }
                        5 if !queued.is_empty() => {
                            let id = queued.remove(rng.below(queued.len() as u64) as usize);
                            b.on_cancel(snapshot, id)
                        }
                        _ if !running.is_empty() => {
                            let id = running.remove(rng.below(running.len() as u64) as usize);
                            b.on_completion(snapshot, Completion::new(id))
                        }
                        _ => b.on_tick(snapshot),
                    };
                    apply(d, now, &mut queued, &mut running, &mut wake);
                }
                // Drain: complete everything, honouring ticks.
                for _ in 0..1000 {
                    if queued.is_empty() && running.is_empty() {
                        break;
                    }
                    let snapshot = Snapshot::at(now).with_in_flight(running.len() as u32);
                    let d = if let Some(id) = running.pop() {
                        b.on_completion(snapshot, Completion::new(id))
                    } else {
                        let due = wake.expect("queued requests but no tick asked for");
                        now = now.max(due);
                        b.on_tick(Snapshot::at(now))
                    };
                    apply(d, now, &mut queued, &mut running, &mut wake);
                }
                assert!(
                    queued.is_empty() && running.is_empty(),
                    "seed {seed}: stuck"
                );
                assert!(b.take_warnings().is_empty(), "seed {seed}");
            }
        }
    }
}
