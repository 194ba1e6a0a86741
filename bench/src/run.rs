//! `bench run`: one client mode against one target (any engine or proxy),
//! in one report.
//!
//! The modes are [`crate::load`]'s (`batched`, `inngest`, `rate`, `naive`)
//! and `sweep`, open-loop rates stepped up to saturation (see
//! [`crate::sweep`]). A run ends after `--requests` or `--duration`,
//! whichever comes first (a sweep's steps are sized by `--step-duration`
//! instead). With `--stream` every answer is an SSE stream and the client
//! also records the time to its first token, from the same origin as its
//! latency.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::client;
use crate::engine::{engine_name, model_of};
use crate::load::{Mode, Plan, parse_duration, send_span};
use crate::measure::{RunResult, measure};
use crate::report::Report;
use crate::sweep;
use crate::workload::{Workload, WorkloadArgs};

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
    let engine_name = engine_name(engine, &engine_url, None).await;
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
        Report::new(engine_name, None, model, &workload, vec![result])
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
    async fn measure(&self, label: &str, workload: &Arc<Workload>, plan: &Plan) -> RunResult {
        measure(
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
) -> Report {
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
    let mut report = Report::new(engine_name, None, model, workload, runs);
    report.sweep = Some(sweep::Sweep::of(steps, bounds.max_p99_ms));
    report
}
