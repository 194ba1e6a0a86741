//! The live traffic's latency, judged in windows.
//!
//! [`Live`] keeps the latest live requests' latencies (queue plus service,
//! as the proxy saw them). Every [`ADJUST_EVERY`] of them (or fewer, when
//! live traffic is slow) it judges their p95. The samples are then
//! dropped, so each judgement sees only the limit it judges.

use std::collections::VecDeque;

/// Live completions per judgement…
pub const ADJUST_EVERY: usize = 20;

/// …or at least this many, once the window has lasted [`WINDOW_OBJECTIVES`]
/// times the objective (slow live traffic would otherwise wait long for 20).
pub const ADJUST_AT_LEAST: usize = 5;

/// See [`ADJUST_AT_LEAST`].
pub const WINDOW_OBJECTIVES: f64 = 5.0;

/// What [`Live`] keeps; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Latencies since the last judgement (µs).
    samples: VecDeque<u64>,
    /// The last live arrival or completion (host µs).
    last_seen_us: Option<u64>,
    /// The last judgement: a window's p95 (µs).
    last_p95_us: Option<f64>,
    /// When the current window began (host µs).
    window_start_us: Option<u64>,
}

impl Live {
    /// A live request finished at `now_us` after `latency_us`.
    pub fn record(&mut self, now_us: u64, latency_us: u64) {
        self.last_seen_us = Some(now_us);
        self.window_start_us.get_or_insert(now_us);
        if self.samples.len() == ADJUST_EVERY {
            self.samples.pop_front();
        }
        self.samples.push_back(latency_us);
    }

    /// A live request arrived at `now_us`: live traffic is present.
    pub fn arrived(&mut self, now_us: u64) {
        self.last_seen_us = Some(self.last_seen_us.map_or(now_us, |seen| seen.max(now_us)));
    }

    /// Whether live traffic has arrived or finished within `window_us`.
    pub fn present(&self, now_us: u64, window_us: u64) -> bool {
        self.last_seen_us
            .is_some_and(|seen| now_us.saturating_sub(seen) <= window_us)
    }

    /// The last judgement's p95 (µs).
    pub fn last_p95_us(&self) -> Option<f64> {
        self.last_p95_us
    }

    /// Once [`ADJUST_EVERY`] samples are in, or [`ADJUST_AT_LEAST`] over
    /// [`WINDOW_OBJECTIVES`] × `objective_us`: their p95 (µs).
    pub fn judge(&mut self, now_us: u64, objective_us: f64) -> Option<f64> {
        let lasted = now_us.saturating_sub(self.window_start_us.unwrap_or(now_us)) as f64;
        let long_enough = lasted >= WINDOW_OBJECTIVES * objective_us;
        let enough = self.samples.len() >= ADJUST_EVERY
            || (self.samples.len() >= ADJUST_AT_LEAST && long_enough);
        if !enough {
            return None;
        }
        self.window_start_us = None;
        let mut latencies: Vec<u64> = self.samples.drain(..).collect();
        latencies.sort_unstable();
        let p95_us = latencies[(latencies.len() * 95).div_ceil(100) - 1].max(1) as f64;
        self.last_p95_us = Some(p95_us);
        Some(p95_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_judgement_takes_a_full_window_and_starts_a_new_one() {
        let mut live = Live::default();
        for i in 1..ADJUST_EVERY as u64 {
            live.record(0, i * 100);
            assert_eq!(live.judge(0, 1_000.0), None);
        }
        live.record(0, 2_000);
        // Nearest-rank p95 of 100, 200, …, 1900, 2000: the 19th, 1900.
        assert_eq!(live.judge(0, 1_000.0), Some(1_900.0));
        assert_eq!(live.last_p95_us(), Some(1_900.0));
        assert_eq!(live.judge(0, 1_000.0), None);
    }

    #[test]
    fn slow_live_traffic_is_judged_on_fewer_samples() {
        let mut live = Live::default();
        for i in 0..ADJUST_AT_LEAST as u64 {
            live.record(i, 1_000);
        }
        // Five samples, but the window has not lasted 5 objectives yet.
        assert_eq!(live.judge(4_999, 1_000.0), None);
        assert_eq!(live.judge(5_000, 1_000.0), Some(1_000.0));
    }

    #[test]
    fn presence_lapses() {
        let mut live = Live::default();
        assert!(!live.present(0, 1_000_000));
        live.record(5_000_000, 1_000);
        assert!(live.present(5_500_000, 1_000_000));
        assert!(!live.present(6_500_000, 1_000_000));
        // An arrival counts as much as a completion.
        live.arrived(6_400_000);
        assert!(live.present(6_500_000, 1_000_000));
    }
}
