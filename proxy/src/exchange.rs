//! One request's life through the proxy: when it arrived, was admitted, went
//! upstream, got its first byte and ended — and the single place where that
//! ending is logged, measured and reported to the admission policy.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::admission::Permit;
use crate::classify::Route;
use crate::ledger::{Admitted, AdmittedEnding, Ending, Received};
use crate::pool::Lease;
use crate::prefix::{Prediction, PrefixTracker};
use crate::replicas::{Replica, Routed};
use crate::telemetry::{self, RequestRecord};
use crate::units::ms;
use crate::usage::{Usage, UsageTap};

/// What a completion/chat request carries besides timings: its prefix
/// prediction (inserted into the tracker once the engine has the blocks)
/// and a tap that reads the engine's `usage` from the response.
#[derive(Debug)]
pub struct Inference {
    tracker: Arc<PrefixTracker>,
    prediction: Prediction,
    tap: UsageTap,
    // A stream: tokens arrive in SSE events, timed one by one.
    sse: bool,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// Whether an SSE chunk carries generated text: a non-empty `"text"`
/// (completions) or `"content"` (chat delta). vLLM's first chat chunk only
/// announces the role with empty content, and the usage chunk has no text.
pub fn carries_tokens(chunk: &[u8]) -> bool {
    [&b"\"text\":\""[..], &b"\"content\":\""[..]]
        .iter()
        .any(|key| {
            chunk
                .windows(key.len() + 1)
                .any(|w| w.starts_with(key) && w[key.len()] != b'"')
        })
}

impl Inference {
    /// For a response that is SSE (`sse`) or JSON.
    pub fn new(tracker: Arc<PrefixTracker>, prediction: Prediction, sse: bool) -> Self {
        Self {
            tracker,
            prediction,
            tap: UsageTap::new(sse),
            sse,
            first_token: None,
            last_token: None,
        }
    }

    /// Reads usage, checks the prediction against the engine (counted for
    /// its `replica` too), and — for a request the
    /// engine completed — records its blocks as cached.
    fn finish(self, ok: bool, replica: Option<&Replica>) -> (Option<Usage>, u32) {
        let usage = self.tap.usage();
        let predicted = self.prediction.cached_tokens;
        if ok {
            self.tracker.insert(&self.prediction);
        }
        if let Some(usage) = usage {
            let hot = telemetry::hot();
            hot.prompt_tokens.increment(u64::from(usage.prompt_tokens));
            hot.output_tokens
                .increment(u64::from(usage.completion_tokens));
            if let Some(actual) = usage.cached_tokens {
                let block = self.prediction.block_size.max(1);
                hot.prefix_error
                    .record(f64::from(predicted.abs_diff(actual)));
                let result = match (predicted / block).cmp(&(actual / block)) {
                    std::cmp::Ordering::Equal => 0,
                    std::cmp::Ordering::Greater => 1,
                    std::cmp::Ordering::Less => 2,
                };
                hot.prefix_checks[result].increment(1);
                if let Some(replica) = replica {
                    replica.checked(result);
                }
            }
        }
        (usage, predicted)
    }
}

/// How a forwarded response ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The whole body reached the client.
    Complete,
    /// The client went away before the body ended (the upstream request is aborted).
    ClientGone,
    /// The upstream failed or stalled mid-body.
    UpstreamFailed(String),
    /// Shutdown ended it at `--drain-timeout`.
    Shutdown,
}

/// A forwarded request, finished exactly once by [`Exchange::finish`].
#[derive(Debug)]
pub struct Exchange {
    /// Request id (also sent back as `x-request-id`).
    pub id: u64,
    /// Route label.
    pub route: Route,
    /// HTTP method.
    pub method: Method,
    /// Upstream status.
    pub status: StatusCode,
    /// Arrival at the proxy.
    pub arrived: Instant,
    /// Admission (equals `arrived` without a policy).
    pub admitted: Instant,
    /// First body byte received.
    pub first_byte: Option<Instant>,
    /// Body bytes passed to the client.
    pub bytes: u64,
    /// Held while in flight; reports the completion to the policy.
    pub permit: Option<Permit>,
    /// The upstream connection, given back for reuse when the response completed.
    pub lease: Option<Lease>,
    /// Completion/chat requests: prefix prediction and usage tap.
    pub inference: Option<Inference>,
    /// The request in the ledger's received balance.
    pub received: Received,
    /// The request in the ledger's admitted balance.
    pub admitted_entry: Admitted,
    /// The replica it went to, and its place in that replica's in-flight
    /// count; `None` only in unit tests.
    pub routed: Option<Routed>,
}

impl Exchange {
    /// Notes a body chunk on its way to the client.
    pub fn on_data(&mut self, data: &Bytes) {
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(Instant::now());
        }
        self.bytes += data.len() as u64;
        if let Some(inference) = &mut self.inference {
            inference.tap.push(data);
            if inference.sse && carries_tokens(data) {
                let now = Instant::now();
                match inference.last_token.replace(now) {
                    None => inference.first_token = Some(now),
                    Some(previous) => telemetry::hot()
                        .route(self.route)
                        .inter_token
                        .record((now - previous).as_secs_f64()),
                }
            }
        }
    }

    /// Logs, measures and reports the end of the request.
    pub fn finish(self, outcome: Outcome) {
        let now = Instant::now();
        if outcome == Outcome::Complete
            && let Some(lease) = self.lease
        {
            lease.release();
        }
        let ok = outcome == Outcome::Complete && self.status.is_success();
        let queue = self.admitted - self.arrived;
        let upstream = now - self.admitted;
        let ttfb = self.first_byte.map(|t| t - self.admitted);
        let outcome_label = match &outcome {
            Outcome::Complete if self.status.is_success() => "ok",
            Outcome::Complete => "upstream_error_status",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamFailed(_) => "upstream_stream_error",
            Outcome::Shutdown => "shutdown",
        };
        let (ending, admitted_ending) = match &outcome {
            Outcome::Complete => (Ending::Answered, AdmittedEnding::Completed),
            Outcome::ClientGone => (Ending::Cut, AdmittedEnding::ClientGone),
            Outcome::UpstreamFailed(_) | Outcome::Shutdown => (Ending::Cut, AdmittedEnding::Failed),
        };
        self.received.end(ending);
        self.admitted_entry.end(admitted_ending);
        let total = now - self.arrived;
        // Time to first token: the first text-bearing event of a stream; the
        // whole response otherwise.
        let ttft = self.inference.as_ref().and_then(|i| {
            if i.sse {
                i.first_token.map(|t| t - self.admitted)
            } else {
                ok.then_some(upstream)
            }
        });
        let (usage, predicted_cached) = match self.inference {
            Some(inference) => {
                let replica = self.routed.as_ref().map(Routed::replica);
                let (usage, predicted) = inference.finish(ok, replica.map(|r| &**r));
                (usage, Some(predicted))
            }
            None => (None, None),
        };
        let actual_cached = usage.and_then(|u| u.cached_tokens);
        match &outcome {
            Outcome::Shutdown => tracing::warn!(
                id = self.id, route = %self.route.label(), method = %self.method,
                status = self.status.as_u16(), outcome = %outcome_label,
                total_ms = ms(total), queue_ms = ms(queue), upstream_ms = ms(upstream),
                bytes = self.bytes, "request cut by shutdown at the drain timeout"
            ),
            Outcome::UpstreamFailed(why) => tracing::warn!(
                id = self.id, route = %self.route.label(), method = %self.method,
                status = self.status.as_u16(), outcome = %outcome_label,
                total_ms = ms(total), queue_ms = ms(queue), upstream_ms = ms(upstream),
                error = %why, "request"
            ),
            _ => tracing::info!(
                id = self.id, route = %self.route.label(), method = %self.method,
                status = self.status.as_u16(), outcome = %outcome_label,
                total_ms = ms(total), queue_ms = ms(queue), upstream_ms = ms(upstream),
                ttfb_ms = ttfb.map(ms), ttft_ms = ttft.map(ms), bytes = self.bytes,
                prompt_tokens = usage.map(|u| u.prompt_tokens),
                output_tokens = usage.map(|u| u.completion_tokens),
                predicted_cached, actual_cached,
                replica = self.routed.as_ref().map(|r| r.replica().name.as_str()),
                routed = self.routed.as_ref().map(|r| r.reason().label()), "request"
            ),
        }
        telemetry::record_request(&RequestRecord {
            route: self.route,
            outcome: outcome_label,
            total,
            queue,
            upstream: Some(upstream),
            ttfb,
            ttft,
        });
        if let Some(permit) = self.permit {
            permit.complete(ok, ttfb.unwrap_or_default(), upstream, usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::carries_tokens;

    #[test]
    fn only_text_bearing_chunks_count_as_tokens() {
        assert!(carries_tokens(
            br#"data: {"choices":[{"index":0,"text":"def"}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#
        ));
        assert!(!carries_tokens(
            br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!carries_tokens(
            br#"data: {"choices":[],"usage":{"prompt_tokens":3}}"#
        ));
        assert!(!carries_tokens(b"data: [DONE]"));
    }
}
