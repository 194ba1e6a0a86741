//! Benchmark reports: the measured runs of one benchmark
//! ([`RunResult`]s, one per configuration) rendered as the JSON file, the
//! Markdown summaries and the plot.
//!
//! # `bench/results/benchmark_YYYYMMDD_HHMMSS.json` (schema `sluice-bench/2`)
//!
//! Beside it, with the same stem: `.md` (the Markdown printed at the end of
//! the run) and `.svg` (latency CDF per configuration, throughput bars; see
//! [`crate::plot`]).
//!
//! ```text
//! {
//!   "schema": "sluice-bench/2",
//!   "created_utc": "2026-11-23T12:00:00Z",
//!   "engine": "simulated vLLM (profile rtx4080)" | "real vLLM at URL" | ...,
//!   "profile": "rtx4080" | null,          // simulator profile, when simulated
//!   "model": "tiny-llama" | null,         // the engine's /v1/models id
//!   "workload": "synthetic candidate evaluation (seed 42, ...)",
//!   "candidate_offset": 1795437296000000 | null,  // candidate of request 0 (synthetic set)
//!   "stream": false,                      // answers streamed (SSE)
//!   "runs": [{
//!     "label": "proxy + concurrency.wasm",  // one column of the table
//!     "target": "http://127.0.0.1:PORT",    // where the clients sent
//!     "plan": {"mode": "batched"|"inngest"|"rate"|"naive"|"sweep", "requests", "duration_s",
//!              "wave", "limit", "clients", "rate", "seed",
//!              "offset"},                    // request i is candidate candidate_offset + offset + i
//!     "client": {                            // as the client saw it
//!       "sent", "ok", "failed",              // ok + failed == sent
//!       "errors": {"http_429": n, "timeout": n, "stream_truncated": n, ...},
//!       "success_rate", "elapsed_s", "throughput_rps",
//!       "output_tokens", "output_tokens_per_s",   // from each answer's usage
//!       "latency_ms": {"count", "p50", "p95", "p99", "mean", "max"},
//!       "ttft_ms": null | {"count", "p50", "p95", "p99", "mean", "max"},  // streamed runs
//!       "latency_cdf_ms": [[quantile, ms], ...]   // every 2%, then 0.99, 0.995, 0.999, 1
//!     },
//!     "proxy": null | {                      // the proxy's GET /stats, when proxied
//!       "policy", "outcomes": {...},
//!       "service_ms", "queue_wait_ms", "total_ms": {"count","p50_ms","p95_ms","p99_ms",...}
//!     },
//!     "prefix_cache": null | {"hit_tokens", "query_tokens", "hit_rate"},  // engine /metrics deltas
//!     "predicted_prefix_cache": null | {...the same},  // the proxy's tracker (proxied runs)
//!     "upstream_max_in_flight": null | n,    // in-process simulator only: exact peak
//!     "gpu": "n/a (no NVIDIA driver)" | "MiB used / MiB total, util %" per GPU,
//!     "gpu_memory_mib": null | n             // summed over GPUs, after the run
//!   }],
//!   "winners": {"throughput (req/s)": "label", ...},  // bench compare only: per
//!                                          // table row, labels within 1% of the best joined by " = "
//!   "sweep": null | {                      // bench run --mode sweep (runs: one per step)
//!     "steps": [{"rate_rps", "offered_rps", "achieved_rps", "sent", "failed",
//!                "p50_ms", "p99_ms", "saturated": null | "throughput" | "errors" | "p99"}],
//!     "max_p99_ms", "sustained_rps", "saturated_rps", "reason", "max_achieved_rps"
//!   }
//! }
//! ```
//!
//! Changes from `sluice-bench/1`: added `candidate_offset`, `stream`,
//! `client.ttft_ms`, `client.latency_cdf_ms`, `predicted_prefix_cache`, `gpu_memory_mib`, `sweep`,
//! the `sweep` mode and the stream error kinds. Every `/1` field is still
//! there with the same meaning, except that candidates now start at
//! `candidate_offset` instead of 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::measure::RunResult;
use crate::stats::PrefixCache;
use crate::sweep::Sweep;
use crate::workload::Workload;

/// The `schema` of every report.
pub(crate) const SCHEMA: &str = "sluice-bench/2";

/// What every report says first: when, against what, with which workload
/// (its fields sit at the top level of the JSON).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Header {
    pub(crate) created_utc: String,
    pub(crate) engine: String,
    pub(crate) profile: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) workload: String,
    pub(crate) candidate_offset: Option<u64>,
    pub(crate) stream: bool,
}

impl Header {
    /// A header stamped now.
    pub(crate) fn new(
        engine: String,
        profile: Option<String>,
        model: Option<String>,
        workload: &Workload,
    ) -> Self {
        Header {
            created_utc: now_utc(),
            engine,
            profile,
            model,
            workload: workload.description.clone(),
            candidate_offset: workload.candidate_offset,
            stream: workload.stream,
        }
    }

    /// The plot's title: the engine and when.
    pub(crate) fn title(&self) -> String {
        format!("{} — {}", self.engine, self.created_utc)
    }
}

/// A whole benchmark report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) schema: &'static str,
    #[serde(flatten)]
    pub(crate) header: Header,
    pub(crate) runs: Vec<RunResult>,
    pub(crate) winners: BTreeMap<String, String>,
    pub(crate) sweep: Option<Sweep>,
}

pub(crate) use sluice::units::utc;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn now_utc() -> String {
    let (y, mo, d, h, mi, s) = utc(now_secs());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A path `dir/{prefix}_YYYYMMDD_HHMMSS.json` for a report created at
/// `created_utc`, not yet taken (`_2`, `_3`, … otherwise).
pub(crate) fn fresh_path(dir: &Path, prefix: &str, created_utc: &str) -> PathBuf {
    let stamp: String = created_utc.chars().filter(char::is_ascii_digit).collect();
    let (day, time) = stamp.split_at(8.min(stamp.len()));
    let mut path = dir.join(format!("{prefix}_{day}_{time}.json"));
    let mut n = 1;
    while path.exists() {
        n += 1;
        path = dir.join(format!("{prefix}_{day}_{time}_{n}.json"));
    }
    path
}

impl Report {
    /// A report of `runs`, stamped now.
    pub(crate) fn new(
        engine: String,
        profile: Option<String>,
        model: Option<String>,
        workload: &Workload,
        runs: Vec<RunResult>,
    ) -> Self {
        Self {
            schema: SCHEMA,
            header: Header::new(engine, profile, model, workload),
            runs,
            winners: BTreeMap::new(),
            sweep: None,
        }
    }

    /// Writes `dir/benchmark_YYYYMMDD_HHMMSS.json`, and beside it `.md`
    /// (`markdown`) and `.svg` (the plot); returns the JSON's path.
    pub(crate) fn write_all(&self, dir: &Path, markdown: &str) -> anyhow::Result<PathBuf> {
        let json = self.write(dir)?;
        std::fs::write(json.with_extension("md"), markdown)?;
        crate::plot::write_svg(
            &self.header.title(),
            &self.runs,
            &json.with_extension("svg"),
        )?;
        Ok(json)
    }

    /// Writes `dir/benchmark_YYYYMMDD_HHMMSS.json`; returns its path.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = fresh_path(dir, "benchmark", &self.header.created_utc);
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(path)
    }

    /// A Markdown summary: one line per run, every measure.
    pub(crate) fn markdown(&self) -> String {
        let mut s = format!(
            "engine: {}\nworkload: {}\n\n| run | sent | ok | errors | req/s | out tok/s | p50 ms | p95 ms | p99 ms | TTFT p50/p95/p99 ms | proxy service p50 ms | queue wait p50 ms | cache hit | upstream max in flight | GPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.header.engine, self.header.workload
        );
        for r in &self.runs {
            let c = &r.client;
            let errors = if c.errors.is_empty() {
                "0".to_string()
            } else {
                c.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let pv = |v: Option<&Value>| {
                v.and_then(|v| v["p50_ms"].as_f64())
                    .map_or("–".into(), |x| format!("{x:.2}"))
            };
            s += &format!(
                "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.label,
                c.sent,
                c.ok,
                errors,
                c.throughput_rps,
                c.output_tokens_per_s,
                ms(c.latency_ms.p50),
                ms(c.latency_ms.p95),
                ms(c.latency_ms.p99),
                c.ttft_ms.as_ref().map_or("–".into(), |t| format!(
                    "{} / {} / {}",
                    ms(t.p50),
                    ms(t.p95),
                    ms(t.p99)
                )),
                pv(r.proxy.as_ref().map(|p| &p.service_ms)),
                pv(r.proxy.as_ref().map(|p| &p.queue_wait_ms)),
                hit(r),
                r.upstream_max_in_flight
                    .map_or("–".into(), |n| n.to_string()),
                r.gpu,
            );
        }
        if let Some(sweep) = &self.sweep {
            s += "\nsweep (open-loop Poisson steps):\n\n";
            s += &sweep.markdown();
        }
        s
    }

    /// The comparison table in the reference's shape: one row per measure,
    /// one column per configuration, a winner per row. Fills `winners`.
    /// TTFT rows appear when the answers were streamed.
    pub(crate) fn comparison(&mut self) -> String {
        type Pick = fn(&RunResult) -> Option<f64>;
        type Fmt = fn(f64) -> String;
        let ms2: Fmt = |v| format!("{v:.2}");
        let pct: Fmt = |v| format!("{:.1}%", v * 100.0);
        // (row, value, higher is better, format)
        let mut rows: Vec<(&str, Pick, bool, Fmt)> = vec![
            (
                "throughput (req/s)",
                |r| Some(r.client.throughput_rps),
                true,
                |v| format!("{v:.0}"),
            ),
            (
                "output tokens/s",
                |r| Some(r.client.output_tokens_per_s),
                true,
                |v| format!("{v:.0}"),
            ),
            ("p50 latency (ms)", |r| r.client.latency_ms.p50, false, ms2),
            ("p95 latency (ms)", |r| r.client.latency_ms.p95, false, ms2),
            ("p99 latency (ms)", |r| r.client.latency_ms.p99, false, ms2),
        ];
        if self.runs.iter().any(|r| r.client.ttft_ms.is_some()) {
            rows.extend([
                (
                    "TTFT p50 (ms)",
                    (|r| r.client.ttft_ms.as_ref().and_then(|t| t.p50)) as Pick,
                    false,
                    ms2,
                ),
                (
                    "TTFT p95 (ms)",
                    |r| r.client.ttft_ms.as_ref().and_then(|t| t.p95),
                    false,
                    ms2,
                ),
                (
                    "TTFT p99 (ms)",
                    |r| r.client.ttft_ms.as_ref().and_then(|t| t.p99),
                    false,
                    ms2,
                ),
            ]);
        }
        rows.extend([
            (
                "total time (s)",
                (|r| Some(r.client.elapsed_s)) as Pick,
                false,
                ms2,
            ),
            (
                "GPU memory",
                |r| r.gpu_memory_mib,
                false,
                |v| format!("{v:.0} MiB"),
            ),
            ("success rate", |r| Some(r.client.success_rate), true, pct),
            (
                "cache benefit (hit rate)",
                |r| r.prefix_cache.as_ref().and_then(|p| p.hit_rate),
                true,
                pct,
            ),
        ]);
        let mut s = format!(
            "engine: {}\nworkload: {}\n\n| metric |",
            self.header.engine, self.header.workload
        );
        for r in &self.runs {
            s += &format!(" {} |", r.label);
        }
        s += " winner |\n|---|";
        for _ in &self.runs {
            s += "---|";
        }
        s += "---|\n";
        for (name, pick, higher, fmt) in rows {
            s += &format!("| {name} |");
            let values: Vec<Option<f64>> = self.runs.iter().map(pick).collect();
            for v in &values {
                s += &format!(" {} |", v.map_or("n/a".into(), fmt));
            }
            let best = winner(&values, higher);
            let label = if values.iter().all(Option::is_none) {
                "–".to_string()
            } else if best.is_empty() {
                "– (all within 1%)".to_string()
            } else {
                let names: Vec<&str> = best.iter().map(|&i| self.runs[i].label.as_str()).collect();
                let joined = names.join(" = ");
                self.winners.insert(name.to_string(), joined.clone());
                joined
            };
            s += &format!(" {label} |\n");
        }
        s
    }
}

/// The indices of the best values: every value within 1% of the best
/// (a tie); empty when none is known or all are tied.
pub(crate) fn winner(values: &[Option<f64>], higher: bool) -> Vec<usize> {
    let known: Vec<(usize, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .collect();
    let best = known
        .iter()
        .map(|&(_, v)| v)
        .fold(None, |acc: Option<f64>, v| {
            Some(match acc {
                None => v,
                Some(a) if (higher && v > a) || (!higher && v < a) => v,
                Some(a) => a,
            })
        });
    let Some(best) = best else {
        return Vec::new();
    };
    let close: Vec<usize> = known
        .iter()
        .filter(|&&(_, v)| (v - best).abs() <= 0.01 * best.abs())
        .map(|&(i, _)| i)
        .collect();
    if close.len() == known.len() && known.len() > 1 {
        return Vec::new();
    }
    close
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}"))
}

fn hit(r: &RunResult) -> String {
    let rate = |p: Option<&PrefixCache>| {
        p.and_then(|p| p.hit_rate)
            .map_or("n/a".into(), |h| format!("{:.1}%", h * 100.0))
    };
    match &r.predicted_prefix_cache {
        None => rate(r.prefix_cache.as_ref()),
        Some(predicted) => format!(
            "{} (proxy predicted {})",
            rate(r.prefix_cache.as_ref()),
            rate(Some(predicted))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(1_795_437_296), (2026, 11, 23, 12, 34, 56));
    }

    #[test]
    fn winners_follow_direction() {
        assert_eq!(winner(&[Some(1.0), Some(3.0), None], true), [1]);
        assert_eq!(winner(&[Some(1.0), Some(3.0), None], false), [0]);
        assert!(winner(&[None, None], true).is_empty());
        assert!(winner(&[Some(1.0), Some(1.005)], true).is_empty());
        assert_eq!(winner(&[Some(2.0)], true), [0]);
        assert_eq!(winner(&[Some(100.0), Some(99.5), Some(50.0)], true), [0, 1]);
    }
}
