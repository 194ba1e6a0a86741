//! `bench compare` (what `just bench` runs): admission policies side by
//! side on one workload, against the two client habits they replace.
//!
//! The upstream is the simulated vLLM (profile `rtx4080` by default),
//! served in-process on 127.0.0.1:0, or any engine given with `--upstream`.
//! Configurations, each a column of the table:
//! - `batched clients → vLLM`: waves of 50, each awaited whole, sent
//!   directly to the engine (the reference's high-parallelism client);
//! - `inngest clients → vLLM`: a semaphore of 10, directly (the reference's
//!   concurrency-capped client);
//! - `sluice (no policy)`, `sluice + batched.wasm`, `sluice + concurrency.wasm`
//!   and one per `--policy`: naive clients (`--clients` independent clients,
//!   back to back) through a proxy started for that policy, so the policy
//!   alone decides admission.
//!
//! The proxy is the `proxy` binary that `SLUICE_PROXY_BIN` names, else the
//! one beside `bench` when it exists, else the proxy library in-process
//! (`--proxy-mode` chooses).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::engine::{EngineArgs, Upstream, engine_name, model_of};
use crate::load::{Mode, Plan, drive};
use crate::measure::measure;
use crate::procs;
use crate::report::Report;
use crate::workload::WorkloadArgs;

/// Where the proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProxyMode {
    /// The `proxy` binary (`SLUICE_PROXY_BIN`, else the one beside `bench`)
    /// if present, else in-process.
    Auto,
    /// The `proxy` binary (`SLUICE_PROXY_BIN`, else the one beside `bench`),
    /// as a child process.
    Process,
    /// The proxy library inside this process.
    InProcess,
}

/// `bench compare` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Requests per configuration.
    #[arg(long, default_value_t = 1000)]
    pub(crate) requests: usize,
    /// Naive clients through the proxy.
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// Wave size of the batched baseline.
    #[arg(long, default_value_t = 50)]
    pub(crate) wave: usize,
    /// Semaphore of the inngest baseline.
    #[arg(long, default_value_t = 10)]
    pub(crate) limit: usize,
    /// Another policy to compare: `PATH` or `PATH,key=value,key=value`.
    #[arg(long)]
    pub(crate) policy: Vec<String>,
    /// Directory of the bundled plugins.
    #[arg(long, default_value = "plugins/dist")]
    pub(crate) plugins: PathBuf,
    /// Requests sent to each configuration before measuring (warm-up).
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
}

/// A proxy for one configuration: its client and admin addresses.
enum Proxy {
    Child(procs::Proc),
    InProcess {
        addr: SocketAddr,
        admin: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

impl Proxy {
    fn addrs(&self) -> (SocketAddr, SocketAddr) {
        match self {
            Proxy::Child(p) => (p.addr, p.admin),
            Proxy::InProcess { addr, admin, .. } => (*addr, *admin),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Proxy::InProcess { stop, .. } = self
            && let Some(tx) = stop.take()
        {
            let _ = tx.send(());
        }
    }
}

async fn start_proxy(
    mode: ProxyMode,
    upstream: SocketAddr,
    extra: &[String],
) -> anyhow::Result<Proxy> {
    let use_child = match mode {
        ProxyMode::Process => true,
        ProxyMode::InProcess => false,
        // A SLUICE_PROXY_BIN that names nothing is an error, not a fallback.
        ProxyMode::Auto => {
            procs::proxy_binary_override().is_some() || procs::proxy_binary().is_ok()
        }
    };
    if use_child {
        let extra = extra.to_vec();
        let proc =
            tokio::task::spawn_blocking(move || procs::start_proxy(upstream, &extra)).await??;
        return Ok(Proxy::Child(proc));
    }
    let mut argv = vec![
        "proxy".to_string(),
        "--upstream".into(),
        format!("http://{upstream}"),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ];
    argv.extend(extra.iter().cloned());
    let config = sluice::cli::load(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = sluice::App::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    app.upstream_metrics
        .first_attempt(std::time::Duration::from_secs(2))
        .await;
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr, admin_addr) = (main.local_addr()?, admin.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sluice::server::run(
        app,
        sluice::server::Listeners { main, admin },
        async move {
            let _ = rx.await;
        },
    ));
    Ok(Proxy::InProcess {
        addr,
        admin: admin_addr,
        stop: Some(tx),
    })
}

/// A `--policy` value as proxy flags and a column label.
fn policy_flags(spec: &str) -> (Vec<String>, String) {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default().to_string();
    let name = std::path::Path::new(&path)
        .file_name()
        .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
    let mut flags = vec!["--policy".to_string(), path];
    let mut config = Vec::new();
    for kv in parts.filter(|p| !p.is_empty()) {
        flags.push("--policy-config".into());
        flags.push(kv.to_string());
        config.push(kv);
    }
    let label = if config.is_empty() {
        format!("sluice + {name}")
    } else {
        format!("sluice + {name} ({})", config.join(" "))
    };
    (flags, label)
}

/// `bench compare`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = compare(&args).await?;
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

async fn compare(args: &Args) -> anyhow::Result<Report> {
    let Upstream {
        addr: upstream,
        url,
        profile: engine_profile,
        in_flight: gauge,
    } = args.engine.start().await?;
    let engine = engine_name(upstream, &url, engine_profile.as_deref()).await;
    eprintln!("bench compare: {engine}");
    let model = model_of(upstream).await;
    let workload = Arc::new(args.workload.build(model.as_deref())?);
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
                &plan(mode, args.requests),
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
        let proxy = start_proxy(args.proxy_mode, upstream, &flags)
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
                &plan(Mode::Naive, args.requests),
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
    fn policy_specs() {
        let (flags, label) = policy_flags("p/dist/x.wasm,limit=4,key=tenant");
        assert_eq!(
            flags,
            [
                "--policy",
                "p/dist/x.wasm",
                "--policy-config",
                "limit=4",
                "--policy-config",
                "key=tenant"
            ]
        );
        assert_eq!(label, "sluice + x.wasm (limit=4 key=tenant)");
        assert_eq!(policy_flags("y.wasm").1, "sluice + y.wasm");
    }
}
