//! Upstreams written in the tests: a well-behaved echo server that counts
//! what reaches it, and raw-TCP servers that misbehave on purpose.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the echo upstream has seen.
#[derive(Default)]
pub struct Seen {
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub total: AtomicUsize,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    /// (arrival time, the request's `x-test-id` header or "").
    pub arrivals: Mutex<Vec<(Instant, String)>>,
    /// Responses sent whole (their bodies handed over to the connection).
    pub completed: AtomicUsize,
    /// For each arrival, in order: how many responses had been completed.
    pub completed_at_arrival: Mutex<Vec<usize>>,
}

impl Seen {
    /// Every arrival's time, earliest first.
    fn arrival_times(&self) -> Vec<Instant> {
        let mut times: Vec<Instant> = self
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect();
        times.sort();
        times
    }

    /// Notes an arrival: its time and tag, and the responses completed so far.
    fn arrive(&self, tag: String) {
        let mut arrivals = self.arrivals.lock().unwrap();
        self.completed_at_arrival
            .lock()
            .unwrap()
            .push(self.completed.load(Ordering::SeqCst));
        arrivals.push((Instant::now(), tag));
    }

    /// Arrivals grouped into waves of `size` by what had been completed when
    /// each arrived: request `j` is in wave `completed / size`. A policy that
    /// lets a wave in only once the one before has been answered whole
    /// (gather semantics) makes every group `size` exactly, however the
    /// machine's scheduling spreads one wave's arrivals in time: a wave-k
    /// request arrives after the k·size answers before it and before any
    /// later wave's. A request let in early lands in an earlier group.
    pub fn waves_by_completions(&self, size: usize) -> Vec<usize> {
        let mut sizes: Vec<usize> = Vec::new();
        for &completed in self.completed_at_arrival.lock().unwrap().iter() {
            let wave = completed / size.max(1);
            if sizes.len() <= wave {
                sizes.resize(wave + 1, 0);
            }
            sizes[wave] += 1;
        }
        sizes
    }

    /// Sizes of the clusters that arrivals form, in time order: a gap of at
    /// least `gap` between two arrivals starts a new cluster (a new wave).
    pub fn arrival_clusters(&self, gap: Duration) -> Vec<usize> {
        let times = self.arrival_times();
        let mut clusters = Vec::new();
        let mut previous: Option<Instant> = None;
        for t in times {
            match previous {
                Some(p) if t - p < gap => *clusters.last_mut().unwrap() += 1,
                _ => clusters.push(1),
            }
            previous = Some(t);
        }
        clusters
    }
}

/// A well-behaved OpenAI-ish upstream. Request headers steer it:
/// `x-test-delay-ms` delays the answer (or each SSE chunk), `x-test-status`
/// sets the status. Every response echoes the path, headers and body it got.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl EchoUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = service_fn(move |req| echo(Arc::clone(&state), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

struct InFlight(Arc<Seen>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn echo(seen: Arc<Seen>, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    seen.total.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(Arc::clone(&seen));
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    seen.arrive(header("x-test-id").unwrap_or_default());
    let delay = Duration::from_millis(
        header("x-test-delay-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let status: u16 = header("x-test-status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let parsed: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let stream = parsed["stream"].as_bool().unwrap_or(false);
    // Like vLLM: every chunk says `"usage":null`; a last event with empty
    // `choices` carries the counts only when the request asked for it.
    let include_usage = parsed["stream_options"]["include_usage"] == true;

    if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let _guard = guard;
            for i in 0..3 {
                tokio::time::sleep(delay).await;
                let chunk = serde_json::json!({"id":"cmpl-echo","object":"text_completion","choices":[{"index":0,"text":format!("tok{i} ")}],"usage":null});
                if tx
                    .send(Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n")))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if include_usage {
                let usage = serde_json::json!({"id":"cmpl-echo","object":"text_completion","choices":[],
                    "usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}});
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(format!("data: {usage}\n\n")))))
                    .await;
            }
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                .await;
        });
        let body = StreamBody::new(tokio_stream_from(rx)).boxed();
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap();
        return Ok(response);
    }
    tokio::time::sleep(delay).await;
    drop(guard);
    let reply = if status == 200 {
        serde_json::json!({
            "id": "cmpl-echo", "object": "text_completion",
            "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            "echo": {"path": path, "headers": headers, "body": String::from_utf8_lossy(&body)},
        })
    } else {
        serde_json::json!({"error": {"message": "upstream says no", "type": "NotFoundError", "code": status}})
    };
    Ok(Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .header("connection", "keep-alive")
        .header("keep-alive", "timeout=5")
        .header("x-upstream", "echo")
        .body(Full::new(Bytes::from(reply.to_string())).boxed())
        .unwrap())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A port with nothing listening on it (connections are refused).
pub async fn refusing() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Accepts connections, reads the request and never answers. Counts
/// connections that the peer (the proxy) closed.
pub struct Hanging {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub closed_by_peer: Arc<AtomicUsize>,
}

pub async fn hanging() -> Hanging {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    Hanging {
        addr,
        accepted,
        closed_by_peer: closed,
    }
}

/// A raw TCP server on 127.0.0.1:0 that runs `serve` for each connection.
pub async fn raw_server<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// Answers every connection with `response` (raw bytes), then closes it.
pub async fn scripted(response: &'static [u8], then_wait: Duration) -> SocketAddr {
    raw_server(move |mut stream| async move {
        let mut buf = [0u8; 8192];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(response).await;
        let _ = stream.flush().await;
        tokio::time::sleep(then_wait).await;
        // dropped: the connection closes
    })
    .await
}

/// Reads one whole request (headers, then Content-Length bytes) from
/// `stream`; `None` when the peer closes first. Reading it all makes a
/// close that follows a FIN, not a reset over unread bytes.
pub async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Some(request);
            }
        }
    }
}

/// Serves one request per connection with a keep-alive `200 {}` and then
/// closes the connection cleanly, as a server's keep-alive timeout does.
pub async fn one_request_per_connection() -> SocketAddr {
    raw_server(|mut stream| async move {
        if read_request(&mut stream).await.is_none() {
            return;
        }
        let reply =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let _ = stream.write_all(reply).await;
        let _ = stream.shutdown().await;
    })
    .await
}

/// Answers the first request it reads with a keep-alive `200 {}`; every
/// later one is read whole and its connection closed without an answer,
/// as an upstream that dies just as a request arrives. `requests` counts
/// the requests read whole.
pub struct AnswersOnce {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

pub async fn answers_once() -> AnswersOnce {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    let addr = raw_server(move |mut stream| {
        let counter = Arc::clone(&counter);
        async move {
            while read_request(&mut stream).await.is_some() {
                if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                    let _ = stream.shutdown().await;
                    return;
                }
                let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                if stream.write_all(reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    AnswersOnce { addr, requests }
}

/// An SSE upstream that sends its first token event at once and the rest
/// (two more, then `[DONE]`) only when the test opens `gate`: a first
/// event that reaches the client before then was relayed unbuffered.
pub async fn gated_stream(gate: Arc<tokio::sync::Notify>) -> SocketAddr {
    raw_server(move |mut stream| {
        let gate = Arc::clone(&gate);
        async move {
            if read_request(&mut stream).await.is_none() {
                return;
            }
            let event = |i: usize| {
                let data = format!(
                    "data: {{\"id\":\"cmpl-gated\",\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":\"tok{i} \"}}],\"usage\":null}}\n\n"
                );
                format!("{:x}\r\n{data}\r\n", data.len())
            };
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let first = format!("{head}{}", event(0));
            if stream.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            gate.notified().await;
            let done = "data: [DONE]\n\n";
            let rest = format!(
                "{}{}{:x}\r\n{done}\r\n0\r\n\r\n",
                event(1),
                event(2),
                done.len()
            );
            let _ = stream.write_all(rest.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}

/// A pass-through between the proxy and a real upstream that counts what
/// crosses it: requests in flight (until the response body has been relayed
/// whole), the most at once, and arrival times.
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl CountingRelay {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Incoming>();
        let target: http::Uri = target.parse().unwrap();
        let state = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (state, client, target) = (Arc::clone(&state), client.clone(), target.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |mut req: Request<Incoming>| {
                        let (state, client, target) =
                            (Arc::clone(&state), client.clone(), target.clone());
                        async move {
                            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            state.max_in_flight.fetch_max(now, Ordering::SeqCst);
                            state.total.fetch_add(1, Ordering::SeqCst);
                            let tag = req
                                .headers()
                                .get("x-test-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            state.arrive(tag);
                            let guard = InFlight(Arc::clone(&state));
                            let pq = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            *req.uri_mut() = format!("http://{}{pq}", target.authority().unwrap())
                                .parse()
                                .unwrap();
                            let response = client.request(req).await.unwrap();
                            let (parts, body) = response.into_parts();
                            // Keep the in-flight guard until the body has been relayed.
                            let body = body.map_frame(move |f| {
                                let _ = &guard;
                                f
                            });
                            Ok::<_, Infallible>(Response::from_parts(parts, body))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
