//! End-to-end tests of the proxy binary against upstreams written here:
//! forwarding rules, input errors, and every way an upstream can fail.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::upstream::{
    EchoUpstream, Hanging, answers_once, gated_stream, hanging, one_request_per_connection,
    read_request, refusing, scripted,
};
use common::{ProxyProcess, post_json, raw_post, send, wait_until};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn completion(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"model": "m", "prompt": "hello", "max_tokens": 4});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn assert_openai_error(reply: &common::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
}

#[tokio::test]
async fn forwards_any_route_and_rewrites_hop_headers() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let reply = send(
        Method::POST,
        &format!("{}/tokenize?verbose=1", proxy.url()),
        &[
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("te", "trailers"),
            ("x-forwarded-for", "203.0.113.9"),
            ("authorization", "Bearer sk-test"),
            ("x-custom", "kept"),
        ],
        Bytes::from_static(b"{\"prompt\":\"x\"}"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let echo = &reply.json()["echo"];
    assert_eq!(echo["path"], "/tokenize?verbose=1");
    assert_eq!(echo["body"], "{\"prompt\":\"x\"}");
    let seen = echo["headers"].as_object().unwrap();
    assert!(
        !seen.contains_key("x-hop") && !seen.contains_key("te"),
        "{seen:?}"
    );
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["authorization"], "Bearer sk-test");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["host"], upstream.addr.to_string());
    // Response: upstream headers kept, hop-by-hop ones dropped, our id added.
    assert_eq!(reply.headers["x-upstream"], "echo");
    assert!(reply.headers.get("keep-alive").is_none());
    assert!(reply.headers.get("x-sluice-request-id").is_some());
    for path in ["/v1/models", "/version", "/v1/embeddings"] {
        let r = send(
            Method::GET,
            &format!("{}{path}", proxy.url()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["echo"]["path"], path);
    }
}

#[tokio::test]
async fn completion_bytes_are_forwarded_unchanged() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    // Odd spacing and key order must survive: the proxy parses but forwards the original bytes.
    let raw = "{ \"prompt\" : \"hi\",\n \"model\":\"m\",  \"max_tokens\": 2 }";
    let reply = send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[("content-type", "application/json")],
        Bytes::from_static(raw.as_bytes()),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["echo"]["body"], raw);
    assert_eq!(reply.json()["usage"]["total_tokens"], 4);
    // The engine's usage is read on the way through.
    let counted = wait_until(Duration::from_secs(5), || async {
        proxy.metric("sluice_output_tokens_total").await == 1.0
    })
    .await;
    assert!(
        counted,
        "output tokens not counted: {}",
        proxy.metrics().await
    );
    assert_eq!(proxy.metric("sluice_prompt_tokens_total").await, 3.0);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let reply = send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[
            ("x-test-status", "404"),
            ("content-type", "application/json"),
        ],
        Bytes::from(completion(json!({})).to_string()),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["message"], "upstream says no");
    assert_eq!(reply.json()["error"]["type"], "NotFoundError");
}

#[tokio::test]
async fn bad_json_and_wrong_types_are_400_and_never_forwarded() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let url = format!("{}/v1/completions", proxy.url());
    let reply = send(
        Method::POST,
        &url,
        &[],
        Bytes::from_static(b"{\"prompt\": "),
    )
    .await;
    assert_openai_error(&reply, 400, "invalid_request");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let reply = post_json(&url, &completion(json!({"max_tokens": "many"}))).await;
    assert_openai_error(&reply, 400, "invalid_request");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let chat = format!("{}/v1/chat/completions", proxy.url());
    let reply = post_json(&chat, &json!({"model": "m", "messages": "hi"})).await;
    assert_openai_error(&reply, 400, "invalid_request");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 0);
    let counted = proxy
        .metric("sluice_requests_total{outcome=\"invalid_request\"}")
        .await;
    assert_eq!(counted, 3.0);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &["--max-body", "1KiB"]);
    let big = "x".repeat(2000);
    let reply = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &completion(json!({"prompt": big})),
    )
    .await;
    assert_openai_error(&reply, 413, "body_too_large");

    // A chunked body (no Content-Length) on a streamed route is cut off at the limit too.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /tokenize HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 1500, "y".repeat(1500));
    conn.write_all(chunk.as_bytes()).await.unwrap();
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("body_too_large"), "{response}");
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"body_too_large\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn refused_upstream_is_502_then_503_with_retry_after() {
    let dead = refusing().await;
    let proxy = ProxyProcess::start(&format!("http://{dead}"), &[]);
    let url = format!("{}/v1/completions", proxy.url());
    let first = post_json(&url, &completion(json!({}))).await;
    assert_openai_error(&first, 502, "upstream_unreachable");
    let second = post_json(&url, &completion(json!({}))).await;
    assert_openai_error(&second, 503, "upstream_down");
    assert_eq!(second.headers["retry-after"], "1");
    let ready = send(
        Method::GET,
        &format!("{}/readyz", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(ready.status, 503);
    let alive = send(
        Method::GET,
        &format!("{}/healthz", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(alive.status, 200);
}

#[tokio::test]
async fn upstream_that_comes_back_is_used_again() {
    // Reserve a port, start the proxy against it while nothing listens, then listen.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &[]);
    let url = format!("{}/v1/models", proxy.url());
    assert_eq!(send(Method::GET, &url, &[], Bytes::new()).await.status, 502);
    let upstream = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let back = wait_until(Duration::from_secs(10), || async {
        send(Method::GET, &url, &[], Bytes::new()).await.status == StatusCode::OK
    })
    .await;
    assert!(back, "the proxy never noticed the upstream came back");
}

#[tokio::test]
async fn hanging_upstream_is_504() {
    let upstream = hanging().await;
    let proxy = ProxyProcess::start(
        &format!("http://{}", upstream.addr),
        &["--upstream-timeout", "300ms"],
    );
    let reply = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &completion(json!({})),
    )
    .await;
    assert_openai_error(&reply, 504, "upstream_timeout");
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"upstream_timeout\"}")
            .await,
        1.0
    );
}

/// Sends a completion through `proxy` on a connection of its own, waits
/// until it has reached the hanging `upstream`, then closes the connection:
/// a client that leaves while the engine works.
async fn leave_once_the_upstream_has_it(proxy: &ProxyProcess, upstream: &Hanging) {
    let conn = raw_post(
        proxy.addr,
        "/v1/completions",
        &completion(json!({})).to_string(),
    )
    .await;
    let reached = wait_until(Duration::from_secs(10), || async {
        upstream.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(reached, "request never reached the upstream");
    drop(conn);
}

#[tokio::test]
async fn client_disconnect_aborts_the_upstream_request() {
    let upstream = hanging().await;
    let proxy = ProxyProcess::start(&format!("http://{}", upstream.addr), &[]);
    leave_once_the_upstream_has_it(&proxy, &upstream).await;
    let aborted = wait_until(Duration::from_secs(10), || async {
        upstream.closed_by_peer.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        aborted,
        "the upstream connection stayed open after the client left"
    );
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_with_an_sse_error() {
    const PARTIAL: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
1d\r\ndata: {\"choices\":[{\"i\":0}]}\n\n\r\n";
    let addr = scripted(PARTIAL, Duration::from_millis(50)).await;
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &[]);
    let reply = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &completion(json!({"stream": true})),
    )
    .await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    assert!(
        text.starts_with("data: {\"choices\":[{\"i\":0}]}\n\n"),
        "{text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("data: {\"error\""), "last event: {last}");
    assert!(last.contains("upstream_stream_error"), "{last}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"upstream_stream_error\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn malformed_upstream_bytes_are_502() {
    let addr = scripted(b"this is not http\r\n\r\n", Duration::ZERO).await;
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &[]);
    let reply = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &completion(json!({})),
    )
    .await;
    assert_openai_error(&reply, 502, "upstream_bad_response");
}

#[tokio::test]
async fn upstream_connections_are_reused_across_requests() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &["--workers", "2"]);
    let url = format!("{}/v1/completions", proxy.url());
    for _ in 0..10 {
        let reply = post_json(&url, &completion(json!({}))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Each request comes on a new client connection, and the two serving
    // threads take client connections in turn. Each thread keeps its own
    // upstream connections and, one request after another, reuses its one.
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 10);
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_upstream_connections_are_not_reused_past_the_keepalive() {
    // An upstream closes a connection idle for its own keep-alive timeout
    // (vLLM: 5 s); a request written just then fails after it has left. So
    // a connection idle for `--upstream-keepalive` is closed, not reused.
    // (Reuse within the keep-alive: `upstream_connections_are_reused_across_requests`.)
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--workers", "1", "--upstream-keepalive", "300ms"],
    );
    let url = format!("{}/v1/completions", proxy.url());
    let reply = post_json(&url, &completion(json!({}))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 1);
    // The idle time that has to pass is the condition itself; a slower
    // machine only makes the connection idle for longer.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply = post_json(&url, &completion(json!({}))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 2);
    assert_eq!(
        upstream.seen.connections.load(Ordering::SeqCst),
        2,
        "the idle connection was reused past --upstream-keepalive"
    );
}

#[tokio::test]
async fn upstream_that_closes_idle_connections_loses_no_request() {
    // Each connection answers one request with a keep-alive response and is
    // then closed by the upstream, as a server's keep-alive timeout does.
    let addr = one_request_per_connection().await;
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &[]);
    let url = format!("{}/v1/completions", proxy.url());
    for i in 0..5 {
        let reply = post_json(&url, &completion(json!({}))).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
}

// Multi-threaded: `ProxyProcess::start` blocks its thread while the proxy
// starts, and the proxy's first scrape needs this upstream to answer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_block_size_is_learned_before_serving() {
    // Every connection gets vLLM's cache config line, as its /metrics has it.
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 66\r\n\r\n\
          vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"1000\"} 1.0\n",
        Duration::ZERO,
    )
    .await;
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &["--scrape-interval", "60s"]);
    // A block size learned after traffic starts would forget every tracked
    // block, so the first scrape comes before the proxy says it listens.
    let logs = proxy.logs();
    let line = |text: &str| logs.iter().position(|l| l.contains(text));
    let learned = line("learned the engine's KV block size");
    assert!(
        learned.is_some() && learned < line("sluice proxy listening"),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn stream_usage_is_measured_but_reaches_only_clients_that_asked() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let url = format!("{}/v1/completions", proxy.url());
    let output_tokens_reach = |n: f64| {
        let proxy = &proxy;
        async move {
            wait_until(Duration::from_secs(5), || async {
                proxy.metric("sluice_output_tokens_total").await == n
            })
            .await
        }
    };

    // Not asked: the proxy asks the upstream for usage, reads it, and strips
    // that event, so the client gets exactly the stream it asked for.
    let plain = post_json(&url, &completion(json!({"stream": true}))).await;
    assert_eq!(plain.status, 200);
    let text = plain.text();
    assert_eq!(text.matches("data: {").count(), 3, "{text}");
    assert!(!text.contains("\"usage\":{"), "usage event leaked: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        output_tokens_reach(3.0).await,
        "the stripped usage was not counted: {}",
        proxy.metrics().await
    );

    // Asked: the usage event passes through, counted once more.
    let asked = post_json(
        &url,
        &completion(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(asked.status, 200);
    let text = asked.text();
    assert_eq!(text.matches("\"usage\":{").count(), 1, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(output_tokens_reach(6.0).await, "{}", proxy.metrics().await);
}

#[tokio::test]
async fn slow_stream_is_relayed_chunk_by_chunk() {
    // The upstream holds its second and third token events until the test
    // has read the first from the proxy.
    let gate = Arc::new(tokio::sync::Notify::new());
    let addr = gated_stream(Arc::clone(&gate)).await;
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &["--upstream-timeout", "60s"]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::post(format!("{}/v1/completions", proxy.url()))
        .body(http_body_util::Full::new(Bytes::from(
            completion(json!({"stream": true})).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    use http_body_util::BodyExt;
    // The first event reached the client while the upstream still held the
    // rest: nothing is buffered.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert!(!first.windows(4).any(|w| w == b"tok1"), "{first:?}");
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(rest.matches("data: {").count(), 2, "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    // Three token events: one time to first token, two inter-token gaps.
    let timed = wait_until(Duration::from_secs(5), || async {
        proxy.metric("sluice_inter_token_seconds_count").await == 2.0
    })
    .await;
    assert!(timed, "{}", proxy.metrics().await);
    assert_eq!(
        proxy
            .metric("sluice_time_to_first_token_seconds_count")
            .await,
        1.0
    );
}

#[tokio::test]
async fn stalled_stream_ends_with_an_sse_error_after_the_idle_timeout() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &["--upstream-timeout", "300ms"]);
    let reply = send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[("x-test-delay-ms", "2000")],
        Bytes::from(completion(json!({"stream": true})).to_string()),
    )
    .await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    assert!(text.starts_with("data: {\"error\""), "{text}");
    assert!(text.contains("sent nothing for 300ms"), "{text}");
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::post(format!("{}/v1/completions", proxy.url()))
        .body(http_body_util::Full::new(Bytes::from(
            completion(json!({})).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let upstream = EchoUpstream::start().await;
    let mut proxy = ProxyProcess::start(&upstream.url(), &["--drain-timeout", "10s"]);
    let url = format!("{}/v1/completions", proxy.url());
    let in_flight = tokio::spawn(async move {
        send(
            Method::POST,
            &url,
            &[("x-test-delay-ms", "700")],
            Bytes::from(completion(json!({})).to_string()),
        )
        .await
    });
    let reached = wait_until(Duration::from_secs(10), || async {
        upstream.seen.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(reached);
    proxy.signal("TERM");
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request was cut off");
    let code = tokio::task::spawn_blocking(move || proxy.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn invalid_configuration_exits_64_before_binding() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--max-body", "lots", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-body") && err.contains("lots"), "{err}");
    let out = run(&["--policy", "no-such-policy.wasm"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"));
    let out = run(&[
        "--tokenizer",
        "no-such-tokenizer.json",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tokenizer") && err.contains("no-such-tokenizer.json"),
        "{err}"
    );
    let out = run(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64));
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--upstream",
        "--listen",
        "--max-body",
        "--upstream-timeout",
        "--drain-timeout",
        "--config",
        "--policy",
        "--policy-config",
        "--max-queue",
        "--queue-timeout",
        "--rate-limit",
        "--tokenizer",
        "SLUICE_UPSTREAM",
    ] {
        assert!(help.contains(flag), "--help does not explain {flag}");
    }
}

#[tokio::test]
async fn logs_one_line_per_request_without_the_api_key() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let reply = send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[("authorization", "Bearer sk-very-secret")],
        Bytes::from(completion(json!({})).to_string()),
    )
    .await;
    assert_eq!(reply.status, 200);
    let id = reply.headers["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let logged = wait_until(Duration::from_secs(5), || {
        let logs = proxy.logs();
        let id = id.clone();
        async move {
            logs.iter()
                .any(|l| l.contains(&format!("id={id} ")) && l.contains("route=completions"))
        }
    })
    .await;
    assert!(logged, "no request line: {:?}", proxy.logs());
    let logs = proxy.logs().join("\n");
    assert!(
        !logs.contains("sk-very-secret"),
        "the API key leaked into the log"
    );
    let line = logs
        .lines()
        .find(|l| l.contains(&format!("id={id} ")))
        .unwrap();
    for field in ["status=200", "total_ms=", "upstream_ms=", "outcome=ok"] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

/// Listens on `addr` and answers every request `200 ok` until aborted
/// (which closes the listener).
fn serve_ok(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                while read_request(&mut s).await.is_some() {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

#[tokio::test]
async fn readyz_follows_the_upstream() {
    // A port with nothing listening yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let proxy = ProxyProcess::start(&format!("http://{addr}"), &[]);
    let readyz = format!("{}/readyz", proxy.url());
    let status = || async { send(Method::GET, &readyz, &[], Bytes::new()).await.status };
    assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE);
    // Up: ready.
    let upstream = serve_ok(tokio::net::TcpListener::bind(addr).await.unwrap());
    let ready = wait_until(Duration::from_secs(10), || async {
        status().await == StatusCode::OK
    })
    .await;
    assert!(ready, "/readyz never followed the upstream up");
    // Down again: not ready.
    upstream.abort();
    let _ = upstream.await;
    let unready = wait_until(Duration::from_secs(10), || async {
        status().await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(unready, "/readyz never followed the upstream down");
    // The liveness check does not follow the upstream.
    let alive = send(
        Method::GET,
        &format!("{}/healthz", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(alive.status, 200);
}

#[tokio::test]
async fn upstream_closing_after_the_request_left_is_502_and_not_sent_again() {
    let upstream = answers_once().await;
    let proxy = ProxyProcess::start(
        &format!("http://{}", upstream.addr),
        &["--workers", "1", "--upstream-keepalive", "60s"],
    );
    let url = format!("{}/v1/completions", proxy.url());
    let first = post_json(&url, &completion(json!({}))).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // The second goes out on the kept-alive connection; the upstream reads
    // it whole and closes. Sending it again could run it twice.
    let second = post_json(&url, &completion(json!({}))).await;
    assert_openai_error(&second, 502, "upstream_bad_response");
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        2,
        "the request was sent to the upstream again"
    );
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"upstream_bad_response\"}")
            .await,
        1.0
    );
}

/// Starts a streaming completion through `proxy` and returns its body once
/// the first event has arrived (the request is then in flight).
async fn stream_in_flight(proxy: &ProxyProcess) -> hyper::body::Incoming {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::post(format!("{}/v1/completions", proxy.url()))
        .body(http_body_util::Full::new(Bytes::from(
            completion(json!({"stream": true})).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    body
}

#[tokio::test]
async fn sigint_drains_and_new_connections_are_refused_meanwhile() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let addr = gated_stream(Arc::clone(&gate)).await;
    let mut proxy = ProxyProcess::start(&format!("http://{addr}"), &["--drain-timeout", "60s"]);
    let (listen, admin) = (proxy.addr, proxy.admin);
    let body = stream_in_flight(&proxy).await;
    proxy.signal("INT");
    assert!(
        proxy
            .wait_for_log(Duration::from_secs(10), |l| l.contains("SIGINT received"))
            .await
            .is_some()
    );
    // While the stream drains, the listeners are closed: a new client is
    // refused at connect, on the client and the admin port alike.
    let refused = wait_until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(listen).await.is_err()
            && tokio::net::TcpStream::connect(admin).await.is_err()
    })
    .await;
    assert!(
        refused,
        "the proxy still accepts connections while draining"
    );
    // The stream in flight is let finish whole.
    gate.notify_one();
    use http_body_util::BodyExt;
    let rest = body.collect().await.expect("the draining stream was cut");
    let rest = String::from_utf8_lossy(&rest.to_bytes()).into_owned();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let code = tokio::task::spawn_blocking(move || proxy.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_drain_timeout_that_runs_out_cuts_the_stream_and_exits_0() {
    // The upstream never sends more than its first event.
    let gate = Arc::new(tokio::sync::Notify::new());
    let addr = gated_stream(gate).await;
    let mut proxy = ProxyProcess::start(&format!("http://{addr}"), &["--drain-timeout", "200ms"]);
    let body = stream_in_flight(&proxy).await;
    proxy.signal("TERM");
    use http_body_util::BodyExt;
    // The stream ends like any interrupted stream: an error event (saying
    // why), no `[DONE]`, never looking complete.
    let rest = body.collect().await.expect("the stream ended cleanly");
    let rest = String::from_utf8_lossy(&rest.to_bytes()).into_owned();
    assert!(!rest.contains("[DONE]"), "{rest}");
    let last = rest.trim_end().rsplit("\n\n").next().unwrap_or("");
    assert!(last.starts_with("data: {\"error\""), "{rest}");
    assert!(last.contains("\"code\":\"shutting_down\""), "{last}");
    // Logged and counted as cut by shutdown, not as a client that left.
    assert!(
        proxy
            .wait_for_log(Duration::from_secs(10), |l| l.contains("outcome=shutdown"))
            .await
            .is_some(),
        "{:#?}",
        proxy.logs()
    );
    assert!(
        proxy
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("drain timeout reached"))
            .await
            .is_some(),
        "{:#?}",
        proxy.logs()
    );
    let code = tokio::task::spawn_blocking(move || proxy.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

/// The request ledger in `/stats` once nothing is in progress.
async fn settled_accounting(proxy: &ProxyProcess) -> serde_json::Value {
    let url = format!("http://{}/stats", proxy.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = send(Method::GET, &url, &[], Bytes::new()).await;
        let balance = reply.json()["accounting"].clone();
        let idle = balance["in_progress"] == 0 && balance["in_flight"] == 0;
        if idle {
            return balance;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests stayed in progress: {balance}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_request_is_accounted_for_exactly_once() {
    // Answered, refused and upstream-cut requests on one proxy …
    const PARTIAL: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
1d\r\ndata: {\"choices\":[{\"i\":0}]}\n\n\r\n";
    let echo = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&echo.url(), &["--max-body", "1KiB"]);
    let url = format!("{}/v1/completions", proxy.url());
    for _ in 0..2 {
        assert_eq!(post_json(&url, &completion(json!({}))).await.status, 200);
    }
    let health = send(
        Method::GET,
        &format!("{}/healthz", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(health.status, 200);
    let malformed = send(Method::POST, &url, &[], Bytes::from_static(b"{not json")).await;
    assert_eq!(malformed.status, 400);
    let oversized = post_json(&url, &completion(json!({"prompt": "x".repeat(4096)}))).await;
    assert_eq!(oversized.status, 413);
    let balance = settled_accounting(&proxy).await;
    assert_eq!(
        [
            balance["received"].clone(),
            balance["answered"].clone(),
            balance["refused"].clone(),
            balance["cut"].clone()
        ],
        [json!(5), json!(3), json!(2), json!(0)],
        "{balance}"
    );
    assert_eq!(
        [balance["admitted"].clone(), balance["completed"].clone()],
        [json!(2), json!(2)],
        "{balance}"
    );
    // The same figures in Prometheus.
    assert_eq!(proxy.metric("sluice_requests_received_total").await, 5.0);
    assert_eq!(
        proxy
            .metric("sluice_requests_ended_total{ending=\"refused\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("sluice_admitted_ended_total{ending=\"completed\"}")
            .await,
        2.0
    );

    // … a stream the engine breaks: cut, and failed upstream …
    let broken = scripted(PARTIAL, Duration::from_millis(50)).await;
    let proxy = ProxyProcess::start(&format!("http://{broken}"), &[]);
    let reply = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &completion(json!({"stream": true})),
    )
    .await;
    assert_eq!(reply.status, 200);
    let balance = settled_accounting(&proxy).await;
    assert_eq!(
        [
            balance["received"].clone(),
            balance["cut"].clone(),
            balance["admitted"].clone(),
            balance["failed"].clone()
        ],
        [json!(1), json!(1), json!(1), json!(1)],
        "{balance}"
    );

    // … and a client that leaves while the engine works: cut, client_gone.
    let upstream = hanging().await;
    let proxy = ProxyProcess::start(&format!("http://{}", upstream.addr), &[]);
    leave_once_the_upstream_has_it(&proxy, &upstream).await;
    let balance = settled_accounting(&proxy).await;
    assert_eq!(
        [
            balance["received"].clone(),
            balance["cut"].clone(),
            balance["admitted"].clone(),
            balance["client_gone"].clone()
        ],
        [json!(1), json!(1), json!(1), json!(1)],
        "{balance}"
    );
}

#[tokio::test]
async fn bodies_being_read_share_one_memory_budget() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--max-body", "1MiB", "--body-memory", "2MiB"],
    );
    let url = format!("{}/v1/completions", proxy.url());
    // A token-id prompt of about 900 KB, declared whole, sent but its last
    // byte: it holds twice its size of the 2 MiB budget while it is read.
    let ids: Vec<String> = (0..130_000u32).map(|i| (100_000 + i).to_string()).collect();
    let big = format!(
        r#"{{"model":"m","max_tokens":1,"prompt":[{}]}}"#,
        ids.join(",")
    );
    let head = |extra: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}\r\n"
        )
    };
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    first
        .write_all(head(&format!("content-length: {}\r\n", big.len())).as_bytes())
        .await
        .unwrap();
    first
        .write_all(&big.as_bytes()[..big.len() - 1])
        .await
        .unwrap();
    let held = "sluice_body_memory_held_bytes";
    let first_holds_its_share = wait_until(Duration::from_secs(10), || async {
        proxy.metric(held).await >= (2 * big.len()) as f64
    })
    .await;
    assert!(
        first_holds_its_share,
        "{held}: {}",
        proxy.metric(held).await
    );
    // Small requests need no share: they are served meanwhile.
    assert_eq!(post_json(&url, &completion(json!({}))).await.status, 200);
    // A second declared large body waits for room (it is not refused) …
    let second = tokio::spawn({
        let (url, big) = (url.clone(), big.clone());
        async move {
            send(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                Bytes::from(big),
            )
            .await
        }
    });
    let waiting = "sluice_body_memory_waiting_requests";
    let second_waits = wait_until(Duration::from_secs(10), || async {
        proxy.metric(waiting).await == 1.0
    })
    .await;
    assert!(second_waits, "the second body did not wait");
    // … and a chunked one that finds the budget spent is refused at once.
    let mut chunked = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    chunked
        .write_all(head("transfer-encoding: chunked\r\n").as_bytes())
        .await
        .unwrap();
    let refused = read_head(&mut chunked, &big).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("body_memory_full"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert!(
        !second.is_finished(),
        "the second body was not kept waiting"
    );
    // The first body ends: it is served, and the second gets its room.
    first
        .write_all(&big.as_bytes()[big.len() - 1..])
        .await
        .unwrap();
    let answer = read_head(&mut first, "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let second = second.await.unwrap();
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(
        proxy
            .metric("sluice_requests_total{route=\"completions\",outcome=\"body_memory_full\"}")
            .await,
        1.0
    );
}

/// Writes `body` in chunks of 64 KiB (chunked encoding) to `stream` until
/// the proxy answers, and returns what it answered up to the end of the
/// head (and some of the body).
async fn read_head(stream: &mut tokio::net::TcpStream, body: &str) -> String {
    let mut chunks = body.as_bytes().chunks(64 * 1024);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer: {}",
            String::from_utf8_lossy(&answer)
        );
        if let Some(chunk) = chunks.next() {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            if stream.write_all(&framed).await.is_err() {
                chunks = [].chunks(1);
            }
        }
        let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) if body.is_empty() || answer.is_empty() => continue,
            Err(_) => {}
        }
        if String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
            // Some of the body too, for the error code.
            let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf))
                .await
                .map(|r| r.map(|n| answer.extend_from_slice(&buf[..n])));
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}
