//! The live traffic's latency, and the batch limit it allows.
//!
//! [`Live`] keeps the latest live requests' latencies (queue plus service,
//! as the proxy saw them) and, every [`ADJUST_EVERY`] of them, compares
//! their p95 with the objective: over it, the batch limit shrinks in
//! proportion (at most by half); more than 2% under it, the limit grows in
//! proportion (at most by half). The samples are then dropped, so each judgement sees only the
//! limit it judges.

use std::collections::VecDeque;

/// Live completions per judgement of the batch limit.
pub const ADJUST_EVERY: usize = 20;

/// How long after its last completion live traffic counts as present, in
/// unloaded service times (and at least a second).
const IDLE_SERVICE_TIMES: f64 = 200.0;

/// What [`Live`] keeps; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Latencies (µs) since the last judgement.
    samples: VecDeque<u64>,
    /// The last live completion (host µs).
    last_seen_us: Option<u64>,
    /// The p95 of the last judgement (µs).
    last_p95_us: Option<u64>,
}

impl Live {
    /// A live request finished at `now_us` after `latency_us`.
    pub fn record(&mut self, now_us: u64, latency_us: u64) {
        self.last_seen_us = Some(now_us);
        if self.samples.len() == ADJUST_EVERY {
            self.samples.pop_front();
        }
        self.samples.push_back(latency_us);
    }

    /// Whether live traffic has finished recently, given the unloaded
    /// service time.
    pub fn present(&self, now_us: u64, unloaded_us: f64) -> bool {
        let idle_us = (unloaded_us * IDLE_SERVICE_TIMES).max(1e6) as u64;
        self.last_seen_us
            .is_some_and(|seen| now_us.saturating_sub(seen) <= idle_us)
    }

    /// The p95 of the last judgement (µs).
    pub fn last_p95_us(&self) -> Option<u64> {
        self.last_p95_us
    }

    /// Once [`ADJUST_EVERY`] samples are in: the batch limit that `limit`
    /// becomes for `objective_us`, between `floor` and `ceiling`.
    pub fn steer(
        &mut self,
        objective_us: f64,
        limit: f64,
        floor: f64,
        ceiling: f64,
    ) -> Option<f64> {
        if self.samples.len() < ADJUST_EVERY {
            return None;
        }
        let mut sorted: Vec<u64> = self.samples.drain(..).collect();
        sorted.sort_unstable();
        let p95 = sorted[(sorted.len() * 95).div_ceil(100) - 1].max(1);
        self.last_p95_us = Some(p95);
        let ratio = objective_us / p95 as f64;
        let next = if ratio < 1.0 {
            limit * ratio.max(0.5)
        } else if ratio > 1.02 {
            limit * ratio.min(1.5)
        } else {
            limit
        };
        Some(next.clamp(floor.min(ceiling), ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(live: &mut Live, latency_us: u64, limit: f64) -> Option<f64> {
        for _ in 0..ADJUST_EVERY {
            live.record(0, latency_us);
        }
        live.steer(1_000.0, limit, 1.0, 64.0)
    }

    #[test]
    fn over_the_objective_the_limit_shrinks_in_proportion() {
        let mut live = Live::default();
        assert_eq!(judged(&mut live, 1_250, 20.0), Some(16.0));
        assert_eq!(live.last_p95_us(), Some(1_250));
        // At most by half, and never under the floor.
        assert_eq!(judged(&mut live, 10_000, 20.0), Some(10.0));
        assert_eq!(judged(&mut live, 10_000, 1.5), Some(1.0));
    }

    #[test]
    fn well_under_the_objective_the_limit_grows_a_little() {
        let mut live = Live::default();
        assert_eq!(judged(&mut live, 800, 16.0), Some(20.0));
        assert_eq!(judged(&mut live, 100, 16.0), Some(24.0));
        assert_eq!(judged(&mut live, 990, 16.0), Some(16.0));
        assert_eq!(judged(&mut live, 1, 50.0), Some(64.0));
    }

    #[test]
    fn a_judgement_waits_for_fresh_samples() {
        let mut live = Live::default();
        assert_eq!(judged(&mut live, 800, 16.0), Some(20.0));
        live.record(0, 5_000);
        assert_eq!(live.steer(1_000.0, 18.0, 1.0, 64.0), None);
    }

    #[test]
    fn presence_lapses() {
        let mut live = Live::default();
        assert!(!live.present(0, 1_000.0));
        live.record(5_000_000, 1_000);
        assert!(live.present(5_500_000, 1_000.0));
        assert!(!live.present(6_500_000, 1_000.0));
        // A slow engine keeps live traffic present for longer.
        assert!(live.present(6_500_000, 10_000.0));
    }
}
