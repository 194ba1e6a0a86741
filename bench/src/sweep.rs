//! `bench run --mode sweep`: open-loop Poisson rates stepped up until the
//! target saturates.
//!
//! Each step is a `rate` run of `rate × --step-duration` requests (at least
//! [`MIN_STEP_REQUESTS`]), with its own candidates and arrival seed. The
//! rates are `--rates` when given, else `--rate` multiplied by
//! `--sweep-factor` each step, for at most `--max-steps` steps. The sweep
//! stops at the first saturated step. A step is saturated when
//! ([`judge`]):
//! - **throughput**: the achieved rate (successes over the step's wall time,
//!   its tail included) is below `--min-achieved` (0.9) of the rate actually
//!   offered (the requests over the span of their Poisson send times, not
//!   the nominal rate, so that the draw's own spread does not count);
//! - **errors**: more than `--max-error-rate` (1%) of the requests failed;
//! - **p99**: the p99 latency, timed from the intended send time, exceeds
//!   `--max-p99`, by default 10× the first step's p99.
//!
//! The saturation point is reported as the last sustained step's offered
//! rate and the first saturated one's.

use std::time::Duration;

use serde::Serialize;

use crate::stats::Summary;

/// Steps shorter than this many requests are too noisy to judge.
pub(crate) const MIN_STEP_REQUESTS: usize = 20;

/// `bench run --mode sweep` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SweepArgs {
    /// Sweep: the offered rates, in order (e.g. `50,100,200,400`); by
    /// default `--rate` times `--sweep-factor` per step.
    #[arg(long, value_delimiter = ',')]
    pub(crate) rates: Vec<f64>,
    /// Sweep: each step's rate over the previous one's.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) sweep_factor: f64,
    /// Sweep: most steps.
    #[arg(long, default_value_t = 10)]
    pub(crate) max_steps: usize,
    /// Sweep: how long each step sends (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = crate::load::parse_duration)]
    pub(crate) step_duration: f64,
    /// Sweep: saturated below this fraction of the offered rate achieved.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) min_achieved: f64,
    /// Sweep: saturated above this fraction of requests failed.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) max_error_rate: f64,
    /// Sweep: saturated when p99 exceeds this (e.g. 500ms); default 10× the
    /// first step's p99.
    #[arg(long, value_parser = crate::load::parse_duration)]
    pub(crate) max_p99: Option<f64>,
}

impl SweepArgs {
    /// The offered rates, in order.
    pub(crate) fn rates(&self, start: f64) -> Vec<f64> {
        if !self.rates.is_empty() {
            return self.rates.clone();
        }
        let factor = self.sweep_factor.max(1.01);
        std::iter::successors(Some(start), |r| Some(r * factor))
            .take(self.max_steps.max(1))
            .collect()
    }

    /// Requests of a step at `rate`.
    pub(crate) fn step_requests(&self, rate: f64) -> usize {
        ((rate * self.step_duration).ceil() as usize).max(MIN_STEP_REQUESTS)
    }
}

/// Why a step counts as saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Reason {
    /// Achieved throughput fell clearly below the offered rate.
    Throughput,
    /// Too many requests failed.
    Errors,
    /// p99 latency grew past the bound.
    P99,
}

/// The bounds a step is judged against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) min_achieved: f64,
    pub(crate) max_error_rate: f64,
    pub(crate) max_p99_ms: Option<f64>,
}

/// One step of a sweep.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    /// The nominal Poisson rate.
    pub(crate) rate_rps: f64,
    /// Requests over the span of their intended send times.
    pub(crate) offered_rps: f64,
    /// Successes over the step's wall time.
    pub(crate) achieved_rps: f64,
    pub(crate) sent: u64,
    pub(crate) failed: u64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// Why it is saturated; `null` when it sustained its rate.
    pub(crate) saturated: Option<Reason>,
}

impl Step {
    /// A step from its client summary; `send_span` is the time over which
    /// its requests were meant to be sent.
    pub(crate) fn of(rate: f64, send_span: Duration, c: &Summary, bounds: &Bounds) -> Self {
        let offered = c.sent as f64 / send_span.as_secs_f64().max(1e-9);
        let mut step = Self {
            rate_rps: rate,
            offered_rps: offered,
            achieved_rps: c.throughput_rps,
            sent: c.sent,
            failed: c.failed,
            p50_ms: c.latency_ms.p50,
            p99_ms: c.latency_ms.p99,
            saturated: None,
        };
        step.saturated = judge(&step, bounds);
        step
    }
}

/// Whether a step is saturated, and by what (throughput is checked first,
/// then errors, then p99).
pub(crate) fn judge(step: &Step, bounds: &Bounds) -> Option<Reason> {
    if step.sent == 0 {
        return None;
    }
    if step.achieved_rps < bounds.min_achieved * step.offered_rps {
        return Some(Reason::Throughput);
    }
    if step.failed as f64 > bounds.max_error_rate * step.sent as f64 {
        return Some(Reason::Errors);
    }
    match (step.p99_ms, bounds.max_p99_ms) {
        (Some(p99), Some(max)) if p99 > max => Some(Reason::P99),
        // Nothing succeeded: no latency to judge, and every request failed.
        (None, _) => Some(Reason::Errors),
        _ => None,
    }
}

/// A whole sweep: its steps and where it saturated.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sweep {
    pub(crate) steps: Vec<Step>,
    /// The p99 bound used, in ms.
    pub(crate) max_p99_ms: Option<f64>,
    /// The highest offered rate sustained (the step before saturation).
    pub(crate) sustained_rps: Option<f64>,
    /// The offered rate of the first saturated step.
    pub(crate) saturated_rps: Option<f64>,
    pub(crate) reason: Option<Reason>,
    /// The highest achieved rate of any step.
    pub(crate) max_achieved_rps: f64,
}

impl Sweep {
    /// Summarises `steps` (the sweep stops at the first saturated one).
    pub(crate) fn of(steps: Vec<Step>, max_p99_ms: Option<f64>) -> Self {
        let first = steps.iter().position(|s| s.saturated.is_some());
        let sustained = match first {
            Some(0) => None,
            Some(i) => Some(steps[i - 1].offered_rps),
            None => steps.last().map(|s| s.offered_rps),
        };
        Self {
            sustained_rps: sustained,
            saturated_rps: first.map(|i| steps[i].offered_rps),
            reason: first.and_then(|i| steps[i].saturated),
            max_achieved_rps: steps.iter().map(|s| s.achieved_rps).fold(0.0, f64::max),
            max_p99_ms,
            steps,
        }
    }

    /// A Markdown table of the steps and a line naming the saturation point.
    pub(crate) fn markdown(&self) -> String {
        let mut s = String::from(
            "| rate (req/s) | offered (req/s) | achieved (req/s) | p50 ms | p99 ms | errors | saturated |\n|---|---|---|---|---|---|---|\n",
        );
        let ms = |v: Option<f64>| v.map_or("–".into(), |x| format!("{x:.2}"));
        for st in &self.steps {
            s += &format!(
                "| {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
                st.rate_rps,
                st.offered_rps,
                st.achieved_rps,
                ms(st.p50_ms),
                ms(st.p99_ms),
                st.failed,
                st.saturated
                    .map_or("no".into(), |r| format!("yes ({r:?})").to_lowercase()),
            );
        }
        s += &match (self.sustained_rps, self.saturated_rps, self.reason) {
            (Some(ok), Some(bad), Some(r)) => format!(
                "\nsaturation: sustained {ok:.1} req/s; saturated at {bad:.1} req/s offered ({}); best achieved {:.1} req/s\n",
                format!("{r:?}").to_lowercase(),
                self.max_achieved_rps
            ),
            (None, Some(bad), Some(r)) => format!(
                "\nsaturation: already saturated at the first step, {bad:.1} req/s offered ({}); lower --rate\n",
                format!("{r:?}").to_lowercase()
            ),
            (Some(ok), _, _) => format!(
                "\nsaturation: not reached; sustained {ok:.1} req/s (raise --rate or --max-steps)\n"
            ),
            _ => "\nsaturation: no steps\n".into(),
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        min_achieved: 0.9,
        max_error_rate: 0.01,
        max_p99_ms: Some(100.0),
    };

    fn step(offered: f64, achieved: f64, sent: u64, failed: u64, p99: Option<f64>) -> Step {
        let mut s = Step {
            rate_rps: offered,
            offered_rps: offered,
            achieved_rps: achieved,
            sent,
            failed,
            p50_ms: p99.map(|p| p / 2.0),
            p99_ms: p99,
            saturated: None,
        };
        s.saturated = judge(&s, &BOUNDS);
        s
    }

    #[test]
    fn saturation_is_judged_on_throughput_errors_and_p99() {
        assert_eq!(step(100.0, 98.0, 1000, 0, Some(20.0)).saturated, None);
        // Exactly at the bounds is still sustained.
        assert_eq!(step(100.0, 90.0, 1000, 10, Some(100.0)).saturated, None);
        assert_eq!(
            step(100.0, 89.0, 1000, 0, Some(20.0)).saturated,
            Some(Reason::Throughput)
        );
        assert_eq!(
            step(100.0, 99.0, 1000, 11, Some(20.0)).saturated,
            Some(Reason::Errors)
        );
        assert_eq!(
            step(100.0, 99.0, 1000, 0, Some(100.5)).saturated,
            Some(Reason::P99)
        );
        assert_eq!(
            step(100.0, 0.0, 10, 10, None).saturated,
            Some(Reason::Throughput)
        );
        let no_bound = Bounds {
            max_p99_ms: None,
            ..BOUNDS
        };
        let mut s = step(100.0, 99.0, 1000, 0, Some(1e6));
        assert_eq!(judge(&s, &no_bound), None);
        s.sent = 0;
        assert_eq!(judge(&s, &BOUNDS), None);
    }

    #[test]
    fn offered_rate_is_the_realised_one() {
        let c = crate::stats::Outcomes::default();
        let mut c = c;
        for _ in 0..50 {
            c.record(crate::stats::Sample {
                result: Ok(1),
                latency: Duration::from_millis(5),
                ttft: None,
            });
        }
        c.elapsed = Duration::from_millis(1050);
        // A draw of 50 arrivals at a nominal 40/s that happened to span 1 s.
        let st = Step::of(40.0, Duration::from_secs(1), &c.summary(), &BOUNDS);
        assert_eq!(st.offered_rps, 50.0);
        assert!((st.achieved_rps - 50.0 / 1.05).abs() < 1e-9);
        assert_eq!(st.saturated, None);
    }

    #[test]
    fn the_saturation_point_is_the_step_before_the_first_saturated_one() {
        let steps = vec![
            step(100.0, 99.0, 500, 0, Some(10.0)),
            step(200.0, 197.0, 1000, 0, Some(30.0)),
            step(400.0, 250.0, 2000, 0, Some(900.0)),
        ];
        let sweep = Sweep::of(steps, Some(100.0));
        assert_eq!(sweep.sustained_rps, Some(200.0));
        assert_eq!(sweep.saturated_rps, Some(400.0));
        assert_eq!(sweep.reason, Some(Reason::Throughput));
        assert_eq!(sweep.max_achieved_rps, 250.0);
        let md = sweep.markdown();
        assert!(
            md.contains("saturated at 400.0 req/s offered (throughput)"),
            "{md}"
        );
        assert!(
            md.contains("| 400 | 400.0 | 250.0 | 450.00 | 900.00 | 0 | yes (throughput) |"),
            "{md}"
        );

        let never = Sweep::of(vec![step(100.0, 99.0, 500, 0, Some(10.0))], None);
        assert_eq!(
            (never.sustained_rps, never.saturated_rps),
            (Some(100.0), None)
        );
        assert!(never.markdown().contains("not reached"));
        let at_once = Sweep::of(vec![step(100.0, 10.0, 500, 0, Some(10.0))], None);
        assert_eq!(at_once.sustained_rps, None);
        assert!(at_once.markdown().contains("already saturated"));
    }

    #[test]
    fn rates_double_or_follow_the_list() {
        let mut a = SweepArgs {
            rates: Vec::new(),
            sweep_factor: 2.0,
            max_steps: 4,
            step_duration: 2.0,
            min_achieved: 0.9,
            max_error_rate: 0.01,
            max_p99: None,
        };
        assert_eq!(a.rates(25.0), [25.0, 50.0, 100.0, 200.0]);
        assert_eq!(a.step_requests(100.0), 200);
        assert_eq!(a.step_requests(1.0), MIN_STEP_REQUESTS);
        a.rates = vec![5.0, 7.0];
        assert_eq!(a.rates(25.0), [5.0, 7.0]);
    }
}
