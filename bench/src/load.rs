//! HTTP load loops with HDR statistics.
//!
//! - [`closed_loop`]: `connections` workers, each with its own keep-alive
//!   HTTP/1.1 connection, send back to back for `duration` (concurrency 1 is
//!   one worker). Latency is measured per request.
//! - [`open_loop`]: requests are *scheduled* at a fixed rate and latency is
//!   measured from the intended send time, so a stall is charged to every
//!   request it delayed (no coordinated omission, like oha's
//!   `--latency-correction` and wrk2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// What one load run produced.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Latencies in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Successful (2xx) responses.
    pub(crate) ok: u64,
    /// Failed requests (non-2xx or transport errors).
    pub(crate) errors: u64,
    /// Wall time of the run.
    pub(crate) elapsed: Duration,
}

impl LoadResult {
    /// Successful requests per second.
    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// A latency quantile in microseconds.
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }
}

/// The request every load loop sends.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Where to connect.
    pub(crate) addr: SocketAddr,
    /// Request path.
    pub(crate) path: String,
    /// Request body (JSON).
    pub(crate) body: Bytes,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn one(sender: &mut Sender, target: &Target) -> bool {
    let request = http::Request::post(target.path.as_str())
        .header(http::header::HOST, "bench")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(target.body.clone()))
        .expect("valid request");
    if sender.ready().await.is_err() {
        return false;
    }
    match sender.send_request(request).await {
        Ok(response) => {
            let ok = response.status().is_success();
            ok && response.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// `connections` workers sending back to back for `duration`.
pub(crate) async fn closed_loop(
    target: &Target,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let deadline = Instant::now() + duration;
    back_to_back(target, connections, move || Instant::now() < deadline).await
}

/// `requests` requests in all, shared by `connections` workers sending back
/// to back (for measurements that count work per request, not time).
pub(crate) async fn fixed_count(
    target: &Target,
    connections: usize,
    requests: u64,
) -> anyhow::Result<LoadResult> {
    let left = Arc::new(std::sync::atomic::AtomicU64::new(requests));
    back_to_back(target, connections, move || {
        left.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        )
        .is_ok()
    })
    .await
}

/// `connections` workers, each on its own keep-alive connection, sending
/// one request after another while `another()` says so. A failed request is
/// counted and its connection replaced (after 10 ms if that fails too).
async fn back_to_back(
    target: &Target,
    connections: usize,
    another: impl Fn() -> bool + Clone + Send + 'static,
) -> anyhow::Result<LoadResult> {
    let start = Instant::now();
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, another) = (target.clone(), another.clone());
        let mut sender = connect(target.addr).await?;
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            let (mut ok, mut errors) = (0u64, 0u64);
            while another() {
                let sent = Instant::now();
                if one(&mut sender, &target).await {
                    ok += 1;
                    let _ = hist.record(sent.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    match connect(target.addr).await {
                        Ok(s) => sender = s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    let mut result = LoadResult {
        latency: histogram(),
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (hist, ok, errors) = worker.await?;
        result.latency.add(hist)?;
        result.ok += ok;
        result.errors += errors;
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

/// Requests scheduled at `rate` per second for `duration`, over a pool of
/// `connections`; latency counted from each request's intended send time.
pub(crate) async fn open_loop(
    target: &Target,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<LoadResult> {
    let pool = Arc::new(Mutex::new(Vec::with_capacity(connections)));
    for _ in 0..connections {
        pool.lock().await.push(connect(target.addr).await?);
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    // Sends are paced by an OS thread: tokio's timer wheel has 1 ms
    // granularity, which would add up to a millisecond of pacing error to
    // every latency measured from the intended send time.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now();
    let std_start = std::time::Instant::now();
    std::thread::spawn(move || {
        for i in 0..total {
            let offset = interval.mul_f64(i as f64);
            let now = std_start.elapsed();
            if offset > now {
                std::thread::sleep(offset - now);
            }
            if tx.send(start + offset).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(intended) = rx.recv().await {
        let (pool, target) = (Arc::clone(&pool), target.clone());
        tasks.push(tokio::spawn(async move {
            let sender = pool.lock().await.pop();
            let mut sender = match sender {
                Some(s) => s,
                None => match connect(target.addr).await {
                    Ok(s) => s,
                    Err(_) => return (false, intended.elapsed()),
                },
            };
            let ok = one(&mut sender, &target).await;
            let latency = intended.elapsed();
            if ok {
                pool.lock().await.push(sender);
            }
            (ok, latency)
        }));
    }
    let mut result = LoadResult {
        latency: histogram(),
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (ok, latency) = task.await?;
        if ok {
            result.ok += 1;
            let _ = result.latency.record(latency.as_micros() as u64);
        } else {
            result.errors += 1;
        }
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_histogram() {
        let mut result = LoadResult {
            latency: histogram(),
            ok: 100,
            errors: 0,
            elapsed: Duration::from_secs(2),
        };
        for us in 1..=100u64 {
            result.latency.record(us * 10).unwrap();
        }
        assert_eq!(result.quantile_us(0.5), 500);
        assert_eq!(result.quantile_us(0.99), 990);
        assert_eq!(result.throughput(), 50.0);
    }
}
