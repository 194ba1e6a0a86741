//! `bench compare` (what `just bench` runs): the ways a job worker can
//! load an engine, side by side, in scenarios that every configuration
//! faces with the same offered load in one run.
//!
//! The engine is the simulated vLLM (profile `rtx4080` by default), served
//! in-process on 127.0.0.1:0, or any engine given with `--upstream`.
//! Configurations: the two client habits straight to the engine (`waves
//! of 50`, each awaited whole; a `semaphore of 10`), naive clients straight
//! to it, and naive clients through Sluice with no policy, `batched.wasm`,
//! `concurrency.wasm`, `adaptive.wasm` (when built) and each `--policy`.
//!
//! First the unloaded latency: `--unloaded` sequential requests straight to
//! the engine; goodput's SLO is 4× its p50 unless `--slo-ms` says. Then the
//! scenarios ([`crate::scenario`] drives them):
//! 1. batch job: `--batch` candidates handed over at once; the best
//!    throughput is the run's capacity;
//! 2. live traffic: open-loop Poisson arrivals at `--live-load` fractions of
//!    the capacity, `--live-seconds` each; a habit applies to the arrivals;
//! 3. mixed: live traffic (`X-Priority: 10`) at `--live-rate` during the
//!    batch job; only the batch uses a habit;
//! 4. frontier: the batch through `concurrency.wasm` at each `--frontier`
//!    cap with live traffic straight to the engine beside it, then adaptive
//!    holding live p95 at `--objective-factor` × its value alone.
//!
//! [`crate::scorecard`] reports them. With `--requests N` the command runs
//! the earlier single-table comparison instead: N requests per
//! configuration, naive clients (`--clients`) through each proxy. With
//! `--replicas N` (or `--upstream` given more than once) it compares
//! routing over engine replicas instead ([`crate::replicas`]).
//!
//! The proxy is the `proxy` binary that `SLUICE_PROXY_BIN` names, else the
//! one beside `bench` when it exists, else the proxy library in-process
//! (`--proxy-mode` chooses); a child's CPU time is read from `/proc`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::engine::{EngineArgs, Upstream, engine_name, model_of};
use crate::load::{Habit, Mode, Plan, drive};
use crate::measure::measure;
use crate::proxy::{self, Proxy, ProxyMode, policy_flags};
use crate::replicas::{self, ReplicaArgs};
use crate::report::{Header, Report};
use crate::scenario::{
    self, BatchRun, Beside, Feed, FrontierPoint, Job, LiveRun, LiveStep, MixedRun, Sender, Tag,
};
use crate::scorecard::{Scorecard, Settings, SloMode};
use crate::workload::{Workload, WorkloadArgs};

/// `bench compare` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Candidates of the batch job.
    #[arg(long, default_value_t = 5000)]
    pub(crate) batch: usize,
    /// Naive clients handing the batch over, each sending back to back
    /// (at most this many requests outstanding at once; on a 2-core
    /// machine a few hundred connections opened at once already meet the
    /// listen backlog's one-second SYN retries).
    #[arg(long, default_value_t = 100)]
    pub(crate) batch_clients: usize,
    /// Live-traffic loads, as fractions of the capacity measured in the run.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.6,0.9,1.1")]
    pub(crate) live_load: Vec<f64>,
    /// Seconds of arrivals at each live load (and of live traffic alone).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) live_seconds: f64,
    /// Goodput's latency objective, in ms (default: 4× the unloaded p50).
    #[arg(long)]
    pub(crate) slo_ms: Option<f64>,
    /// Live rate beside the batch (mixed, frontier), in req/s (default: 7%
    /// of the capacity).
    #[arg(long)]
    pub(crate) live_rate: Option<f64>,
    /// The frontier's static caps: `concurrency.wasm limit=N` (empty: no frontier).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16,24,32")]
    pub(crate) frontier: Vec<usize>,
    /// SLO mode: adaptive's objective is this × the live p95 alone.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) objective_factor: f64,
    /// A second engine, a vLLM started with `--scheduling-policy priority`
    /// (e.g. `SLUICE_VLLM_PORT=8001 SLUICE_VLLM_ARGS='--scheduling-policy
    /// priority' scripts/vllm.sh start`): the mixed scenario then also runs
    /// against it, live requests carrying `"priority": -10`, for the
    /// engine's own answer to live traffic beside a batch.
    #[arg(long)]
    pub(crate) priority_upstream: Option<String>,
    /// Only the configurations whose label contains one of these (e.g.
    /// `adaptive,naive → vLLM`); all by default. The frontier and SLO mode
    /// still run unless `--frontier ''`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Sequential requests that measure the unloaded latency.
    #[arg(long, default_value_t = 50)]
    pub(crate) unloaded: usize,
    /// Run the single-table comparison instead, with this many requests
    /// per configuration.
    #[arg(long)]
    pub(crate) requests: Option<usize>,
    /// Naive clients through the proxy (single table).
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// Wave size of the waves habit.
    #[arg(long, default_value_t = 50)]
    pub(crate) wave: usize,
    /// Semaphore of the semaphore habit.
    #[arg(long, default_value_t = 10)]
    pub(crate) limit: usize,
    /// Another policy to compare: `PATH` or `PATH,key=value,key=value`.
    #[arg(long)]
    pub(crate) policy: Vec<String>,
    /// Directory of the bundled plugins.
    #[arg(long, default_value = "plugins/dist")]
    pub(crate) plugins: PathBuf,
    /// Requests sent to the engine, and to each proxy started, before measuring.
    #[arg(long, default_value_t = 100)]
    pub(crate) warmup: usize,
    /// Where the proxy runs.
    #[arg(long, value_enum, default_value_t = ProxyMode::Auto)]
    pub(crate) proxy_mode: ProxyMode,
    /// Directory of the results (JSON, Markdown, SVG plot).
    #[arg(long, default_value = "bench/results")]
    pub(crate) out_dir: PathBuf,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
    #[command(flatten)]
    pub(crate) replica: ReplicaArgs,
}

/// `bench compare`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.replica.replicas.is_some() || args.engine.upstream.len() > 1 {
        replicas::run(replicas::Settings {
            replica: args.replica,
            upstreams: args.engine.upstream,
            profile: args.engine.profile,
            requests: args.requests,
            warmup: args.warmup,
            proxy_mode: args.proxy_mode,
            out_dir: args.out_dir,
            workload: args.workload,
        })
        .await?;
        return Ok(());
    }
    if let Some(requests) = args.requests {
        return single_table(&args, requests).await;
    }
    validate(&args)?;
    let card = scenarios(&args).await?;
    let markdown = card.markdown();
    let path = card.write_all(&args.out_dir, &markdown)?;
    print!("{markdown}");
    println!("\nresults: {} (and .md, .svg)", path.display());
    Ok(())
}

fn validate(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(
        args.batch_clients >= 1,
        "--batch-clients must be at least 1"
    );
    anyhow::ensure!(
        args.live_seconds > 0.0 && args.live_seconds.is_finite(),
        "--live-seconds must be positive"
    );
    anyhow::ensure!(
        args.live_load.iter().all(|l| *l > 0.0 && l.is_finite()),
        "--live-load takes positive fractions, e.g. 0.3,0.6,0.9,1.1"
    );
    anyhow::ensure!(
        args.live_rate.is_none_or(|r| r > 0.0 && r.is_finite()),
        "--live-rate must be positive"
    );
    anyhow::ensure!(
        args.frontier.iter().all(|n| *n >= 1),
        "--frontier caps must be at least 1"
    );
    Ok(())
}

/// One configuration: how its clients send, and through what.
struct Config {
    label: String,
    /// A client habit straight to the engine.
    habit: bool,
    /// Where and how its clients send.
    sender: Sender,
    /// The proxy in the way, if any (stopped on drop).
    proxy: Option<Proxy>,
}

impl Config {
    fn cpu(&self) -> Option<f64> {
        self.proxy.as_ref()?.cpu_seconds()
    }
}

/// CPU time per request in µs, from CPU seconds before and after.
fn cpu_per_request(before: Option<f64>, after: Option<f64>, requests: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (requests > 0).then(|| (after - before).max(0.0) * 1e6 / requests as f64)
}

/// The configurations: habits and naive clients straight to the engine,
/// then naive clients through a proxy started (and warmed up) for each
/// policy.
async fn configurations(
    args: &Args,
    engine: SocketAddr,
    feed: &Feed,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Config>> {
    let direct = |label: String, habit: Habit, is_habit: bool| Config {
        label,
        habit: is_habit,
        sender: Sender {
            addr: engine,
            habit,
        },
        proxy: None,
    };
    let mut configs = vec![
        direct(
            format!("waves of {} → vLLM", args.wave),
            Habit::Waves(args.wave),
            true,
        ),
        direct(
            format!("semaphore of {} → vLLM", args.limit),
            Habit::Semaphore(args.limit),
            true,
        ),
        direct("naive → vLLM".into(), Habit::Open, false),
    ];
    // (flags, label, optional: a failure to start is a note, not an error)
    let mut specs = vec![(Vec::new(), "sluice (no policy)".to_string(), false)];
    for file in ["batched.wasm", "concurrency.wasm", "adaptive.wasm"] {
        let path = args.plugins.join(file);
        let optional = file == "adaptive.wasm";
        if !path.is_file() && optional {
            notes.push(format!(
                "{} not found: its configurations were skipped",
                path.display()
            ));
            continue;
        }
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build the plugins with `just plugins`",
            path.display()
        );
        let (flags, label) = policy_flags(&path.display().to_string());
        specs.push((flags, label, optional));
    }
    specs.extend(args.policy.iter().map(|p| {
        let (flags, label) = policy_flags(p);
        (flags, label, false)
    }));
    let wanted =
        |label: &str| args.only.is_empty() || args.only.iter().any(|o| label.contains(o.as_str()));
    configs.retain(|c| wanted(&c.label));
    specs.retain(|(_, label, _)| wanted(label));
    for (flags, label, optional) in specs {
        let proxy = match start_warm(args, engine, feed, &flags).await {
            Ok(proxy) => proxy,
            Err(e) if optional => {
                notes.push(format!("{label} did not start ({e:#}): skipped"));
                continue;
            }
            Err(e) => return Err(e.context(format!("start the proxy for {label}"))),
        };
        configs.push(Config {
            label: format!("naive → {label}"),
            habit: false,
            sender: Sender {
                addr: proxy.addrs().0,
                habit: Habit::Open,
            },
            proxy: Some(proxy),
        });
    }
    Ok(configs)
}

/// A proxy in front of `engine` with `flags`, warmed up.
async fn start_warm(
    args: &Args,
    engine: SocketAddr,
    feed: &Feed,
    flags: &[String],
) -> anyhow::Result<Proxy> {
    let proxy = proxy::start(args.proxy_mode, engine, flags).await?;
    if args.warmup > 0 {
        scenario::warm_up(proxy.addrs().0, feed, args.warmup, args.clients).await;
    }
    Ok(proxy)
}

async fn scenarios(args: &Args) -> anyhow::Result<Scorecard> {
    let Upstream {
        addr: engine,
        url,
        profile,
        ..
    } = args.engine.start().await?;
    let engine_label = engine_name(engine, &url, profile.as_deref()).await;
    eprintln!("bench compare: {engine_label}");
    let model = model_of(engine).await;
    let workload = Arc::new(args.workload.build(model.as_deref())?);
    if let Some(offset) = workload.candidate_offset {
        eprintln!(
            "bench compare: candidate offset {offset} (repeat with --candidate-offset {offset})"
        );
    }
    let feed = Feed::new(Arc::clone(&workload));
    let seed = args.workload.seed;
    let span = Duration::from_secs_f64(args.live_seconds);
    let mut notes = Vec::new();
    if args.warmup > 0 {
        scenario::warm_up(engine, &feed, args.warmup, args.clients).await;
    }
    let unloaded = scenario::unloaded(engine, &feed, args.unloaded.max(1)).await;
    anyhow::ensure!(
        unloaded.ok > 0,
        "the engine answered no request: {:?}",
        unloaded.errors
    );
    let unloaded_p50_ms = unloaded.quantile_us(0.5) as f64 / 1000.0;
    let slo_ms = args.slo_ms.unwrap_or(4.0 * unloaded_p50_ms);
    let slo = Duration::from_secs_f64(slo_ms / 1000.0);
    eprintln!("bench compare: unloaded p50 {unloaded_p50_ms:.2} ms, SLO {slo_ms:.2} ms");
    let configs = configurations(args, engine, &feed, &mut notes).await?;

    let job = Job {
        n: args.batch,
        clients: args.batch_clients,
    };
    let mut batch = Vec::new();
    for c in &configs {
        eprintln!("bench compare: batch job, {}", c.label);
        let before = c.cpu();
        let out = scenario::batch_job(c.sender, &feed, job).await;
        batch.push(BatchRun {
            label: c.label.clone(),
            habit: c.habit,
            client: out.summary(),
            proxy_cpu_us: cpu_per_request(before, c.cpu(), out.sent),
        });
    }
    let capacity = batch
        .iter()
        .map(|b| b.client.throughput_rps)
        .fold(0.0, f64::max);
    anyhow::ensure!(capacity > 0.0, "no configuration finished a batch request");
    eprintln!("bench compare: capacity {capacity:.0} req/s");

    let mut live = Vec::new();
    for c in &configs {
        eprintln!("bench compare: live traffic, {}", c.label);
        let mut steps = Vec::new();
        for (k, &load) in args.live_load.iter().enumerate() {
            let rate = load * capacity;
            let before = c.cpu();
            let out = scenario::live(c.sender, &feed, rate, span, seed + k as u64).await;
            let o = &out.outcomes;
            steps.push(LiveStep {
                load,
                offered_rps: o.sent as f64 / span.as_secs_f64(),
                client: o.summary(),
                goodput_rps: crate::stats::goodput(o, slo, span),
                proxy_cpu_us: cpu_per_request(before, c.cpu(), o.sent),
            });
        }
        live.push(LiveRun {
            label: c.label.clone(),
            habit: c.habit,
            steps,
        });
    }

    let live_rate = args.live_rate.unwrap_or(0.07 * capacity);
    let straight = Sender {
        addr: engine,
        habit: Habit::Open,
    };
    eprintln!("bench compare: live traffic alone at {live_rate:.1} req/s");
    let alone = scenario::live(straight, &feed, live_rate, span, seed).await;
    let live_alone = alone.outcomes.summary();
    let beside = |sender: Sender| Beside {
        sender,
        tag: Tag::Live,
        rate: live_rate,
    };
    let mut mixed = Vec::new();
    for (c, b) in configs.iter().zip(&batch) {
        eprintln!("bench compare: mixed, {}", c.label);
        // Only the batch keeps a habit; live requests go straight to the engine.
        let live_sender = if c.proxy.is_some() {
            c.sender
        } else {
            straight
        };
        let expected = Duration::from_secs_f64(b.client.elapsed_s);
        let before = c.cpu();
        let both = scenario::mixed(c.sender, beside(live_sender), &feed, job, expected, seed).await;
        let carried = both.batch.sent
            + if c.proxy.is_some() {
                both.live.outcomes.sent
            } else {
                0
            };
        mixed.push(MixedRun {
            label: c.label.clone(),
            habit: c.habit,
            live: both.live.outcomes.summary(),
            batch: both.batch.summary(),
            batch_alone_rps: b.client.throughput_rps,
            live_timeline: both.live.timeline,
            proxy_cpu_us: cpu_per_request(before, c.cpu(), carried),
        });
    }
    if let Some(url) = &args.priority_upstream {
        // The engine's own answer: vLLM scheduling by the body's priority,
        // both kinds of traffic sent to it straight.
        let label = "naive → vLLM priority scheduling".to_string();
        eprintln!("bench compare: mixed, {label} ({url})");
        let sender = Sender {
            addr: crate::client::resolve(url).await?,
            habit: Habit::Open,
        };
        let naive_alone = batch.iter().find(|b| b.label == "naive → vLLM");
        let batch_alone_rps = naive_alone.map_or(capacity, |b| b.client.throughput_rps);
        let expected = Duration::from_secs_f64(args.batch as f64 / batch_alone_rps);
        let live = Beside {
            tag: Tag::LiveForEngine,
            ..beside(sender)
        };
        let both = scenario::mixed(sender, live, &feed, job, expected, seed).await;
        mixed.push(MixedRun {
            label,
            habit: false,
            live: both.live.outcomes.summary(),
            batch: both.batch.summary(),
            batch_alone_rps,
            live_timeline: both.live.timeline,
            proxy_cpu_us: None,
        });
    }
    drop(configs);

    let live_alone_p95 = live_alone.latency_ms.p95;
    let mut frontier = Vec::new();
    let mut slo_mode = None;
    let concurrency = args.plugins.join("concurrency.wasm");
    for &n in &args.frontier {
        let (flags, label) = policy_flags(&format!("{},limit={n}", concurrency.display()));
        eprintln!("bench compare: frontier, {label}");
        let proxy = start_warm(args, engine, &feed, &flags)
            .await
            .with_context(|| format!("start the proxy for {label}"))?;
        let through = Sender {
            addr: proxy.addrs().0,
            habit: Habit::Open,
        };
        let expected = Duration::from_secs_f64(args.batch as f64 / capacity);
        let before = proxy.cpu_seconds();
        let both = scenario::mixed(through, beside(straight), &feed, job, expected, seed).await;
        let cpu = cpu_per_request(before, proxy.cpu_seconds(), both.batch.sent);
        frontier.push(point(label, Some(n), &both, live_alone_p95, capacity, cpu));
    }
    let adaptive = args.plugins.join("adaptive.wasm");
    match live_alone_p95 {
        _ if args.frontier.is_empty() => {}
        None => notes.push("no live request succeeded alone: SLO mode skipped".into()),
        Some(_) if !adaptive.is_file() => {
            notes.push(format!(
                "{} not found: SLO mode skipped",
                adaptive.display()
            ));
        }
        Some(alone_p95) => {
            // To the hundredth of a millisecond, as the flag is written.
            let objective = (args.objective_factor * alone_p95 * 100.0).round() / 100.0;
            let (flags, label) = policy_flags(&format!(
                "{},live_p95_ms={objective:.2}",
                adaptive.display()
            ));
            eprintln!("bench compare: SLO mode, {label}");
            match start_warm(args, engine, &feed, &flags).await {
                Err(e) => notes.push(format!("{label} did not start ({e:#}): SLO mode skipped")),
                Ok(proxy) => {
                    let through = Sender {
                        addr: proxy.addrs().0,
                        habit: Habit::Open,
                    };
                    let expected = Duration::from_secs_f64(args.batch as f64 / capacity);
                    let before = proxy.cpu_seconds();
                    let both =
                        scenario::mixed(through, beside(through), &feed, job, expected, seed).await;
                    let carried = both.batch.sent + both.live.outcomes.sent;
                    let cpu = cpu_per_request(before, proxy.cpu_seconds(), carried);
                    let p = point(label, None, &both, live_alone_p95, capacity, cpu);
                    slo_mode = Some(SloMode::judge(objective, &p, &frontier));
                    frontier.push(p);
                }
            }
        }
    }

    let mut card = Scorecard {
        schema: crate::scorecard::SCHEMA,
        header: Header::new(engine_label, profile, model, &workload),
        settings: Settings {
            batch: args.batch,
            batch_clients: args.batch_clients,
            live_load: args.live_load.clone(),
            live_seconds: args.live_seconds,
            objective_factor: args.objective_factor,
            frontier: args.frontier.clone(),
            warmup: args.warmup,
            wave: args.wave,
            limit: args.limit,
        },
        unloaded_p50_ms,
        slo_ms,
        capacity_rps: capacity,
        batch,
        live,
        live_rate_rps: live_rate,
        live_alone: Some(live_alone),
        mixed,
        frontier,
        slo_mode,
        summary: Vec::new(),
        notes,
    };
    card.judge();
    Ok(card)
}

/// A frontier point from a batch with live traffic beside it.
fn point(
    label: String,
    limit: Option<usize>,
    both: &scenario::Both,
    live_alone_p95: Option<f64>,
    capacity: f64,
    proxy_cpu_us: Option<f64>,
) -> FrontierPoint {
    let live = both.live.outcomes.summary();
    let batch = both.batch.summary();
    FrontierPoint {
        live_p95_ratio: live
            .latency_ms
            .p95
            .zip(live_alone_p95)
            .map(|(p, a)| p / a.max(1e-9)),
        batch_ratio: batch.throughput_rps / capacity.max(1e-9),
        label,
        limit,
        live,
        batch,
        proxy_cpu_us,
    }
}

/// The single-table comparison (`--requests N`): N requests per
/// configuration, the habits straight to the engine and naive clients
/// through each proxy, in one table with a winner per row.
async fn single_table(args: &Args, requests: usize) -> anyhow::Result<()> {
    let mut report = single_table_report(args, requests).await?;
    let table = report.comparison();
    let details = report.markdown();
    // The engine/workload header is already printed above.
    let markdown = format!(
        "{table}\nper run:\n\n{}",
        details.split_once("\n\n").map_or(&*details, |(_, t)| t)
    );
    let path = report.write_all(&args.out_dir, &markdown)?;
    print!("{markdown}");
    println!("\nresults: {} (and .md, .svg)", path.display());
    Ok(())
}

async fn single_table_report(args: &Args, requests: usize) -> anyhow::Result<Report> {
    let Upstream {
        addr: upstream,
        url,
        profile: engine_profile,
        in_flight: gauge,
    } = args.engine.start().await?;
    let engine = engine_name(upstream, &url, engine_profile.as_deref()).await;
    eprintln!("bench compare: {engine}");
    let model = model_of(upstream).await;
    let workload: Arc<Workload> = Arc::new(args.workload.build(model.as_deref())?);
    if let Some(offset) = workload.candidate_offset {
        eprintln!(
            "bench compare: candidate offset {offset} (repeat with --candidate-offset {offset})"
        );
    }

    // Every run (warm-ups included) evaluates its own candidates: only the
    // rubric is shared, as in the reference workload.
    let mut next = 0usize;
    let mut plan = |mode: Mode, requests: usize| {
        next += requests;
        Plan {
            mode,
            requests,
            duration_s: None,
            wave: args.wave,
            limit: args.limit,
            clients: args.clients,
            rate: 0.0,
            seed: args.workload.seed,
            offset: next - requests,
        }
    };
    let mut runs = Vec::new();
    // The baselines: client-side coordination, straight to the engine.
    for (mode, label) in [
        (
            Mode::Batched,
            format!("batched clients ({}) → vLLM", args.wave),
        ),
        (
            Mode::Inngest,
            format!("inngest clients ({}) → vLLM", args.limit),
        ),
    ] {
        eprintln!("bench compare: {label}");
        drive(upstream, &workload, &plan(mode, args.warmup)).await;
        runs.push(
            measure(
                &label,
                &url,
                upstream,
                None,
                Some(upstream),
                gauge.as_ref(),
                &workload,
                &plan(mode, requests),
            )
            .await,
        );
    }
    // Naive clients through the proxy, one proxy per policy.
    let mut configs = vec![(Vec::new(), "sluice (no policy)".to_string())];
    for (file, config) in [("batched.wasm", ""), ("concurrency.wasm", "")] {
        let path = args.plugins.join(file);
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build the plugins with `just plugins`",
            path.display()
        );
        configs.push(policy_flags(&format!("{}{config}", path.display())));
    }
    configs.extend(args.policy.iter().map(|p| policy_flags(p)));
    for (flags, label) in configs {
        eprintln!("bench compare: {label} ({} naive clients)", args.clients);
        let proxy = proxy::start(args.proxy_mode, upstream, &flags)
            .await
            .with_context(|| format!("start the proxy for {label}"))?;
        let (addr, admin) = proxy.addrs();
        drive(addr, &workload, &plan(Mode::Naive, args.warmup)).await;
        runs.push(
            measure(
                &label,
                &format!("http://{addr}"),
                addr,
                Some(admin),
                Some(upstream),
                gauge.as_ref(),
                &workload,
                &plan(Mode::Naive, requests),
            )
            .await,
        );
        drop(proxy);
    }
    Ok(Report::new(engine, engine_profile, model, &workload, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_cpu_is_per_request_and_needs_a_process() {
        assert_eq!(cpu_per_request(Some(1.0), Some(1.5), 1000), Some(500.0));
        assert_eq!(cpu_per_request(None, None, 1000), None);
        assert_eq!(cpu_per_request(Some(1.0), Some(1.5), 0), None);
    }
}
