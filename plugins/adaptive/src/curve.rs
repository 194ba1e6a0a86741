//! The engine's service curve, learned from completions, and the climb
//! that finds its knee.
//!
//! [`Curve`] keeps, for each in-flight level of a fixed ladder ([`LEVELS`]),
//! the service time of requests admitted at that level (a moving average).
//! With a backlog keeping `c` requests in flight, the engine completes
//! `c / service(c)` per second: [`Curve::throughput`]. That grows with `c`
//! while the engine batches for free, then flattens: the knee.
//!
//! [`Climb`] moves a limit along the ladder by what the curve shows: up
//! while a step adds at least [`MIN_GAIN`] throughput, back one step when
//! it does not (the knee), then holds, probing one step up and one step
//! down now and then so that it follows an engine whose curve moves.

/// In-flight levels the curve is measured at, about 1.5× apart.
pub const LEVELS: [u32; 24] = [
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
    3072, 4096,
];

/// The least throughput gain that justifies one step up the ladder.
pub const MIN_GAIN: f64 = 0.02;

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

/// Service time by in-flight level; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Curve {
    points: [Point; LEVELS.len()],
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

    /// The service time with the engine nearly idle (levels 1 to 3), µs.
    pub fn unloaded_us(&self) -> Option<f64> {
        (0..3).find_map(|i| self.service_us(i))
    }

    /// The lowest level whose throughput is at least `share` of level
    /// `best`'s, among the measured levels up to `best`.
    pub fn lowest_with_share(&self, best: usize, share: f64) -> Option<usize> {
        let target = self.throughput(best)? * share;
        (0..=best).find(|&i| self.throughput(i).is_some_and(|t| t >= target))
    }

    /// The highest measured level up to `ceiling` whose service time is at
    /// most `budget_us`.
    pub fn highest_within(&self, ceiling: usize, budget_us: f64) -> Option<usize> {
        (0..=ceiling)
            .rev()
            .find(|&i| self.service_us(i).is_some_and(|s| s <= budget_us))
    }

    /// The highest measured level up to `ceiling`.
    pub fn highest_measured(&self, ceiling: usize) -> Option<usize> {
        (0..=ceiling).rev().find(|&i| self.service_us(i).is_some())
    }

    fn fresh(&self, index: usize) -> u32 {
        self.points[index].fresh
    }

    fn judged(&mut self, index: usize) {
        self.points[index].fresh = 0;
    }
}

/// Where the climb is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Going up while each step pays.
    Up,
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
            phase: Phase::Up,
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
    /// moves. True when the limit moved.
    pub fn step(&mut self, curve: &mut Curve) -> bool {
        let i = self.index;
        let round = LEVELS[i].max(MIN_SAMPLES);
        if curve.fresh(i) < round {
            return false;
        }
        curve.judged(i);
        let gained = |from: usize, to: usize| match (curve.throughput(from), curve.throughput(to)) {
            (Some(a), Some(b)) => b >= a * (1.0 + MIN_GAIN),
            _ => true,
        };
        let before = self.index;
        match self.phase {
            Phase::Up if i == 0 || gained(i - 1, i) => {
                if i < self.max_index {
                    self.index = i + 1;
                } else {
                    self.settle(i);
                }
            }
            Phase::Up => self.settle(i - 1),
            Phase::Hold(rounds) if rounds + 1 < HOLD_ROUNDS => self.phase = Phase::Hold(rounds + 1),
            Phase::Hold(_) => {
                let up = self.probe_up_next && i < self.max_index;
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
            // One step above the knee pays after all: climb on.
            Phase::ProbeUp if gained(i - 1, i) => self.phase = Phase::Up,
            Phase::ProbeUp => self.settle(i - 1),
            // The knee's step no longer pays: the knee is lower now.
            Phase::ProbeDown if !gained(i, i + 1) => self.settle(i),
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
        for _ in 0..LEVELS[index].max(MIN_SAMPLES) {
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
            climb.step(&mut curve);
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
        assert_eq!(climb.knee().map(|k| LEVELS[k]), Some(24), "{visited:?}");
        assert!(
            visited.iter().all(|&l| l <= 32),
            "never past one step over the knee"
        );
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
            climb.step(&mut curve);
        }
        assert_eq!(climb.knee().map(|k| LEVELS[k]), Some(8));
        // The engine now batches four times as much for free.
        for _ in 0..400 {
            feed(&mut curve, climb.index(), slow);
            climb.step(&mut curve);
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
        assert_eq!(
            curve.highest_within(9, 2_000.0).map(|i| LEVELS[i]),
            Some(16)
        );
        assert_eq!(curve.highest_within(9, 10.0), None);
    }
}
