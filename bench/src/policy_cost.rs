//! `bench policy-cost`: the host-side cost of one admission-policy event,
//! wasm call included, measured per call with an HDR histogram. The events
//! are the proxy's steady state: an arrival that is admitted at once, then
//! its completion.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use sluice::admission::wasm::PolicyRuntime;
use sluice::admission::{CompletionReport, Event, Policy, RequestInfo, Snapshot};

/// Flags of `bench policy-cost`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The policy component.
    #[arg(long, default_value = "plugins/dist/concurrency.wasm")]
    policy: PathBuf,
    /// `--policy-config` pairs (KEY=VALUE, repeatable).
    #[arg(long = "policy-config", default_value = "limit=1000000")]
    policy_config: Vec<String>,
    /// Arrival + completion pairs to measure.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
}

/// Runs the measurement and prints percentiles.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let config: Vec<(String, String)> = args
        .policy_config
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let runtime =
        PolicyRuntime::new(Duration::from_millis(50), 64 << 20).context("wasm runtime")?;
    let mut policy = runtime
        .load_file(&args.policy, &config)
        .with_context(|| format!("load {}", args.policy.display()))?;
    let mut arrival = Histogram::<u64>::new(3)?;
    let mut completion = Histogram::<u64>::new(3)?;
    let info = RequestInfo {
        tenant: "tenant-a".into(),
        model: "tiny-llama".into(),
        prompt_tokens: 1200,
        max_tokens: 64,
        ..RequestInfo::default()
    };
    let start = Instant::now();
    for id in 0..args.events {
        let now_us = start.elapsed().as_micros() as u64;
        let event = Event::Arrival {
            id,
            info: info.clone(),
            arrived_us: now_us,
        };
        let snapshot = Snapshot {
            now_us,
            in_flight: 0,
            queued: 1,
            replicas: &[],
        };
        let t = Instant::now();
        let decision = policy.call(snapshot, &event).context("arrival")?;
        arrival.record(t.elapsed().as_nanos() as u64)?;
        anyhow::ensure!(
            decision.admit == [sluice::admission::Admit::id(id)],
            "policy did not admit {id} at once: {decision:?}"
        );
        let event = Event::Completion {
            id,
            report: CompletionReport {
                ok: true,
                ..CompletionReport::default()
            },
        };
        let snapshot = Snapshot {
            now_us,
            in_flight: 1,
            queued: 0,
            replicas: &[],
        };
        let t = Instant::now();
        policy.call(snapshot, &event).context("completion")?;
        completion.record(t.elapsed().as_nanos() as u64)?;
    }
    println!(
        "bench policy-cost: {} ({}), {} arrival+completion pairs",
        args.policy.display(),
        policy.description(),
        args.events
    );
    println!("| event | median ns | p99 ns | p99.9 ns | max ns |");
    println!("|---|---|---|---|---|");
    for (name, h) in [("arrival (admit)", &arrival), ("completion", &completion)] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    Ok(())
}
