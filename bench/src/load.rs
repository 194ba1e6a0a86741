//! Sending requests over time: every load loop of the bench, all on the one
//! client ([`Conn`]).
//!
//! [`drive`] sends a workload as a [`Plan`] says, in one of its modes
//! (the reference benchmark's two client habits, plus two open ones):
//! - `batched`: waves of `wave` sent together; the next wave leaves when
//!   the whole wave has returned (the reference's gather). A request's
//!   latency runs from its wave's start.
//! - `inngest`: at most `limit` in flight, a semaphore.
//! - `rate`: open-loop Poisson arrivals at `rate` req/s.
//! - `naive`: `clients` independent clients, each sending its next request
//!   when its last returns, with no coordination: what a fleet of naive
//!   workers does. Through the proxy, the policy alone decides.
//! - `sweep`: `rate` steps of rising rate until the target saturates
//!   (`bench run` steps it and judges each step).
//!
//! A plan ends after `requests` or `duration_s`, whichever comes first.
//!
//! [`arrivals`] sends open-loop arrivals as a client [`Habit`] says:
//! at once, gathered into waves, or through a semaphore (`bench compare`'s
//! live traffic, where a habit's queueing counts in the latency).
//!
//! [`closed_loop`], [`fixed_count`] and [`fixed_rate`] send one request
//! over and over on connections opened beforehand (`bench overhead`,
//! `bench telemetry-cost`).
//!
//! Closed loops time each request from its send. Open loops time it from
//! its intended send time, so a stall is charged to every request it
//! delayed (no coordinated omission, like oha's `--latency-correction` and
//! wrk2); their sends are paced by an OS thread, since tokio's timer has
//! 1 ms granularity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sluice_sim::engine::splitmix64;
use tokio::time::Instant;

use crate::client::{Conn, Request};
use crate::progress::{Progress, Tick};
use crate::stats::{Outcomes, Sample};
use crate::workload::Workload;

/// A client mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Waves sent together, each awaited whole.
    Batched,
    /// A semaphore: at most `limit` in flight.
    Inngest,
    /// Open-loop Poisson arrivals at a fixed rate.
    Rate,
    /// Many independent clients, back to back.
    Naive,
    /// Open-loop Poisson rates stepped up until the target saturates
    /// (`bench run` only; one step of it is a `rate` run).
    Sweep,
}

/// How a run sends.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Plan {
    pub(crate) mode: Mode,
    /// Requests to send (the run stops earlier at `duration_s`).
    pub(crate) requests: usize,
    pub(crate) duration_s: Option<f64>,
    /// `batched`: wave size.
    pub(crate) wave: usize,
    /// `inngest`: most in flight.
    pub(crate) limit: usize,
    /// `naive`: concurrent clients.
    pub(crate) clients: usize,
    /// `rate`: arrivals per second.
    pub(crate) rate: f64,
    /// `rate`: seed of the arrival times.
    pub(crate) seed: u64,
    /// Request `i` of the run is workload item `offset + i` (so runs of one
    /// comparison send distinct candidates).
    pub(crate) offset: usize,
}

/// Sends the workload to `addr` as `plan` says, showing no progress.
pub(crate) async fn drive(addr: SocketAddr, workload: &Arc<Workload>, plan: &Plan) -> Outcomes {
    drive_with(addr, workload, plan, Progress::hidden().tick()).await
}

/// Sends the workload to `addr` as `plan` says, counting each finished
/// request on `tick`.
pub(crate) async fn drive_with(
    addr: SocketAddr,
    workload: &Arc<Workload>,
    plan: &Plan,
    tick: &Tick,
) -> Outcomes {
    let (workload, offset) = (Arc::clone(workload), plan.offset);
    drive_requests(addr, plan, move |i| workload.item(offset + i), tick).await
}

/// Sends `request(i)` for each index `i` of `plan` to `addr` as `plan`
/// says (its `offset` is the caller's to apply), counting each finished
/// request on `tick`.
pub(crate) async fn drive_requests<R>(
    addr: SocketAddr,
    plan: &Plan,
    request: R,
    tick: &Tick,
) -> Outcomes
where
    R: Fn(usize) -> Request + Clone + Send + 'static,
{
    let deadline = plan
        .duration_s
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let expired = move || deadline.is_some_and(|d| Instant::now() >= d);
    let start = Instant::now();
    let mut out = match plan.mode {
        Mode::Batched => {
            waves(
                addr,
                plan.wave.max(1),
                plan.requests,
                expired,
                request,
                tick,
            )
            .await
        }
        Mode::Inngest | Mode::Naive => {
            let workers = if plan.mode == Mode::Inngest {
                plan.limit
            } else {
                plan.clients
            };
            let conns = (0..workers.max(1)).map(|_| Conn::new(addr)).collect();
            let (counter, requests) = (Arc::new(AtomicUsize::new(0)), plan.requests);
            let next = move || {
                if expired() {
                    return None;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed);
                (i < requests).then_some(i)
            };
            back_to_back(conns, next, request, tick).await
        }
        Mode::Rate | Mode::Sweep => {
            let offsets = poisson_offsets(plan.rate, plan.requests, plan.seed);
            open_loop(addr, Vec::new(), offsets, deadline, request, tick).await
        }
    };
    out.elapsed = start.elapsed();
    out
}

/// `connections` connections, opened first, sending `request` back to
/// back for `duration`.
pub(crate) async fn closed_loop(
    addr: SocketAddr,
    request: &Request,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Outcomes> {
    let deadline = Instant::now() + duration;
    repeat(addr, request, connections, move || {
        (Instant::now() < deadline).then_some(0)
    })
    .await
}

/// `requests` sends of `request` in all, shared by `connections`
/// connections sending back to back (for measurements that count work per
/// request, not time).
pub(crate) async fn fixed_count(
    addr: SocketAddr,
    request: &Request,
    connections: usize,
    requests: u64,
) -> anyhow::Result<Outcomes> {
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    repeat(addr, request, connections, move || {
        (sent.fetch_add(1, Ordering::Relaxed) < requests).then_some(0)
    })
    .await
}

/// `request` sent at a fixed `rate` per second for `duration`, over a pool
/// of `connections` opened first (more are opened when all are busy).
pub(crate) async fn fixed_rate(
    addr: SocketAddr,
    request: &Request,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Outcomes> {
    let pool = open(addr, connections).await?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let offsets = (0..total).map(|i| interval.mul_f64(i as f64)).collect();
    let start = Instant::now();
    let request = request.clone();
    let repeat = move |_| request.clone();
    let mut out = open_loop(addr, pool, offsets, None, repeat, &Tick::default()).await;
    out.elapsed = start.elapsed();
    Ok(out)
}

/// `connections` connections to `addr`, opened now.
async fn open(addr: SocketAddr, connections: usize) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(addr).await?);
    }
    Ok(conns)
}

/// `request` over `connections` connections opened first, back to back
/// while `another()` gives an index.
async fn repeat(
    addr: SocketAddr,
    request: &Request,
    connections: usize,
    another: impl Fn() -> Option<usize> + Clone + Send + 'static,
) -> anyhow::Result<Outcomes> {
    let start = Instant::now();
    let conns = open(addr, connections).await?;
    let request = request.clone();
    let repeat = move |_| request.clone();
    let mut out = back_to_back(conns, another, repeat, &Tick::default()).await;
    out.elapsed = start.elapsed();
    Ok(out)
}

/// Each of `conns` sends one request after another — `request(i)` for the
/// index `i` that `next()` gives — until `next()` gives none; latency from
/// each send.
async fn back_to_back<N, R>(conns: Vec<Conn>, next: N, request: R, tick: &Tick) -> Outcomes
where
    N: Fn() -> Option<usize> + Clone + Send + 'static,
    R: Fn(usize) -> Request + Clone + Send + 'static,
{
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (next, request, tick) = (next.clone(), request.clone(), tick.clone());
            tokio::spawn(async move {
                let mut mine = Outcomes::default();
                while let Some(i) = next() {
                    let sent = Instant::now();
                    let r = conn.send(&request(i)).await;
                    tick.record(r.is_ok());
                    mine.record(Sample::new(r, sent));
                }
                mine
            })
        })
        .collect();
    let mut out = Outcomes::default();
    for worker in workers {
        if let Ok(mine) = worker.await {
            out.merge(mine);
        }
    }
    out
}

/// Waves of `wave` requests sent together, each awaited whole, until
/// `requests` are sent or `expired()`; latency from each wave's start.
async fn waves<R>(
    addr: SocketAddr,
    wave: usize,
    requests: usize,
    expired: impl Fn() -> bool,
    request: R,
    tick: &Tick,
) -> Outcomes
where
    R: Fn(usize) -> Request + Clone + Send + 'static,
{
    let mut conns: Vec<Conn> = (0..wave).map(|_| Conn::new(addr)).collect();
    let mut out = Outcomes::default();
    let mut next = 0usize;
    while next < requests && !expired() {
        let n = wave.min(requests - next);
        let wave_start = Instant::now();
        let tasks: Vec<_> = conns
            .drain(..n)
            .enumerate()
            .map(|(k, mut conn)| {
                let (request, tick, i) = (request.clone(), tick.clone(), next + k);
                tokio::spawn(async move {
                    let r = conn.send(&request(i)).await;
                    tick.record(r.is_ok());
                    (conn, Sample::new(r, wave_start))
                })
            })
            .collect();
        for task in tasks {
            match task.await {
                Ok((conn, sample)) => {
                    conns.push(conn);
                    out.record(sample);
                }
                Err(_) => {
                    conns.push(Conn::new(addr));
                    out.record(Sample::failed("client_panic"));
                }
            }
        }
        next += n;
    }
    out
}

/// Request `i` sent at `offsets[i]` from now (none at or after
/// `deadline`), each on a connection taken from a shared pool (`pool` to
/// begin with; a new one when it is empty); latency from each intended
/// send time.
async fn open_loop<R>(
    addr: SocketAddr,
    pool: Vec<Conn>,
    offsets: Vec<Duration>,
    deadline: Option<Instant>,
    request: R,
    tick: &Tick,
) -> Outcomes
where
    R: Fn(usize) -> Request + Clone + Send + 'static,
{
    let mut tasks = Vec::with_capacity(offsets.len());
    let pool = Arc::new(std::sync::Mutex::new(pool));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let start = Instant::now();
    let std_start = std::time::Instant::now();
    std::thread::spawn(move || {
        for (i, offset) in offsets.into_iter().enumerate() {
            if deadline.is_some_and(|d| start + offset >= d) {
                return;
            }
            let now = std_start.elapsed();
            if offset > now {
                std::thread::sleep(offset - now);
            }
            if tx.send((i, start + offset)).is_err() {
                return;
            }
        }
    });
    while let Some((i, intended)) = rx.recv().await {
        let (pool, request, tick) = (Arc::clone(&pool), request.clone(), tick.clone());
        tasks.push(tokio::spawn(async move {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let mut conn = conn.unwrap_or_else(|| Conn::new(addr));
            let r = conn.send(&request(i)).await;
            tick.record(r.is_ok());
            let sample = Sample::new(r, intended);
            if let Ok(mut p) = pool.lock() {
                p.push(conn);
            }
            sample
        }));
    }
    let mut out = Outcomes::default();
    for task in tasks {
        match task.await {
            Ok(sample) => out.record(sample),
            Err(_) => out.record(Sample::failed("client_panic")),
        }
    }
    out
}

/// How a client sends the requests that arrive for it (`bench compare`'s
/// live traffic): a job worker's habit, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Habit {
    /// Each request is sent the moment it arrives.
    Open,
    /// What has arrived, up to `n`, is sent together, and the next wave
    /// leaves when the whole wave has returned.
    Waves(usize),
    /// At most `n` in flight; arrivals wait in the client's queue.
    Semaphore(usize),
}

/// What [`arrivals`] measured: every request timed from its arrival.
#[derive(Debug, Default)]
pub(crate) struct Arrived {
    pub(crate) outcomes: Outcomes,
    /// `[arrival s since the start, latency ms]` of each successful request.
    pub(crate) timeline: Vec<[f64; 2]>,
}

/// Request `i` arrives at `offsets[i]` from now (none after `stop` is set)
/// and is sent as `habit` says, each on a connection of its own pool;
/// latency from each arrival, so time spent in the client's queue counts.
pub(crate) async fn arrivals<R>(
    addr: SocketAddr,
    offsets: Vec<Duration>,
    habit: Habit,
    stop: Arc<AtomicBool>,
    request: R,
    tick: &Tick,
) -> Arrived
where
    R: Fn(usize) -> Request + Clone + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let start = Instant::now();
    pace(offsets, start, stop, tx);
    // Each request's sample and arrival offset.
    let send = move |mut conn: Conn, i: usize, at: Instant, tick: Tick| {
        let request = request.clone();
        tokio::spawn(async move {
            let r = conn.send(&request(i)).await;
            tick.record(r.is_ok());
            (conn, Sample::new(r, at), at - start)
        })
    };
    let mut done = Vec::new();
    match habit {
        Habit::Open => {
            let pool = Arc::new(std::sync::Mutex::new(Vec::<Conn>::new()));
            let mut tasks = Vec::new();
            while let Some((i, at)) = rx.recv().await {
                let (pool, send, tick) = (Arc::clone(&pool), send.clone(), tick.clone());
                tasks.push(tokio::spawn(async move {
                    let conn = pool.lock().ok().and_then(|mut p| p.pop());
                    let conn = conn.unwrap_or_else(|| Conn::new(addr));
                    let (conn, sample, offset) = send(conn, i, at, tick).await.ok()?;
                    if let Ok(mut p) = pool.lock() {
                        p.push(conn);
                    }
                    Some((sample, offset))
                }));
            }
            for task in tasks {
                done.push(task.await.ok().flatten());
            }
        }
        Habit::Waves(n) => {
            let mut conns: Vec<Conn> = (0..n.max(1)).map(|_| Conn::new(addr)).collect();
            while let Some(first) = rx.recv().await {
                let wave: Vec<_> = gather(&mut rx, first, n.max(1))
                    .into_iter()
                    .map(|(i, at)| {
                        let conn = conns.pop().unwrap_or_else(|| Conn::new(addr));
                        send(conn, i, at, tick.clone())
                    })
                    .collect();
                for task in wave {
                    match task.await {
                        Ok((conn, sample, offset)) => {
                            conns.push(conn);
                            done.push(Some((sample, offset)));
                        }
                        Err(_) => done.push(None),
                    }
                }
            }
        }
        Habit::Semaphore(n) => {
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            let workers: Vec<_> = (0..n.max(1))
                .map(|_| {
                    let (rx, send, tick) = (Arc::clone(&rx), send.clone(), tick.clone());
                    tokio::spawn(async move {
                        let mut conn = Conn::new(addr);
                        let mut mine = Vec::new();
                        loop {
                            let next = rx.lock().await.recv().await;
                            let Some((i, at)) = next else { break };
                            match send(conn, i, at, tick.clone()).await {
                                Ok((c, sample, offset)) => {
                                    conn = c;
                                    mine.push(Some((sample, offset)));
                                }
                                Err(_) => {
                                    conn = Conn::new(addr);
                                    mine.push(None);
                                }
                            }
                        }
                        mine
                    })
                })
                .collect();
            for worker in workers {
                done.extend(worker.await.unwrap_or_default());
            }
        }
    }
    let mut out = Arrived::default();
    for result in done {
        match result {
            Some((sample, offset)) => {
                if sample.result.is_ok() {
                    let ms = sample.latency.as_secs_f64() * 1000.0;
                    out.timeline.push([offset.as_secs_f64(), ms]);
                }
                out.outcomes.record(sample);
            }
            None => out.outcomes.record(Sample::failed("client_panic")),
        }
    }
    out.timeline.sort_by(|a, b| a[0].total_cmp(&b[0]));
    out.outcomes.elapsed = start.elapsed();
    out
}

/// Sends `(i, start + offsets[i])` on `tx` at each offset, from an OS
/// thread (tokio's timer has 1 ms granularity), until the offsets run out
/// or `stop` is set.
fn pace(
    offsets: Vec<Duration>,
    start: Instant,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
) {
    let std_start = std::time::Instant::now();
    std::thread::spawn(move || {
        for (i, offset) in offsets.into_iter().enumerate() {
            let now = std_start.elapsed();
            if offset > now {
                std::thread::sleep(offset - now);
            }
            if stop.load(Ordering::Relaxed) || tx.send((i, start + offset)).is_err() {
                return;
            }
        }
    });
}

/// A wave: `first`, then whatever else has already arrived on `rx`, up to
/// `max` in all (a client gathering its queue without waiting for more).
fn gather<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, first: T, max: usize) -> Vec<T> {
    let mut wave = vec![first];
    while wave.len() < max {
        match rx.try_recv() {
            Ok(item) => wave.push(item),
            Err(_) => break,
        }
    }
    wave
}

/// Exponential gaps of a Poisson process at `rate`, deterministic in `seed`.
pub(crate) fn poisson_offsets(rate: f64, n: usize, seed: u64) -> Vec<Duration> {
    let mut state = seed;
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            let at = Duration::from_secs_f64(t);
            state = splitmix64(state);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            t += -(1.0 - u).ln() / rate.max(1e-9);
            at
        })
        .collect()
}

/// The span over which an open-loop plan's requests are meant to be sent:
/// the last intended send time plus one mean gap (so `n` requests over it
/// are the rate actually offered).
pub(crate) fn send_span(plan: &Plan) -> Duration {
    let offsets = poisson_offsets(plan.rate, plan.requests, plan.seed);
    offsets.last().copied().unwrap_or_default() + Duration::from_secs_f64(1.0 / plan.rate.max(1e-9))
}

/// Parses `30`, `30s`, `500ms`, `2m`, `1h` into seconds (`--duration`, `--soak`).
pub(crate) fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(|v| v * scale)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 30s, 500ms, 2m, 1h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_have_the_asked_rate() {
        let offsets = poisson_offsets(200.0, 20_000, 3);
        assert_eq!(offsets[0], Duration::ZERO);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        let rate = 20_000.0 / offsets.last().unwrap().as_secs_f64();
        assert!((rate - 200.0).abs() < 6.0, "rate {rate}");
        assert_eq!(offsets, poisson_offsets(200.0, 20_000, 3));
    }

    #[test]
    fn a_wave_gathers_what_has_arrived_up_to_its_size() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 1..=5 {
            tx.send(i).unwrap();
        }
        assert_eq!(gather(&mut rx, 0, 3), [0, 1, 2]);
        // Fewer waiting than the wave's size: it leaves with what is there.
        assert_eq!(gather(&mut rx, 9, 50), [9, 3, 4, 5]);
        assert_eq!(gather(&mut rx, 7, 50), [7]);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(30.0));
        assert_eq!(parse_duration("500ms"), Ok(0.5));
        assert_eq!(parse_duration("2m"), Ok(120.0));
        assert_eq!(parse_duration("1h"), Ok(3600.0));
        assert_eq!(parse_duration("7"), Ok(7.0));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
    }
}
