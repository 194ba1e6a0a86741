//! The engine's counters and histograms, rendered under vLLM's metric names
//! and bucket bounds (checked against vLLM 0.32's `/metrics`).

use std::fmt::Write as _;

/// vLLM's bucket bounds for time to first token.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's bucket bounds for inter-token latency.
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's bucket bounds for request-level durations (e2e, queue, prefill).
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram with fixed bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; one more than `bounds` for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of the observations so far.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Why a sequence finished, as vLLM's `finished_reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `max_tokens` (or the context length).
    Length,
    /// Aborted: client disconnect.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// Everything the engine counts.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Prompt tokens of requests admitted (counted once per request).
    pub prompt_tokens: u64,
    /// Output tokens sampled.
    pub generation_tokens: u64,
    /// Tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Sequences preempted (their blocks freed, to be recomputed).
    pub preemptions: u64,
    /// Requests finished by length.
    pub finished_length: u64,
    /// Requests aborted.
    pub finished_abort: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Arrival to first token.
    pub ttft: Histogram,
    /// Gap between consecutive tokens of a sequence.
    pub itl: Histogram,
    /// Arrival to last token.
    pub e2e: Histogram,
    /// Arrival to first scheduled.
    pub queue: Histogram,
    /// First scheduled to first token.
    pub prefill: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            finished_length: 0,
            finished_abort: 0,
            steps: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_BUCKETS),
            queue: Histogram::new(REQUEST_BUCKETS),
            prefill: Histogram::new(REQUEST_BUCKETS),
        }
    }
}

/// Gauges read from the engine at render time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Sequences in the running batch.
    pub running: usize,
    /// Sequences waiting.
    pub waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_usage: f64,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: u32,
}

/// Renders the Prometheus text exposition, vLLM-style labels included.
pub fn render(model: &str, stats: &Stats, g: Gauges) -> String {
    let l = format!("engine=\"0\",model_name=\"{model}\"");
    let mut out = String::with_capacity(8 * 1024);
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP vllm:{name} {help}");
        let _ = writeln!(out, "# TYPE vllm:{name} gauge");
        let _ = writeln!(out, "vllm:{name}{{{l}}} {v:?}");
    };
    gauge(
        "num_requests_running",
        "Number of requests in model execution batches.",
        g.running as f64,
    );
    gauge(
        "num_requests_waiting",
        "Number of requests waiting to be processed.",
        g.waiting as f64,
    );
    gauge(
        "kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        g.kv_usage,
    );
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP vllm:{name}_total {help}");
        let _ = writeln!(out, "# TYPE vllm:{name}_total counter");
        let _ = writeln!(out, "vllm:{name}_total{{{l}}} {:?}", v as f64);
    };
    counter(
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        stats.prefix_queries,
    );
    counter(
        "prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        stats.prefix_hits,
    );
    counter(
        "num_preemptions",
        "Cumulative number of preemption from the engine.",
        stats.preemptions,
    );
    counter(
        "prompt_tokens",
        "Number of prefill tokens processed.",
        stats.prompt_tokens,
    );
    counter(
        "generation_tokens",
        "Number of generation tokens processed.",
        stats.generation_tokens,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests."
    );
    let _ = writeln!(out, "# TYPE vllm:request_success_total counter");
    for (reason, v) in [
        ("stop", 0),
        ("length", stats.finished_length),
        ("abort", stats.finished_abort),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{model}\"}} {:?}",
            v as f64
        );
    }
    for (name, help, h) in [
        (
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &stats.ttft,
        ),
        (
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &stats.itl,
        ),
        (
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &stats.e2e,
        ),
        (
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &stats.queue,
        ),
        (
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &stats.prefill,
        ),
    ] {
        let _ = writeln!(out, "# HELP vllm:{name} {help}");
        let _ = writeln!(out, "# TYPE vllm:{name} histogram");
        let mut cum = 0;
        for (i, c) in h.counts.iter().enumerate() {
            cum += c;
            let le = h
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| format!("{b:?}"));
            let _ = writeln!(
                out,
                "vllm:{name}_bucket{{engine=\"0\",le=\"{le}\",model_name=\"{model}\"}} {:?}",
                cum as f64
            );
        }
        let _ = writeln!(out, "vllm:{name}_count{{{l}}} {:?}", h.count as f64);
        let _ = writeln!(out, "vllm:{name}_sum{{{l}}} {:?}", h.sum);
    }
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
    );
    let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\",simulated=\"True\"}} 1.0",
        g.block_size, g.num_blocks
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inclusive_upper_bounds() {
        let mut stats = Stats::default();
        stats.e2e.observe(0.3);
        stats.e2e.observe(0.31);
        stats.e2e.observe(9999.0);
        let text = render(
            "m",
            &stats,
            Gauges {
                running: 1,
                waiting: 2,
                kv_usage: 0.5,
                block_size: 32,
                num_blocks: 10,
            },
        );
        assert!(text.contains(
            "vllm:e2e_request_latency_seconds_bucket{engine=\"0\",le=\"0.3\",model_name=\"m\"} 1.0"
        ));
        assert!(text.contains(
            "vllm:e2e_request_latency_seconds_bucket{engine=\"0\",le=\"0.5\",model_name=\"m\"} 2.0"
        ));
        assert!(text.contains(
            "vllm:e2e_request_latency_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 3.0"
        ));
        assert!(text.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2.0"));
        assert!(text.contains("block_size=\"32\""));
    }
}
