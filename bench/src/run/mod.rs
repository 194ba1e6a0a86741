//! `bench run`: one client mode against one target, and the client modes
//! `bench compare` reuses.
//!
//! Modes (the reference benchmark's two client habits, plus two open ones):
//! - `batched`: waves of `--wave` (50) sent together; the next wave leaves
//!   when the whole wave has returned (the reference's gather). A request's
//!   latency runs from its wave's start.
//! - `inngest`: at most `--limit` (10) in flight, a semaphore.
//! - `rate`: open-loop Poisson arrivals at `--rate` req/s; latency counted
//!   from each request's intended send time (no coordinated omission).
//! - `naive`: `--clients` (100) independent clients, each sending its next
//!   request when its last returns, with no coordination: what a fleet of
//!   naive workers does. Through the proxy, the policy alone decides.
//! - `sweep`: `rate` steps of rising rate until the target saturates
//!   (see [`sweep`]).
//!
//! A run ends after `--requests` or `--duration`, whichever comes first
//! (a sweep's steps are sized by `--step-duration` instead). With
//! `--stream` every answer is an SSE stream and the client also records the
//! time to its first token, from the same origin as its latency.

pub(crate) mod client;
pub(crate) mod stats;
pub(crate) mod sweep;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use sluice_sim::engine::splitmix64;
use tokio::time::Instant;

use crate::progress::{Progress, Tick};
use crate::report;
use crate::workload::{Workload, WorkloadArgs};
use client::Conn;
use stats::{Outcomes, Sample};

/// A client mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Waves sent together, each awaited whole.
    Batched,
    /// A semaphore: at most `limit` in flight.
    Inngest,
    /// Open-loop Poisson arrivals at a fixed rate.
    Rate,
    /// Many independent clients, back to back.
    Naive,
    /// Open-loop Poisson rates stepped up until the target saturates
    /// (`bench run` only; one step of it is a `rate` run).
    Sweep,
}

/// How a run sends.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Plan {
    pub(crate) mode: Mode,
    /// Requests to send (the run stops earlier at `duration_s`).
    pub(crate) requests: usize,
    pub(crate) duration_s: Option<f64>,
    /// `batched`: wave size.
    pub(crate) wave: usize,
    /// `inngest`: most in flight.
    pub(crate) limit: usize,
    /// `naive`: concurrent clients.
    pub(crate) clients: usize,
    /// `rate`: arrivals per second.
    pub(crate) rate: f64,
    /// `rate`: seed of the arrival times.
    pub(crate) seed: u64,
    /// Request `i` of the run is workload item `offset + i` (so runs of one
    /// comparison send distinct candidates).
    pub(crate) offset: usize,
}

/// Sends the workload to `addr` as `plan` says, showing no progress.
pub(crate) async fn drive(addr: SocketAddr, workload: &Arc<Workload>, plan: &Plan) -> Outcomes {
    drive_with(addr, workload, plan, Progress::hidden().tick()).await
}

/// Sends the workload to `addr` as `plan` says, counting each finished
/// request on `tick`.
pub(crate) async fn drive_with(
    addr: SocketAddr,
    workload: &Arc<Workload>,
    plan: &Plan,
    tick: &Tick,
) -> Outcomes {
    let deadline = plan
        .duration_s
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let expired = move || deadline.is_some_and(|d| Instant::now() >= d);
    let start = Instant::now();
    let offset = plan.offset;
    let mut out = Outcomes::default();
    match plan.mode {
        Mode::Batched => {
            let mut conns: Vec<Conn> = (0..plan.wave.max(1)).map(|_| Conn::new(addr)).collect();
            let mut next = 0usize;
            while next < plan.requests && !expired() {
                let n = plan.wave.max(1).min(plan.requests - next);
                let wave_start = Instant::now();
                let tasks: Vec<_> = conns
                    .drain(..n)
                    .enumerate()
                    .map(|(k, mut conn)| {
                        let (workload, tick) = (Arc::clone(workload), tick.clone());
                        tokio::spawn(async move {
                            let r = conn.send_timed(&workload.item(offset + next + k)).await;
                            tick.record(r.is_ok());
                            (conn, Sample::new(r, wave_start))
                        })
                    })
                    .collect();
                for task in tasks {
                    match task.await {
                        Ok((conn, sample)) => {
                            conns.push(conn);
                            out.record(sample);
                        }
                        Err(_) => {
                            conns.push(Conn::new(addr));
                            out.record(Sample::failed("client_panic"));
                        }
                    }
                }
                next += n;
            }
        }
        Mode::Inngest | Mode::Naive => {
            let workers = if plan.mode == Mode::Inngest {
                plan.limit
            } else {
                plan.clients
            };
            let counter = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..workers.max(1))
                .map(|_| {
                    let (counter, workload, requests, tick) = (
                        Arc::clone(&counter),
                        Arc::clone(workload),
                        plan.requests,
                        tick.clone(),
                    );
                    tokio::spawn(async move {
                        let mut conn = Conn::new(addr);
                        let mut mine = Outcomes::default();
                        loop {
                            if expired() {
                                break;
                            }
                            let i = counter.fetch_add(1, Ordering::Relaxed);
                            if i >= requests {
                                break;
                            }
                            let sent = Instant::now();
                            let r = conn.send_timed(&workload.item(offset + i)).await;
                            tick.record(r.is_ok());
                            mine.record(Sample::new(r, sent));
                        }
                        mine
                    })
                })
                .collect();
            for task in tasks {
                if let Ok(mine) = task.await {
                    out.merge(mine);
                }
            }
        }
        Mode::Rate | Mode::Sweep => out = open_loop(addr, workload, plan, deadline, tick).await,
    }
    out.elapsed = start.elapsed();
    out
}

/// Exponential gaps of a Poisson process at `rate`, deterministic in `seed`.
pub(crate) fn poisson_offsets(rate: f64, n: usize, seed: u64) -> Vec<Duration> {
    let mut state = seed;
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            let at = Duration::from_secs_f64(t);
            state = splitmix64(state);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            t += -(1.0 - u).ln() / rate.max(1e-9);
            at
        })
        .collect()
}

async fn open_loop(
    addr: SocketAddr,
    workload: &Arc<Workload>,
    plan: &Plan,
    deadline: Option<Instant>,
    tick: &Tick,
) -> Outcomes {
    let offsets = poisson_offsets(plan.rate, plan.requests, plan.seed);
    let pool = Arc::new(std::sync::Mutex::new(Vec::<Conn>::new()));
    // Paced by an OS thread: tokio's timer has 1 ms granularity.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let start = Instant::now();
    let std_start = std::time::Instant::now();
    std::thread::spawn(move || {
        for (i, offset) in offsets.into_iter().enumerate() {
            if deadline.is_some_and(|d| start + offset >= d) {
                return;
            }
            let now = std_start.elapsed();
            if offset > now {
                std::thread::sleep(offset - now);
            }
            if tx.send((i, start + offset)).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(plan.requests);
    while let Some((i, intended)) = rx.recv().await {
        let (pool, workload, offset, tick) = (
            Arc::clone(&pool),
            Arc::clone(workload),
            plan.offset,
            tick.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let mut conn = conn.unwrap_or_else(|| Conn::new(addr));
            let r = conn.send_timed(&workload.item(offset + i)).await;
            tick.record(r.is_ok());
            let sample = Sample::new(r, intended);
            if let Ok(mut p) = pool.lock() {
                p.push(conn);
            }
            sample
        }));
    }
    let mut out = Outcomes::default();
    for task in tasks {
        match task.await {
            Ok(sample) => out.record(sample),
            Err(_) => out.record(Sample::failed("client_panic")),
        }
    }
    out
}

/// The model an engine serves (its first `/v1/models` entry).
pub(crate) async fn model_of(addr: SocketAddr) -> Option<String> {
    let (status, body) = client::get(addr, "/v1/models").await.ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"][0]["id"].as_str().map(str::to_string)
}

/// The engine's `/metrics` text, if it has one.
pub(crate) async fn metrics_of(addr: SocketAddr) -> Option<String> {
    match client::get(addr, "/metrics").await {
        Ok((200, body)) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// Parses `30`, `30s`, `500ms`, `2m` into seconds.
pub(crate) fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(|v| v * scale)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 30s, 500ms, 2m)"))
}

/// `bench run` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The engine or proxy to load (http://HOST:PORT).
    #[arg(long)]
    pub(crate) target: String,
    /// Client mode.
    #[arg(long, value_enum, default_value_t = Mode::Batched)]
    pub(crate) mode: Mode,
    /// Requests to send.
    #[arg(long, default_value_t = 5000)]
    pub(crate) requests: usize,
    /// Stop after this long even if requests remain (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) duration: Option<f64>,
    /// `batched`: requests per wave.
    #[arg(long, default_value_t = 50)]
    pub(crate) wave: usize,
    /// `inngest`: most requests in flight.
    #[arg(long, default_value_t = 10)]
    pub(crate) limit: usize,
    /// `naive`: concurrent clients.
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// `rate`: arrivals per second (Poisson).
    #[arg(long, default_value_t = 100.0)]
    pub(crate) rate: f64,
    /// The proxy's admin address (http://HOST:PORT) when `--target` is a
    /// Sluice proxy: its `/stats` service time goes in the report.
    #[arg(long)]
    pub(crate) proxy_admin: Option<String>,
    /// The engine behind the proxy (http://HOST:PORT), for its `/metrics`
    /// (prefix-cache hit rate); defaults to `--target`.
    #[arg(long)]
    pub(crate) engine: Option<String>,
    /// Directory of the results (JSON, Markdown, SVG plot).
    #[arg(long, default_value = "bench/results")]
    pub(crate) out_dir: std::path::PathBuf,
    #[command(flatten)]
    pub(crate) sweep: sweep::SweepArgs,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
}

/// `bench run`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let target = client::resolve(&args.target).await?;
    let engine_url = args.engine.clone().unwrap_or_else(|| args.target.clone());
    let engine = client::resolve(&engine_url).await?;
    let admin = match &args.proxy_admin {
        Some(url) => Some(client::resolve(url).await?),
        None => None,
    };
    let model = model_of(engine).await;
    let workload = Arc::new(args.workload.build(model.as_deref())?);
    if let Some(offset) = workload.candidate_offset {
        eprintln!("bench run: candidate offset {offset} (repeat with --candidate-offset {offset})");
    }
    let engine_name = report::engine_name(engine, &engine_url, None).await;
    let view = View {
        url: &args.target,
        target,
        admin,
        engine,
    };
    let report = if args.mode == Mode::Sweep {
        sweep_run(&args, &view, engine_name, model, &workload).await
    } else {
        let plan = Plan {
            mode: args.mode,
            requests: args.requests,
            duration_s: args.duration,
            wave: args.wave,
            limit: args.limit,
            clients: args.clients,
            rate: args.rate,
            seed: args.workload.seed,
            offset: 0,
        };
        let label = format!("{:?}", args.mode).to_lowercase();
        let result = view.measure(&label, &workload, &plan).await;
        report::Report::new(engine_name, None, model, &workload, vec![result])
    };
    let markdown = report.markdown();
    let path = report.write_all(&args.out_dir, &markdown)?;
    print!("{markdown}");
    println!("\nresults: {} (and .md, .svg)", path.display());
    Ok(())
}

/// Where a `bench run` sends and what it reads around each measurement.
struct View<'a> {
    url: &'a str,
    target: SocketAddr,
    admin: Option<SocketAddr>,
    engine: SocketAddr,
}

impl View<'_> {
    async fn measure(
        &self,
        label: &str,
        workload: &Arc<Workload>,
        plan: &Plan,
    ) -> report::RunResult {
        report::measure(
            label,
            self.url,
            self.target,
            self.admin,
            Some(self.engine),
            None,
            workload,
            plan,
        )
        .await
    }
}

/// `bench run --mode sweep`: one `rate` run per step, up to saturation.
async fn sweep_run(
    args: &Args,
    view: &View<'_>,
    engine_name: String,
    model: Option<String>,
    workload: &Arc<Workload>,
) -> report::Report {
    let mut bounds = sweep::Bounds {
        min_achieved: args.sweep.min_achieved,
        max_error_rate: args.sweep.max_error_rate,
        max_p99_ms: args.sweep.max_p99.map(|s| s * 1000.0),
    };
    let (mut steps, mut runs, mut offset) = (Vec::new(), Vec::new(), 0usize);
    for (k, rate) in args.sweep.rates(args.rate).into_iter().enumerate() {
        let requests = args.sweep.step_requests(rate);
        let plan = Plan {
            mode: Mode::Rate,
            requests,
            duration_s: None,
            wave: args.wave,
            limit: args.limit,
            clients: args.clients,
            rate,
            seed: args.workload.seed.wrapping_add(k as u64),
            offset,
        };
        offset += requests;
        let result = view
            .measure(&format!("rate {rate:.0}/s"), workload, &plan)
            .await;
        if bounds.max_p99_ms.is_none() {
            bounds.max_p99_ms = result.client.latency_ms.p99.map(|p| p * 10.0);
        }
        let step = sweep::Step::of(rate, send_span(&plan), &result.client, &bounds);
        eprintln!(
            "bench run: rate {rate:.0}/s: offered {:.1}, achieved {:.1} req/s, p99 {} ms, {} errors{}",
            step.offered_rps,
            step.achieved_rps,
            step.p99_ms.map_or("–".into(), |v| format!("{v:.1}")),
            step.failed,
            step.saturated
                .map_or(String::new(), |r| format!(": saturated ({r:?})")
                    .to_lowercase()),
        );
        let saturated = step.saturated.is_some();
        steps.push(step);
        runs.push(result);
        if saturated {
            break;
        }
    }
    let mut report = report::Report::new(engine_name, None, model, workload, runs);
    report.sweep = Some(sweep::Sweep::of(steps, bounds.max_p99_ms));
    report
}

/// The span over which an open-loop plan's requests are meant to be sent:
/// the last intended send time plus one mean gap (so `n` requests over it
/// are the rate actually offered).
pub(crate) fn send_span(plan: &Plan) -> Duration {
    let offsets = poisson_offsets(plan.rate, plan.requests, plan.seed);
    offsets.last().copied().unwrap_or_default() + Duration::from_secs_f64(1.0 / plan.rate.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_asked_rate() {
        let offsets = poisson_offsets(200.0, 20_000, 3);
        assert_eq!(offsets[0], Duration::ZERO);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        let rate = 20_000.0 / offsets.last().unwrap().as_secs_f64();
        assert!((rate - 200.0).abs() < 6.0, "rate {rate}");
        assert_eq!(offsets, poisson_offsets(200.0, 20_000, 3));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(30.0));
        assert_eq!(parse_duration("500ms"), Ok(0.5));
        assert_eq!(parse_duration("2m"), Ok(120.0));
        assert_eq!(parse_duration("7"), Ok(7.0));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
    }
}
