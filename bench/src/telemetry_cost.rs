//! `bench telemetry-cost`: what recording metrics costs per request, counted
//! in instructions rather than timed.
//!
//! On a shared 2-core machine the same throughput run varies by more than
//! the effect being measured (the timed `bench overhead --telemetry-cost`
//! spread 0.75–1.30×). Instructions do not: the proxy runs under
//! `valgrind --tool=callgrind`, which counts every instruction it executes,
//! the same count whatever else the machine is doing.
//!
//! For each setting — telemetry on, and off (`SLUICE_TELEMETRY=off`) — the
//! proxy is started twice, sent `N` and then `2N` requests through the
//! built-in fast upstream, and stopped with SIGTERM (callgrind writes its
//! totals at exit). The difference between the two runs is `N` requests'
//! worth of instructions, free of start-up and shutdown; divided by `N` it is
//! the cost of one request. The ratio of the two settings is the share of a
//! request's user-space work that recording takes — an upper bound on the
//! throughput it costs when the proxy is CPU-bound, since kernel time (about
//! half of the proxy's CPU, per `perf`) is not counted and is the same in
//! both settings.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::client::{Read, Request};
use crate::load::fixed_count;
use crate::{fast_upstream, procs};
use anyhow::{Context, bail};

/// Flags of `bench telemetry-cost`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Requests in the shorter run (the longer sends twice as many).
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Client connections sending them. One keeps the count repeatable:
    /// with more, how many requests each wake-up serves varies run to run.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Where callgrind's output files go (kept for `callgrind_annotate`).
    #[arg(long, default_value = "target/telemetry-cost")]
    out_dir: PathBuf,
}

/// Runs the four counted runs and prints the comparison.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed (Debian: apt-get install valgrind)");
    }
    if args.requests == 0 || args.connections == 0 {
        bail!("--requests and --connections must be at least 1");
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("create {}", args.out_dir.display()))?;
    let upstream = fast_upstream::start()?;
    println!(
        "telemetry cost: proxy (one worker thread) under callgrind, {n} and {n2} requests over {c} connections to the built-in fast upstream (no model)",
        n = args.requests,
        n2 = 2 * args.requests,
        c = args.connections
    );
    let mut per_request = Vec::new();
    for (label, telemetry) in [("on", "on"), ("off", "off")] {
        let short = counted_run(&args, upstream, telemetry, args.requests).await?;
        let long = counted_run(&args, upstream, telemetry, 2 * args.requests).await?;
        let per = long.saturating_sub(short) as f64 / args.requests as f64;
        println!(
            "  telemetry {label:>3}: {short} instructions for {n}, {long} for {n2}: {per:.0} instructions/request",
            n = args.requests,
            n2 = 2 * args.requests
        );
        per_request.push(per);
    }
    let (on, off) = (per_request[0], per_request[1]);
    let share = (on - off) / on;
    println!(
        "telemetry costs {:.0} instructions/request: {:.1}% of a request's user-space instructions ({:.0} vs {:.0}); \
         max-throughput ratio with/without recording ≈ {:.3}× when CPU-bound (kernel time not counted: an upper bound on the cost)",
        on - off,
        100.0 * share,
        on,
        off,
        off / on
    );
    Ok(())
}

/// Instructions the proxy executed from start to exit with `requests` sent.
async fn counted_run(
    args: &Args,
    upstream: std::net::SocketAddr,
    telemetry: &str,
    requests: u64,
) -> anyhow::Result<u64> {
    let out = args
        .out_dir
        .join(format!("callgrind.telemetry-{telemetry}.{requests}.out"));
    let wrapper = [
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        "-q".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    // Pass-through (no policy), no upstream scrape: only the request path runs.
    let extra = ["--scrape-interval".to_owned(), "0".to_owned()];
    let proxy = procs::start_proxy_wrapped(
        &wrapper,
        &[upstream],
        &extra,
        // One serving thread: the count then does not depend on how
        // connections were spread over threads.
        &[("SLUICE_TELEMETRY", telemetry), ("SLUICE_WORKERS", "1")],
    )?;
    let request = Request::post(
        "/v1/completions",
        &br#"{"model":"fast","prompt":"Say hello.","max_tokens":1}"#[..],
    )
    .read(Read::Status)
    .timeout(None);
    let result = fixed_count(proxy.addr, &request, args.connections, requests).await?;
    if result.failed() > 0 || result.ok != requests {
        bail!(
            "{} of {requests} requests failed through the proxy under callgrind",
            result.failed()
        );
    }
    let status = proxy.terminate()?;
    if !status.success() {
        bail!("the proxy under callgrind exited with {status}");
    }
    total_instructions(&out)
}

/// The `summary:` (or `totals:`) line of a callgrind output file: total Ir.
fn total_instructions(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_total(&text).with_context(|| format!("no instruction total in {}", path.display()))
}

fn parse_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_total_from_callgrind_output() {
        let out = "# callgrind format\nversion: 1\nevents: Ir\nfn=main\n3 10\nsummary: 123456789\ntotals: 123456789\n";
        assert_eq!(parse_total(out), Some(123_456_789));
        assert_eq!(parse_total("events: Ir\n"), None);
    }
}
