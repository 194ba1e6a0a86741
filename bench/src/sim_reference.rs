//! `bench sim-vs-reference`: the simulator against the reference GPU
//! benchmark (RTX 4080, 5,000 requests; waves of 50 and a semaphore of 10),
//! on the bench's candidate-evaluation workload.
//!
//! Three figures per client mode, side by side with the reference and the
//! error of each:
//! - the engine model in virtual time (`sluice_sim::reference`): the
//!   profile's own timing with no HTTP, what the `rtx4080` fit is made on;
//! - the same clients over HTTP (the batched and inngest modes of
//!   [`crate::load`]) against the simulator served in-process, so this
//!   machine's HTTP and scheduling costs come on top;
//! - the HTTP cap: the same over HTTP against a simulator whose every time
//!   is zero, i.e. what this machine's load generator and server alone
//!   allow.
//!
//! `--fit OUT.toml` first refits the profile's timing to the reference in
//! virtual time and writes it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::Value;
use sluice_sim::Profile;
use sluice_sim::reference::{self, Clients, Point, REFERENCE, REFERENCE_REQUESTS};
use sluice_sim::tokenizer::Tokenizer;

use crate::load::{self, Mode, Plan};
use crate::workload::{Workload, WorkloadArgs};

/// `bench sim-vs-reference` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Simulator profile (built-in name or TOML path).
    #[arg(long, default_value = "rtx4080")]
    profile: String,
    /// Requests per run (the reference sent 5,000).
    #[arg(long, default_value_t = REFERENCE_REQUESTS)]
    requests: usize,
    /// Virtual time only: skip the HTTP runs.
    #[arg(long)]
    no_http: bool,
    /// Refit the profile's timing to the reference first; write it here.
    #[arg(long)]
    fit: Option<PathBuf>,
    /// Requests per client mode in each evaluation of the fit.
    #[arg(long, default_value_t = 1000)]
    fit_requests: usize,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Runs the comparison and prints it.
pub(crate) async fn run(mut args: Args) -> anyhow::Result<()> {
    let mut profile = Profile::load(&args.profile)?;
    // The same candidates every time (each run has a fresh simulator, so
    // nothing is cached from an earlier one): the virtual figures repeat
    // exactly. Virtual and HTTP runs send the same items.
    args.workload.candidate_offset.get_or_insert(0);
    let workload = Arc::new(args.workload.build(Some(&profile.model))?);
    let max_tokens = args.workload.max_tokens as usize;
    let tok = Tokenizer::new(profile.engine.vocab_size);
    let prompts: Vec<Vec<u32>> = (0..args.requests.max(1))
        .map(|i| prompt_tokens(&workload, i, &tok))
        .collect::<anyhow::Result<_>>()?;

    if let Some(out) = &args.fit {
        eprintln!(
            "fitting {} to the reference ({} requests per mode per try)...",
            profile.name, args.fit_requests
        );
        let n = args.fit_requests.min(prompts.len());
        let (fitted, loss) = reference::fit(&profile, n, &prompts[..n], max_tokens);
        profile = fitted;
        profile.description = format!(
            "fitted by `bench sim-vs-reference --fit` to the reference RTX 4080 benchmark \
             (waves of 50: 4,292 req/s, p50 9.05 ms, p95 10.38 ms; semaphore of 10: \
             3,687 req/s, p50 2.56 ms, p95 2.79 ms) in virtual time, on {}; loss {loss:.5}",
            workload.description
        );
        std::fs::write(out, profile.to_toml())
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }

    let mut rows = Vec::new();
    for (clients, want) in REFERENCE {
        let virt = reference::simulate(&profile, clients, args.requests, &prompts, max_tokens);
        rows.push((clients, want, virt, None, None));
    }
    if !args.no_http {
        let mut zero = profile.clone();
        let t = &mut zero.timing;
        (t.step_base_ms, t.prefill_token_ms, t.decode_seq_ms) = (0.0, 0.0, 0.0);
        (t.context_token_ms, t.request_overhead_ms) = (0.0, 0.0);
        (t.api_in_ms, t.api_out_ms) = (0.0, 0.0);
        for row in &mut rows {
            eprintln!("over HTTP: {}...", row.0.label());
            row.3 = Some(http(&profile, &workload, row.0, args.requests).await?);
            eprintln!("over HTTP, zero-time engine: {}...", row.0.label());
            row.4 = Some(http(&zero, &workload, row.0, args.requests).await?);
        }
    }

    println!(
        "simulated vLLM (profile {}) vs the reference RTX 4080 benchmark; {} requests per mode; {}",
        profile.name, args.requests, workload.description
    );
    println!(
        "| client mode | metric | reference | sim, virtual time | error | sim over HTTP | error | HTTP cap (zero-time engine) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (clients, want, virt, over_http, cap) in rows {
        for name in ["req/s", "p50 ms", "p95 ms"] {
            let get = |p: &Point| match name {
                "req/s" => p.req_s,
                "p50 ms" => p.p50_ms,
                _ => p.p95_ms,
            };
            let fmt = |v: f64| {
                if name == "req/s" {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            };
            let cell = |p: Option<Point>| match p {
                Some(p) => (
                    fmt(get(&p)),
                    format!("{:+.1}%", reference::error_pct(get(&p), get(&want))),
                ),
                None => ("-".into(), "-".into()),
            };
            let (v, ve) = cell(Some(virt));
            let (h, he) = cell(over_http);
            let c = cap.map_or("-".into(), |p| fmt(get(&p)));
            println!(
                "| {} | {name} | {} | {v} | {ve} | {h} | {he} | {c} |",
                clients.label(),
                fmt(get(&want)),
            );
        }
    }
    Ok(())
}

/// The prompt of workload item `i`, in the simulator's tokens.
fn prompt_tokens(workload: &Workload, i: usize, tok: &Tokenizer) -> anyhow::Result<Vec<u32>> {
    let body: Value = serde_json::from_slice(&workload.item(i).body)?;
    if let Some(p) = body.get("prompt").and_then(Value::as_str) {
        return Ok(tok.encode(p));
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .context("a workload item with neither prompt nor messages")?;
    let pairs: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m.get("role").and_then(Value::as_str).unwrap_or_default(),
                m.get("content").and_then(Value::as_str).unwrap_or_default(),
            )
        })
        .collect();
    Ok(tok.encode(&Tokenizer::chat_prompt(pairs)))
}

/// `clients` over HTTP against `profile` served in-process.
async fn http(
    profile: &Profile,
    workload: &Arc<Workload>,
    clients: Clients,
    requests: usize,
) -> anyhow::Result<Point> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sluice_sim::serve(listener, profile.clone(), async {
        let _ = stopped.await;
    }));
    let (mode, wave, limit) = match clients {
        Clients::Waves(n) => (Mode::Batched, n, 1),
        Clients::Semaphore(n) => (Mode::Inngest, 1, n),
    };
    let plan = |requests, offset| Plan {
        mode,
        requests,
        duration_s: None,
        wave,
        limit,
        clients: 1,
        rate: 0.0,
        seed: 0,
        offset,
    };
    // Warm-up on other candidates: connections open, the rubric cached.
    load::drive(addr, workload, &plan(100, requests)).await;
    let out = load::drive(addr, workload, &plan(requests, 0)).await;
    let _ = stop.send(());
    server.await??;
    let s = out.summary();
    anyhow::ensure!(
        s.failed == 0,
        "{} requests failed over HTTP: {:?}",
        s.failed,
        s.errors
    );
    Ok(Point {
        req_s: s.throughput_rps,
        p50_ms: s.latency_ms.p50.unwrap_or(0.0),
        p95_ms: s.latency_ms.p95.unwrap_or(0.0),
    })
}
