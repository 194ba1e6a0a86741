//! Truth from the engine: the upstream's own `/metrics`, scraped on an
//! interval and re-exported under `sluice_upstream_...` so one Prometheus
//! scrape of Sluice shows the engine's view next to the proxy's. An upstream
//! without these metrics is fine: nothing is exported for what is absent.
//!
//! The scrape also learns the engine's KV block size from
//! `vllm:cache_config_info{block_size="..."}` for prefix tracking.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::watch;

/// vLLM series re-exported, and their Sluice names.
pub const MIRRORED: [(&str, &str, Kind); 5] = [
    (
        "vllm:prefix_cache_queries_total",
        "sluice_upstream_prefix_cache_queries_total",
        Kind::Counter,
    ),
    (
        "vllm:prefix_cache_hits_total",
        "sluice_upstream_prefix_cache_hits_total",
        Kind::Counter,
    ),
    (
        "vllm:num_requests_running",
        "sluice_upstream_requests_running",
        Kind::Gauge,
    ),
    (
        "vllm:num_requests_waiting",
        "sluice_upstream_requests_waiting",
        Kind::Gauge,
    ),
    (
        "vllm:kv_cache_usage_perc",
        "sluice_upstream_kv_cache_usage_ratio",
        Kind::Gauge,
    ),
];

/// How a mirrored series is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic: exported as a counter set to the upstream's absolute value.
    Counter,
    /// Exported as a gauge.
    Gauge,
}

/// The last scrape, for `/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamView {
    /// Mirrored values by vLLM name (summed over label sets).
    pub values: std::collections::BTreeMap<String, f64>,
    /// The engine's KV block size in tokens, when it says.
    pub block_size: Option<u32>,
    /// Whether the last scrape succeeded.
    pub ok: bool,
}

/// The engine's own load, from its last scrape (zeros before one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` (0 to 1).
    pub kv_usage: f32,
}

/// Shared scrape results.
#[derive(Debug)]
pub struct UpstreamMetrics {
    view: Mutex<UpstreamView>,
    // 0 until the upstream reports it.
    block_size: AtomicU32,
    // The engine's load, read on every routing decision without a lock.
    running: AtomicU32,
    waiting: AtomicU32,
    kv_usage_bits: AtomicU32,
    // Becomes true once the first scrape has been tried (or when none will be).
    first_attempt: watch::Sender<bool>,
}

impl Default for UpstreamMetrics {
    fn default() -> Self {
        Self {
            view: Mutex::default(),
            block_size: AtomicU32::new(0),
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            kv_usage_bits: AtomicU32::new(0),
            first_attempt: watch::Sender::new(false),
        }
    }
}

impl UpstreamMetrics {
    /// The last scrape.
    pub fn view(&self) -> UpstreamView {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until the first scrape has been tried, at most `limit`.
    ///
    /// The proxy waits for it before serving: the scrape may teach the
    /// prefix tracker the engine's block size, and a block size learned
    /// after traffic has started forgets every block tracked so far (a
    /// bench warm-up, say), so the next requests would all be predicted to
    /// miss.
    pub async fn first_attempt(&self, limit: Duration) {
        let mut done = self.first_attempt.subscribe();
        let _ = tokio::time::timeout(limit, done.wait_for(|tried| *tried)).await;
    }

    /// The engine's load at its last scrape.
    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            kv_usage: f32::from_bits(self.kv_usage_bits.load(Ordering::Relaxed)),
        }
    }

    fn set_load(&self, values: &std::collections::BTreeMap<String, f64>) {
        let count = |name: &str| values.get(name).map_or(0, |v| v.max(0.0) as u32);
        self.running
            .store(count("vllm:num_requests_running"), Ordering::Relaxed);
        self.waiting
            .store(count("vllm:num_requests_waiting"), Ordering::Relaxed);
        let kv = values
            .get("vllm:kv_cache_usage_perc")
            .map_or(0.0, |v| *v as f32);
        self.kv_usage_bits.store(kv.to_bits(), Ordering::Relaxed);
    }

    /// The engine's block size, once known.
    pub fn block_size(&self) -> Option<u32> {
        match self.block_size.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

/// Parses Prometheus text into (sum of each mirrored series, block size).
pub fn parse(text: &str) -> (std::collections::BTreeMap<String, f64>, Option<u32>) {
    let mut values = std::collections::BTreeMap::new();
    let mut block_size = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if name == "vllm:cache_config_info" {
            block_size = line
                .split("block_size=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|v| v.parse().ok());
            continue;
        }
        if MIRRORED.iter().any(|(n, _, _)| *n == name)
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            *values.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    (values, block_size)
}

/// Starts scraping `http://{authority}/metrics` every `interval` (`None`:
/// never), exporting the mirrored series labelled `replica`. The engine's
/// block size and cache size (`num_gpu_blocks`) go to `prefix`. The task
/// ends when the returned handle is the last one left.
pub fn start(
    authority: &str,
    replica: &str,
    interval: Option<Duration>,
    prefix: Arc<crate::prefix::PrefixTracker>,
) -> Arc<UpstreamMetrics> {
    let shared = Arc::new(UpstreamMetrics::default());
    let Some(interval) = interval else {
        shared.first_attempt.send_replace(true);
        return shared;
    };
    let weak = Arc::downgrade(&shared);
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url = format!("http://{authority}/metrics");
    let replica = replica.to_owned();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            ticker.tick().await;
            let text = scrape_once(&client, &url, interval).await;
            let Some(state) = weak.upgrade() else {
                return;
            };
            let _first = FirstAttempt(&state.first_attempt);
            let Some(text) = text else {
                if let Ok(mut v) = state.view.lock() {
                    v.ok = false;
                }
                continue;
            };
            let (values, block_size) = parse(&text);
            if let Some(blocks) = cache_blocks(&text)
                && blocks != prefix.capacity()
            {
                prefix.set_capacity(blocks);
            }
            if let Some(bs) = block_size {
                prefix.set_block_size(bs);
            }
            if values.is_empty() && !warned {
                tracing::info!(url = %url, "the upstream's /metrics has no vLLM series; nothing to mirror");
                warned = true;
            }
            for (vllm, ours, kind) in MIRRORED {
                if let Some(v) = values.get(vllm) {
                    let replica = replica.clone();
                    match kind {
                        Kind::Counter => {
                            metrics::counter!(ours, "replica" => replica).absolute(*v as u64);
                        }
                        Kind::Gauge => metrics::gauge!(ours, "replica" => replica).set(*v),
                    }
                }
            }
            state.set_load(&values);
            if let Some(bs) = block_size
                && state.block_size.swap(bs, Ordering::Relaxed) != bs
            {
                tracing::info!(replica = %replica, block_size = bs, "learned the engine's KV block size");
            }
            if let Ok(mut v) = state.view.lock() {
                *v = UpstreamView {
                    values,
                    block_size,
                    ok: true,
                };
            }
        }
    });
    shared
}

/// Marks the first attempt done when dropped: after a failed scrape at
/// once, after a successful one once its results are applied.
struct FirstAttempt<'a>(&'a watch::Sender<bool>);

impl Drop for FirstAttempt<'_> {
    fn drop(&mut self) {
        self.0
            .send_if_modified(|tried| !std::mem::replace(tried, true));
    }
}

/// `num_gpu_blocks` from `vllm:cache_config_info`: the engine's cache size in blocks.
pub fn cache_blocks(text: &str) -> Option<usize> {
    text.lines()
        .find(|l| l.starts_with("vllm:cache_config_info"))?
        .split("num_gpu_blocks=\"")
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()
}

async fn scrape_once(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    limit: Duration,
) -> Option<String> {
    let request = Request::get(url).body(Empty::new()).ok()?;
    let response = tokio::time::timeout(limit, client.request(request))
        .await
        .ok()?
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(limit, response.into_body().collect())
        .await
        .ok()?
        .ok()?;
    String::from_utf8(body.to_bytes().to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_series_and_block_size() {
        let text = "# HELP vllm:num_requests_running x\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 224.0\n\
            vllm:prefix_cache_hits_total{engine=\"1\",model_name=\"m\"} 32.0\n\
            vllm:cache_config_info{block_size=\"32\",enable_prefix_caching=\"True\"} 1.0\n\
            vllm:other 9\n";
        let (values, block_size) = parse(text);
        assert_eq!(values["vllm:num_requests_running"], 3.0);
        assert_eq!(values["vllm:prefix_cache_hits_total"], 256.0);
        assert!(!values.contains_key("vllm:other"));
        assert_eq!(block_size, Some(32));
        assert_eq!(
            cache_blocks("vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"32768\"} 1.0"),
            Some(32768)
        );
        let (values, block_size) = parse("some_other_server_metric 1\n");
        assert!(values.is_empty() && block_size.is_none());
    }
}
