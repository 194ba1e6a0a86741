//! The adaptive scheduler, in plain Rust: no bindings, no clock.
//!
//! [`Adaptive`] sorts waiting requests into live traffic (priority ≥
//! `live_priority`) and batch work (the rest), in [`FairQueue`] order.
//! Live requests are admitted at once (up to `max_limit` in flight in all).
//! Batch requests are admitted while fewer than the batch limit run:
//!
//! - the **knee** ([`Climb`]): the in-flight level past which the engine's
//!   throughput stops growing, learned from completions ([`Curve`]; only
//!   requests that ran with about the same number in flight from start to
//!   end count). A batch job alone runs there: about the engine's best
//!   throughput. With a short queue fewer run anyway.
//! - while **live traffic** is present (a live request arrived or finished
//!   within `live_window_s`), the limit its latency objective allows:
//!   `live_p95_ms`, or by default `auto_factor` times the unloaded service
//!   time the curve measured. The first guess comes from the curve, as
//!   soon as live traffic and batch work meet: the highest level whose
//!   service time, times the usual spread of live latency, fits the
//!   objective. Then each window of live completions ([`Live`]) moves it
//!   in proportion to how far the window's p95 is from 95% of the
//!   objective, and each live request over twice the objective brakes it.
//!   It never goes below the level that keeps `min_batch_share` percent of
//!   the best throughput measured, nor above the knee.
//!
//! The limit and the objective are published as gauges (`batch_limit`,
//! `knee`, `live_p95_ms`, `objective_ms`); a line is logged at info when
//! the limit doubles or halves, and when live traffic first meets batch
//! work.

use sluice_policy_sdk::{
    self as sdk, Completion, ConfigError, Decision, FairQueue, FastMap, Level, Policy, Request,
    Snapshot,
};

use crate::config::Config;
use crate::curve::{Climb, Curve, Fit, LEVELS, level_index};
use crate::live::Live;

/// The live p95 over the curve's mean service time that the first guess
/// assumes.
const P95_OVER_MEAN: f64 = 1.4;

/// Most change of the in-flight count, from a request's admission to its
/// end, for its service time to count as a point of the curve.
const LEVEL_SWING: f64 = 1.25;

/// What each window of live completions aims for, as a share of the objective.
pub const SETPOINT: f64 = 0.95;

/// A live request this many times over the objective brakes the batch…
const BRAKE_OVER: f64 = 2.0;

/// …by this factor.
const BRAKE: f64 = 0.9;

/// An admitted request.
#[derive(Debug, Clone, Copy)]
struct Running {
    live: bool,
    /// Requests in flight when it was admitted, itself included.
    level: u32,
    /// When it was admitted (host µs).
    admitted_us: u64,
}

/// The `adaptive` policy's state between events.
#[derive(Debug)]
pub struct Adaptive {
    config: Config,
    queue: FairQueue,
    running: FastMap<u64, Running>,
    live_running: u32,
    batch_running: u32,
    /// Requests the host had in flight that this instance did not admit
    /// (admitted before a hot reload).
    inherited: sdk::Inherited,
    curve: Curve,
    climb: Climb,
    live: Live,
    /// The batch limit the live objective allows, while live traffic is present.
    steered: Option<f64>,
    /// When `steered` last moved (host µs): live requests admitted before
    /// it are not judged against the new limit.
    moved_us: u64,
    /// The batch limit last logged.
    logged_limit: u32,
    /// Gauges already published, to publish only changes.
    published: FastMap<&'static str, f64>,
    /// Host contract violations seen since the last [`Policy::take_warnings`].
    warnings: Vec<String>,
}

impl Adaptive {
    /// A scheduler with nothing learned yet.
    pub fn new(config: Config) -> Self {
        Adaptive {
            queue: FairQueue::new(config.weights.clone()),
            climb: Climb::new(config.max_limit),
            config,
            running: FastMap::default(),
            live_running: 0,
            batch_running: 0,
            inherited: sdk::Inherited::default(),
            curve: Curve::default(),
            live: Live::default(),
            steered: None,
            moved_us: 0,
            logged_limit: 1,
            published: FastMap::default(),
            warnings: Vec::new(),
        }
    }

    /// How many requests wait.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// How many requests this instance admitted that have not completed.
    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    /// The knee's in-flight level, once found.
    pub fn knee(&self) -> Option<u32> {
        self.climb.knee().map(|i| LEVELS[i])
    }

    /// The live objective now (µs): configured, or derived once the
    /// unloaded service time is known.
    pub fn objective_us(&self) -> Option<f64> {
        if self.config.live_p95_ms > 0.0 {
            return Some(self.config.live_p95_ms * 1_000.0);
        }
        Some(self.curve.unloaded_us()? * self.config.auto_factor)
    }

    /// The most batch requests that may run now.
    pub fn batch_limit(&self, now_us: u64) -> u32 {
        let knee = self.climb.limit();
        match self.steered {
            Some(steered) if self.live_present(now_us) => (steered.round() as u32).max(1),
            _ => knee,
        }
    }

    fn live_present(&self, now_us: u64) -> bool {
        let window_us = self.config.live_window_s.saturating_mul(1_000_000);
        self.live.present(now_us, window_us)
    }

    fn observe(&mut self, now: Snapshot) {
        let own = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        self.inherited.observe(now, own);
    }

    /// Admits every live request that fits under `max_limit`, then batch
    /// requests up to the batch limit.
    fn admit(&mut self, now_us: u64) -> Decision {
        let mut decision = Decision::default();
        // Live traffic beside batch work and no limit yet: the curve's
        // first guess holds the batch from now, not from the first live
        // completion a service time later.
        if self.steered.is_none()
            && self.live_present(now_us)
            && (self.batch_running > 0 || self.backlogged())
            && let Some(objective) = self.objective_us()
        {
            let limit = self.modelled_limit(objective);
            sdk::log(
                Level::Info,
                &format!(
                    "adaptive: live traffic beside batch work: batch limit {limit:.0} from the curve (objective {:.2} ms)",
                    objective / 1_000.0
                ),
            );
            self.steered = Some(limit);
            self.moved_us = now_us;
        }
        let held = self.inherited.count();
        let batch_limit = self.batch_limit(now_us);
        let (max_limit, live_priority) = (self.config.max_limit, self.config.live_priority);
        loop {
            let total = self.live_running + self.batch_running + held;
            let batch = self.batch_running + held;
            let fits = |q: &sdk::Queued| {
                total < max_limit && (q.priority >= live_priority || batch < batch_limit)
            };
            let Some(queued) = self.queue.pop_where(fits) else {
                break;
            };
            let live = queued.priority >= live_priority;
            if live {
                self.live_running += 1;
            } else {
                self.batch_running += 1;
            }
            let level = total + 1;
            self.running.insert(
                queued.id,
                Running {
                    live,
                    level,
                    admitted_us: now_us,
                },
            );
            decision.admit.push(queued.id);
        }
        self.publish(now_us, batch_limit);
        decision
    }

    /// Forgets admitted request `id` and frees its slot; `None` when it is
    /// not ours.
    fn finish(&mut self, id: u64) -> Option<Running> {
        let running = self.running.remove(&id)?;
        if running.live {
            self.live_running -= 1;
        } else {
            self.batch_running -= 1;
        }
        Some(running)
    }

    /// Whether batch work waits for a slot that the limit holds back.
    fn backlogged(&self) -> bool {
        self.queue.len() > self.queue.count_at_least(self.config.live_priority)
    }

    /// Learns from a completion: the curve, the climb, the live objective.
    /// `ending` is how many were in flight as it ended, itself included.
    fn learn(&mut self, now_us: u64, done: &Completion, running: Running, ending: u32) {
        // A point of the curve is a request that ran with about the same
        // number in flight from start to end: a limit held by a backlog.
        // One that saw the count swing (a burst arriving, a queue
        // draining) measured no single level.
        let (low, high) = (running.level.min(ending), running.level.max(ending));
        if done.ok && f64::from(high) <= f64::from(low.max(1)) * LEVEL_SWING {
            self.curve.record((low + high).div_ceil(2), done.e2e_us);
        }
        // The climb judges its own level only: while the live objective
        // holds the batch below it, the curve fills in below the climb.
        let limit = self.batch_limit(now_us);
        let was_full = self.batch_running + self.inherited.count() + 1 >= limit;
        if self.backlogged() && was_full && !running.live && limit == self.climb.limit() {
            let waiting = self.queue.len() - self.queue.count_at_least(self.config.live_priority);
            let demand = self.batch_running + self.inherited.count() + waiting as u32;
            self.climb.step(&mut self.curve, demand);
        }
        // Live traffic steers the batch only while there is a batch: with
        // none, the next one beside live traffic starts from the curve.
        let batch_idle = self.batch_running == 0 && !self.backlogged();
        if batch_idle || !self.live_present(now_us) {
            self.steered = None;
        }
        if running.live && done.ok && !batch_idle {
            let latency = done.queue_us.saturating_add(done.e2e_us);
            // A window judges the limit it ran under: live requests admitted
            // before the last move ran beside the batch of the limit before.
            let judged = running.admitted_us >= self.moved_us;
            if judged {
                self.live.record(now_us, latency);
            }
            self.steer(now_us, latency as f64, judged);
        }
    }

    /// The batch limit's bounds beside live traffic: the level that keeps
    /// `min_batch_share` of the best throughput measured, and the knee (or
    /// the climb's level while it probes above it); `max_limit` while no
    /// knee is known, since the climb cannot look for one while live
    /// traffic holds the batch below it.
    fn bounds(&self) -> (f64, f64) {
        let (top, ceiling) = match self.climb.knee() {
            Some(knee) => {
                let top = knee.max(self.climb.index());
                (top, f64::from(LEVELS[top]))
            }
            None => (
                level_index(self.config.max_limit),
                f64::from(self.config.max_limit),
            ),
        };
        let share = f64::from(self.config.min_batch_share) / 100.0;
        let floor = self
            .curve
            .lowest_with_share(top, share)
            .map_or(1.0, |i| f64::from(LEVELS[i]));
        (floor.min(ceiling), ceiling)
    }

    /// The first guess beside live traffic: the batch limit at which the
    /// curve's mean service time, times the usual spread of live latency
    /// over it, meets the objective (less the live request itself), as far
    /// as the curve has been measured.
    fn modelled_limit(&self, objective: f64) -> f64 {
        let (floor, ceiling) = self.bounds();
        let budget = objective / P95_OVER_MEAN;
        let top = level_index(ceiling.round() as u32);
        let limit = match self.curve.level_within(top, budget) {
            Fit::Between(in_flight) => in_flight - 1.0,
            Fit::None => floor,
            // Nothing measured is too slow: start from the highest level
            // measured, and let the live completions say how much higher.
            Fit::AtLeast(in_flight) => in_flight - 1.0,
        };
        limit.clamp(floor, ceiling)
    }

    /// Steers the batch limit by a live request's latency: a first guess
    /// from the curve; a brake on each request far over the objective;
    /// and, every window of live completions, a move in proportion to how
    /// far its p95 is from the objective (down at once, up by half the gap).
    fn steer(&mut self, now_us: u64, latency_us: f64, judged: bool) {
        let Some(objective) = self.objective_us() else {
            return;
        };
        let (floor, ceiling) = self.bounds();
        let mut limit = match self.steered {
            Some(limit) => limit,
            None => self.modelled_limit(objective),
        };
        if latency_us > BRAKE_OVER * objective {
            limit *= BRAKE;
        }
        let judgement = judged.then(|| self.live.judge(now_us, objective)).flatten();
        if let Some(p95_us) = judgement {
            // Windows of 20 are noisy: steering each to the objective would
            // leave the run's p95 over it, so each aims a little under.
            let ratio = SETPOINT * objective / p95_us;
            if ratio < 1.0 {
                limit *= ratio.max(0.5);
            } else if ratio > 1.0 {
                limit *= (1.0 + (ratio - 1.0) / 2.0).min(1.5);
            }
        }
        let limit = limit.clamp(floor, ceiling);
        if self
            .steered
            .is_none_or(|before| (limit - before).abs() > 0.01 * before)
        {
            self.moved_us = now_us;
        }
        self.steered = Some(limit);
    }

    /// Publishes what changed, and logs a limit that doubled or halved.
    fn publish(&mut self, now_us: u64, batch_limit: u32) {
        let ratio = f64::from(batch_limit) / f64::from(self.logged_limit.max(1));
        if !(0.5..2.0).contains(&ratio) {
            let live = if self.live_present(now_us) {
                "live traffic present"
            } else {
                "no live traffic"
            };
            let knee = self
                .knee()
                .map_or("not yet found".into(), |k| k.to_string());
            sdk::log(
                Level::Info,
                &format!(
                    "adaptive: batch limit {} -> {batch_limit} ({live}; knee {knee})",
                    self.logged_limit
                ),
            );
            self.logged_limit = batch_limit;
        }
        let objective_ms = self.objective_us().map_or(0.0, |us| us / 1_000.0);
        let live_p95_ms = self.live.last_p95_us().map_or(0.0, |us| us / 1_000.0);
        let knee = self.knee().map_or(0.0, f64::from);
        for (name, value) in [
            ("batch_limit", f64::from(batch_limit)),
            ("knee", knee),
            ("objective_ms", objective_ms),
            ("live_p95_ms", live_p95_ms),
        ] {
            if self.published.insert(name, value) != Some(value) {
                sdk::gauge(name, value);
            }
        }
    }
}

impl Policy for Adaptive {
    fn init(config: &sdk::Config) -> Result<Self, ConfigError> {
        Config::read(config).map(Adaptive::new)
    }

    fn describe(&self) -> String {
        self.config.to_string()
    }

    fn on_arrival(&mut self, now: Snapshot, req: &Request) -> Decision {
        self.observe(now);
        let id = req.id;
        if self.running.contains_key(&id) || !self.queue.push(req) {
            self.warnings.push(format!(
                "adaptive: duplicate arrival of request {id} ignored"
            ));
        } else if req.priority >= self.config.live_priority {
            self.live.arrived(now.now_us);
        }
        self.admit(now.now_us)
    }

    fn on_completion(&mut self, now: Snapshot, done: Completion) -> Decision {
        let id = done.id;
        // In flight as it ends, itself included.
        let ending = self.live_running + self.batch_running + self.inherited.count();
        if let Some(running) = self.finish(id) {
            self.learn(now.now_us, &done, running, ending);
        } else if self.queue.remove(id).is_some() {
            self.warnings.push(format!(
                "adaptive: completion of request {id}, which was never admitted; dropped from the queue"
            ));
        } else {
            if !self.inherited.completed() {
                self.warnings.push(format!(
                    "adaptive: completion of unknown request {id} ignored"
                ));
            }
        }
        self.admit(now.now_us)
    }

    fn on_cancel(&mut self, now: Snapshot, id: u64) -> Decision {
        self.observe(now);
        if self.queue.remove(id).is_some() {
            // The usual case.
        } else if self.finish(id).is_some() {
            self.warnings.push(format!(
                "adaptive: cancel of admitted request {id}; counted as completed"
            ));
        } else {
            self.warnings
                .push(format!("adaptive: cancel of unknown request {id} ignored"));
        }
        self.admit(now.now_us)
    }

    fn on_tick(&mut self, now: Snapshot) -> Decision {
        self.observe(now);
        self.admit(now.now_us)
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, priority: i32) -> Request {
        Request {
            priority,
            ..Request::new(id)
        }
    }

    fn done(id: u64, e2e_us: u64) -> Completion {
        Completion {
            ok: true,
            e2e_us,
            ..Completion::new(id)
        }
    }

    #[test]
    fn it_starts_at_one_and_admits_live_traffic_at_once() {
        let mut a = Adaptive::new(Config::default());
        let now = Snapshot::at(0);
        assert_eq!(a.on_arrival(now, &request(1, 0)).admit, [1]);
        assert!(a.on_arrival(now, &request(2, 0)).admit.is_empty());
        assert_eq!(a.on_arrival(now, &request(3, 5)).admit, [3]);
        assert_eq!(a.on_completion(now, done(1, 1_000)).admit, [2]);
        assert!(a.take_warnings().is_empty());
    }

    #[test]
    fn a_priority_request_goes_before_a_backlog() {
        let mut a = Adaptive::new(Config {
            live_priority: 100,
            ..Config::default()
        });
        let now = Snapshot::at(0);
        a.on_arrival(now, &request(0, 0));
        for id in 1..=100 {
            a.on_arrival(now, &request(id, 0));
        }
        a.on_arrival(now, &request(500, 10));
        assert_eq!(a.on_completion(now, done(0, 1_000)).admit, [500]);
    }

    #[test]
    fn cancels_and_unknown_ids_keep_the_counts_right() {
        let mut a = Adaptive::new(Config::default());
        let now = Snapshot::at(0);
        a.on_arrival(now, &request(1, 0));
        a.on_arrival(now, &request(2, 0));
        assert!(a.on_cancel(now, 2).admit.is_empty());
        assert!(a.on_cancel(now, 99).admit.is_empty());
        assert!(a.on_arrival(now, &request(1, 0)).admit.is_empty());
        assert_eq!(a.take_warnings().len(), 2);
        a.on_completion(now, done(1, 1_000));
        assert_eq!((a.in_flight(), a.queued()), (0, 0));
    }
}
