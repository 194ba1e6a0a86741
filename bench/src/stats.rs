//! What a run measured and the statistics reported from it: each
//! request's [`Sample`], a run's [`Outcomes`] (HDR histograms of
//! microseconds), their [`Summary`] and [`goodput`]; counters read from
//! Prometheus text; the [`median`] every report takes over repeats.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::client::{Answer, Failure};

/// One request's result, timed from its origin: its send, its wave's start,
/// or its intended send time (open loop).
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Output tokens, or the error's kind.
    pub(crate) result: Result<u64, String>,
    /// Origin to the whole answer.
    pub(crate) latency: Duration,
    /// Origin to the first text-bearing SSE event (streams only).
    pub(crate) ttft: Option<Duration>,
}

impl Sample {
    /// Times `result` from `origin`, now.
    pub(crate) fn new(result: Result<Answer, Failure>, origin: Instant) -> Self {
        let latency = origin.elapsed();
        match result {
            Ok(a) => Self {
                result: Ok(a.output_tokens),
                latency,
                ttft: a.first_token.map(|t| t.saturating_duration_since(origin)),
            },
            Err(failure) => Self {
                result: Err(failure.kind),
                latency,
                ttft: None,
            },
        }
    }

    /// A failure with no timing (a client task that panicked).
    pub(crate) fn failed(kind: &str) -> Self {
        Self {
            result: Err(kind.into()),
            latency: Duration::ZERO,
            ttft: None,
        }
    }
}

/// Raw outcomes of a run, merged from its workers.
#[derive(Debug, Clone)]
pub(crate) struct Outcomes {
    /// Latencies of successful requests, in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Times to first token of successful streamed requests, in microseconds.
    pub(crate) ttft: Histogram<u64>,
    /// Requests sent (every one ends as ok or as an error).
    pub(crate) sent: u64,
    /// Successful (2xx) requests.
    pub(crate) ok: u64,
    /// Failed requests by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// `usage.completion_tokens`, summed over successful requests.
    pub(crate) output_tokens: u64,
    /// Wall time of the run.
    pub(crate) elapsed: Duration,
}

impl Default for Outcomes {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            ttft: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            sent: 0,
            ok: 0,
            errors: BTreeMap::new(),
            output_tokens: 0,
            elapsed: Duration::ZERO,
        }
    }
}

impl Outcomes {
    /// Records one request.
    pub(crate) fn record(&mut self, sample: Sample) {
        self.sent += 1;
        match sample.result {
            Ok(tokens) => {
                self.ok += 1;
                self.output_tokens += tokens;
                let _ = self.latency.record(micros(sample.latency));
                if let Some(ttft) = sample.ttft {
                    let _ = self.ttft.record(micros(ttft));
                }
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    /// Adds another worker's outcomes (not its elapsed time).
    pub(crate) fn merge(&mut self, other: Outcomes) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.output_tokens += other.output_tokens;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        let _ = self.latency.add(other.latency);
        let _ = self.ttft.add(other.ttft);
    }

    /// Failed requests, every kind.
    pub(crate) fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful requests per second of the run.
    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile of the successful requests, in microseconds.
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }

    /// The reported summary.
    pub(crate) fn summary(&self) -> Summary {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        Summary {
            sent: self.sent,
            ok: self.ok,
            failed: self.failed(),
            errors: self.errors.clone(),
            success_rate: if self.sent == 0 {
                0.0
            } else {
                self.ok as f64 / self.sent as f64
            },
            elapsed_s: secs,
            throughput_rps: self.throughput(),
            output_tokens: self.output_tokens,
            output_tokens_per_s: self.output_tokens as f64 / secs,
            latency_ms: Quantiles::of(&self.latency),
            ttft_ms: (!self.ttft.is_empty()).then(|| Quantiles::of(&self.ttft)),
            latency_cdf_ms: cdf(&self.latency),
        }
    }
}

/// Goodput: the successful requests that took at most `slo`, per second
/// of `span` (the time over which they were offered).
pub(crate) fn goodput(outcomes: &Outcomes, slo: Duration, span: Duration) -> f64 {
    let within = outcomes.latency.count_between(1, micros(slo));
    within as f64 / span.as_secs_f64().max(1e-9)
}

/// The median of `values`, its finite ones only (`NaN` when there are none).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// `[quantile, ms]` points of a latency CDF: every 2%, then the tail.
pub(crate) fn cdf(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..50)
        .map(|i| f64::from(i) / 50.0)
        .chain([0.99, 0.995, 0.999, 1.0])
        .map(|q| [q, h.value_at_quantile(q) as f64 / 1000.0])
        .collect()
}

/// Latency quantiles in milliseconds (`null` fields when nothing succeeded).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Quantiles {
    pub(crate) count: u64,
    pub(crate) p50: Option<f64>,
    pub(crate) p95: Option<f64>,
    pub(crate) p99: Option<f64>,
    pub(crate) mean: Option<f64>,
    pub(crate) max: Option<f64>,
}

impl Quantiles {
    /// From an HDR histogram of microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let some = |v: f64| (!h.is_empty()).then_some(v);
        Self {
            count: h.len(),
            p50: some(ms(h.value_at_quantile(0.50))),
            p95: some(ms(h.value_at_quantile(0.95))),
            p99: some(ms(h.value_at_quantile(0.99))),
            mean: some(h.mean() / 1000.0),
            max: some(ms(h.max())),
        }
    }
}

/// The client-side summary of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) sent: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) success_rate: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) throughput_rps: f64,
    pub(crate) output_tokens: u64,
    pub(crate) output_tokens_per_s: f64,
    pub(crate) latency_ms: Quantiles,
    /// Time to first token, when the answers were streamed.
    pub(crate) ttft_ms: Option<Quantiles>,
    /// `[quantile, latency ms]` points (for plots).
    pub(crate) latency_cdf_ms: Vec<[f64; 2]>,
}

/// The sum of every sample of metric `name` in Prometheus text (all label
/// sets), or `None` when it is absent.
pub(crate) fn prom_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Prefix-cache counters of an engine's `/metrics`: (hits, queries).
pub(crate) fn prefix_counters(text: &str) -> Option<(f64, f64)> {
    Some((
        prom_sum(text, "vllm:prefix_cache_hits_total")?,
        prom_sum(text, "vllm:prefix_cache_queries_total")?,
    ))
}

/// The proxy's predicted prefix-cache (hits, queries) in tokens, from its `/metrics`.
pub(crate) fn predicted_prefix_counters(text: &str) -> Option<(f64, f64)> {
    Some((
        prom_sum(text, "sluice_prefix_cache_hit_tokens_total")?,
        prom_sum(text, "sluice_prefix_cache_query_tokens_total")?,
    ))
}

/// Prefix-cache use over a run, from counter deltas.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PrefixCache {
    pub(crate) hit_tokens: f64,
    pub(crate) query_tokens: f64,
    pub(crate) hit_rate: Option<f64>,
}

impl PrefixCache {
    /// From counters before and after the run.
    pub(crate) fn between(before: (f64, f64), after: (f64, f64)) -> Self {
        let hits = (after.0 - before.0).max(0.0);
        let queries = (after.1 - before.1).max(0.0);
        Self {
            hit_tokens: hits,
            query_tokens: queries,
            hit_rate: (queries > 0.0).then(|| hits / queries),
        }
    }
}

/// Least-squares line through `points`: `(intercept, slope)`.
pub(crate) fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| (my - sxy / sxx * mx, sxy / sxx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_is_counted_once() {
        let mut a = Outcomes::default();
        for ms in 1..=100u64 {
            a.record(ok(2, ms, None));
        }
        let mut b = Outcomes::default();
        b.record(Sample::failed("http_429"));
        b.record(Sample::failed("http_429"));
        b.record(Sample::failed("timeout"));
        a.merge(b);
        a.elapsed = Duration::from_secs(2);
        let s = a.summary();
        assert_eq!(s.sent, 103);
        assert_eq!(s.ok + s.failed, s.sent);
        assert_eq!(s.errors["http_429"], 2);
        assert_eq!(s.errors["timeout"], 1);
        assert_eq!(s.output_tokens, 200);
        assert_eq!(s.throughput_rps, 50.0);
        assert_eq!(s.output_tokens_per_s, 100.0);
        assert!((s.success_rate - 100.0 / 103.0).abs() < 1e-12);
        let q = s.latency_ms;
        assert_eq!(q.count, 100);
        assert!((q.p50.unwrap() - 50.0).abs() < 0.1, "{q:?}");
        assert!((q.p95.unwrap() - 95.0).abs() < 0.1, "{q:?}");
        assert!((q.p99.unwrap() - 99.0).abs() < 0.1, "{q:?}");
        assert!((q.mean.unwrap() - 50.5).abs() < 0.1, "{q:?}");
        assert_eq!(s.ttft_ms, None, "nothing was streamed");
        let cdf = &s.latency_cdf_ms;
        assert_eq!(cdf.first(), Some(&[0.0, 1.0]));
        let last = cdf.last().unwrap();
        assert_eq!(last[0], 1.0);
        assert!((last[1] - 100.0).abs() < 0.1, "{last:?}: HDR's 3 digits");
        assert!(
            cdf.windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
    }

    fn ok(tokens: u64, latency_ms: u64, ttft_ms: Option<u64>) -> Sample {
        Sample {
            result: Ok(tokens),
            latency: Duration::from_millis(latency_ms),
            ttft: ttft_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn ttft_quantiles_come_from_streamed_requests() {
        let mut a = Outcomes::default();
        for ms in 1..=100u64 {
            a.record(ok(1, 10 * ms, Some(ms)));
        }
        // A non-streamed answer counts in latency, not in TTFT.
        a.record(ok(1, 5, None));
        let s = a.summary();
        let t = s.ttft_ms.expect("streamed");
        assert_eq!((t.count, s.latency_ms.count), (100, 101));
        assert!((t.p50.unwrap() - 50.0).abs() < 0.1, "{t:?}");
        assert!((t.p99.unwrap() - 99.0).abs() < 0.1, "{t:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn samples_are_timed_from_their_origin() {
        let origin = Instant::now();
        tokio::time::advance(Duration::from_millis(30)).await;
        let first_token = Some(Instant::now());
        tokio::time::advance(Duration::from_millis(70)).await;
        let s = Sample::new(
            Ok(Answer {
                output_tokens: 3,
                first_token,
                ..Answer::default()
            }),
            origin,
        );
        assert_eq!(s.result, Ok(3));
        assert_eq!(s.latency, Duration::from_millis(100));
        assert_eq!(s.ttft, Some(Duration::from_millis(30)));
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let mut result = Outcomes {
            ok: 100,
            elapsed: Duration::from_secs(2),
            ..Outcomes::default()
        };
        for us in 1..=100u64 {
            result.latency.record(us * 10).unwrap();
        }
        assert_eq!(result.quantile_us(0.5), 500);
        assert_eq!(result.quantile_us(0.99), 990);
        assert_eq!(result.throughput(), 50.0);
    }

    #[test]
    fn goodput_counts_what_finished_within_the_slo() {
        let mut a = Outcomes::default();
        for ms in 1..=100u64 {
            a.record(ok(1, ms, None));
        }
        a.record(Sample::failed("http_503"));
        let span = Duration::from_secs(2);
        assert_eq!(goodput(&a, Duration::from_millis(50), span), 25.0);
        assert_eq!(goodput(&a, Duration::from_secs(1), span), 50.0);
        assert_eq!(
            goodput(&Outcomes::default(), Duration::from_secs(1), span),
            0.0
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 1.0, 2.0]), 1.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn empty_runs_have_no_quantiles() {
        let s = Outcomes::default().summary();
        assert_eq!(s.success_rate, 0.0);
        assert_eq!(s.latency_ms.p50, None);
    }

    #[test]
    fn prometheus_counters_are_summed_over_labels() {
        let text = "# HELP vllm:prefix_cache_hits_total x\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 30.0\n\
                    vllm:prefix_cache_hits_total{engine=\"1\",model_name=\"m\"} 10\n\
                    vllm:prefix_cache_hits_total_created 5\n\
                    vllm:prefix_cache_queries_total 80\n";
        assert_eq!(prom_sum(text, "vllm:prefix_cache_hits_total"), Some(40.0));
        assert_eq!(prefix_counters(text), Some((40.0, 80.0)));
        assert_eq!(prom_sum(text, "vllm:absent"), None);
        let p = PrefixCache::between((40.0, 80.0), (100.0, 160.0));
        assert_eq!(p.hit_rate, Some(0.75));
        assert_eq!(PrefixCache::between((1.0, 1.0), (1.0, 1.0)).hit_rate, None);
    }
}
