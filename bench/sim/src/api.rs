//! The HTTP face of the simulator: vLLM's OpenAI routes with the field
//! names, SSE framing and error bodies of vLLM 0.32 (compared against the
//! real server by `tests/conformance.rs`).
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions`,
//! `GET /v1/models`, `GET /health`, `GET /metrics`.
//!
//! As vLLM does, a `max_tokens` above `max_model_len` is refused, a prompt
//! of `max_model_len` tokens or more is refused, and otherwise `max_tokens`
//! is clamped to the room left in the context.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::driver::{Sim, Submission};
use crate::engine::{NewSeq, TokenEvent, splitmix64};
use crate::profile::Profile;
use crate::tokenizer::{SimTokenizer, Tokenizer};

/// Response bodies: whole JSON or a live SSE stream.
pub type SimBody = UnsyncBoxBody<Bytes, Infallible>;

/// Serves the simulated vLLM on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    profile: Profile,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, profile, None, shutdown).await
}

/// [`serve`], counting tokens with `tokenizer` when given (whose
/// vocabulary then replaces the profile's).
pub async fn serve_with(
    listener: TcpListener,
    mut profile: Profile,
    tokenizer: Option<SimTokenizer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(vocab) = tokenizer.as_ref().and_then(SimTokenizer::vocab_size) {
        profile.engine.vocab_size = vocab;
    }
    let sim = Sim::new(profile);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(sim.clone().run({
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }));
    let app = match tokenizer {
        Some(t) => App::with_tokenizer(sim, t),
        None => App::new(sim),
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    eprintln!("sim: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
    let _ = stop_tx.send(true);
    let _ = engine.await;
    Ok(())
}

/// The request handler, independent of sockets (tests call it directly).
#[derive(Debug, Clone)]
pub struct App {
    sim: Sim,
    tokenizer: SimTokenizer,
}

/// An OpenAI-shaped error, as vLLM writes it.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn bad_request(message: String, param: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message,
            param: Some(param.to_string()),
        }
    }

    /// A request-validation failure (vLLM's pydantic errors).
    fn validation(message: String, param: &str) -> Self {
        Self {
            kind: "Bad Request",
            ..Self::bad_request(message, param)
        }
    }

    fn into_response(self) -> Response<SimBody> {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        json_response(self.status, &body)
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<SimBody> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn full(b: Bytes) -> SimBody {
    Full::new(b).boxed_unsync()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A validated generation request.
#[derive(Debug)]
struct Gen {
    kind: Kind,
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    stream: bool,
    include_usage: bool,
    seed: u64,
}

impl App {
    /// A handler for `sim`, counting with the simple tokenizer.
    pub fn new(sim: Sim) -> Self {
        let tokenizer = SimTokenizer::Simple(Tokenizer::new(sim.profile().engine.vocab_size));
        Self { sim, tokenizer }
    }

    /// A handler for `sim`, counting with `tokenizer`.
    pub fn with_tokenizer(sim: Sim, tokenizer: SimTokenizer) -> Self {
        Self { sim, tokenizer }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<SimBody> {
        let (parts, body) = req.into_parts();
        match (&parts.method, parts.uri.path()) {
            (&Method::GET, "/health") => Response::new(full(Bytes::new())),
            (&Method::GET, "/v1/models") => json_response(StatusCode::OK, &self.models()),
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(full(Bytes::from(self.sim.metrics_text())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::POST, path @ ("/v1/completions" | "/v1/chat/completions")) => {
                let kind = if path == "/v1/completions" {
                    Kind::Completion
                } else {
                    Kind::Chat
                };
                let bytes = match body.collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return Response::new(full(Bytes::new())),
                };
                match self.parse(kind, &bytes) {
                    Ok(g) => self.generate(g).await,
                    Err(e) => e.into_response(),
                }
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"})),
        }
    }

    fn models(&self) -> Value {
        let p = self.sim.profile();
        let created = unix_now();
        json!({"object": "list", "data": [{
            "id": p.model, "object": "model", "created": created, "owned_by": "vllm",
            "root": p.model, "parent": null, "max_model_len": p.engine.max_model_len,
            "permission": [{
                "id": format!("modelperm-{:016x}", splitmix64(created)),
                "object": "model_permission", "created": created,
                "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
                "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
                "organization": "*", "group": null, "is_blocking": false,
            }],
        }]})
    }

    fn parse(&self, kind: Kind, bytes: &[u8]) -> Result<Gen, ApiError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            // vLLM names the byte offset of the error: `body.<offset>`.
            let before: usize = bytes
                .split(|&b| b == b'\n')
                .take(e.line().saturating_sub(1))
                .map(|l| l.len() + 1)
                .sum();
            let param = format!("body.{}", before + e.column());
            ApiError::validation(
                format!(
                    "1 validation error:\n  {{'type': 'json_invalid', 'loc': '{param}', 'msg': 'JSON decode error', 'ctx': {{'error': \"{e}\"}}}}"
                ),
                &param,
            )
        })?;
        let Some(obj) = v.as_object() else {
            return Err(ApiError::validation(
                "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid dictionary or object to extract fields from'}".into(),
                "body",
            ));
        };
        let p = self.sim.profile();
        let model = obj.get("model").and_then(Value::as_str);
        if let Some(m) = model
            && m != p.model
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "NotFoundError",
                message: format!(
                    "The model `{m}` does not exist. Valid aliases: {}.",
                    p.model
                ),
                param: Some("model".into()),
            });
        }
        let text = match kind {
            Kind::Completion => match obj.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                _ => return Err(missing("prompt")),
            },
            Kind::Chat => {
                let Some(Value::Array(msgs)) = obj.get("messages") else {
                    return Err(missing("messages"));
                };
                let mut pairs = Vec::with_capacity(msgs.len());
                for m in msgs {
                    let role = m.get("role").and_then(Value::as_str);
                    let content = match m.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(parts)) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        _ => String::new(),
                    };
                    let Some(role) = role else {
                        return Err(missing("messages.role"));
                    };
                    pairs.push((role.to_string(), content));
                }
                Tokenizer::chat_prompt(pairs.iter().map(|(r, c)| (r.as_str(), c.as_str())))
            }
        };
        let prompt_tokens = self.tokenizer.encode(&text);
        let max_len = p.engine.max_model_len;
        let max_tokens = match obj
            .get("max_completion_tokens")
            .or_else(|| obj.get("max_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(n as usize),
                _ => {
                    return Err(ApiError::bad_request(
                        format!("max_tokens must be at least 1, got {v}."),
                        "max_tokens",
                    ));
                }
            },
        };
        if let Some(n) = max_tokens
            && n > max_len
        {
            return Err(ApiError::bad_request(
                format!(
                    "max_tokens={n} cannot be greater than max_model_len={max_len}. Please request fewer output tokens. (parameter=max_tokens, value={n})"
                ),
                "max_tokens",
            ));
        }
        if prompt_tokens.len() >= max_len {
            let n = prompt_tokens.len();
            return Err(ApiError::bad_request(
                format!(
                    "This model's maximum context length is {max_len} tokens. However, your prompt contains at least {n} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, value={n})"
                ),
                "input_tokens",
            ));
        }
        let room = max_len - prompt_tokens.len();
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let seed = obj.get("seed").and_then(Value::as_u64).unwrap_or(0);
        let mut prompt_seed = seed;
        for &t in &prompt_tokens {
            prompt_seed = splitmix64(prompt_seed ^ u64::from(t));
        }
        Ok(Gen {
            kind,
            max_tokens: max_tokens.unwrap_or(room).min(room),
            prompt_tokens,
            stream,
            include_usage,
            seed: prompt_seed,
        })
    }

    async fn generate(&self, g: Gen) -> Response<SimBody> {
        let prompt_len = g.prompt_tokens.len();
        let sub = self.sim.submit(NewSeq {
            prompt: g.prompt_tokens,
            max_tokens: g.max_tokens,
            seed: g.seed,
        });
        let (prefix, object) = match g.kind {
            Kind::Completion => ("cmpl", "text_completion"),
            Kind::Chat => ("chatcmpl", "chat.completion"),
        };
        let meta = Meta {
            id: format!("{prefix}-{:016x}", splitmix64(sub.id ^ unix_now())),
            created: unix_now(),
            model: self.sim.profile().model.clone(),
            kind: g.kind,
            prompt_len,
        };
        if g.stream {
            let body = SseBody {
                sub,
                meta,
                tokenizer: self.tokenizer.clone(),
                include_usage: g.include_usage,
                pending: VecDeque::new(),
                started: false,
                done: false,
            };
            let mut r = Response::new(body.boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            return r;
        }
        let mut sub = sub;
        let mut text = String::new();
        let mut completion = 0;
        let mut cached = 0;
        while let Some(ev) = sub.tokens.recv().await {
            text.push_str(&self.tokenizer.decode_token(ev.token));
            completion += 1;
            cached = ev.cached_tokens;
            if ev.finished.is_some() {
                sub.disarm();
                break;
            }
        }
        let usage = meta.usage(completion, cached, true);
        let body = match g.kind {
            Kind::Completion => json!({
                "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                "choices": [{
                    "index": 0, "text": text, "logprobs": null, "finish_reason": "length",
                    "stop_reason": null, "token_ids": null, "prompt_logprobs": null,
                    "prompt_token_ids": null, "routed_experts": null,
                }],
                "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
                "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null,
            }),
            Kind::Chat => json!({
                "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                "choices": [{
                    "index": 0,
                    "message": {
                        "role": "assistant", "content": text, "refusal": null,
                        "annotations": null, "audio": null, "function_call": null,
                        "reasoning": null,
                    },
                    "logprobs": null, "finish_reason": "length", "stop_reason": null,
                    "token_ids": null, "routed_experts": null,
                }],
                "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
                "prompt_logprobs": null, "prompt_token_ids": null, "prompt_text": null,
                "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null,
            }),
        };
        json_response(StatusCode::OK, &body)
    }
}

/// Says in every response that this is the simulator.
const FINGERPRINT: &str = "vllm-sim";

fn missing(field: &str) -> ApiError {
    ApiError::validation(
        format!(
            "1 validation error:\n  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required'}}"
        ),
        &format!("body.{field}"),
    )
}

#[derive(Debug)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_len: usize,
}

impl Meta {
    fn usage(&self, completion: usize, cached: usize, full_details: bool) -> Value {
        let details = match (self.kind, full_details) {
            (Kind::Completion, false) => json!({"cached_tokens": cached}),
            (Kind::Chat, false) => json!({"cached_tokens": cached, "created_cache_tokens": 0}),
            (Kind::Completion, true) => json!({
                "cached_tokens": cached, "created_cache_tokens": null, "multimodal_tokens": null,
            }),
            (Kind::Chat, true) => json!({
                "cached_tokens": cached, "created_cache_tokens": 0, "multimodal_tokens": null,
            }),
        };
        let mut u = json!({
            "prompt_tokens": self.prompt_len,
            "total_tokens": self.prompt_len + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
        });
        if full_details {
            u["completion_tokens_details"] = Value::Null;
        }
        u
    }

    /// One SSE chunk; vLLM's chat stream puts the prompt fields on the role
    /// chunk only.
    fn chunk(&self, choices: Value, prompt_fields: bool) -> Bytes {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices,
        });
        if prompt_fields {
            v["prompt_token_ids"] = Value::Null;
            v["prompt_text"] = Value::Null;
        }
        sse(&v)
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A streaming response: turns engine tokens into vLLM's SSE chunks as the
/// client reads them. Dropping it (client gone) aborts the sequence.
struct SseBody {
    sub: Submission,
    meta: Meta,
    tokenizer: SimTokenizer,
    include_usage: bool,
    pending: VecDeque<Bytes>,
    started: bool,
    done: bool,
}

impl SseBody {
    fn on_token(&mut self, ev: &TokenEvent) {
        let text = self.tokenizer.decode_token(ev.token);
        let finish = ev.finished.map(|f| f.as_str());
        let choice = match self.meta.kind {
            Kind::Completion => json!([{
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                "stop_reason": null, "prompt_token_ids": null, "token_ids": null,
            }]),
            Kind::Chat if finish.is_some() => json!([{
                "index": 0, "delta": {"content": text}, "logprobs": null,
                "finish_reason": finish, "stop_reason": null, "token_ids": null,
            }]),
            Kind::Chat => json!([{
                "index": 0, "delta": {"content": text}, "logprobs": null,
                "finish_reason": null, "token_ids": null,
            }]),
        };
        self.pending.push_back(self.meta.chunk(choice, false));
        if ev.finished.is_some() {
            if self.include_usage {
                let usage = self.meta.usage(ev.index + 1, ev.cached_tokens, false);
                let v = json!({
                    "id": self.meta.id,
                    "object": if self.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                    "created": self.meta.created, "model": self.meta.model, "choices": [],
                    "usage": usage, "system_fingerprint": FINGERPRINT,
                });
                self.pending.push_back(sse(&v));
            }
            self.pending
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.done = true;
            self.sub.disarm();
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if !this.started {
            this.started = true;
            if this.meta.kind == Kind::Chat {
                let role = json!([{
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                }]);
                let chunk = this.meta.chunk(role, true);
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        loop {
            if let Some(b) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.sub.tokens.poll_recv(cx) {
                Poll::Ready(Some(ev)) => this.on_token(&ev),
                // The engine dropped us: shutting down.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
