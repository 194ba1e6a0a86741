//! `bench compare`'s report: every scenario's results ([`Scorecard`]),
//! who wins each and by how much against the best client habit
//! ([`Verdict`]), rendered as Markdown tables, JSON and the plot.
//!
//! # `bench/results/compare_YYYYMMDD_HHMMSS.json` (schema `sluice-compare/1`)
//!
//! Beside it, with the same stem: `.md` (the tables printed at the end of
//! the run) and `.svg` ([`crate::plot::write_scenarios_svg`]).
//!
//! ```text
//! {
//!   "schema": "sluice-compare/1", "created_utc", "engine", "profile", "model",
//!   "workload", "candidate_offset", "stream",
//!   "settings": {"batch", "batch_clients", "live_load": [fractions], "live_seconds",
//!                "objective_factor", "frontier": [N], "warmup", "wave", "limit"},
//!   "unloaded_p50_ms",            // sequential requests straight to the engine
//!   "slo_ms",                     // goodput's objective
//!   "capacity_rps",               // the best batch-job throughput
//!   "batch": [{"label", "habit", "client": Summary, "proxy_cpu_us"}],
//!   "live": [{"label", "habit", "steps": [{"load", "offered_rps", "client": Summary,
//!             "goodput_rps", "proxy_cpu_us"}]}],
//!   "live_rate_rps",              // mixed and frontier: the live rate
//!   "live_alone": Summary,        // live at that rate alone, naive, straight to the engine
//!   "mixed": [{"label", "habit", "live": Summary, "batch": Summary, "batch_alone_rps",
//!              "live_timeline": [[arrival s, latency ms]], "proxy_cpu_us"}],
//!   "frontier": [{"label", "limit": N | null, "live": Summary, "batch": Summary,
//!                 "live_p95_ratio", "batch_ratio", "proxy_cpu_us"}],
//!   "slo_mode": null | {"objective_ms", "live_p95_ms", "met", "batch_rps",
//!                       "best_static": label | null, "best_static_rps", "ratio"},
//!   "summary": [{"scenario", "measure", "winner", "value", "versus", "versus_value", "ratio"}],
//!   "notes": ["..."]
//! }
//! ```
//!
//! `Summary` is a run's client-side summary, as in `sluice-bench/2`
//! ([`crate::report`]); `proxy_cpu_us` is the proxy process's CPU time
//! (user + system) per request it carried, `null` when no proxy process
//! was in the way.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::{Header, fresh_path};
use crate::scenario::{BatchRun, FrontierPoint, LiveRun, MixedRun};
use crate::stats::Summary;

/// The `schema` of the report.
pub(crate) const SCHEMA: &str = "sluice-compare/1";

/// How far above its objective adaptive's live p95 may be and still meet it.
pub(crate) const SLO_TOLERANCE: f64 = 0.10;

/// The flags a comparison ran with.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    pub(crate) batch: usize,
    pub(crate) batch_clients: usize,
    pub(crate) live_load: Vec<f64>,
    pub(crate) live_seconds: f64,
    pub(crate) objective_factor: f64,
    pub(crate) frontier: Vec<usize>,
    pub(crate) warmup: usize,
    pub(crate) wave: usize,
    pub(crate) limit: usize,
}

/// Adaptive asked to hold live p95 at an objective.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SloMode {
    pub(crate) objective_ms: f64,
    pub(crate) live_p95_ms: Option<f64>,
    /// Its live p95 within [`SLO_TOLERANCE`] of the objective.
    pub(crate) met: bool,
    pub(crate) batch_rps: f64,
    /// The static cap with the most batch throughput whose live p95 met
    /// the objective.
    pub(crate) best_static: Option<String>,
    pub(crate) best_static_rps: Option<f64>,
    /// Adaptive's batch throughput over the best static cap's.
    pub(crate) ratio: Option<f64>,
}

impl SloMode {
    /// Judges adaptive's `point` against `objective_ms` and the static
    /// caps of `frontier`, each side by the same rule: a live p95 within
    /// [`SLO_TOLERANCE`] over the objective meets it.
    pub(crate) fn judge(
        objective_ms: f64,
        point: &FrontierPoint,
        frontier: &[FrontierPoint],
    ) -> Self {
        let live_p95_ms = point.live_p95();
        let meets =
            |p95: Option<f64>| p95.is_some_and(|v| v <= objective_ms * (1.0 + SLO_TOLERANCE));
        let best = frontier
            .iter()
            .filter(|p| p.limit.is_some() && meets(p.live_p95()))
            .max_by(|a, b| a.batch.throughput_rps.total_cmp(&b.batch.throughput_rps));
        let batch_rps = point.batch.throughput_rps;
        Self {
            objective_ms,
            live_p95_ms,
            met: meets(live_p95_ms),
            batch_rps,
            best_static: best.map(|p| p.label.clone()),
            best_static_rps: best.map(|p| p.batch.throughput_rps),
            ratio: best.map(|p| batch_rps / p.batch.throughput_rps.max(1e-9)),
        }
    }
}

/// Who won a scenario on one measure, against whom.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) scenario: String,
    pub(crate) measure: String,
    pub(crate) winner: String,
    pub(crate) value: f64,
    /// The best client habit (or, for the SLO mode, the best static cap).
    pub(crate) versus: Option<String>,
    pub(crate) versus_value: Option<f64>,
    /// How many times better the winner is than `versus` (≥ 1).
    pub(crate) ratio: Option<f64>,
}

/// One configuration's value on a measure: (label, a client habit, value).
pub(crate) type Entry<'a> = (&'a str, bool, Option<f64>);

/// The best of `entries` (`higher` or lower is better) against the best
/// client habit among them; `None` when no entry has a value.
pub(crate) fn verdict(
    scenario: &str,
    measure: &str,
    entries: &[Entry<'_>],
    higher: bool,
) -> Option<Verdict> {
    let better = |a: f64, b: f64| if higher { a > b } else { a < b };
    let best = |habits_only: bool| {
        entries
            .iter()
            .filter(|(_, habit, _)| !habits_only || *habit)
            .filter_map(|&(label, _, v)| v.filter(|v| v.is_finite()).map(|v| (label, v)))
            .fold(None, |acc: Option<(&str, f64)>, (l, v)| match acc {
                Some((_, a)) if !better(v, a) => acc,
                _ => Some((l, v)),
            })
    };
    let (winner, value) = best(false)?;
    let habit = best(true);
    let ratio = habit.map(|(_, h)| {
        let r = if higher { value / h } else { h / value };
        if r.is_finite() { r } else { 1.0 }
    });
    Some(Verdict {
        scenario: scenario.into(),
        measure: measure.into(),
        winner: winner.into(),
        value,
        versus: habit.map(|(l, _)| l.to_string()),
        versus_value: habit.map(|(_, v)| v),
        ratio,
    })
}

/// A whole comparison.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Scorecard {
    pub(crate) schema: &'static str,
    #[serde(flatten)]
    pub(crate) header: Header,
    pub(crate) settings: Settings,
    pub(crate) unloaded_p50_ms: f64,
    pub(crate) slo_ms: f64,
    pub(crate) capacity_rps: f64,
    pub(crate) batch: Vec<BatchRun>,
    pub(crate) live: Vec<LiveRun>,
    pub(crate) live_rate_rps: f64,
    pub(crate) live_alone: Option<Summary>,
    pub(crate) mixed: Vec<MixedRun>,
    pub(crate) frontier: Vec<FrontierPoint>,
    pub(crate) slo_mode: Option<SloMode>,
    pub(crate) summary: Vec<Verdict>,
    pub(crate) notes: Vec<String>,
}

impl Scorecard {
    /// Fills `summary`: each scenario's winner against the best client habit.
    pub(crate) fn judge(&mut self) {
        let mut out = Vec::new();
        let batch: Vec<Entry<'_>> = self
            .batch
            .iter()
            .map(|r| (&*r.label, r.habit, Some(r.client.throughput_rps)))
            .collect();
        out.extend(verdict("batch job", "throughput (req/s)", &batch, true));
        let live: Vec<Entry<'_>> = self
            .live
            .iter()
            .map(|r| {
                let n = r.steps.len().max(1) as f64;
                let mean = r.steps.iter().map(|s| s.goodput_rps).sum::<f64>() / n;
                (&*r.label, r.habit, (!r.steps.is_empty()).then_some(mean))
            })
            .collect();
        out.extend(verdict(
            "live traffic",
            "goodput (req/s within SLO, mean over loads)",
            &live,
            true,
        ));
        let mixed_live: Vec<Entry<'_>> = self
            .mixed
            .iter()
            .map(|r| (&*r.label, r.habit, r.live.latency_ms.p95))
            .collect();
        out.extend(verdict("mixed", "live p95 (ms)", &mixed_live, false));
        let mixed_batch: Vec<Entry<'_>> = self
            .mixed
            .iter()
            .map(|r| (&*r.label, r.habit, Some(r.batch.throughput_rps)))
            .collect();
        out.extend(verdict(
            "mixed",
            "batch throughput (req/s)",
            &mixed_batch,
            true,
        ));
        // Both at once: the most batch throughput among the configurations
        // that kept live p95 within twice its value alone.
        if let Some(alone) = self.live_alone.as_ref().and_then(|a| a.latency_ms.p95) {
            let both: Vec<Entry<'_>> = self
                .mixed
                .iter()
                .filter(|r| r.live.latency_ms.p95.is_some_and(|p| p <= 2.0 * alone))
                .map(|r| (&*r.label, r.habit, Some(r.batch.throughput_rps)))
                .collect();
            out.extend(verdict(
                "mixed",
                "batch req/s with live p95 ≤ 2× alone",
                &both,
                true,
            ));
        }
        if let Some(slo) = &self.slo_mode {
            // Adaptive wins only when it met the objective and matched the
            // best static cap that did.
            let adaptive_wins = slo.met && slo.ratio.is_none_or(|r| r >= 1.0);
            let measure = format!(
                "batch req/s with live p95 ≤ {:.1} ms (adaptive {})",
                slo.objective_ms,
                if slo.met { "met it" } else { "missed it" }
            );
            let adaptive = "sluice + adaptive.wasm".to_string();
            out.push(match (&slo.best_static, slo.best_static_rps) {
                (Some(cap), Some(cap_rps)) if !adaptive_wins => Verdict {
                    scenario: "SLO mode".into(),
                    measure,
                    winner: cap.clone(),
                    value: cap_rps,
                    versus: Some(adaptive),
                    versus_value: Some(slo.batch_rps),
                    ratio: slo.ratio.filter(|r| *r > 0.0).map(|r| 1.0 / r),
                },
                _ => Verdict {
                    scenario: "SLO mode".into(),
                    measure,
                    winner: adaptive,
                    value: slo.batch_rps,
                    versus: slo.best_static.clone(),
                    versus_value: slo.best_static_rps,
                    ratio: slo.ratio,
                },
            });
        }
        self.summary = out;
    }

    /// Writes `dir/compare_YYYYMMDD_HHMMSS.json`, and beside it `.md`
    /// (`markdown`) and `.svg`; returns the JSON's path.
    pub(crate) fn write_all(&self, dir: &Path, markdown: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = fresh_path(dir, "compare", &self.header.created_utc);
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::write(json.with_extension("md"), markdown)?;
        crate::plot::write_scenarios_svg(
            &self.header.title(),
            &self.live,
            &self.frontier,
            self.slo_mode.as_ref().map(|s| s.objective_ms),
            &self.mixed,
            &json.with_extension("svg"),
        )?;
        Ok(json)
    }

    /// Every table, with the summary first.
    pub(crate) fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "engine: {}", self.header.engine);
        let _ = writeln!(s, "workload: {}", self.header.workload);
        let _ = writeln!(
            s,
            "unloaded p50 {:.2} ms (sequential, straight to the engine); SLO {:.2} ms; capacity {:.0} req/s (the best batch-job throughput)",
            self.unloaded_p50_ms, self.slo_ms, self.capacity_rps
        );
        for note in &self.notes {
            let _ = writeln!(s, "note: {note}");
        }
        s += &self.summary_table();
        s += &self.batch_table();
        s += &self.live_table();
        s += &self.mixed_table();
        s += &self.frontier_table();
        s
    }

    fn summary_table(&self) -> String {
        let mut s = String::from(
            "\n## Summary: which configuration wins\n\n| scenario | measure | winner | value | against | its value | margin |\n|---|---|---|---|---|---|---|\n",
        );
        for v in &self.summary {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                v.scenario,
                v.measure,
                v.winner,
                num(Some(v.value)),
                v.versus.as_deref().unwrap_or("–"),
                num(v.versus_value),
                v.ratio.map_or("–".into(), |r| format!("{r:.2}×")),
            );
        }
        s
    }

    fn batch_table(&self) -> String {
        let mut s = format!(
            "\n## 1. Batch job: {} candidates handed over at once\n\n| configuration | total time (s) | throughput (req/s) | p50 ms | p99 ms | failed | proxy CPU µs/req |\n|---|---|---|---|---|---|---|\n",
            self.settings.batch
        );
        for r in &self.batch {
            let c = &r.client;
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.0} | {} | {} | {} | {} |",
                r.label,
                c.elapsed_s,
                c.throughput_rps,
                num(c.latency_ms.p50),
                num(c.latency_ms.p99),
                c.failed,
                num(r.proxy_cpu_us),
            );
        }
        s
    }

    fn live_table(&self) -> String {
        let mut s = format!(
            "\n## 2. Live traffic: open-loop Poisson, {} s per load (a fraction of capacity), latency from arrival; goodput within {:.2} ms\n\n| configuration | load | offered req/s | p50 ms | p95 ms | p99 ms | goodput req/s | failed | proxy CPU µs/req |\n|---|---|---|---|---|---|---|---|---|\n",
            self.settings.live_seconds, self.slo_ms
        );
        for r in &self.live {
            for step in &r.steps {
                let q = &step.client.latency_ms;
                let _ = writeln!(
                    s,
                    "| {} | {:.2} | {:.0} | {} | {} | {} | {:.0} | {} | {} |",
                    r.label,
                    step.load,
                    step.offered_rps,
                    num(q.p50),
                    num(q.p95),
                    num(q.p99),
                    step.goodput_rps,
                    step.client.failed,
                    num(step.proxy_cpu_us),
                );
            }
        }
        s
    }

    fn mixed_table(&self) -> String {
        let alone = self.live_alone.as_ref().map(|a| &a.latency_ms);
        let mut s = format!(
            "\n## 3. Mixed: live traffic at {:.1} req/s (`X-Priority: 10`) during the batch job\n\nAlone: live p50 {} ms, p95 {} ms (naive, straight to the engine); batch: each configuration's batch job.\n\n| configuration | live p50 ms | live p95 ms | live p95 × alone | batch req/s | batch alone req/s | batch × alone | failed live / batch | proxy CPU µs/req |\n|---|---|---|---|---|---|---|---|---|\n",
            self.live_rate_rps,
            num(alone.and_then(|q| q.p50)),
            num(alone.and_then(|q| q.p95)),
        );
        for r in &self.mixed {
            let p95 = r.live.latency_ms.p95;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {} / {} | {} |",
                r.label,
                num(r.live.latency_ms.p50),
                num(p95),
                ratio(p95, alone.and_then(|q| q.p95)),
                r.batch.throughput_rps,
                r.batch_alone_rps,
                r.batch.throughput_rps / r.batch_alone_rps.max(1e-9),
                r.live.failed,
                r.batch.failed,
                num(r.proxy_cpu_us),
            );
        }
        s
    }

    fn frontier_table(&self) -> String {
        if self.frontier.is_empty() {
            return String::new();
        }
        let mut s = format!(
            "\n## 4. Frontier: the batch through a static cap, live at {:.1} req/s straight to the engine beside it\n\nAlone: live p95 {} ms; batch: the capacity, {:.0} req/s. Adaptive's live goes through Sluice with it.\n\n| batch through | live p95 ms | live p95 × alone | batch req/s | batch × capacity | proxy CPU µs/req |\n|---|---|---|---|---|---|\n",
            self.live_rate_rps,
            num(self.live_alone.as_ref().and_then(|a| a.latency_ms.p95)),
            self.capacity_rps,
        );
        for p in &self.frontier {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.2} | {} |",
                p.label,
                num(p.live_p95()),
                p.live_p95_ratio.map_or("–".into(), |r| format!("{r:.2}")),
                p.batch.throughput_rps,
                p.batch_ratio,
                num(p.proxy_cpu_us),
            );
        }
        if let Some(slo) = &self.slo_mode {
            let _ = writeln!(
                s,
                "\nSLO mode: objective live p95 ≤ {:.2} ms ({} × alone); adaptive's {} ms {} it (the rule: within {:.0}% over), with {:.0} batch req/s; the best static cap meeting it: {}.",
                slo.objective_ms,
                self.settings.objective_factor,
                num(slo.live_p95_ms),
                if slo.met { "meets" } else { "misses" },
                SLO_TOLERANCE * 100.0,
                slo.batch_rps,
                match (&slo.best_static, slo.best_static_rps, slo.ratio) {
                    (Some(l), Some(v), Some(r)) =>
                        format!("{l}, {v:.0} req/s (adaptive {r:.2}× that)"),
                    _ => "none".into(),
                },
            );
        }
        s
    }
}

/// A measure with 2 decimals below 100, none above; `–` when unknown.
fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_winner_is_measured_against_the_best_habit() {
        let entries = [
            ("waves", true, Some(100.0)),
            ("semaphore", true, Some(80.0)),
            ("sluice", false, Some(150.0)),
            ("broken", false, None),
        ];
        let v = verdict("batch job", "req/s", &entries, true).unwrap();
        assert_eq!((v.winner.as_str(), v.value), ("sluice", 150.0));
        assert_eq!(v.versus.as_deref(), Some("waves"));
        assert_eq!(v.ratio, Some(1.5));
        // Lower is better: the ratio is still how many times better.
        let v = verdict("mixed", "p95", &entries, false).unwrap();
        assert_eq!(
            (v.winner.as_str(), v.versus.as_deref()),
            ("semaphore", Some("semaphore"))
        );
        assert_eq!(v.ratio, Some(1.0));
        let p95 = [("waves", true, Some(40.0)), ("sluice", false, Some(10.0))];
        assert_eq!(
            verdict("mixed", "p95", &p95, false).unwrap().ratio,
            Some(4.0)
        );
        // No habit measured: a winner without a margin; nothing measured: none.
        let v = verdict("x", "y", &[("sluice", false, Some(1.0))], true).unwrap();
        assert_eq!((v.versus, v.ratio), (None, None));
        assert_eq!(verdict("x", "y", &[("a", true, None)], true), None);
    }

    fn point(label: &str, limit: Option<usize>, p95: f64, rps: f64) -> FrontierPoint {
        let mut live = crate::stats::Outcomes::default();
        live.record(crate::stats::Sample {
            result: Ok(1),
            latency: std::time::Duration::from_secs_f64(p95 / 1000.0),
            ttft: None,
        });
        let mut batch = crate::stats::Outcomes {
            ok: (rps * 10.0) as u64,
            ..Default::default()
        };
        batch.elapsed = std::time::Duration::from_secs(10);
        FrontierPoint {
            label: label.into(),
            limit,
            live: live.summary(),
            batch: batch.summary(),
            live_p95_ratio: None,
            batch_ratio: 1.0,
            proxy_cpu_us: None,
        }
    }

    #[test]
    fn the_slo_mode_is_judged_against_the_best_static_cap_that_meets_it() {
        let frontier = [
            point("limit 2", Some(2), 10.0, 100.0),
            point("limit 8", Some(8), 19.0, 300.0),
            point("limit 16", Some(16), 21.9, 330.0),
            point("limit 32", Some(32), 50.0, 500.0),
        ];
        let adaptive = point("adaptive", None, 21.5, 360.0);
        let slo = SloMode::judge(20.0, &adaptive, &frontier);
        assert!(slo.met, "21.5 is within 10% of 20");
        // The caps are judged by the same rule: 21.9 ms meets 20 too.
        assert_eq!(slo.best_static.as_deref(), Some("limit 16"));
        assert!((slo.ratio.unwrap() - 360.0 / 330.0).abs() < 1e-9);
        let slo = SloMode::judge(5.0, &point("adaptive", None, 9.0, 50.0), &frontier);
        assert!(!slo.met);
        assert_eq!((slo.best_static, slo.ratio), (None, None));
    }
}
