//! `bench overhead`: what Sluice adds over a direct connection, measured in
//! one run against one fast upstream, with two references: `hyper-floor`
//! (hyper and tokio with no proxy logic, when it is built beside the proxy)
//! and nginx `proxy_pass` (when it is installed). Every figure is printed
//! next to its baseline as a ratio; nothing here asserts a timing.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{Read, Request};
use crate::load::{closed_loop, fixed_rate};
use crate::stats::{Outcomes, median};
use crate::{fast_upstream, procs};

/// Flags of `bench overhead`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds: each measures every target in turn, and every ratio compares
    /// figures of the same round, so a machine that drifts during the run
    /// moves baseline and target alike. The table shows medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
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
    /// Skip `hyper-floor` (the least a hyper proxy does; measured when it is
    /// built beside the proxy binary).
    #[arg(long)]
    no_floor: bool,
}

/// One target's measurements in one round.
struct Sample {
    c1: Outcomes,
    fixed: Outcomes,
    max: Outcomes,
    // CPU time the proxy process spent per request at maximum throughput.
    cpu_us_per_request: Option<f64>,
}

impl Sample {
    /// The proxy's CPU µs per request at maximum throughput (NaN when not read).
    fn cpu(&self) -> f64 {
        self.cpu_us_per_request.unwrap_or(f64::NAN)
    }
}

struct Row {
    name: String,
    // One per round, in order.
    rounds: Vec<Sample>,
}

impl Row {
    /// `f` for every round, in order (`f` gets the round's index too, to
    /// compare with another row's same round).
    fn each(&self, f: impl Fn(usize, &Sample) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .enumerate()
            .map(|(i, s)| f(i, s))
            .collect()
    }

    /// The median over rounds of `f` (see [`Row::each`]).
    fn median(&self, f: impl Fn(usize, &Sample) -> f64) -> f64 {
        median(&self.each(f))
    }

    /// Per round: the p50 of `pick` minus `base`'s in the same round, µs.
    fn added_p50(&self, base: &Row, pick: fn(&Sample) -> &Outcomes) -> Vec<f64> {
        self.each(|i, s| {
            pick(s).quantile_us(0.5) as f64 - pick(&base.rounds[i]).quantile_us(0.5) as f64
        })
    }

    /// Per round: maximum throughput over `base`'s in the same round.
    fn throughput_ratio(&self, base: &Row) -> Vec<f64> {
        self.each(|i, s| s.max.throughput() / base.rounds[i].max.throughput())
    }
}

/// Runs every measurement and prints the table.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let upstream = fast_upstream::start()?;
    // Only the status is read: no client work but HTTP, and no time limit.
    let request = Request::post(
        "/v1/completions",
        &br#"{"model":"fast","prompt":"Say hello.","max_tokens":1}"#[..],
    )
    .read(Read::Status)
    .timeout(None);

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
    // The floor is a reference: one that fails to start is reported, not fatal.
    let floor = if args.no_floor {
        Ok(None)
    } else {
        procs::start_hyper_floor(upstream)
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
    if let Ok(Some(f)) = &floor {
        targets.push(("hyper-floor".to_owned(), f.addr, Some(f)));
    }
    if let Some(n) = &nginx {
        targets.push(("nginx".to_owned(), n.addr, Some(n)));
    }

    let rounds = args.rounds.max(1);
    println!(
        "bench overhead: engine = built-in fast upstream (no model); {}s per measurement, {rounds} interleaved rounds (figures: medians over rounds)",
        args.seconds
    );
    println!("proxy binary: {}", proxy.binary.display());
    match &floor {
        Ok(Some(f)) => println!(
            "hyper-floor binary: {} (hyper and tokio as the proxy has them, no proxy logic: the floor under its overhead)",
            f.binary.display()
        ),
        Ok(None) if !args.no_floor => println!(
            "hyper-floor: not built beside the proxy binary (cargo build -p sluice-hyper-floor with the proxy's profile); not measured"
        ),
        Ok(None) => {}
        Err(err) => println!("hyper-floor: did not start ({err:#}); not measured"),
    }
    let mut rows: Vec<Row> = targets
        .iter()
        .map(|(name, _, _)| Row {
            name: name.clone(),
            rounds: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        for ((name, addr, process), row) in targets.iter().zip(&mut rows) {
            // Warm up connections and caches.
            closed_loop(*addr, &request, 4, Duration::from_millis(300)).await?;
            let c1 = closed_loop(*addr, &request, 1, duration).await?;
            let fixed = fixed_rate(*addr, &request, args.rate, duration, 16).await?;
            let cpu_before = process.map(procs::Proc::cpu_seconds);
            let max = closed_loop(*addr, &request, args.connections, duration).await?;
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
            row.rounds.push(Sample {
                c1,
                fixed,
                max,
                cpu_us_per_request,
            });
        }
    }
    print_table(&rows, args.rate);
    print_rounds(&rows);
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(sluice), Some(floor)) = (row("sluice"), row("hyper-floor")) {
        println!();
        println!(
            "sluice over hyper-floor (its own work): c=1 p50 {} µs, proxy CPU {} µs/request (medians of the rounds' differences); max throughput {:.2}× (median of the rounds' ratios)",
            signed(median(&sluice.added_p50(floor, |s| &s.c1)), 0),
            signed(sluice.median(|i, s| s.cpu() - floor.rounds[i].cpu()), 1),
            median(&sluice.throughput_ratio(floor)),
        );
    }
    if let (Some(on), Some(off)) = (row("sluice"), row("sluice (telemetry off)")) {
        println!();
        println!(
            "telemetry cost: max throughput with recording {:.2}× without; proxy CPU {:.1} vs {:.1} µs/request ({:+.1}%, the median of the rounds' ratios)",
            median(&on.throughput_ratio(off)),
            on.median(|_, s| s.cpu()),
            off.median(|_, s| s.cpu()),
            on.median(|i, s| (s.cpu() / off.rounds[i].cpu() - 1.0) * 100.0)
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

/// `x` with its sign and `digits` decimals; a zero has no sign.
fn signed(x: f64, digits: usize) -> String {
    unsigned_zero(format!("{x:+.digits$}"))
}

/// `shown` without its sign when it is a zero (-0.4 rounds to "-0").
fn unsigned_zero(shown: String) -> String {
    match shown.strip_prefix(['-', '+']) {
        Some(zero) if zero.chars().all(|c| c == '0' || c == '.') => zero.to_owned(),
        _ => shown,
    }
}

fn mb(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.1}", b as f64 / 1_048_576.0))
        .unwrap_or_else(|| "n/a".into())
}

fn print_table(rows: &[Row], rate: f64) {
    let direct = &rows[0];
    let nginx = rows.iter().find(|r| r.name == "nginx");
    // Added latency and ratios: against the baseline of the same round.
    let added = |r: &Row, pick| median(&r.added_p50(direct, pick)).round() as i64;
    let ratio = |r: &Row, base| median(&r.throughput_ratio(base));
    println!();
    println!(
        "| target | c=1 p50 µs | c=1 p99 µs | added c=1 p50 µs | {rate:.0} req/s p50 µs | {rate:.0} req/s p99 µs | added p50 µs | max req/s | × direct | × nginx | proxy CPU µs/req | errors (all rounds) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let q = |pick: fn(&Sample) -> &Outcomes, quantile: f64| {
            r.median(|_, s| pick(s).quantile_us(quantile) as f64)
        };
        let vs_nginx = nginx
            .map(|n| format!("{:.2}", ratio(r, n)))
            .unwrap_or_else(|| "n/a".into());
        let cpu = r.median(|_, s| s.cpu());
        let errors: u64 = r
            .rounds
            .iter()
            .map(|s| s.c1.failed() + s.fixed.failed() + s.max.failed())
            .sum();
        println!(
            "| {} | {:.0} | {:.0} | {:+} | {:.0} | {:.0} | {:+} | {:.0} | {:.2} | {} | {} | {} |",
            r.name,
            q(|s| &s.c1, 0.5),
            q(|s| &s.c1, 0.99),
            added(r, |s| &s.c1),
            q(|s| &s.fixed, 0.5),
            q(|s| &s.fixed, 0.99),
            added(r, |s| &s.fixed),
            r.median(|_, s| s.max.throughput()),
            ratio(r, direct),
            vs_nginx,
            if cpu.is_nan() {
                "n/a".into()
            } else {
                format!("{cpu:.1}")
            },
            errors,
        );
    }
}

/// The headline figures round by round: how much they move within one run.
fn print_rounds(rows: &[Row]) {
    let direct = &rows[0];
    let nginx = rows.iter().find(|r| r.name == "nginx");
    let list = |v: Vec<f64>, digits: usize| {
        v.iter()
            .map(|&x| unsigned_zero(format!("{x:.digits$}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    println!("round by round:");
    for r in &rows[1..] {
        let added = r.added_p50(direct, |s| &s.c1);
        let mut line = format!("- {}: added c=1 p50 µs {}", r.name, list(added, 0));
        if let Some(n) = nginx.filter(|n| n.name != r.name) {
            let ratio = r.throughput_ratio(n);
            line.push_str(&format!("; max throughput × nginx {}", list(ratio, 2)));
        }
        println!("{line}");
    }
}
