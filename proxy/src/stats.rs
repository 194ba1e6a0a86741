//! Exact latency percentiles for `/stats`: HDR histograms per route and
//! policy, since start or since the last `POST /stats/reset`. This is what
//! the load generator reads for server-side truth (queue wait and service
//! time next to what the client saw).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::classify::Route;

/// What is recorded for every finished request.
#[derive(Debug)]
pub struct RequestRecord {
    /// Route label.
    pub route: Route,
    /// Outcome label (bounded: see [`crate::exchange::Outcome`] and [`crate::error::ProxyError::code`]).
    pub outcome: &'static str,
    /// Arrival to end.
    pub total: Duration,
    /// Waiting for admission.
    pub queue: Duration,
    /// Admission to end, when the request went upstream.
    pub upstream: Option<Duration>,
    /// Admission to first byte, when one arrived.
    pub ttfb: Option<Duration>,
    /// Admission to first token (completion and chat routes).
    pub ttft: Option<Duration>,
}

/// The policy label requests are recorded under ("none" in pass-through);
/// shared, so recording a request clones a pointer, not the name.
static POLICY: LazyLock<RwLock<Arc<str>>> = LazyLock::new(|| RwLock::new(Arc::from("none")));
static STATS: OnceLock<Mutex<Window>> = OnceLock::new();

/// Sets the policy label for requests recorded from now on.
pub fn set_policy_label(name: &str) {
    if let Ok(mut label) = POLICY.write() {
        *label = Arc::from(name);
    }
}

fn policy_label() -> Arc<str> {
    POLICY
        .read()
        .map(|l| Arc::clone(&l))
        .unwrap_or_else(|_| Arc::from("none"))
}

/// Histograms (µs) and counts for one route and policy.
#[derive(Debug)]
struct Series {
    total: Histogram<u64>,
    queue: Histogram<u64>,
    upstream: Histogram<u64>,
    ttfb: Histogram<u64>,
    ttft: Histogram<u64>,
    outcomes: BTreeMap<&'static str, u64>,
}

impl Series {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Self {
            total: h(),
            queue: h(),
            upstream: h(),
            ttfb: h(),
            ttft: h(),
            outcomes: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct Window {
    since: std::time::Instant,
    series: BTreeMap<(&'static str, Arc<str>), Series>,
}

fn window() -> &'static Mutex<Window> {
    STATS.get_or_init(|| {
        Mutex::new(Window {
            since: std::time::Instant::now(),
            series: BTreeMap::new(),
        })
    })
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Adds one finished request.
pub fn record(r: &RequestRecord) {
    let key = (r.route.label(), policy_label());
    let Ok(mut w) = window().lock() else { return };
    let s = w.series.entry(key).or_insert_with(Series::new);
    *s.outcomes.entry(r.outcome).or_insert(0) += 1;
    let _ = s.total.record(us(r.total));
    if let Some(upstream) = r.upstream {
        let _ = s.queue.record(us(r.queue));
        let _ = s.upstream.record(us(upstream));
    }
    if let Some(ttfb) = r.ttfb {
        let _ = s.ttfb.record(us(ttfb));
    }
    if let Some(ttft) = r.ttft {
        let _ = s.ttft.record(us(ttft));
    }
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "mean_ms": h.mean() / 1000.0,
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

/// The window as JSON; with `reset`, a new window starts.
pub fn snapshot(reset: bool) -> Value {
    let Ok(mut w) = window().lock() else {
        return json!({});
    };
    let routes: Vec<Value> = w
        .series
        .iter()
        .map(|((route, policy), s)| {
            json!({
                "route": route,
                "policy": &**policy,
                "outcomes": s.outcomes,
                "latency": {
                    "total": summary(&s.total),
                    "queue_wait": summary(&s.queue),
                    "service": summary(&s.upstream),
                    "time_to_first_byte": summary(&s.ttfb),
                    "time_to_first_token": summary(&s.ttft),
                },
            })
        })
        .collect();
    let value = json!({
        "window_s": w.since.elapsed().as_secs_f64(),
        "series": routes,
    });
    if reset {
        w.series.clear();
        w.since = std::time::Instant::now();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Route;

    #[test]
    fn percentiles_are_exact_and_reset_starts_a_new_window() {
        for ms in 1..=100u64 {
            record(&RequestRecord {
                route: Route::Embeddings,
                outcome: "ok",
                total: Duration::from_millis(ms),
                queue: Duration::from_millis(1),
                upstream: Some(Duration::from_millis(ms)),
                ttfb: None,
                ttft: None,
            });
        }
        let s = snapshot(true);
        let series = s["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["route"] == "embeddings")
            .unwrap()
            .clone();
        assert_eq!(series["outcomes"]["ok"], 100);
        let total = &series["latency"]["total"];
        assert_eq!(total["count"], 100);
        assert!(
            (total["p50_ms"].as_f64().unwrap() - 50.0).abs() < 0.1,
            "{total}"
        );
        assert!(
            (total["p99_ms"].as_f64().unwrap() - 99.0).abs() < 0.1,
            "{total}"
        );
        assert_eq!(series["latency"]["time_to_first_byte"]["count"], 0);
        let after = snapshot(false);
        assert!(
            !after["series"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["route"] == "embeddings"),
            "reset keeps old data: {after}"
        );
    }
}
