//! Memory: the proxy's resident set size (`VmRSS` of the `proxy` process)
//! as tracked sessions accumulate, and over a soak at steady load.
//!
//! A session is a distinct conversation: its own `user` and its own prompt
//! prefix (`--session-tokens` text tokens; the run's nonce and the session
//! number lead it, so no two sessions share a block). What the proxy keeps
//! per session is the prompt's chained block hashes in the prefix tracker's
//! LRU; its per-tenant state (the rate limiter's buckets, a tenant-keyed
//! policy's slots) is dropped once a tenant is idle, by design. The proxy is
//! started with `--prefix-cache-blocks` large enough for every session, and
//! after the last level a sample of sessions is sent again: the tracker's
//! predicted hits (`sluice_prefix_cache_hit_tokens_total`) show whether they
//! were all still held.
//!
//! 100,000 requests must be cheap, so the proxy fronts the built-in fast
//! upstream (no model, an immediate answer), and `--memory-concurrency`
//! connections send them. The upstream's `/metrics` is not scraped
//! (`--scrape-interval 0`), so the tracker keeps the configured capacity.
//!
//! Figures:
//! - RSS after a warm-up (one extra session sent repeatedly) and at each level;
//! - bytes per session: the slope of a least-squares line through RSS
//!   growth against sessions (the warm-up is the origin); its intercept is
//!   what the first requests cost once;
//! - linearity: every level lies within 10% of the last level's growth from
//!   that line (judged when the last level grew by 4 MiB or more);
//! - soak: RSS sampled about 30 times over `--soak` while `--soak-rate`
//!   requests/s replay the tracked sessions (steady state: no new session);
//!   after the first 20% (warm-up), the least-squares trend over the rest of
//!   the soak must add at most max(1 MiB, 2% of RSS).
//!
//! # JSON (`"memory"`)
//!
//! ```text
//! {"engine": "built-in fast upstream (no model)", "proxy_flags": [...],
//!  "session_tokens", "blocks_per_session", "prefix_cache_blocks",
//!  "baseline_rss_bytes",
//!  "levels": [{"sessions", "rss_bytes", "growth_bytes", "bytes_per_session", "failed"}],
//!  "bytes_per_session": f, "bytes_per_block": f,     // the fitted slope
//!  "retained": {"sampled", "hit_tokens", "expected_hit_tokens", "fraction"},
//!  "linearity": {"fixed_bytes", "max_residual_bytes", "max_residual_share" | null, "note"},
//!  "soak": null | {"duration_s", "rate", "sent", "ok", "failed", "warmup_s",
//!                  "samples": [[t_s, rss_bytes], ...], "growth_bytes", "tolerance_bytes"},
//!  "checks": [Check, ...]}
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;
use sluice::classify::Prompt;
use sluice::prefix::{DEFAULT_BLOCK_SIZE, PrefixTracker};
use sluice::tokens::CHARS_PER_TOKEN;

use super::{Args, Check, Op, short};
use crate::client::{self, Conn, Request};
use crate::fast_upstream;
use crate::procs::{self, Proc};
use crate::soak::{Counts, paced_load};
use crate::stats::{fit, prom_sum};

const MIB: f64 = 1024.0 * 1024.0;
/// Linearity is judged only when the last level grew at least this much:
/// below it, page and allocator noise dominate.
const LINEAR_MIN_GROWTH: f64 = 4.0 * MIB;
/// Largest allowed distance of a level from the fitted line, as a share of
/// the total growth.
const LINEAR_TOLERANCE: f64 = 0.10;
/// Share of the soak treated as warm-up.
const SOAK_WARMUP: f64 = 0.2;
/// Allowed RSS trend over the soak after warm-up: this share of RSS …
const SOAK_TOLERANCE_SHARE: f64 = 0.02;
/// … or this many bytes, whichever is larger.
const SOAK_TOLERANCE_FLOOR: f64 = MIB;
/// Sessions sent again to check they are still tracked.
const RETAINED_SAMPLE: usize = 100;

/// RSS at one level.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Level {
    pub(crate) sessions: usize,
    pub(crate) rss_bytes: u64,
    pub(crate) growth_bytes: i64,
    pub(crate) bytes_per_session: f64,
    pub(crate) failed: u64,
}

/// Whether the sessions were still tracked at the end.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Retained {
    pub(crate) sampled: usize,
    pub(crate) hit_tokens: f64,
    pub(crate) expected_hit_tokens: f64,
    pub(crate) fraction: f64,
}

/// Linear growth of RSS with sessions: a least-squares line through the
/// warm-up (0 sessions) and every level.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Linearity {
    /// The line's intercept: growth not proportional to sessions.
    pub(crate) fixed_bytes: Option<f64>,
    /// The largest distance of a level from the line …
    pub(crate) max_residual_bytes: Option<f64>,
    /// … as a share of the last level's growth (null: not determined).
    pub(crate) max_residual_share: Option<f64>,
    pub(crate) note: String,
}

/// The soak at steady load.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Soak {
    pub(crate) duration_s: f64,
    pub(crate) rate: f64,
    pub(crate) sent: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) warmup_s: f64,
    pub(crate) samples: Vec<(f64, u64)>,
    pub(crate) growth_bytes: f64,
    pub(crate) tolerance_bytes: f64,
}

/// The memory category.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Memory {
    pub(crate) engine: String,
    pub(crate) proxy_flags: Vec<String>,
    pub(crate) session_tokens: usize,
    pub(crate) blocks_per_session: usize,
    pub(crate) prefix_cache_blocks: usize,
    pub(crate) baseline_rss_bytes: u64,
    pub(crate) levels: Vec<Level>,
    pub(crate) bytes_per_session: f64,
    pub(crate) bytes_per_block: f64,
    pub(crate) retained: Retained,
    pub(crate) linearity: Linearity,
    pub(crate) soak: Option<Soak>,
    pub(crate) checks: Vec<Check>,
}

impl Memory {
    pub(crate) fn checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter()
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = format!(
            "\n## memory: proxy RSS per tracked session ({}; a session = {} blocks of the prefix tracker)\n\n\
             | sessions | RSS MiB | growth MiB | growth / sessions (bytes) |\n|---|---|---|---|\n| 0 (after warm-up) | {:.1} | – | – |\n",
            self.engine,
            self.blocks_per_session,
            self.baseline_rss_bytes as f64 / MIB
        );
        for l in &self.levels {
            s += &format!(
                "| {} | {:.1} | {:.2} | {} |\n",
                l.sessions,
                l.rss_bytes as f64 / MIB,
                l.growth_bytes as f64 / MIB,
                short(l.bytes_per_session)
            );
        }
        s += &format!(
            "\nbytes per session (fitted slope): {} ({} per block); sessions still tracked at the end: {:.1}% of {} sampled\nlinearity: {}\n",
            short(self.bytes_per_session),
            short(self.bytes_per_block),
            self.retained.fraction * 100.0,
            self.retained.sampled,
            self.linearity.note
        );
        if let Some(soak) = &self.soak {
            let first = soak.samples.first().map_or(0, |s| s.1);
            let last = soak.samples.last().map_or(0, |s| s.1);
            s += &format!(
                "soak: {:.0} s at {} req/s ({} sent, {} failed); RSS {:.1} → {:.1} MiB; trend after {} s warm-up {:+.2} MiB (tolerance {:.2} MiB)\n",
                soak.duration_s,
                short(soak.rate),
                soak.sent,
                soak.failed,
                first as f64 / MIB,
                last as f64 / MIB,
                short(soak.warmup_s),
                soak.growth_bytes / MIB,
                soak.tolerance_bytes / MIB
            );
        }
        s += "\n| check | result |\n|---|---|\n";
        for c in &self.checks {
            s += &format!("| {} | {} |\n", c.name, c.verdict());
        }
        s
    }
}

/// Session `i`'s prompt: exactly `tokens` text tokens of the proxy.
fn session_prompt(nonce: u64, i: usize, tokens: usize) -> String {
    const FILLER: &str = " the agent keeps notes on its task and answers the user";
    let len = tokens * CHARS_PER_TOKEN;
    let mut s = format!("Session {i} of run {nonce:x}:");
    while s.len() < len {
        s.push_str(FILLER);
    }
    s.truncate(len);
    s
}

fn session_item(nonce: u64, i: usize, tokens: usize) -> Request {
    let body = json!({
        "model": "fast",
        "prompt": session_prompt(nonce, i, tokens),
        "max_tokens": 1,
        "user": format!("session-{i}"),
    });
    Request::post("/v1/completions", body.to_string())
}

/// Sends session `index(k)` for `k` in `0..count` over `concurrency`
/// connections; returns the failures.
async fn send_all(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    item: Arc<dyn Fn(usize) -> Request + Send + Sync>,
) -> u64 {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency.clamp(1, count.max(1)))
        .map(|_| {
            let (next, failed, item) = (Arc::clone(&next), Arc::clone(&failed), Arc::clone(&item));
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= count {
                        break;
                    }
                    if conn.send(&item(k)).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    failed.load(Ordering::Relaxed)
}

async fn hit_tokens(admin: SocketAddr) -> anyhow::Result<f64> {
    let text = client::metrics(admin)
        .await
        .context("the proxy's /metrics")?;
    Ok(prom_sum(&text, sluice::telemetry::PREFIX_HIT_TOKENS).unwrap_or(0.0))
}

fn rss(proxy: &Proc) -> anyhow::Result<u64> {
    proxy.rss_bytes().context("read the proxy's VmRSS")
}

/// Least-squares line through `(x, y)`: `(intercept, slope)`.
/// Runs the category: its own fast upstream and proxy.
pub(crate) async fn run(args: &Args, nonce: u64) -> anyhow::Result<Memory> {
    let mut levels: Vec<usize> = args.sessions.iter().copied().filter(|&n| n > 0).collect();
    levels.sort_unstable();
    levels.dedup();
    let max = levels
        .last()
        .copied()
        .context("--sessions names no level")?;
    let tokens = args.session_tokens.max(1);

    // What one session costs the tracker, from the tracker itself.
    let probe = PrefixTracker::new(1 << 20, DEFAULT_BLOCK_SIZE);
    let prompt = Prompt::Text(vec![session_prompt(nonce, 0, tokens)]);
    let first = probe.lookup(&prompt);
    probe.insert(&first);
    let blocks_per_session = first.blocks.len();
    let hit_per_session = f64::from(probe.lookup(&prompt).cached_tokens);
    anyhow::ensure!(
        blocks_per_session > 0,
        "--session-tokens {tokens} is shorter than one block ({DEFAULT_BLOCK_SIZE} tokens)"
    );
    // Room for every session (and the warm-up) with a quarter to spare.
    let capacity = (max + 1) * blocks_per_session * 5 / 4 + 1024;

    let upstream = fast_upstream::start()?;
    let mut flags = vec![
        "--scrape-interval".to_string(),
        "0".into(),
        "--prefix-cache-blocks".into(),
        capacity.to_string(),
        "--block-size".into(),
        DEFAULT_BLOCK_SIZE.to_string(),
    ];
    flags.extend(args.memory_proxy_arg.iter().cloned());
    let proxy = {
        let flags = flags.clone();
        tokio::task::spawn_blocking(move || procs::start_proxy(upstream, &flags))
            .await?
            .context("start the proxy for the memory category")?
    };
    let (addr, admin) = (proxy.addr, proxy.admin);
    let concurrency = args.memory_concurrency;

    // Warm-up: connections, buffers and lazily built state, with one
    // session (number `max`, beyond the counted ones) sent repeatedly.
    eprintln!("bench suite: memory, warm-up");
    let warm_failed = send_all(
        addr,
        concurrency * 8,
        concurrency,
        Arc::new(move |_| session_item(nonce, max, tokens)),
    )
    .await;
    anyhow::ensure!(
        warm_failed == 0,
        "{warm_failed} warm-up requests to the proxy failed"
    );
    let baseline = rss(&proxy)?;

    let mut results = Vec::new();
    let mut sent = 0usize;
    for &n in &levels {
        eprintln!("bench suite: memory, {n} sessions");
        let start = sent;
        let failed = send_all(
            addr,
            n - start,
            concurrency,
            Arc::new(move |k| session_item(nonce, start + k, tokens)),
        )
        .await;
        sent = n;
        let now = rss(&proxy)?;
        let growth = now as i64 - baseline as i64;
        results.push(Level {
            sessions: n,
            rss_bytes: now,
            growth_bytes: growth,
            bytes_per_session: growth as f64 / n as f64,
            failed,
        });
    }

    // Are the sessions still tracked? Send a spread of them again.
    let sampled = RETAINED_SAMPLE.min(max);
    let before = hit_tokens(admin).await?;
    let failed = send_all(
        addr,
        sampled,
        concurrency,
        Arc::new(move |k| session_item(nonce, k * max / sampled, tokens)),
    )
    .await;
    let hits = hit_tokens(admin).await? - before;
    let expected = (sampled as u64 - failed) as f64 * hit_per_session;
    let retained = Retained {
        sampled,
        hit_tokens: hits,
        expected_hit_tokens: expected,
        fraction: if expected > 0.0 { hits / expected } else { 0.0 },
    };

    // RSS against sessions, the warm-up as the origin: the slope is what a
    // session costs, the intercept what the first requests cost once.
    let mut points = vec![(0.0, 0.0)];
    points.extend(
        results
            .iter()
            .map(|l| (l.sessions as f64, l.growth_bytes as f64)),
    );
    let (fixed, per_session) = fit(&points).context("too few levels for a fit")?;
    let total_growth = results.last().map_or(0, |l| l.growth_bytes) as f64;
    let bytes_per_block = per_session / blocks_per_session as f64;
    let linearity = if total_growth >= LINEAR_MIN_GROWTH {
        let residual = points
            .iter()
            .map(|&(n, g)| (g - (fixed + per_session * n)).abs())
            .fold(0.0, f64::max);
        let share = residual / total_growth;
        Linearity {
            fixed_bytes: Some(fixed),
            max_residual_bytes: Some(residual),
            max_residual_share: Some(share),
            note: format!(
                "a line fits every level to within {:.1}% of the total growth (allowed {:.0}%): {} bytes once, then {} per session",
                share * 100.0,
                LINEAR_TOLERANCE * 100.0,
                short(fixed),
                short(per_session)
            ),
        }
    } else {
        Linearity {
            fixed_bytes: Some(fixed),
            max_residual_bytes: None,
            max_residual_share: None,
            note: format!(
                "not determined: the last level grew by less than {} MiB, too close to page and allocator noise",
                LINEAR_MIN_GROWTH / MIB
            ),
        }
    };

    let soak = if args.soak > 0.0 && args.soak_rate > 0.0 {
        Some(soak(&proxy, args, nonce, max, tokens).await?)
    } else {
        None
    };

    let mut checks = vec![Check::new(
        "sessions still tracked (fraction of predicted hits)",
        retained.fraction,
        Op::AtLeast,
        0.99,
    )];
    if let Some(share) = linearity.max_residual_share {
        checks.push(Check::new(
            "linear growth (largest residual / total growth)",
            share,
            Op::AtMost,
            LINEAR_TOLERANCE,
        ));
    }
    if let Some(s) = &soak {
        checks.push(Check::new(
            "soak: RSS trend after warm-up (bytes)",
            s.growth_bytes,
            Op::AtMost,
            s.tolerance_bytes,
        ));
    }
    Ok(Memory {
        engine: "built-in fast upstream (no model)".into(),
        proxy_flags: flags,
        session_tokens: tokens,
        blocks_per_session,
        prefix_cache_blocks: capacity,
        baseline_rss_bytes: baseline,
        levels: results,
        bytes_per_session: per_session,
        bytes_per_block,
        retained,
        linearity,
        soak,
        checks,
    })
}

/// Replays the `sessions` tracked sessions at `--soak-rate` for `--soak`,
/// sampling the proxy's RSS.
async fn soak(
    proxy: &Proc,
    args: &Args,
    nonce: u64,
    sessions: usize,
    tokens: usize,
) -> anyhow::Result<Soak> {
    let duration = Duration::from_secs_f64(args.soak);
    eprintln!("bench suite: memory, soak for {:.0} s", args.soak);
    let addr = proxy.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let load = tokio::spawn(paced_load(
        addr,
        args.soak_rate,
        args.memory_concurrency,
        move |i| session_item(nonce, i % sessions, tokens),
        Arc::clone(&stop),
        Arc::clone(&counts),
    ));
    let every = (duration / 30).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let t = started.elapsed();
        samples.push((t.as_secs_f64(), rss(proxy)?));
        if t >= duration {
            break;
        }
        tokio::time::sleep(every.min(duration - t)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await?;
    let warmup = args.soak * SOAK_WARMUP;
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.0 >= warmup)
        .map(|&(t, r)| (t, r as f64))
        .collect();
    let span = after.last().map_or(0.0, |l| l.0) - after.first().map_or(0.0, |f| f.0);
    let growth = fit(&after).map_or(0.0, |(_, slope)| slope) * span;
    let mean = after.iter().map(|p| p.1).sum::<f64>() / after.len().max(1) as f64;
    let (sent, ok) = (
        counts.sent.load(Ordering::Relaxed),
        counts.ok.load(Ordering::Relaxed),
    );
    // The admin endpoint still answers: the proxy lived through the soak.
    client::get(proxy.admin, "/metrics")
        .await
        .context("the proxy after the soak")?;
    Ok(Soak {
        duration_s: args.soak,
        rate: args.soak_rate,
        sent,
        ok,
        failed: sent - ok,
        warmup_s: warmup,
        samples,
        growth_bytes: growth,
        tolerance_bytes: (SOAK_TOLERANCE_SHARE * mean).max(SOAK_TOLERANCE_FLOOR),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_prompts_are_distinct_and_exactly_sized() {
        let a = session_prompt(7, 1, 128);
        let b = session_prompt(7, 2, 128);
        assert_eq!(a.len(), 128 * CHARS_PER_TOKEN);
        assert_eq!(b.len(), a.len());
        assert_ne!(a[..16], b[..16], "distinct from the first block");
    }

    #[test]
    fn lines() {
        assert_eq!(fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some((1.0, 2.0)));
        assert_eq!(fit(&[(0.0, 1.0)]), None);
        assert_eq!(fit(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }
}
