//! The engine's service curve, learned from completions, and the climb
//! that finds its knee.
//!
//! [`Curve`] keeps, for each in-flight level of a fixed ladder ([`LEVELS`]),
//! the service time of requests admitted at that level (a moving average).
//! With a backlog keeping `c` requests in flight, the engine completes
//! `c / service(c)` per second: [`Curve::throughput`]. That grows with `c`
//! while the engine batches for free, then flattens: the knee.
//!
//! [`Climb`] moves a limit along the ladder by what the curve shows: it
//! doubles while a doubling adds at least [`MIN_GAIN`] throughput (looking
//! one doubling past a miss, for engines whose curve has a plateau),
//! settles on the best level (the knee), then holds, probing one step up
//! and one step down now and then so that it follows an engine whose curve
//! moves.

/// In-flight levels the curve is measured at, about 1.5× apart.
pub const LEVELS: [u32; 24] = [
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
    3072, 4096,
];

/// The least throughput gain that justifies doubling the level.
pub const MIN_GAIN: f64 = 0.04;

/// Rounds held at the knee between probes.
const HOLD_ROUNDS: u32 = 12;

/// Samples a level needs before its throughput is trusted.
const MIN_SAMPLES: u32 = 4;

/// The index of the highest level at or below `in_flight` (0 for 0 or 1).
pub fn level_index(in_flight: u32) -> usize {
    LEVELS
        .iter()
        .rposition(|&level| level <= in_flight)
        .unwrap_or(0)
}

/// One level's measurements.
#[derive(Debug, Clone, Copy, Default)]
struct Point {
    /// Samples ever recorded here.
    samples: u32,
    /// Samples recorded since the climb last judged this level.
    fresh: u32,
    /// Moving average of the service time (µs).
    service_us: f64,
    /// Moving average of the in-flight count the samples were admitted at
    /// (a level's bucket spans up to the next level).
    in_flight: f64,
}

/// Levels whose service time counts as unloaded: 1, 2 and 3 in flight.
const UNLOADED_LEVELS: usize = 3;

/// Service time by in-flight level; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Curve {
    points: [Point; LEVELS.len()],
    /// The least service time measured at the unloaded levels (µs).
    unloaded_us: Option<f64>,
}

impl Curve {
    /// Records that a request admitted with `in_flight` requests running
    /// (itself included) took `service_us` from admission to its end.
    pub fn record(&mut self, in_flight: u32, service_us: u64) {
        let point = &mut self.points[level_index(in_flight)];
        point.samples = point.samples.saturating_add(1);
        point.fresh = point.fresh.saturating_add(1);
        // The plain mean for the first samples, then a moving average that
        // forgets an old engine state within a few dozen samples.
        let weight = (1.0 / f64::from(point.samples)).max(0.1);
        point.service_us += weight * (service_us as f64 - point.service_us);
        point.in_flight += weight * (f64::from(in_flight.max(1)) - point.in_flight);
        let index = level_index(in_flight);
        if index < UNLOADED_LEVELS
            && let Some(service) = self.service_us(index)
        {
            self.unloaded_us = Some(self.unloaded_us.map_or(service, |u| u.min(service)));
        }
    }

    /// The service time at level `index` (µs), once measured.
    pub fn service_us(&self, index: usize) -> Option<f64> {
        let point = self.points.get(index)?;
        (point.samples >= MIN_SAMPLES && point.service_us > 0.0).then_some(point.service_us)
    }

    /// Completions per second with about `LEVELS[index]` in flight, once
    /// measured: by Little's law, the samples' mean in-flight count over
    /// their mean service time.
    pub fn throughput(&self, index: usize) -> Option<f64> {
        Some(self.points[index].in_flight * 1e6 / self.service_us(index)?)
    }

    /// The service time with the engine nearly idle: the least measured at
    /// 1 to 3 in flight (µs). The least, because a busy engine also slows
    /// the requests admitted while few were in flight; so it never rises
    /// again (an engine that became slower for good keeps the tighter
    /// objective; set `live_p95_ms` there).
    pub fn unloaded_us(&self) -> Option<f64> {
        self.unloaded_us
    }

    /// The lowest level whose throughput is at least `share` of the best
    /// measured at any level up to `ceiling`, when a level measured at most
    /// a doubling below it falls short (or it is level 1): further below,
    /// a level not measured might be the lowest.
    pub fn lowest_with_share(&self, ceiling: usize, share: f64) -> Option<usize> {
        let measured: Vec<(usize, f64)> = (0..=ceiling)
            .filter_map(|i| Some((i, self.throughput(i)?)))
            .collect();
        let best = measured.iter().map(|&(_, t)| t).fold(0.0, f64::max);
        let at = measured.iter().position(|&(_, t)| t >= best * share)?;
        let (index, _) = measured[at];
        // The level below must be measured within a doubling (two ladder
        // steps), the climb's stride.
        let below_falls_short = at > 0 && measured[at - 1].0 + 2 >= index;
        (index == 0 || below_falls_short).then_some(index)
    }

    /// The in-flight count (a fraction, between measured levels) at which
    /// the service time reaches `budget_us`, looking at measured levels up
    /// to `ceiling`; see [`Fit`].
    pub fn level_within(&self, ceiling: usize, budget_us: f64) -> Fit {
        let measured: Vec<(f64, f64)> = (0..=ceiling.min(LEVELS.len() - 1))
            .filter_map(|i| Some((self.points[i].in_flight, self.service_us(i)?)))
            .collect();
        let Some(last_fit) = measured.iter().rposition(|&(_, s)| s <= budget_us) else {
            return Fit::None;
        };
        let (c0, s0) = measured[last_fit];
        match measured.get(last_fit + 1) {
            Some(&(c1, s1)) if s1 > s0 && c1 > c0 => {
                Fit::Between(c0 + (c1 - c0) * (budget_us - s0) / (s1 - s0))
            }
            Some(_) => Fit::Between(c0),
            None => Fit::AtLeast(c0),
        }
    }

    fn fresh(&self, index: usize) -> u32 {
        self.points[index].fresh
    }

    fn judged(&mut self, index: usize) {
        self.points[index].fresh = 0;
    }
}

/// Where the service time reaches a budget, by [`Curve::level_within`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit {
    /// Even the lowest measured level is slower.
    None,
    /// At about this in-flight count: a measured level above it is slower.
    Between(f64),
    /// At this in-flight count or more: no measured level is slower.
    AtLeast(f64),
}

/// Where the climb is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Doubling the level while it pays: `best` is the best level so far,
    /// `misses` the doublings since that did not beat it.
    Up {
        /// The best level so far (an index into [`LEVELS`]).
        best: usize,
        /// Doublings since `best` that did not beat it by [`MIN_GAIN`].
        misses: u8,
    },
    /// At the knee, counting rounds to the next probe.
    Hold(u32),
    /// Trying one step above the knee.
    ProbeUp,
    /// Trying one step below the knee.
    ProbeDown,
}

/// A limit moved along [`LEVELS`] by the curve; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Climb {
    index: usize,
    max_index: usize,
    phase: Phase,
    /// The last knee found, and whether the next probe goes up.
    knee: Option<usize>,
    probe_up_next: bool,
}

impl Climb {
    /// A climb from level 1, never above `max_limit`.
    pub fn new(max_limit: u32) -> Self {
        Climb {
            index: 0,
            max_index: level_index(max_limit),
            phase: Phase::Up { best: 0, misses: 0 },
            knee: None,
            probe_up_next: true,
        }
    }

    /// The limit now.
    pub fn limit(&self) -> u32 {
        LEVELS[self.index]
    }

    /// The level index now.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The knee, once found.
    pub fn knee(&self) -> Option<usize> {
        self.knee
    }

    /// Where the climb is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// After a completion while a backlog kept the limit full: once the
    /// current level has a round of fresh samples, judges it and maybe
    /// moves, never up to a level above `demand` (the requests running and
    /// waiting), which could not be filled to be judged. True when the
    /// limit moved.
    ///
    /// The first climb doubles the level while a doubling adds at least
    /// [`MIN_GAIN`] over the best so far, and looks one doubling past a
    /// miss (an engine's curve can have a plateau: on a CPU engine 4 and 8
    /// in flight give about the same, 16 a fifth more). Then it settles on
    /// the best, and probes one ladder step up or down now and then, where
    /// a step is half a doubling and needs half the gain (up: the whole
    /// gain, so that noise does not walk the knee up).
    pub fn step(&mut self, curve: &mut Curve, demand: u32) -> bool {
        let i = self.index;
        if curve.fresh(i) < LEVELS[i].max(MIN_SAMPLES) {
            return false;
        }
        curve.judged(i);
        let gained = |from: usize, to: usize, gain: f64| match (
            curve.throughput(from),
            curve.throughput(to),
        ) {
            (Some(a), Some(b)) => b >= a * (1.0 + gain),
            _ => true,
        };
        let before = self.index;
        let fits = |level: u32| level <= demand;
        let can_rise = i < self.max_index && fits(LEVELS[i + 1]);
        match self.phase {
            Phase::Up { best, misses } => {
                let (best, misses) = if i == best || gained(best, i, MIN_GAIN) {
                    (i, 0)
                } else {
                    (best, misses + 1)
                };
                // The highest level up to twice this one that the demand fills.
                let double = (i + 1..=self.max_index)
                    .take_while(|&n| LEVELS[n] <= 2 * LEVELS[i] && fits(LEVELS[n]))
                    .last();
                match double {
                    Some(next) if misses < 2 => {
                        self.index = next;
                        self.phase = Phase::Up { best, misses };
                    }
                    _ => self.settle(best),
                }
            }
            Phase::Hold(rounds) if rounds + 1 < HOLD_ROUNDS => self.phase = Phase::Hold(rounds + 1),
            Phase::Hold(_) => {
                let up = self.probe_up_next && can_rise;
                let down = !up && i > 0;
                self.probe_up_next = !self.probe_up_next;
                if up {
                    self.index = i + 1;
                    self.phase = Phase::ProbeUp;
                } else if down {
                    self.index = i - 1;
                    self.phase = Phase::ProbeDown;
                } else {
                    self.phase = Phase::Hold(0);
                }
            }
            // One step above the knee pays after all: climb on from there.
            Phase::ProbeUp if gained(i - 1, i, MIN_GAIN) => {
                self.phase = Phase::Up { best: i, misses: 0 };
            }
            Phase::ProbeUp => self.settle(i - 1),
            // The knee's step no longer pays: the knee is lower now.
            Phase::ProbeDown if !gained(i, i + 1, MIN_GAIN / 2.0) => self.settle(i),
            Phase::ProbeDown => self.settle(i + 1),
        }
        self.index != before
    }

    fn settle(&mut self, knee: usize) {
        self.index = knee;
        self.knee = Some(knee);
        self.phase = Phase::Hold(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A curve from a service-time function of the in-flight level.
    fn feed(curve: &mut Curve, index: usize, service: impl Fn(u32) -> u64) {
        for _ in 0..LEVELS[index].max(MIN_SAMPLES) * 2 {
            curve.record(LEVELS[index], service(LEVELS[index]));
        }
    }

    /// Runs the climb against an engine whose service time is `service`,
    /// for `rounds` rounds, and returns the levels it visited.
    fn climb(service: impl Fn(u32) -> u64, rounds: usize) -> (Climb, Vec<u32>) {
        let (mut curve, mut climb) = (Curve::default(), Climb::new(256));
        let mut visited = Vec::new();
        for _ in 0..rounds {
            feed(&mut curve, climb.index(), &service);
            climb.step(&mut curve, u32::MAX);
            visited.push(climb.limit());
        }
        (climb, visited)
    }

    #[test]
    fn levels_index_the_ladder() {
        assert_eq!(level_index(0), 0);
        assert_eq!(level_index(1), 0);
        assert_eq!(level_index(5), 3);
        assert_eq!(level_index(24), 8);
        assert_eq!(level_index(u32::MAX), LEVELS.len() - 1);
    }

    #[test]
    fn the_climb_stops_where_throughput_stops_growing() {
        // Free batching up to 24 in flight, then each request slows the rest.
        let (climb, visited) = climb(|c| 2_000 + 2_000 * u64::from(c.saturating_sub(24)) / 24, 40);
        // Doubling finds 32 (as fast as 24), looks two doublings past it,
        // settles, and a probe down finds that 24 does as well.
        assert_eq!(climb.knee().map(|k| LEVELS[k]), Some(24), "{visited:?}");
        assert!(
            visited.iter().all(|&l| l <= 128),
            "never more than two doublings past the best: {visited:?}"
        );
    }

    #[test]
    fn a_plateau_does_not_stop_the_climb() {
        // Like vLLM on CPU: 4 and 8 in flight give the same throughput,
        // 16 and 32 more, then nothing more.
        let throughput_per_ms = |c: u32| match c {
            0..=4 => f64::from(c),
            5..=8 => 4.0,
            9..=16 => 5.0,
            _ => 6.0,
        };
        let (climb, visited) = climb(
            |c| (f64::from(c) / throughput_per_ms(c) * 1_000.0) as u64,
            60,
        );
        let knee = climb.knee().map(|k| LEVELS[k]);
        assert!(matches!(knee, Some(24 | 32)), "{knee:?}: {visited:?}");
    }

    #[test]
    fn the_climb_never_rises_past_the_demand() {
        let (mut curve, mut climb) = (Curve::default(), Climb::new(256));
        for _ in 0..40 {
            // An engine that batches for free, fed by 20 clients.
            feed(&mut curve, climb.index(), |_| 1_000);
            climb.step(&mut curve, 20);
        }
        assert_eq!(climb.limit(), 16, "24 could never be filled by 20");
    }

    #[test]
    fn the_share_floor_works_on_the_climbs_doublings() {
        // Measured at 1, 2, 4, 8, 16 only (as the first climb leaves it):
        // 1 request per ms per request in flight up to 8, then no more.
        let mut curve = Curve::default();
        for level in [1, 2, 4, 8, 16] {
            feed(&mut curve, level_index(level), |c| {
                1_000 * u64::from(c.max(8)) / 8
            });
        }
        let floor = curve.lowest_with_share(level_index(16), 0.6);
        assert_eq!(floor.map(|i| LEVELS[i]), Some(8));
        // With a gap of more than a doubling below it, no floor is claimed.
        let mut sparse = Curve::default();
        for level in [1, 8, 16] {
            feed(&mut sparse, level_index(level), |c| {
                1_000 * u64::from(c.max(8)) / 8
            });
        }
        assert_eq!(sparse.lowest_with_share(level_index(16), 0.6), None);
    }

    #[test]
    fn a_flat_engine_stays_at_one() {
        // Every request takes twice as long with two in flight: no gain.
        let (climb, _) = climb(|c| 1_000 * u64::from(c), 10);
        assert_eq!(climb.knee(), Some(0));
        assert_eq!(climb.limit(), 1);
    }

    #[test]
    fn the_knee_follows_an_engine_that_changes() {
        let (mut curve, mut climb) = (Curve::default(), Climb::new(256));
        let fast = |c: u32| 1_000 + 1_000 * u64::from(c.saturating_sub(8)) / 8;
        let slow = |c: u32| 1_000 + 1_000 * u64::from(c.saturating_sub(32)) / 32;
        for _ in 0..30 {
            feed(&mut curve, climb.index(), fast);
            climb.step(&mut curve, u32::MAX);
        }
        assert_eq!(climb.knee().map(|k| LEVELS[k]), Some(8));
        // The engine now batches four times as much for free.
        for _ in 0..400 {
            feed(&mut curve, climb.index(), slow);
            climb.step(&mut curve, u32::MAX);
        }
        assert_eq!(climb.knee().map(|k| LEVELS[k]), Some(32));
    }

    #[test]
    fn shares_and_budgets_pick_levels() {
        let mut curve = Curve::default();
        for i in 0..=9 {
            feed(&mut curve, i, |c| {
                1_000 + 1_000 * u64::from(c.saturating_sub(8)) / 8
            });
        }
        assert_eq!(curve.unloaded_us(), Some(1_000.0));
        // Throughput grows to 8/ms at 8 in flight and stays there.
        let best = level_index(8);
        assert_eq!(
            curve.lowest_with_share(best, 0.5).map(|i| LEVELS[i]),
            Some(4)
        );
        // 2 ms is reached at 16 in flight exactly.
        assert_eq!(curve.level_within(9, 2_000.0), Fit::Between(16.0));
        // 1.5 ms is half way from 8 (1 ms) to 16 (2 ms) in flight.
        assert_eq!(curve.level_within(9, 1_500.0), Fit::Between(12.0));
        assert_eq!(curve.level_within(9, 999.0), Fit::None);
        assert_eq!(curve.level_within(9, 1e9), Fit::AtLeast(32.0));
    }
}
