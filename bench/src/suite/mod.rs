//! `bench suite`: the benchmark suite the user described, each category
//! printed with its figures and pass/fail against its target, all in one
//! JSON report.
//!
//! - [`batching`]: 1, 3 and 5 agents each generating 500 tokens at once
//!   through the proxy, against the same agents one after another; target
//!   speedup > 1.5× at 3 agents and > 2.5× at 5.
//! - [`resume`]: time to first token of a 2K, 4K and 8K-token context sent
//!   cold, then resumed with the prefix already cached; target > 3× faster.
//!   Sizes that do not fit the engine's `max_model_len` are capped (when
//!   90% or more still fits) or skipped, with the reason.
//! - [`memory`]: the proxy's RSS with 1 … 100,000 tracked sessions (bytes
//!   per session, linear growth) and over a soak at steady load (no growth
//!   after warm-up).
//!
//! Batching and cache resume run through a `proxy` child process in front
//! of the upstream: the in-process simulated vLLM (profile `rtx4080`) by
//! default, or any engine given with `--upstream`. The memory category
//! needs 100,000 requests to be cheap, so its proxy fronts the built-in fast
//! upstream (no model). The report names the engine of each.
//!
//! # `bench/results/suite_YYYYMMDD_HHMMSS.json` (schema `sluice-bench-suite/1`)
//!
//! ```text
//! {
//!   "schema": "sluice-bench-suite/1", "created_utc": "...",
//!   "engine": "simulated vLLM (profile rtx4080)" | "real vLLM at URL" | ...,
//!   "profile": "rtx4080" | null, "model": "..." | null, "max_model_len": n | null,
//!   "batching": null | {...},       // see batching.rs
//!   "cache_resume": null | {...},   // see resume.rs
//!   "memory": null | {...},         // see memory.rs
//!   "checks": {"total", "passed", "failed"},  // over every category's checks
//! }
//! ```
//!
//! Every target is a [`Check`]: the measured `value`, the comparison `op`
//! and `threshold`, and `pass`, which is exactly `value op threshold`.

mod batching;
mod memory;
mod resume;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;

use crate::client::post_json;
use crate::engine::{EngineArgs, Upstream, engine_name, max_model_len, model_of};
use crate::load::parse_duration;
use crate::procs;
use crate::report;

/// A category of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Category {
    /// Concurrent agents vs the same agents one after another.
    Batching,
    /// Time to first token, cold vs with the prefix cached.
    CacheResume,
    /// The proxy's RSS per tracked session, and a soak.
    Memory,
}

/// `bench suite` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Categories to run (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) only: Vec<Category>,
    /// Batching: agent counts, each run concurrently and sequentially.
    #[arg(long, value_delimiter = ',', default_value = "1,3,5")]
    pub(crate) agents: Vec<usize>,
    /// Batching: tokens each agent generates.
    #[arg(long, default_value_t = 500)]
    pub(crate) agent_tokens: u32,
    /// Batching: runs of each side per agent count (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) batching_repeats: usize,
    /// Cache resume: context sizes in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub(crate) contexts: Vec<usize>,
    /// Cache resume: cold/resumed pairs per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub(crate) cache_repeats: usize,
    /// Memory: cumulative tracked-session counts at which RSS is read.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,5,10,1000,10000,50000,100000"
    )]
    pub(crate) sessions: Vec<usize>,
    /// Memory: prompt length of each session, in the proxy's text tokens
    /// (4 bytes each).
    #[arg(long, default_value_t = 128)]
    pub(crate) session_tokens: usize,
    /// Memory: connections sending the sessions.
    #[arg(long, default_value_t = 64)]
    pub(crate) memory_concurrency: usize,
    /// Memory: soak duration at steady load (e.g. 10m, 30s).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub(crate) soak: f64,
    /// Memory: requests per second during the soak.
    #[arg(long, default_value_t = 200.0)]
    pub(crate) soak_rate: f64,
    /// Memory: extra proxy flags (repeatable), e.g. `--memory-proxy-arg=--policy=concurrency.wasm`.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) memory_proxy_arg: Vec<String>,
    /// Directory of the JSON report.
    #[arg(long, default_value = "bench/results")]
    pub(crate) out_dir: PathBuf,
}

/// How a [`Check`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Op {
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

/// One target: `pass` is `value op threshold`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) op: Op,
    pub(crate) threshold: f64,
    pub(crate) pass: bool,
}

impl Check {
    pub(crate) fn new(name: impl Into<String>, value: f64, op: Op, threshold: f64) -> Self {
        let pass = value.is_finite()
            && match op {
                Op::Greater => value > threshold,
                Op::AtLeast => value >= threshold,
                Op::AtMost => value <= threshold,
            };
        Self {
            name: name.into(),
            value,
            op,
            threshold,
            pass,
        }
    }

    /// `PASS (3.21 > 1.5)` or `FAIL (…)`.
    pub(crate) fn verdict(&self) -> String {
        let op = match self.op {
            Op::Greater => ">",
            Op::AtLeast => "≥",
            Op::AtMost => "≤",
        };
        format!(
            "{} ({} {op} {})",
            if self.pass { "PASS" } else { "FAIL" },
            short(self.value),
            short(self.threshold)
        )
    }
}

/// A number with about three significant digits.
pub(crate) fn short(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Totals over every check of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Tally {
    pub(crate) total: usize,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
}

/// The whole suite report.
#[derive(Debug, Serialize)]
pub(crate) struct SuiteReport {
    pub(crate) schema: &'static str,
    pub(crate) created_utc: String,
    pub(crate) engine: String,
    pub(crate) profile: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) max_model_len: Option<u64>,
    pub(crate) batching: Option<batching::Batching>,
    pub(crate) cache_resume: Option<resume::CacheResume>,
    pub(crate) memory: Option<memory::Memory>,
    pub(crate) checks: Tally,
}

/// The upstream under test, and what to call it.
pub(crate) struct Engine {
    pub(crate) addr: SocketAddr,
    pub(crate) name: String,
    pub(crate) model: Option<String>,
    pub(crate) max_model_len: Option<u64>,
    /// Whether `POST /tokenize` works (real vLLM): prompts are then sent as
    /// token ids of exact length.
    pub(crate) tokenize: bool,
}

/// `bench suite`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let wants = |c: Category| args.only.is_empty() || args.only.contains(&c);
    let Upstream {
        addr: upstream,
        url,
        profile,
        ..
    } = args.engine.start().await?;
    let name = engine_name(upstream, &url, profile.as_deref()).await;
    let model = model_of(upstream).await;
    let max_model_len = max_model_len(upstream).await;
    let tokenize = post_json(
        upstream,
        "/tokenize",
        &serde_json::json!({"prompt": "probe", "model": model}),
    )
    .await
    .is_ok_and(|(status, _)| status == 200);
    let engine = Engine {
        addr: upstream,
        name,
        model,
        max_model_len,
        tokenize,
    };
    println!("bench suite: {}", engine.name);
    // Contexts and prompts of this run never meet an earlier run's in a
    // long-lived engine's cache.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);

    let needs_proxy = wants(Category::Batching) || wants(Category::CacheResume);
    let proxy = if needs_proxy {
        let proxy = tokio::task::spawn_blocking(move || procs::start_proxy(upstream, &[]))
            .await?
            .context("start the proxy in front of the engine")?;
        Some(proxy)
    } else {
        None
    };
    let mut batching = None;
    let mut cache_resume = None;
    if let Some(proxy) = &proxy {
        if wants(Category::Batching) {
            let b = batching::run(&args, &engine, proxy.addr, nonce).await?;
            print!("{}", b.markdown());
            batching = Some(b);
        }
        if wants(Category::CacheResume) {
            let c = resume::run(&args, &engine, proxy.addr, nonce).await?;
            print!("{}", c.markdown());
            cache_resume = Some(c);
        }
    }
    drop(proxy);
    let memory = if wants(Category::Memory) {
        let m = memory::run(&args, nonce).await?;
        print!("{}", m.markdown());
        Some(m)
    } else {
        None
    };

    let mut all: Vec<&Check> = Vec::new();
    if let Some(b) = &batching {
        all.extend(b.checks());
    }
    if let Some(c) = &cache_resume {
        all.extend(c.checks());
    }
    if let Some(m) = &memory {
        all.extend(m.checks());
    }
    let passed = all.iter().filter(|c| c.pass).count();
    let checks = Tally {
        total: all.len(),
        passed,
        failed: all.len() - passed,
    };
    let (y, mo, d, h, mi, s) = report::utc(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let suite = SuiteReport {
        schema: "sluice-bench-suite/1",
        created_utc: format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        engine: engine.name,
        profile,
        model: engine.model,
        max_model_len: engine.max_model_len,
        batching,
        cache_resume,
        memory,
        checks,
    };
    println!(
        "\nchecks: {} passed, {} failed (of {})",
        suite.checks.passed, suite.checks.failed, suite.checks.total
    );
    let path = write(&suite, &args.out_dir)?;
    println!("results: {}", path.display());
    Ok(())
}

/// Writes `dir/suite_YYYYMMDD_HHMMSS.json` (never over an earlier one).
fn write(suite: &SuiteReport, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp: String = suite
        .created_utc
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let base = format!("suite_{}_{}", &stamp[..8], &stamp[8..]);
    let mut path = dir.join(format!("{base}.json"));
    let mut n = 1;
    while path.exists() {
        n += 1;
        path = dir.join(format!("{base}_{n}.json"));
    }
    std::fs::write(&path, serde_json::to_string_pretty(suite)? + "\n")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_pass_exactly_when_the_comparison_holds() {
        assert!(Check::new("x", 1.6, Op::Greater, 1.5).pass);
        assert!(!Check::new("x", 1.5, Op::Greater, 1.5).pass);
        assert!(Check::new("x", 1.5, Op::AtLeast, 1.5).pass);
        assert!(Check::new("x", 1.5, Op::AtMost, 1.5).pass);
        assert!(!Check::new("x", 1.6, Op::AtMost, 1.5).pass);
        assert!(!Check::new("x", f64::NAN, Op::AtMost, 1.5).pass);
        assert_eq!(
            Check::new("x", 3.214, Op::Greater, 3.0).verdict(),
            "PASS (3.21 > 3.00)"
        );
    }
}
