//! Metrics through one facade: every metric Sluice exports is described here
//! once (name, unit, help), labelled only with bounded sets (route, outcome,
//! policy event kinds), and exposed in Prometheus text on the admin listener.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::classify::Route;
pub use crate::stats::RequestRecord;

/// Requests finished, by route and outcome.
pub const REQUESTS: &str = "sluice_requests_total";
/// End-to-end time as the client sees it (arrival to last byte).
pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
/// Time waiting for admission.
pub const QUEUE_WAIT: &str = "sluice_queue_wait_seconds";
/// Admission to the end of the upstream response.
pub const UPSTREAM_DURATION: &str = "sluice_upstream_duration_seconds";
/// Admission to the first response byte.
pub const TIME_TO_FIRST_BYTE: &str = "sluice_time_to_first_byte_seconds";
/// Admission to the first generated token (first text-bearing SSE event; the whole response otherwise).
pub const TIME_TO_FIRST_TOKEN: &str = "sluice_time_to_first_token_seconds";
/// Gaps between text-bearing SSE events of a stream.
pub const INTER_TOKEN: &str = "sluice_inter_token_seconds";
/// Requests admitted and not yet finished.
pub const IN_FLIGHT: &str = "sluice_in_flight_requests";
/// Requests refused before queueing, by reason.
pub const REQUESTS_SHED: &str = "sluice_requests_shed_total";
/// Requests waiting for admission.
pub const QUEUED: &str = "sluice_queued_requests";
/// Policy faults (trap, deadline, invalid decision), by kind.
pub const POLICY_FAULTS: &str = "sluice_policy_faults_total";
/// Policy calls, by event.
pub const POLICY_CALLS: &str = "sluice_policy_calls_total";
/// Policy reloads, by result.
pub const POLICY_RELOADS: &str = "sluice_policy_reloads_total";
/// Whether the built-in fallback policy is active (1) or the plugin (0).
pub const POLICY_FALLBACK: &str = "sluice_policy_fallback_active";
/// Gauge: a number the policy publishes through its `gauge` import, by `name`.
pub const POLICY_VALUE: &str = "sluice_policy_value";
/// Gauge: the proxy's resident memory (bytes), sampled at scrape time.
pub const PROCESS_RESIDENT_MEMORY: &str = "sluice_process_resident_memory_bytes";
/// Gauge: CPU time the proxy has used, user and system (seconds); its
/// `rate()` is the cores in use.
pub const PROCESS_CPU: &str = "sluice_process_cpu_seconds";
/// Gauge: client connections open, by `listener` (`main`, `admin`).
pub const OPEN_CONNECTIONS: &str = "sluice_open_connections";
/// Requests sent to each replica, by `replica` and `reason` (see
/// [`crate::replicas::replica::ROUTE_REASONS`]).
pub const REPLICA_REQUESTS: &str = "sluice_replica_requests_total";
/// Requests that left a replica unsent for another one, by `replica`.
pub const REPLICA_FAILOVERS: &str = "sluice_replica_failovers_total";
/// Prefix predictions checked against a replica's `cached_tokens`, by
/// `replica` and `result` (`exact`, `over`, `under`, in whole blocks).
pub const REPLICA_PREDICTIONS: &str = "sluice_replica_prefix_predictions_total";
/// Gauge: requests in flight to each replica through this proxy.
pub const REPLICA_IN_FLIGHT: &str = "sluice_replica_in_flight_requests";
/// Gauge: 1 while a replica may take requests, by `replica`.
pub const REPLICA_HEALTHY: &str = "sluice_replica_healthy";
/// Gauge: bytes of `--body-memory` held by bodies being read and parsed.
pub const BODY_MEMORY_HELD: &str = "sluice_body_memory_held_bytes";
/// Gauge: declared bodies waiting for their share of `--body-memory`.
pub const BODY_MEMORY_WAITING: &str = "sluice_body_memory_waiting_requests";
/// Admin requests refused by the access rules, by reason.
pub const ADMIN_DENIED: &str = "sluice_admin_denied_total";
/// The `reason`s of [`ADMIN_DENIED`]: the [`crate::error::ProxyError::code`]s of the refusals.
pub const ADMIN_DENIED_REASONS: [&str; 3] =
    ["unauthorized", "host_not_allowed", "admin_token_required"];

/// Client connections Sluice closed, by `listener` and `reason` (`idle_timeout`, `evicted`).
pub const CONNECTIONS_CLOSED: &str = "sluice_connections_closed_total";
/// Client connections refused at `--max-connections` (answered 503), by `listener`.
pub const CONNECTIONS_REFUSED: &str = "sluice_connections_refused_total";

/// Client requests received (see [`crate::ledger`]).
pub const REQUESTS_RECEIVED: &str = "sluice_requests_received_total";
/// Client requests ended, by `ending` (answered, refused, cut).
pub const REQUESTS_ENDED: &str = "sluice_requests_ended_total";
/// Requests admitted towards the engine.
pub const REQUESTS_ADMITTED: &str = "sluice_requests_admitted_total";
/// Admitted requests ended, by `ending` (completed, failed, client_gone).
pub const ADMITTED_ENDED: &str = "sluice_admitted_ended_total";
/// The `ending` labels of [`REQUESTS_ENDED`], in [`crate::ledger::Ending`] order.
pub const REQUEST_ENDINGS: [&str; 3] = ["answered", "refused", "cut"];
/// The `ending` labels of [`ADMITTED_ENDED`], in [`crate::ledger::AdmittedEnding`] order.
pub const ADMITTED_ENDINGS: [&str; 3] = ["completed", "failed", "client_gone"];

/// KV-cache events received from a replica, by replica and kind (stored,
/// removed, cleared, unknown; malformed counts messages skipped).
pub const KV_EVENTS: &str = "sluice_kv_events_total";
/// KV-cache events that changed nothing, by replica and reason.
pub const KV_EVENTS_IGNORED: &str = "sluice_kv_events_ignored_total";
/// Gaps in a replica's KV-event sequence numbers (batches lost).
pub const KV_EVENT_GAPS: &str = "sluice_kv_event_gaps_total";
/// 1 while the KV-event subscriber is connected to the replica, else 0.
pub const KV_EVENTS_CONNECTED: &str = "sluice_kv_events_connected";

/// Prompt tokens the prefix tracker looked up.
pub const PREFIX_QUERY_TOKENS: &str = "sluice_prefix_cache_query_tokens_total";
/// Prompt tokens the prefix tracker predicted to be cached.
pub const PREFIX_HIT_TOKENS: &str = "sluice_prefix_cache_hit_tokens_total";
/// |predicted − actual| cached tokens, when the engine reports `cached_tokens`.
pub const PREFIX_ERROR: &str = "sluice_prefix_prediction_error_tokens";
/// Predictions checked against the engine, by result (exact to the block, over, under).
pub const PREFIX_CHECKS: &str = "sluice_prefix_predictions_total";
/// Prompt tokens, from the engine's `usage`.
pub const PROMPT_TOKENS: &str = "sluice_prompt_tokens_total";
/// Output tokens, from the engine's `usage`.
pub const OUTPUT_TOKENS: &str = "sluice_output_tokens_total";
/// GPU memory in use, by GPU index.
pub const GPU_MEMORY_USED: &str = "sluice_gpu_memory_used_bytes";
/// GPU memory in total, by GPU index.
pub const GPU_MEMORY_TOTAL: &str = "sluice_gpu_memory_total_bytes";
/// GPU utilisation (0–1), by GPU index.
pub const GPU_UTILIZATION: &str = "sluice_gpu_utilization_ratio";

/// Buckets from 100 µs to 10 minutes: LLM latencies span all of it.
const LATENCY_BUCKETS: [f64; 22] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets for token counts (one block of 16 up to a long context).
const TOKEN_BUCKETS: [f64; 10] = [
    0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Off only when `SLUICE_TELEMETRY=off`: then no metric or `/stats` sample is
/// recorded. It exists to measure what recording costs (`bench overhead
/// --telemetry-cost`), not for production.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// How often the recorder drains histogram samples into its summaries.
/// Without it they pile up until a scrape: about 110 bytes a request for a
/// deployment that scrapes rarely or never.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep every [`UPKEEP_EVERY`] on a thread of its own,
/// for the life of the process.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("sluice-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot start the metrics upkeep thread ({e}): histograms drain only when scraped"
        );
    }
}

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("bucket list is non-empty")
                .set_buckets_for_metric(Matcher::Full(PREFIX_ERROR.into()), &TOKEN_BUCKETS)
                .expect("bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if std::env::var("SLUICE_TELEMETRY").is_ok_and(|v| v == "off") {
                ENABLED.store(false, Ordering::Relaxed);
                tracing::warn!("SLUICE_TELEMETRY=off: no metrics or /stats samples are recorded");
                return handle;
            }
            // Fails only if another recorder is installed (a test harness); keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone());
            describe();
            register_at_zero();
            // Register the hot-path handles now that the recorder is in place.
            hot();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(REQUESTS, "Requests finished, by route and outcome.");
    describe_counter!(
        KV_EVENTS,
        "KV-cache events received from a replica's engine, by replica and kind (stored, removed, cleared, unknown; malformed: messages skipped)."
    );
    describe_counter!(
        KV_EVENTS_IGNORED,
        "KV-cache events the prefix mirror did not apply, by replica and reason (unknown_parent, other_medium, keyed)."
    );
    describe_counter!(
        KV_EVENT_GAPS,
        "Gaps in a replica's KV-event sequence numbers: batches lost."
    );
    describe_gauge!(
        KV_EVENTS_CONNECTED,
        "1 while the KV-event subscriber is connected to the replica's engine, else 0."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Client connections Sluice closed: idle past --client-idle-timeout, or evicted (the longest idle) to make room at --max-connections."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections answered 503 at --max-connections because every open one had a request in progress."
    );
    describe_counter!(
        REQUESTS_RECEIVED,
        "Client requests received; each ends once in sluice_requests_ended_total."
    );
    describe_counter!(
        REQUESTS_ENDED,
        "Client requests ended, by ending: answered (whole response), refused (Sluice's own error), cut (no whole response)."
    );
    describe_counter!(
        REQUESTS_ADMITTED,
        "Requests admitted towards the engine; each ends once in sluice_admitted_ended_total."
    );
    describe_counter!(
        ADMITTED_ENDED,
        "Admitted requests ended, by ending: completed, failed, client_gone."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Arrival to the last byte sent to the client."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time spent waiting for admission."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Admission to the end of the upstream response."
    );
    describe_histogram!(
        TIME_TO_FIRST_BYTE,
        Unit::Seconds,
        "Admission to the first response byte from the upstream."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Admission to the first generated token (the whole response when not streaming)."
    );
    describe_histogram!(
        INTER_TOKEN,
        Unit::Seconds,
        "Gaps between streamed token events."
    );
    describe_gauge!(IN_FLIGHT, "Requests admitted and not yet finished.");
    describe_gauge!(QUEUED, "Requests waiting for admission.");
    describe_counter!(
        REQUESTS_SHED,
        "Requests refused before queueing (rate limit, full queue), by reason."
    );
    describe_counter!(
        POLICY_FAULTS,
        "Policy faults that switched admission to the fallback, by kind."
    );
    describe_counter!(POLICY_CALLS, "Calls into the admission policy, by event.");
    describe_counter!(POLICY_RELOADS, "Policy reloads, by result.");
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY,
        Unit::Bytes,
        "The proxy's resident memory, sampled when /metrics is scraped."
    );
    describe_gauge!(
        PROCESS_CPU,
        Unit::Seconds,
        "CPU time the proxy has used, user and system; rate() gives cores in use."
    );
    describe_counter!(
        REPLICA_REQUESTS,
        "Requests sent to each replica, by why it was chosen (prefix, rendezvous, least_loaded, round_robin, policy, failover)."
    );
    describe_counter!(
        REPLICA_FAILOVERS,
        "Requests that could not be sent to a replica (connect failed, or closed before any byte was written) and went to another."
    );
    describe_counter!(
        REPLICA_PREDICTIONS,
        "Prefix predictions checked against the replica's own cached_tokens: exact, over or under, in whole blocks."
    );
    describe_gauge!(
        REPLICA_IN_FLIGHT,
        "Requests in flight to each replica through this proxy, sampled at scrape."
    );
    describe_gauge!(
        REPLICA_HEALTHY,
        "1 while a replica may take new requests, 0 while its connect or /health check fails; sampled at scrape."
    );
    describe_gauge!(
        BODY_MEMORY_HELD,
        Unit::Bytes,
        "Bytes of --body-memory held by request bodies being read and parsed (two per body byte past the first 64 KiB)."
    );
    describe_gauge!(
        BODY_MEMORY_WAITING,
        "Request bodies waiting for their share of --body-memory."
    );
    describe_gauge!(
        OPEN_CONNECTIONS,
        "Client connections open, by listener (main, admin)."
    );
    describe_counter!(
        ADMIN_DENIED,
        "Admin requests refused: no or a wrong bearer token, a Host the listener does not answer to, a change without --admin-token on a listener others can reach."
    );
    describe_gauge!(
        POLICY_VALUE,
        "A number the admission policy publishes (e.g. its current limit), by name."
    );
    describe_gauge!(
        POLICY_FALLBACK,
        "1 while the built-in fallback policy replaces a faulty plugin."
    );
    describe_gauge!(GPU_MEMORY_USED, Unit::Bytes, "GPU memory in use (NVML).");
    describe_gauge!(GPU_MEMORY_TOTAL, Unit::Bytes, "GPU memory in total (NVML).");
    describe_gauge!(
        GPU_UTILIZATION,
        "GPU utilisation over the last sample period, 0 to 1 (NVML)."
    );
    describe_counter!(
        PREFIX_QUERY_TOKENS,
        "Prompt tokens looked up in the prefix tracker."
    );
    describe_counter!(
        PREFIX_HIT_TOKENS,
        "Prompt tokens the prefix tracker predicted to be in the engine's prefix cache."
    );
    describe_histogram!(
        PREFIX_ERROR,
        "Absolute difference between predicted and engine-reported cached tokens."
    );
    describe_counter!(
        PREFIX_CHECKS,
        "Predictions checked against the engine's cached_tokens, by result."
    );
    describe_counter!(PROMPT_TOKENS, "Prompt tokens, from the engine's usage.");
    describe_counter!(OUTPUT_TOKENS, "Output tokens, from the engine's usage.");
}

/// Counters that alert rules watch start at 0, so `rate()` over them is 0
/// (not empty) until the first event.
fn register_at_zero() {
    for reason in ["queue_full", "rate_limited"] {
        counter!(REQUESTS_SHED, "reason" => reason).increment(0);
    }
    for kind in ["trap", "deadline", "invalid_decision"] {
        counter!(POLICY_FAULTS, "kind" => kind).increment(0);
    }
    for result in ["ok", "rejected"] {
        counter!(POLICY_RELOADS, "result" => result).increment(0);
    }
    for reason in ADMIN_DENIED_REASONS {
        counter!(ADMIN_DENIED, "reason" => reason).increment(0);
    }
}

/// Handles for the series that every request touches, registered once.
///
/// The `counter!`/`histogram!` macros build a key and look it up in the
/// recorder's registry on every call; callgrind put that at about a
/// thousand instructions per call, most of what recording a request cost
/// (`bench telemetry-cost`). A handle points at the series' storage itself.
/// Registered after the recorder is installed ([`install`]); before that (or
/// with telemetry off) they are no-ops.
pub struct Hot {
    routes: Vec<RouteSeries>,
    /// [`PREFIX_QUERY_TOKENS`].
    pub prefix_query_tokens: Counter,
    /// [`PREFIX_HIT_TOKENS`].
    pub prefix_hit_tokens: Counter,
    /// [`PROMPT_TOKENS`].
    pub prompt_tokens: Counter,
    /// [`OUTPUT_TOKENS`].
    pub output_tokens: Counter,
    /// [`PREFIX_ERROR`].
    pub prefix_error: Histogram,
    /// [`PREFIX_CHECKS`] by result: exact, over, under.
    pub prefix_checks: [Counter; 3],
    /// [`QUEUED`].
    pub queued: Gauge,
    /// [`IN_FLIGHT`].
    pub in_flight: Gauge,
    /// [`REQUESTS_RECEIVED`].
    pub received: Counter,
    /// [`REQUESTS_ENDED`] by ending, in [`REQUEST_ENDINGS`] order.
    pub ended: [Counter; 3],
    /// [`REQUESTS_ADMITTED`].
    pub admitted: Counter,
    /// [`ADMITTED_ENDED`] by ending, in [`ADMITTED_ENDINGS`] order.
    pub admitted_ended: [Counter; 3],
}

/// The per-route series of [`Hot`].
pub struct RouteSeries {
    /// [`REQUESTS`] with outcome `ok` (other outcomes use the macro).
    pub ok: Counter,
    /// [`REQUEST_DURATION`].
    pub duration: Histogram,
    /// [`QUEUE_WAIT`].
    pub queue_wait: Histogram,
    /// [`UPSTREAM_DURATION`].
    pub upstream: Histogram,
    /// [`TIME_TO_FIRST_BYTE`].
    pub first_byte: Histogram,
    /// [`TIME_TO_FIRST_TOKEN`].
    pub first_token: Histogram,
    /// [`INTER_TOKEN`].
    pub inter_token: Histogram,
}

impl RouteSeries {
    fn new(route: Route) -> Self {
        let route = route.label();
        Self {
            ok: counter!(REQUESTS, "route" => route, "outcome" => "ok"),
            duration: histogram!(REQUEST_DURATION, "route" => route),
            queue_wait: histogram!(QUEUE_WAIT, "route" => route),
            upstream: histogram!(UPSTREAM_DURATION, "route" => route),
            first_byte: histogram!(TIME_TO_FIRST_BYTE, "route" => route),
            first_token: histogram!(TIME_TO_FIRST_TOKEN, "route" => route),
            inter_token: histogram!(INTER_TOKEN, "route" => route),
        }
    }
}

impl Hot {
    /// The series of `route`.
    pub fn route(&self, route: Route) -> &RouteSeries {
        &self.routes[route as usize]
    }
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// The registered hot-path handles.
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| Hot {
        routes: Route::ALL.into_iter().map(RouteSeries::new).collect(),
        prefix_query_tokens: counter!(PREFIX_QUERY_TOKENS),
        prefix_hit_tokens: counter!(PREFIX_HIT_TOKENS),
        prompt_tokens: counter!(PROMPT_TOKENS),
        output_tokens: counter!(OUTPUT_TOKENS),
        prefix_error: histogram!(PREFIX_ERROR),
        prefix_checks: ["exact", "over", "under"]
            .map(|result| counter!(PREFIX_CHECKS, "result" => result)),
        queued: gauge!(QUEUED),
        in_flight: gauge!(IN_FLIGHT),
        received: counter!(REQUESTS_RECEIVED),
        ended: REQUEST_ENDINGS.map(|ending| counter!(REQUESTS_ENDED, "ending" => ending)),
        admitted: counter!(REQUESTS_ADMITTED),
        admitted_ended: ADMITTED_ENDINGS.map(|ending| counter!(ADMITTED_ENDED, "ending" => ending)),
    })
}

/// Records one finished request (Prometheus and `/stats`).
pub fn record_request(r: &RequestRecord) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    crate::stats::record(r);
    let series = hot().route(r.route);
    if r.outcome == "ok" {
        series.ok.increment(1);
    } else {
        counter!(REQUESTS, "route" => r.route.label(), "outcome" => r.outcome).increment(1);
    }
    series.duration.record(r.total.as_secs_f64());
    if let Some(upstream) = r.upstream {
        series.queue_wait.record(r.queue.as_secs_f64());
        series.upstream.record(upstream.as_secs_f64());
    }
    if let Some(ttfb) = r.ttfb {
        series.first_byte.record(ttfb.as_secs_f64());
    }
    if let Some(ttft) = r.ttft {
        series.first_token.record(ttft.as_secs_f64());
    }
}

/// Records a reload's result.
pub fn count_reload(result: &'static str) {
    metrics::counter!(POLICY_RELOADS, "result" => result).increment(1);
}

/// Records an admin request refused for `reason` (one of [`ADMIN_DENIED_REASONS`]).
pub fn count_admin_denied(reason: &'static str) {
    metrics::counter!(ADMIN_DENIED, "reason" => reason).increment(1);
}
