//! `bench bodies`: what large request bodies do to everyone else.
//!
//! A `proxy` child process fronts the built-in fast upstream. First a small
//! completion is sent over and over on one connection (`--seconds`): its
//! latency alone. Then `--large` clients each send a completion whose prompt
//! is `--large-mib` MiB of token ids, again and again, while the small one
//! is measured once more. Reported: the small requests' p50/p99 alone and
//! beside the large ones (and the ratio), the proxy's peak RSS, and how the
//! large requests ended (served, or refused with 503 at `--body-memory`).
//! Nothing here asserts a timing; the ratio is the figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{Conn, Request};
use crate::load::closed_loop;
use crate::stats::Outcomes;
use crate::{fast_upstream, procs};

const MIB: f64 = 1024.0 * 1024.0;

/// `bench bodies` options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds of each measurement (alone, then beside the large bodies).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Clients sending large bodies at once.
    #[arg(long, default_value_t = 16)]
    large: usize,
    /// Size of each large body's token-id prompt, in MiB.
    #[arg(long, default_value_t = 15.0)]
    large_mib: f64,
    /// Extra proxy flags (repeatable), e.g. `--proxy-arg=--body-memory=512MiB`.
    #[arg(long, allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
}

/// A completion whose prompt is about `mib` MiB of token ids.
fn large_body(mib: f64) -> Bytes {
    let target = (mib * MIB) as usize;
    let mut body = String::with_capacity(target + 64);
    body.push_str(r#"{"model":"m","max_tokens":1,"prompt":["#);
    let mut id = 10_000u32;
    let start = body.len();
    while body.len() < target {
        if body.len() > start {
            body.push(',');
        }
        body.push_str(&id.to_string());
        id = if id >= 99_999 { 10_000 } else { id + 7 };
    }
    body.push_str("]}");
    Bytes::from(body)
}

/// Runs the measurement.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let upstream = fast_upstream::start()?;
    let flags = args.proxy_arg.clone();
    let proxy = tokio::task::spawn_blocking(move || procs::start_proxy(upstream, &flags)).await??;
    let addr = proxy.addr;
    let small = Request::post(
        "/v1/completions",
        r#"{"model":"m","prompt":"hello","max_tokens":1}"#,
    );
    let seconds = Duration::from_secs_f64(args.seconds);
    closed_loop(addr, &small, 1, Duration::from_millis(500)).await?;
    let idle_rss = proxy.rss_bytes().unwrap_or(0);
    let alone = closed_loop(addr, &small, 1, seconds).await?;

    let body = large_body(args.large_mib);
    eprintln!(
        "bench bodies: {} clients sending {:.1} MiB token-id prompts",
        args.large,
        body.len() as f64 / MIB
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let large: Vec<_> = (0..args.large)
        .map(|_| {
            let request = Request::post("/v1/completions", body.clone());
            let (stop, served, refused, failed) = (
                Arc::clone(&stop),
                Arc::clone(&served),
                Arc::clone(&refused),
                Arc::clone(&failed),
            );
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    match conn.send(&request).await {
                        Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                        Err(f) if f.kind == "http_503" => {
                            // Refused at the budget: retry after a moment, as Retry-After says (shortened).
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(f) => {
                            if failed.load(Ordering::Relaxed) == 0 {
                                eprintln!("bench bodies: a large request failed: {f}");
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    // Peak RSS while the large bodies flow.
    let sampler = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(proxy.rss_bytes().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The proxy goes back with the figure: it must outlive the
            // large requests still in flight.
            (peak, proxy)
        })
    };
    // Let the large clients get going before measuring beside them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let beside = closed_loop(addr, &small, 1, seconds).await?;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (peak, proxy) = sampler.await?;
    for task in large {
        let _ = task.await;
    }
    drop(proxy);
    print_report(
        &args,
        &alone,
        &beside,
        idle_rss,
        peak,
        elapsed,
        [
            served.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        ],
    );
    Ok(())
}

fn print_report(
    args: &Args,
    alone: &Outcomes,
    beside: &Outcomes,
    idle_rss: u64,
    peak_rss: u64,
    elapsed: f64,
    [served, refused, failed]: [u64; 3],
) {
    let ms = |us: u64| us as f64 / 1000.0;
    let (p50a, p99a) = (alone.quantile_us(0.50), alone.quantile_us(0.99));
    let (p50b, p99b) = (beside.quantile_us(0.50), beside.quantile_us(0.99));
    println!(
        "small requests, one connection, {} s each: alone p50 {:.2} ms p99 {:.2} ms ({} ok); beside {} large: p50 {:.2} ms p99 {:.2} ms ({} ok, {} failed); p99 ratio {:.2}×",
        args.seconds,
        ms(p50a),
        ms(p99a),
        alone.ok,
        args.large,
        ms(p50b),
        ms(p99b),
        beside.ok,
        beside.failed(),
        p99b as f64 / p99a.max(1) as f64,
    );
    println!(
        "large bodies ({:.1} MiB of token ids): {served} served ({:.1}/s), {refused} refused with 503, {failed} failed; proxy RSS idle {:.1} MiB, peak {:.1} MiB",
        args.large_mib,
        served as f64 / elapsed.max(1e-9),
        idle_rss as f64 / MIB,
        peak_rss as f64 / MIB,
    );
}
