//! The forwarding path for client traffic: classify, admit, forward, stream
//! back. Every route is forwarded; completions and chat are parsed first and
//! go through admission when a policy is loaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::admission::{Admission, Permit, RequestInfo};
use crate::body::{BodyLimitExceeded, ProxyBody, full};
use crate::classify::{InferenceRequest, Prompt, Route};
use crate::error::ProxyError;
use crate::exchange::{Exchange, Inference};
use crate::headers::{self, Peer, Tenants};
use crate::intake::BodyBudget;
use crate::ledger::{self, AdmittedEnding, Ending, Received};
use crate::observed::ObservedBody;
use crate::prefix::{Prediction, PrefixTracker};
use crate::replicas::{Query, ReplicaSet};
use crate::stream_usage;
use crate::telemetry::{self, RequestRecord};
use crate::upstream::SendError;

/// Response header carrying Sluice's id for the request (as in its log line).
pub const REQUEST_ID_HEADER: &str = "x-sluice-request-id";

/// The client-facing service.
#[derive(Debug)]
pub struct Proxy {
    replicas: Arc<ReplicaSet>,
    admission: Option<Admission>,
    prefix: Arc<PrefixTracker>,
    /// Who a request's tenant is (the trust model and the key digests).
    tenants: Tenants,
    max_body: u64,
    body_budget: BodyBudget,
    next_id: AtomicU64,
}

/// Bodies larger than this are parsed (and their prefix looked up) on the
/// blocking pool, so one large token-id prompt never stalls the serving
/// thread's other connections.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Large bodies parsed at once: half the CPUs (at least one), so parsing
/// never takes every core from the serving threads; the others wait their
/// turn (their memory is already within `--body-memory`).
fn large_parse_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new((cpus / 2).max(1))
    })
}

impl Proxy {
    /// A proxy to `replicas`; `admission` is `None` for pass-through.
    pub fn new(
        replicas: Arc<ReplicaSet>,
        admission: Option<Admission>,
        prefix: Arc<PrefixTracker>,
        tenants: Tenants,
        max_body: u64,
        body_budget: BodyBudget,
    ) -> Self {
        Self {
            replicas,
            admission,
            prefix,
            tenants,
            max_body,
            body_budget,
            next_id: AtomicU64::new(1),
        }
    }

    /// Serves one client request; never fails (errors become OpenAI-shaped responses).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        client: &Peer,
    ) -> Response<ProxyBody> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let arrived = Instant::now();
        // Ends exactly once: here for Sluice's own answers, else with the
        // exchange (dropped with this future if the client leaves first).
        let mut received = Some(ledger::global().receive());
        let route = Route::of(request.method(), request.uri().path());
        let mut response = match request.uri().path() {
            "/healthz" => json_response(StatusCode::OK, r#"{"status":"ok"}"#),
            "/readyz" => self.readiness().await,
            _ => match self
                .forward(id, arrived, route, request, client, &mut received)
                .await
            {
                Ok(response) => response,
                Err(err) => {
                    log_refusal(id, route, arrived, &err);
                    if let Some(received) = received.take() {
                        received.end(Ending::Refused);
                    }
                    err.into_response()
                }
            },
        };
        if let Some(received) = received {
            received.end(Ending::Answered);
        }
        response
            .headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from(id));
        response
    }

    /// Ready while at least one replica is healthy and accepts a connection.
    async fn readiness(&self) -> Response<ProxyBody> {
        let all = self.replicas.all();
        for replica in all.iter().filter(|r| r.healthy()) {
            if replica.upstream.reachable().await {
                return json_response(StatusCode::OK, r#"{"status":"ready"}"#);
            }
        }
        {
            let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
            let body = crate::error::openai_error(
                &format!("no upstream is reachable ({})", names.join(", ")),
                "upstream_error",
                "upstream_unreachable",
            );
            json_response(StatusCode::SERVICE_UNAVAILABLE, &body.to_string())
        }
    }

    async fn forward(
        &self,
        id: u64,
        arrived: Instant,
        route: Route,
        request: Request<Incoming>,
        client: &Peer,
        received: &mut Option<Received>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.replicas.check_up()?;
        let (mut parts, body) = request.into_parts();
        let method = parts.method.clone();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body,
            });
        }

        let mut permit: Option<Permit> = None;
        let mut prediction: Option<Prediction> = None;
        let mut strip_usage = false;
        let body = if route.is_inference() {
            let (mut bytes, share) = self.body_budget.read(body, declared, self.max_body).await?;
            let (parsed, predicted) = self.parse_and_predict(route, bytes.clone()).await?;
            // Parsed: what the body holds now is the buffer being forwarded.
            drop(share);
            if parsed.stream
                && !parsed.include_usage
                && let Some(asking) = stream_usage::ask_for_usage(&bytes)
            {
                // Measure every stream: ask for usage, strip it on the way back.
                bytes = asking;
                strip_usage = true;
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            if let Some(admission) = &self.admission {
                let cached_by_replica = self.replicas.held_tokens(&predicted);
                let info = request_info(
                    &self.tenants,
                    &parts.headers,
                    &parsed,
                    &predicted,
                    cached_by_replica,
                )?;
                permit = Some(admission.admit(id, info).await?);
            }
            prediction = Some(predicted);
            full(bytes)
        } else {
            let limit = self.max_body;
            Limited::new(body, limit as usize)
                .map_err(move |e| {
                    if e.is::<LengthLimitError>() {
                        Box::new(BodyLimitExceeded(limit)) as crate::body::BoxError
                    } else {
                        e
                    }
                })
                .boxed_unsync()
        };
        let admitted = Instant::now();

        headers::strip_hop_by_hop(&mut parts.headers);
        headers::append_forwarded_for(&mut parts.headers, client);
        // Origin-form for the upstream; `Upstream::send` sets its `Host`.
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
        parts.version = Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, body);

        let admitted_entry = ledger::global().admit();
        let query = Query {
            prediction: prediction.as_ref(),
            named: permit.as_ref().and_then(Permit::replica),
        };
        let mut tried = Vec::new();
        let mut request = upstream_request;
        let (response, lease, routed) = loop {
            let routed = match self.replicas.choose(query, &tried) {
                Ok(routed) => routed,
                Err(err) => {
                    admitted_entry.end(AdmittedEnding::Failed);
                    return Err(err);
                }
            };
            let replica = routed.replica();
            match replica.upstream.send(request).await {
                Ok((response, lease)) => break (response, lease, routed),
                Err(SendError {
                    error,
                    unsent: Some(unsent),
                }) if self.replicas.all().len() > tried.len() + 1 => {
                    tracing::warn!(id, replica = %replica.name, error = %error, "not sent; trying another replica");
                    replica.failed_over();
                    tried.push(replica.id);
                    request = unsent;
                }
                Err(SendError { error, .. }) => {
                    admitted_entry.end(AdmittedEnding::Failed);
                    return Err(error);
                }
            }
        };
        let Some(received) = received.take() else {
            return Err(ProxyError::Internal("request ledger entry missing".into()));
        };
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let idle_timeout = routed.replica().upstream.idle_timeout();
        let exchange = Exchange {
            id,
            route,
            method,
            status: parts.status,
            arrived,
            admitted,
            first_byte: None,
            bytes: 0,
            permit,
            lease: Some(lease),
            inference: prediction.map(|prediction| {
                // The prediction for the replica it went to.
                let tracker = &routed.replica().prefix;
                let prediction = if Arc::ptr_eq(tracker, &self.prefix) {
                    prediction
                } else {
                    let held = routed
                        .held()
                        .unwrap_or_else(|| tracker.held_tokens(&prediction));
                    prediction.with_cached(held)
                };
                let hot = telemetry::hot();
                hot.prefix_query_tokens
                    .increment(u64::from(prediction.prompt_tokens));
                hot.prefix_hit_tokens
                    .increment(u64::from(prediction.cached_tokens));
                Inference::new(Arc::clone(tracker), prediction, sse)
            }),
            received,
            admitted_entry,
            routed: Some(routed),
        };
        let mut body = ObservedBody::new(body, idle_timeout, sse, exchange);
        if strip_usage && sse {
            if parts.headers.contains_key(header::CONTENT_ENCODING) {
                // Compressed events cannot be read; the client sees the extra event.
                tracing::debug!(id, "compressed stream: usage event left in place");
            } else {
                // The body shrinks by the usage event: no length may be promised.
                parts.headers.remove(header::CONTENT_LENGTH);
                body = body.strip_usage();
            }
        }
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    /// The typed view of `bytes` and its prefix prediction. A large body
    /// is parsed on the blocking pool; with `--tokenizer`, encoding a long
    /// text prompt takes milliseconds, so that runs there too. Meanwhile the
    /// serving thread goes on with its other connections.
    async fn parse_and_predict(
        &self,
        route: Route,
        bytes: Bytes,
    ) -> Result<(InferenceRequest, Prediction), ProxyError> {
        if bytes.len() <= INLINE_PARSE_BYTES {
            let parsed = InferenceRequest::parse(route, &bytes)?;
            if !self.prefix.tokenizes() || matches!(parsed.prompt, Prompt::Tokens(_)) {
                let predicted = self.prefix.lookup(&parsed.prompt);
                return Ok((parsed, predicted));
            }
            let prefix = Arc::clone(&self.prefix);
            return tokio::task::spawn_blocking(move || {
                let predicted = prefix.lookup(&parsed.prompt);
                (parsed, predicted)
            })
            .await
            .map_err(|e| ProxyError::Internal(format!("prefix prediction failed: {e}")));
        }
        let _slot = large_parse_slots()
            .acquire()
            .await
            .map_err(|_| ProxyError::Internal("parse slots closed".into()))?;
        let prefix = Arc::clone(&self.prefix);
        tokio::task::spawn_blocking(move || {
            let parsed = InferenceRequest::parse(route, &bytes)?;
            let predicted = prefix.lookup(&parsed.prompt);
            Ok((parsed, predicted))
        })
        .await
        .map_err(|e| ProxyError::Internal(format!("request parsing failed: {e}")))?
    }
}

/// What the policy is told about a request. With several replicas,
/// `cached_by_replica` holds each one's prediction and `cached-tokens` is
/// the best of them; with one, it is empty.
fn request_info(
    tenants: &Tenants,
    headers: &http::HeaderMap,
    parsed: &InferenceRequest,
    prediction: &Prediction,
    cached_by_replica: Vec<(u32, u32)>,
) -> Result<RequestInfo, ProxyError> {
    let best = cached_by_replica.iter().map(|&(_, held)| held).max();
    Ok(RequestInfo {
        tenant: tenants.of(headers, parsed.user.as_deref())?,
        model: parsed.model.clone(),
        prompt_tokens: prediction.prompt_tokens,
        max_tokens: parsed.max_tokens.unwrap_or(0),
        cached_tokens: best.unwrap_or(prediction.cached_tokens),
        prefix_group: prediction.prefix_group,
        priority: headers::priority(headers),
        cached_by_replica,
    })
}

fn json_response(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Logs and counts a request Sluice answered itself.
fn log_refusal(id: u64, route: Route, arrived: Instant, err: &ProxyError) {
    let total = arrived.elapsed();
    let status = err.status().as_u16();
    if err.status().is_server_error() {
        tracing::warn!(id, route = %route.label(), status, outcome = %err.code(), total_ms = crate::units::ms(total), error = %err, "request");
    } else {
        tracing::info!(id, route = %route.label(), status, outcome = %err.code(), total_ms = crate::units::ms(total), error = %err, "request");
    }
    telemetry::record_request(&RequestRecord {
        route,
        outcome: err.code(),
        total,
        queue: std::time::Duration::ZERO,
        upstream: None,
        ttfb: None,
        ttft: None,
    });
}
