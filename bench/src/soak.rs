//! `bench soak`: the proxy's memory over a long run at steady load, with or
//! without something scraping its `/metrics`.
//!
//! A `proxy` child process fronts the engine (the in-process simulated vLLM,
//! profile `rtx4080`, by default; any engine with `--upstream`). Requests
//! arrive at `--rate` per second (open loop, at most `--concurrency` at
//! once), a `--stream-share` of them streamed, new candidates every time
//! (the rubric is shared, as a job's are). With `--scrape-interval`, a
//! scraper reads `/metrics` that often; without it nothing does, which is
//! the case where an unscraped recorder would pile up histogram samples.
//!
//! RSS (`VmRSS`) is printed at the start, every `--report-every` and at the
//! end, and sampled every 10 s. After `--warmup` (allocator pools and
//! connection buffers reach their working size first), a least-squares line
//! through the samples gives the growth: the line's rise from the end of
//! the warm-up to the end of the run, as a share of its value at the end of
//! the warm-up (the baseline). A line, not the last sample against the
//! first: the allocator's RSS moves a few MiB up and down as it returns
//! memory, and one sample would judge that noise. The run fails when the
//! growth exceeds `--max-growth`, or when more than 0.1% of the requests
//! failed (a proxy refusing everything would look flat).
//!
//! # JSON (`--json PATH`)
//!
//! ```text
//! {"engine", "proxy_flags": [...], "duration_s", "rate", "concurrency",
//!  "stream_share", "scrape_interval_s" | null, "scrapes", "warmup_s",
//!  "sent", "ok", "failed", "samples": [[t_s, rss_bytes], ...],
//!  "start_rss_bytes", "baseline_rss_bytes", "end_rss_bytes", "peak_rss_bytes",
//!  "growth": f,          // the fitted line's rise after warm-up / baseline
//!  "end_over_baseline": f, "max_growth": f, "passed": bool}
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::client::{self, Conn, Request};
use crate::engine::EngineArgs;
use crate::load::parse_duration;
use crate::procs::{self, Proc};
use crate::stats::fit;
use crate::workload::WorkloadArgs;

const MIB: f64 = 1024.0 * 1024.0;
/// How often RSS is sampled for the JSON series (the printed reports are
/// `--report-every`).
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Failed requests tolerated, as a share of those sent.
const MAX_FAILED_SHARE: f64 = 0.001;

/// `bench soak` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// How long to run at steady load (e.g. 1h, 10m, 90s).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    duration: f64,
    /// Requests per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Most requests in flight at once (arrivals beyond it wait).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Share of the requests streamed (SSE), 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    stream_share: f64,
    /// Scrape the proxy's /metrics this often (e.g. 15s); without it nothing scrapes it.
    #[arg(long, value_parser = parse_duration)]
    scrape_interval: Option<f64>,
    /// Print RSS this often.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    report_every: f64,
    /// Time before the baseline (default: a tenth of the run, at most 5 minutes).
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<f64>,
    /// Largest allowed growth of RSS from the baseline to the end (0.10: 10%).
    #[arg(long, default_value_t = 0.10)]
    max_growth: f64,
    /// Extra proxy flags (repeatable), e.g. `--proxy-arg=--policy=plugins/dist/adaptive.wasm`.
    #[arg(long, allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What a soak measured.
#[derive(Debug, Serialize)]
struct Report {
    engine: String,
    proxy_flags: Vec<String>,
    duration_s: f64,
    rate: f64,
    concurrency: usize,
    stream_share: f64,
    scrape_interval_s: Option<f64>,
    scrapes: u64,
    warmup_s: f64,
    sent: u64,
    ok: u64,
    failed: u64,
    samples: Vec<(f64, u64)>,
    start_rss_bytes: u64,
    baseline_rss_bytes: u64,
    end_rss_bytes: u64,
    peak_rss_bytes: u64,
    growth: f64,
    end_over_baseline: f64,
    max_growth: f64,
    passed: bool,
}

/// Requests sent and answered by the steady load.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) sent: AtomicU64,
    pub(crate) ok: AtomicU64,
}

/// Runs the soak; an error when it failed its check.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.stream_share) {
        bail!("--stream-share must be between 0 and 1");
    }
    if args.rate <= 0.0 || args.duration <= 0.0 {
        bail!("--rate and --duration must be positive");
    }
    let upstream = args.engine.start().await?;
    let engine =
        crate::engine::engine_name(upstream.addr, &upstream.url, upstream.profile.as_deref()).await;
    let model = crate::engine::model_of(upstream.addr).await;
    let plain = args.workload.build(model.as_deref())?;
    let streamed = WorkloadArgs {
        stream: true,
        ..args.workload.clone()
    }
    .build(model.as_deref())?;
    let flags = args.proxy_arg.clone();
    let proxy = {
        let flags = flags.clone();
        let addr = upstream.addr;
        tokio::task::spawn_blocking(move || procs::start_proxy(addr, &flags)).await??
    };
    let warmup = args
        .warmup
        .unwrap_or((args.duration / 10.0).min(300.0))
        .min(args.duration);
    eprintln!(
        "bench soak: {engine}; {} req/s for {:.0} s ({:.0}% streamed), {}",
        args.rate,
        args.duration,
        args.stream_share * 100.0,
        match args.scrape_interval {
            Some(every) => format!("/metrics scraped every {every} s"),
            None => "/metrics not scraped".to_string(),
        }
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let share = args.stream_share;
    // Request i is streamed when the running count of streamed requests
    // steps up at i: exactly `share` of them, spread evenly.
    let item = move |i: usize| {
        if ((i + 1) as f64 * share).floor() > (i as f64 * share).floor() {
            streamed.item(i)
        } else {
            plain.item(i)
        }
    };
    let load = tokio::spawn(paced_load(
        proxy.addr,
        args.rate,
        args.concurrency,
        item,
        Arc::clone(&stop),
        Arc::clone(&counts),
    ));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = args.scrape_interval.map(|every| {
        tokio::spawn(scrape(
            proxy.admin,
            Duration::from_secs_f64(every),
            Arc::clone(&stop),
            Arc::clone(&scrapes),
        ))
    });

    let samples = sample_rss(&proxy, &args, warmup, &counts).await?;
    stop.store(true, Ordering::Relaxed);
    load.await?;
    if let Some(scraper) = scraper {
        scraper.await?;
    }
    client::get(proxy.admin, "/metrics")
        .await
        .context("the proxy after the soak")?;

    let at = |t: f64| {
        samples
            .iter()
            .find(|s| s.0 >= t)
            .or(samples.last())
            .map_or(0, |s| s.1)
    };
    let start = at(0.0);
    let end = samples.last().map_or(0, |s| s.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.0 >= warmup)
        .map(|&(t, rss)| (t, rss as f64))
        .collect();
    let (baseline, growth) = match fit(&after) {
        Some((intercept, slope)) => {
            let baseline = intercept + slope * warmup;
            let span = after.last().map_or(warmup, |l| l.0) - warmup;
            (baseline, slope * span / baseline.max(1.0))
        }
        None => (at(warmup) as f64, 0.0),
    };
    let end_over_baseline = end as f64 / baseline.max(1.0) - 1.0;
    let (sent, ok) = (
        counts.sent.load(Ordering::Relaxed),
        counts.ok.load(Ordering::Relaxed),
    );
    let failed = sent - ok;
    let failed_share = failed as f64 / sent.max(1) as f64;
    let passed = growth <= args.max_growth && failed_share <= MAX_FAILED_SHARE;
    println!(
        "soak {:.0} s at {} req/s, {}: RSS start {:.1} MiB, baseline (at {:.0} s, fitted) {:.1} MiB, end {:.1} MiB ({:+.1}%), peak {:.1} MiB; fitted growth after warm-up {:+.1}% (limit {:.0}%); {sent} sent, {failed} failed; {}",
        args.duration,
        args.rate,
        match args.scrape_interval {
            Some(every) => format!("scraped every {every} s"),
            None => "not scraped".to_string(),
        },
        start as f64 / MIB,
        warmup,
        baseline / MIB,
        end as f64 / MIB,
        end_over_baseline * 100.0,
        peak as f64 / MIB,
        growth * 100.0,
        args.max_growth * 100.0,
        if passed { "PASS" } else { "FAIL" },
    );
    let report = Report {
        engine,
        proxy_flags: flags,
        duration_s: args.duration,
        rate: args.rate,
        concurrency: args.concurrency,
        stream_share: args.stream_share,
        scrape_interval_s: args.scrape_interval,
        scrapes: scrapes.load(Ordering::Relaxed),
        warmup_s: warmup,
        sent,
        ok,
        failed,
        samples,
        start_rss_bytes: start,
        baseline_rss_bytes: baseline as u64,
        end_rss_bytes: end,
        peak_rss_bytes: peak,
        growth,
        end_over_baseline,
        max_growth: args.max_growth,
        passed,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    drop(proxy);
    if !passed {
        bail!(
            "soak failed: RSS grew {:+.1}% (limit {:.0}%), {failed} of {sent} requests failed",
            growth * 100.0,
            args.max_growth * 100.0
        );
    }
    Ok(())
}

/// Samples RSS every [`SAMPLE_EVERY`] (and at the warm-up's end) until
/// `--duration`, printing it at the start, every `--report-every` and at
/// the end.
async fn sample_rss(
    proxy: &Proc,
    args: &Args,
    warmup: f64,
    counts: &Counts,
) -> anyhow::Result<Vec<(f64, u64)>> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_report = 0.0;
    let mut warm_taken = false;
    loop {
        let t = started.elapsed().as_secs_f64();
        let rss = proxy.rss_bytes().context("read the proxy's RSS")?;
        samples.push((t, rss));
        let done = t >= args.duration;
        if t >= next_report || done {
            println!(
                "{:>6.0} s  RSS {:>7.1} MiB  {} sent, {} ok{}",
                t,
                rss as f64 / MIB,
                counts.sent.load(Ordering::Relaxed),
                counts.ok.load(Ordering::Relaxed),
                if done { "  (end)" } else { "" },
            );
            while next_report <= t {
                next_report += args.report_every.max(1.0);
            }
        }
        if done {
            return Ok(samples);
        }
        let mut wake = (t + SAMPLE_EVERY.as_secs_f64())
            .min(next_report)
            .min(args.duration);
        if !warm_taken && warmup > t {
            wake = wake.min(warmup);
        }
        warm_taken |= t >= warmup;
        tokio::time::sleep(Duration::from_secs_f64((wake - t).max(0.01))).await;
    }
}

/// Sends `item(i)` at `rate` per second to `addr` (open loop: arrivals
/// wait while `concurrency` are in flight) until `stop`, then waits for the
/// requests still in flight.
pub(crate) async fn paced_load(
    addr: std::net::SocketAddr,
    rate: f64,
    concurrency: usize,
    item: impl Fn(usize) -> Request,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let concurrency = concurrency.max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let pool = Arc::new(std::sync::Mutex::new(Vec::<Conn>::new()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let request = item(i);
        i += 1;
        let (pool, counts) = (Arc::clone(&pool), Arc::clone(&counts));
        tokio::spawn(async move {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let mut conn = conn.unwrap_or_else(|| Conn::new(addr));
            counts.sent.fetch_add(1, Ordering::Relaxed);
            if conn.send(&request).await.is_ok() {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut p) = pool.lock() {
                p.push(conn);
            }
            drop(permit);
        });
    }
    let _ = permits.acquire_many(concurrency as u32).await;
}

/// Reads `/metrics` every `every` until `stop`, counting the reads that
/// answered.
async fn scrape(
    admin: std::net::SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if matches!(client::get(admin, "/metrics").await, Ok((200, _))) {
            scrapes.fetch_add(1, Ordering::Relaxed);
        }
    }
}
