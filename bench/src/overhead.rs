//! `bench overhead`: what Sluice adds over a direct connection, measured in
//! one run against one fast upstream, with nginx `proxy_pass` as a reference
//! when it is installed. Every figure is printed next to its baseline as a
//! ratio; nothing here asserts a timing.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use crate::load::{LoadResult, Target, closed_loop, open_loop};
use crate::{fast_upstream, procs};

/// Flags of `bench overhead`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Fixed request rate for the open-loop latency measurement (req/s).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Connections for the maximum-throughput measurement.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Also measure the proxy with this policy loaded (e.g. plugins/dist/concurrency.wasm).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// `--policy-config` for that policy (repeatable).
    #[arg(long = "policy-config")]
    policy_config: Vec<String>,
    /// Also measure the proxy with telemetry off (SLUICE_TELEMETRY=off): what recording metrics costs.
    #[arg(long)]
    telemetry_cost: bool,
    /// Skip nginx even when installed.
    #[arg(long)]
    no_nginx: bool,
}

struct Row {
    name: String,
    c1: LoadResult,
    fixed: LoadResult,
    max: LoadResult,
    // CPU time the proxy process spent per request at maximum throughput.
    cpu_us_per_request: Option<f64>,
}

/// Runs every measurement and prints the table.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let upstream = fast_upstream::start()?;
    let body = Bytes::from_static(br#"{"model":"fast","prompt":"Say hello.","max_tokens":1}"#);

    let proxy = procs::start_proxy(upstream, &[])?;
    // Let the proxy settle, then read its idle footprint.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = proxy.rss_bytes();
    let policy_proxy = match &args.policy {
        Some(path) => {
            let mut extra = vec![
                "--policy".to_owned(),
                path.display().to_string(),
                "--max-queue".into(),
                "100000".into(),
            ];
            for kv in &args.policy_config {
                extra.push("--policy-config".into());
                extra.push(kv.clone());
            }
            Some(procs::start_proxy(upstream, &extra)?)
        }
        None => None,
    };
    let quiet_proxy = if args.telemetry_cost {
        Some(procs::start_proxy_with_env(
            upstream,
            &[],
            &[("SLUICE_TELEMETRY", "off")],
        )?)
    } else {
        None
    };
    let nginx = if args.no_nginx {
        None
    } else {
        procs::start_nginx(upstream)?
    };

    let mut targets: Vec<(String, std::net::SocketAddr, Option<&procs::Proc>)> = vec![
        ("direct".to_owned(), upstream, None),
        ("sluice".to_owned(), proxy.addr, Some(&proxy)),
    ];
    if let (Some(p), Some(path)) = (&policy_proxy, &args.policy) {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        targets.push((format!("sluice+{name}"), p.addr, Some(p)));
    }
    if let Some(q) = &quiet_proxy {
        targets.push(("sluice (telemetry off)".to_owned(), q.addr, Some(q)));
    }
    if let Some(n) = &nginx {
        targets.push(("nginx".to_owned(), n.addr, Some(n)));
    }

    println!(
        "bench overhead: engine = built-in fast upstream (no model); {}s per measurement",
        args.seconds
    );
    let mut rows = Vec::new();
    for (name, addr, process) in targets {
        let target = Target {
            addr,
            path: "/v1/completions".into(),
            body: body.clone(),
        };
        // Warm up connections and caches.
        closed_loop(&target, 4, Duration::from_millis(300)).await?;
        let c1 = closed_loop(&target, 1, duration).await?;
        let fixed = open_loop(&target, args.rate, duration, 16).await?;
        let cpu_before = process.map(procs::Proc::cpu_seconds);
        let max = closed_loop(&target, args.connections, duration).await?;
        let cpu_us_per_request = process
            .zip(cpu_before)
            .map(|(p, before)| (p.cpu_seconds() - before) * 1e6 / max.ok.max(1) as f64);
        eprintln!(
            "  {name:<18} c=1 p50 {:>6} µs   {} req/s p50 {:>6} µs   max {:>8.0} req/s",
            c1.quantile_us(0.5),
            args.rate,
            fixed.quantile_us(0.5),
            max.throughput()
        );
        rows.push(Row {
            name,
            c1,
            fixed,
            max,
            cpu_us_per_request,
        });
    }
    print_table(&rows, args.rate);
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(on), Some(off)) = (row("sluice"), row("sluice (telemetry off)")) {
        let cpu = |r: &Row| r.cpu_us_per_request.unwrap_or(f64::NAN);
        println!();
        println!(
            "telemetry cost: max throughput with recording {:.2}× without; proxy CPU {:.1} vs {:.1} µs/request ({:+.1}%)",
            on.max.throughput() / off.max.throughput(),
            cpu(on),
            cpu(off),
            (cpu(on) / cpu(off) - 1.0) * 100.0
        );
    }
    let after_rss = proxy.rss_bytes();
    println!();
    println!(
        "sluice RSS: idle {} MB, after load {} MB",
        mb(idle_rss),
        mb(after_rss)
    );
    Ok(())
}

fn mb(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.1}", b as f64 / 1_048_576.0))
        .unwrap_or_else(|| "n/a".into())
}

fn print_table(rows: &[Row], rate: f64) {
    let direct = &rows[0];
    let nginx = rows.iter().find(|r| r.name == "nginx");
    println!();
    println!(
        "| target | c=1 p50 µs | c=1 p99 µs | added c=1 p50 µs | {rate:.0} req/s p50 µs | {rate:.0} req/s p99 µs | added p50 µs | max req/s | × direct | × nginx | proxy CPU µs/req | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let added_c1 = r.c1.quantile_us(0.5) as i64 - direct.c1.quantile_us(0.5) as i64;
        let added_fixed = r.fixed.quantile_us(0.5) as i64 - direct.fixed.quantile_us(0.5) as i64;
        let vs_direct = r.max.throughput() / direct.max.throughput();
        let vs_nginx = nginx
            .map(|n| format!("{:.2}", r.max.throughput() / n.max.throughput()))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "| {} | {} | {} | {:+} | {} | {} | {:+} | {:.0} | {:.2} | {} | {} | {} |",
            r.name,
            r.c1.quantile_us(0.5),
            r.c1.quantile_us(0.99),
            added_c1,
            r.fixed.quantile_us(0.5),
            r.fixed.quantile_us(0.99),
            added_fixed,
            r.max.throughput(),
            vs_direct,
            vs_nginx,
            r.cpu_us_per_request
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "n/a".into()),
            r.c1.errors + r.fixed.errors + r.max.errors,
        );
    }
}
