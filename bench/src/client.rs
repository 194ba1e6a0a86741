//! The bench's one HTTP/1.1 client. Every request a benchmark sends goes
//! through one connect–send path ([`Conn`]); what is read of the answer
//! depends on what the caller measures:
//!
//! - [`Conn::send`] reads an answer as [`Read`] says. [`Read::Usage`] (the
//!   workload runs) parses the engine's `usage`; a `text/event-stream`
//!   answer is read event by event ([`SseScan`]): the moment the first
//!   event carrying text arrives is the request's first token, the last
//!   `usage` event gives its tokens (or, without one, output tokens are the
//!   count of text-bearing events), and a stream that ends without
//!   `data: [DONE]` or with an `error` event is a failure. [`Read::Status`]
//!   (the overhead loops) drains the body unparsed: no client work beyond
//!   HTTP. Anything but a 2xx answer is a [`Failure`], named by its kind.
//! - [`Conn::fetch`] returns the status and the whole body, whatever the
//!   status ([`get`], [`post_json`] and [`metrics`]: `/v1/models`,
//!   `/metrics`, `/stats`, `/tokenize`).
//!
//! A [`Request`] carries its method, path, JSON body, deadline and any
//! extra headers (`X-Priority`, `X-Tenant`, …). A [`Conn`] is one
//! keep-alive connection with `TCP_NODELAY`, opened on first use (or at
//! once, [`Conn::open`]) and dropped after a failure, so the next request
//! opens a new one.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// How long a request may take, unless it says otherwise, before it counts
/// as a `timeout` failure.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a 2xx answer [`Conn::send`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// The whole body, unparsed.
    Status,
    /// The engine's `usage`, and a stream's first token.
    Usage,
}

/// One request to send.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) method: Method,
    /// Route path (and query).
    pub(crate) path: &'static str,
    /// JSON body; empty for none.
    pub(crate) body: Bytes,
    /// Headers besides `Content-Type` (e.g. `X-Priority`, `X-Tenant`); `Host`
    /// is `bench` unless set here.
    pub(crate) headers: HeaderMap,
    /// Limit on the whole exchange, connecting included; `None`: no limit.
    pub(crate) timeout: Option<Duration>,
    /// What [`Conn::send`] reads of the answer.
    pub(crate) read: Read,
}

impl Request {
    /// `POST path` with a JSON body; its usage is read, within [`REQUEST_TIMEOUT`].
    pub(crate) fn post(path: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            method: Method::POST,
            path,
            body: body.into(),
            headers: HeaderMap::new(),
            timeout: Some(REQUEST_TIMEOUT),
            read: Read::Usage,
        }
    }

    /// `GET path`, within [`REQUEST_TIMEOUT`].
    pub(crate) fn get(path: &'static str) -> Self {
        Self {
            method: Method::GET,
            ..Self::post(path, Bytes::new())
        }
    }

    /// With another limit on the whole exchange (`None`: no limit).
    pub(crate) fn timeout(mut self, limit: Option<Duration>) -> Self {
        self.timeout = limit;
        self
    }

    /// Reading `read` of the answer.
    pub(crate) fn read(mut self, read: Read) -> Self {
        self.read = read;
        self
    }

    /// With `Host: addr`, as a browser or curl sends it: the proxy's admin
    /// listener answers only to IP addresses and names it is given.
    fn host(mut self, addr: SocketAddr) -> Self {
        if let Ok(value) = http::HeaderValue::try_from(addr.to_string()) {
            self.headers.insert(HOST, value);
        }
        self
    }

    fn to_http(&self) -> http::Request<Full<Bytes>> {
        let mut builder = http::Request::builder()
            .method(self.method.clone())
            .uri(self.path);
        if !self.headers.contains_key(HOST) {
            builder = builder.header(HOST, "bench");
        }
        if !self.body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let mut request = builder
            .body(Full::new(self.body.clone()))
            .expect("valid request");
        for (name, value) in &self.headers {
            request.headers_mut().append(name, value.clone());
        }
        request
    }
}

/// What [`Conn::send`] read of a 2xx answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    /// `usage.completion_tokens` (streams without usage: text-bearing
    /// events; [`Read::Status`]: 0).
    pub(crate) output_tokens: u64,
    /// `usage.prompt_tokens`, when the answer had it.
    pub(crate) prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, when the engine reports it.
    pub(crate) cached_tokens: Option<u64>,
    /// When the first text-bearing SSE event arrived (streams only).
    pub(crate) first_token: Option<Instant>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The kind reports count: `http_429`, `http_503`, `connect`,
    /// `transport`, `timeout`, `bad_body`, `stream_error`, `stream_truncated`.
    pub(crate) kind: String,
    /// What a non-2xx answer said.
    pub(crate) body: Option<Bytes>,
}

impl Failure {
    fn of(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            body: None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind)?;
        match &self.body {
            Some(body) if !body.is_empty() => write!(f, ": {}", String::from_utf8_lossy(body)),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Failure {}

type Sender = http1::SendRequest<Full<Bytes>>;

/// One keep-alive connection to a target.
#[derive(Debug)]
pub(crate) struct Conn {
    addr: SocketAddr,
    /// `None` before the first request and after a failure: the next
    /// request connects.
    sender: Option<Sender>,
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

impl Conn {
    /// A connection to `addr`, opened on first use.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// A connection to `addr`, opened now (so that no request's time
    /// includes connecting, and a target that refuses fails here).
    pub(crate) async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            sender: Some(connect(addr).await?),
        })
    }

    /// Sends `request`; what [`Read`] asks of its 2xx answer, or why it failed.
    pub(crate) async fn send(&mut self, request: &Request) -> Result<Answer, Failure> {
        self.exchange(request, |response| read_answer(response, request.read))
            .await
    }

    /// Sends `request`; its answer's status and whole body, whatever the status.
    pub(crate) async fn fetch(&mut self, request: &Request) -> Result<(u16, Bytes), Failure> {
        self.exchange(request, |response| async move {
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| Failure::of("transport"))?
                .to_bytes();
            Ok((status, body))
        })
        .await
    }

    /// Sends `request` and reads its answer with `read`, within the
    /// request's timeout; after a failure the connection is dropped.
    async fn exchange<T, F, Fut>(&mut self, request: &Request, read: F) -> Result<T, Failure>
    where
        F: FnOnce(hyper::Response<Incoming>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let exchange = async {
            let response = self.start(request).await?;
            read(response).await
        };
        let result = match request.timeout {
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or_else(|_| Err(Failure::of("timeout"))),
            None => exchange.await,
        };
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    /// Connects when needed and sends `request`: its answer's head.
    async fn start(&mut self, request: &Request) -> Result<hyper::Response<Incoming>, Failure> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(
                connect(self.addr)
                    .await
                    .map_err(|_| Failure::of("connect"))?,
            );
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await.map_err(|_| Failure::of("transport"))?;
        sender
            .send_request(request.to_http())
            .await
            .map_err(|_| Failure::of("transport"))
    }
}

/// Reads an answer as `read` says: a 2xx one into an [`Answer`], any other
/// into a [`Failure`] with its body.
async fn read_answer(response: hyper::Response<Incoming>, read: Read) -> Result<Answer, Failure> {
    let status = response.status();
    let streamed = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = response.into_body();
    let transport = |_| Failure::of("transport");
    if !status.is_success() {
        let text = body.collect().await.map_err(transport)?.to_bytes();
        return Err(Failure {
            kind: format!("http_{}", status.as_u16()),
            body: Some(text),
        });
    }
    if read == Read::Status {
        body.collect().await.map_err(transport)?;
        return Ok(Answer::default());
    }
    if !streamed {
        let body = body.collect().await.map_err(transport)?.to_bytes();
        return json_usage(&body).ok_or_else(|| Failure::of("bad_body"));
    }
    let mut scan = SseScan::default();
    let mut first_token = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(transport)?;
        if let Some(data) = frame.data_ref()
            && scan.push(data)
            && first_token.is_none()
        {
            first_token = Some(Instant::now());
        }
    }
    let output_tokens = scan.finish().map_err(Failure::of)?;
    Ok(Answer {
        output_tokens,
        prompt_tokens: scan.prompt_tokens,
        cached_tokens: scan.cached_tokens,
        first_token,
    })
}

/// An OpenAI SSE stream, read incrementally: completions carry text in
/// `choices[].text`, chat in `choices[].delta.content`; vLLM's first chat
/// event (the role, with empty content) and its usage event carry none.
#[derive(Debug, Default)]
pub(crate) struct SseScan {
    /// Bytes of an event not yet terminated by a blank line.
    pending: Vec<u8>,
    /// Events with text so far.
    pub(crate) content_events: u64,
    /// `usage.completion_tokens` of the last event that had it.
    pub(crate) usage_tokens: Option<u64>,
    /// `usage.prompt_tokens` of that event.
    pub(crate) prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens` of that event.
    pub(crate) cached_tokens: Option<u64>,
    /// `data: [DONE]` seen.
    pub(crate) done: bool,
    /// An event with an `error` field (or unparsable JSON) seen.
    pub(crate) failed: bool,
}

impl SseScan {
    /// Feeds a chunk; true when it completed the stream's first text-bearing event.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> bool {
        let before = self.content_events;
        self.pending.extend_from_slice(chunk);
        while let Some((end, sep)) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end + sep).take(end).collect();
            self.on_event(&event);
        }
        before == 0 && self.content_events > 0
    }

    fn on_event(&mut self, event: &[u8]) {
        let text = String::from_utf8_lossy(event);
        // One event's data lines, joined with newlines (the SSE rule).
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return;
        }
        let data = data.join("\n");
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
            self.failed = true;
            return;
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.failed = true;
        }
        let usage = &v["usage"];
        if let Some(n) = usage["completion_tokens"].as_u64() {
            self.usage_tokens = Some(n);
            self.prompt_tokens = usage["prompt_tokens"].as_u64();
            self.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"].as_u64();
        }
        let has_text = v["choices"].as_array().is_some_and(|choices| {
            choices.iter().any(|c| {
                [&c["text"], &c["delta"]["content"]]
                    .iter()
                    .any(|t| t.as_str().is_some_and(|t| !t.is_empty()))
            })
        });
        if has_text {
            self.content_events += 1;
        }
    }

    /// The stream's output tokens once it has ended, or why it failed.
    pub(crate) fn finish(&self) -> Result<u64, String> {
        if self.failed {
            Err("stream_error".into())
        } else if !self.done {
            Err("stream_truncated".into())
        } else {
            Ok(self.usage_tokens.unwrap_or(self.content_events))
        }
    }
}

/// The end of the first complete event in `buf` and its separator's length.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\n\n") {
            Some((i, 2))
        } else if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })
}

/// The `usage` of a JSON answer (no `usage`: 0 output tokens); `None`
/// when the body is not such an answer.
fn json_usage(body: &[u8]) -> Option<Answer> {
    #[derive(serde::Deserialize)]
    struct Details {
        cached_tokens: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Usage {
        completion_tokens: u64,
        prompt_tokens: Option<u64>,
        prompt_tokens_details: Option<Details>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<Usage>,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    Some(body.usage.map_or_else(Answer::default, |u| Answer {
        output_tokens: u.completion_tokens,
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
        first_token: None,
    }))
}

/// `http://host:port[/...]` → the socket address.
pub(crate) async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    tokio::net::lookup_host(&hostport)
        .await?
        .next()
        .with_context(|| format!("{url}: no address"))
}

/// `GET path` on `addr` over a fresh connection, within 10 s: the status
/// and body.
pub(crate) async fn get(addr: SocketAddr, path: &'static str) -> anyhow::Result<(u16, Bytes)> {
    let request = Request::get(path)
        .host(addr)
        .timeout(Some(Duration::from_secs(10)));
    Ok(Conn::new(addr).fetch(&request).await?)
}

/// `POST path` without a body on `addr` over a fresh connection, within
/// 10 s: the status and body.
pub(crate) async fn post(addr: SocketAddr, path: &'static str) -> anyhow::Result<(u16, Bytes)> {
    let request = Request::post(path, Bytes::new())
        .host(addr)
        .timeout(Some(Duration::from_secs(10)));
    Ok(Conn::new(addr).fetch(&request).await?)
}

/// `GET /metrics` on `addr` (an engine, or the proxy's admin): its text,
/// when it answers 200.
pub(crate) async fn metrics(addr: SocketAddr) -> Option<String> {
    match get(addr, "/metrics").await {
        Ok((200, body)) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// `POST path` with a JSON body on `addr` over a fresh connection, within
/// 60 s: the status and body.
pub(crate) async fn post_json(
    addr: SocketAddr,
    path: &'static str,
    body: &serde_json::Value,
) -> anyhow::Result<(u16, Bytes)> {
    let request = Request::post(path, serde_json::to_vec(body)?)
        .host(addr)
        .timeout(Some(Duration::from_secs(60)));
    Ok(Conn::new(addr).fetch(&request).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_tokens(body: &[u8]) -> Option<u64> {
        json_usage(body).map(|a| a.output_tokens)
    }

    #[test]
    fn usage_is_read_from_the_answer() {
        assert_eq!(
            output_tokens(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":7}}"#),
            Some(7)
        );
        assert_eq!(output_tokens(br#"{"id":"x"}"#), Some(0));
        assert_eq!(output_tokens(b"not json"), None);
        let a = json_usage(
            br#"{"usage":{"prompt_tokens":240,"completion_tokens":8,"prompt_tokens_details":{"cached_tokens":224}}}"#,
        );
        assert_eq!(
            a.map(|a| (a.prompt_tokens, a.cached_tokens)),
            Some((Some(240), Some(224)))
        );
    }

    const COMPLETION: &str = "data: {\"choices\":[{\"index\":0,\"text\":\"He\"}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"text\":\"llo\",\"finish_reason\":\"length\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn the_first_token_is_the_first_event_with_text() {
        // Split at every byte boundary: the first token is reported once,
        // by the chunk that completes the first text-bearing event.
        let bytes = COMPLETION.as_bytes();
        let first_end = COMPLETION.find("\n\n").unwrap() + 2;
        for cut in 1..bytes.len() {
            let mut scan = SseScan::default();
            let a = scan.push(&bytes[..cut]);
            let b = scan.push(&bytes[cut..]);
            assert_eq!((a, b), (cut >= first_end, cut < first_end), "cut {cut}");
            assert_eq!(scan.content_events, 2);
            assert_eq!(scan.finish(), Ok(2));
        }
    }

    #[test]
    fn chat_role_and_usage_events_carry_no_text() {
        let mut scan = SseScan::default();
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n";
        assert!(!scan.push(role.as_bytes()));
        assert!(!scan.push(b": a comment\n\n"));
        assert!(scan.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"));
        assert!(!scan.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\n"));
        assert_eq!(scan.finish(), Err("stream_truncated".into()));
        assert!(!scan.push(b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":5}}\n\n"));
        scan.push(b"data: [DONE]\n\n");
        // The engine's usage, not the event count.
        assert_eq!(scan.finish(), Ok(5));
    }

    #[test]
    fn the_last_usage_event_gives_prompt_and_cached_tokens() {
        let mut scan = SseScan::default();
        scan.push(COMPLETION.as_bytes());
        assert_eq!((scan.prompt_tokens, scan.cached_tokens), (Some(9), None));
        let mut scan = SseScan::default();
        scan.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n");
        scan.push(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2048,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":2032}}}\n\ndata: [DONE]\n\n");
        assert_eq!(scan.finish(), Ok(2));
        assert_eq!(
            (scan.prompt_tokens, scan.cached_tokens),
            (Some(2048), Some(2032))
        );
    }

    /// An upstream on 127.0.0.1:0 that answers every request with `answer`
    /// (status, content type, body) and reports each request's headers.
    async fn upstream(
        answer: (u16, &'static str, &'static str),
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<HeaderMap>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(req.headers().clone());
                        let _ = req.into_body().collect().await;
                        let (status, content_type, body) = answer;
                        http::Response::builder()
                            .status(status)
                            .header(CONTENT_TYPE, content_type)
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn extra_headers_are_sent_and_streams_timed() {
        let (addr, mut seen) = upstream((200, "text/event-stream", COMPLETION)).await;
        let mut request = Request::post("/v1/completions", r#"{"stream":true}"#);
        for (name, value) in [("x-priority", "2"), ("x-tenant", "a")] {
            request
                .headers
                .insert(name, http::HeaderValue::from_static(value));
        }
        let mut conn = Conn::new(addr);
        let sent = Instant::now();
        let answer = conn.send(&request).await.unwrap();
        assert_eq!(answer.output_tokens, 2);
        assert_eq!(answer.prompt_tokens, Some(9));
        assert!(answer.first_token.is_some_and(|t| t >= sent));
        let headers = seen.recv().await.unwrap();
        assert_eq!(headers["x-priority"], "2");
        assert_eq!(headers["x-tenant"], "a");
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        assert_eq!(headers[HOST], "bench");
        // Status only: nothing parsed; the connection is reused.
        let answer = conn.send(&request.clone().read(Read::Status)).await;
        assert_eq!(answer, Ok(Answer::default()));
        assert!(seen.recv().await.unwrap().contains_key("x-tenant"));
        // The admin helpers name the address in `Host`, as curl does.
        let answer = conn.send(&request.host(addr).read(Read::Status)).await;
        assert_eq!(answer, Ok(Answer::default()));
        let headers = seen.recv().await.unwrap();
        assert_eq!(headers.get_all(HOST).iter().count(), 1);
        assert_eq!(headers[HOST], addr.to_string().as_str());
    }

    #[tokio::test]
    async fn other_statuses_fail_with_their_body_and_fetch_returns_them() {
        let (addr, _seen) = upstream((429, "application/json", r#"{"error":"busy"}"#)).await;
        let failure = Conn::new(addr)
            .send(&Request::post("/v1/completions", "{}"))
            .await
            .unwrap_err();
        assert_eq!(failure.kind, "http_429");
        assert_eq!(failure.to_string(), r#"http_429: {"error":"busy"}"#);
        let (status, body) = get(addr, "/metrics").await.unwrap();
        assert_eq!((status, &body[..]), (429, &br#"{"error":"busy"}"#[..]));
        let refused = Conn::new(closed_port().await)
            .send(&Request::get("/health"))
            .await;
        assert_eq!(refused.unwrap_err().kind, "connect");
    }

    /// A port nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[test]
    fn streams_without_usage_count_text_events_and_errors_fail() {
        let mut scan = SseScan::default();
        scan.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\ndata: [DONE]\n\n");
        assert_eq!(scan.finish(), Ok(2));
        let mut scan = SseScan::default();
        scan.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"error\":{\"message\":\"upstream died\"}}\n\n");
        assert_eq!(scan.finish(), Err("stream_error".into()));
    }
}
