//! Client connections against the proxy binary: idle and half-open
//! connections time out, at the connection limit a new client takes an idle
//! connection's place or gets a fast 503, and a long request is never idle.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::upstream::{EchoUpstream, gated_stream, hanging};
use common::{ProxyProcess, post_json, raw_post, wait_until};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn completion() -> serde_json::Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 4})
}

/// Idle clients of every kind: one that sends nothing, one half an HTTP/2
/// preface, one the preface and SETTINGS, one half a request head.
async fn idle_clients(addr: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut clients = Vec::new();
    for i in 0..count {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        match i % 4 {
            0 => {}
            1 => stream.write_all(&H2_PREFACE[..10]).await.unwrap(),
            2 => {
                stream.write_all(H2_PREFACE).await.unwrap();
                stream.write_all(H2_SETTINGS).await.unwrap();
            }
            _ => stream
                .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
                .await
                .unwrap(),
        }
        clients.push(stream);
    }
    clients
}

/// Whether the proxy closed `stream` (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // HTTP/2 SETTINGS, GOAWAY or a 408: keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn at_the_limit_idle_connections_make_room_for_a_new_client() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &["--max-connections", "8"]);
    // Twelve idle sockets against a limit of eight: every slot is held by
    // a client that sends nothing useful.
    let _idle = idle_clients(proxy.addr, 12).await;
    let url = format!("{}/v1/completions", proxy.url());
    // A normal client is still served, without waiting for any timeout.
    let reply = tokio::time::timeout(Duration::from_secs(5), post_json(&url, &completion()))
        .await
        .expect("a new client hung at the connection limit");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        proxy
            .metric("sluice_connections_closed_total{listener=\"main\",reason=\"evicted\"}")
            .await
            >= 4.0,
        "{}",
        proxy.metrics().await
    );
    // The admin listener likewise (it serves 64 at once).
    let _idle_admin = idle_clients(proxy.admin, 70).await;
    let metrics = tokio::time::timeout(Duration::from_secs(5), proxy.metrics())
        .await
        .expect("the admin listener hung at its connection limit");
    assert!(metrics.contains("sluice_connections_closed_total"));
}

#[tokio::test]
async fn at_the_limit_with_every_connection_busy_a_new_client_gets_503_at_once() {
    let upstream = hanging().await;
    let proxy = ProxyProcess::start(
        &format!("http://{}", upstream.addr),
        &["--max-connections", "2"],
    );
    // Two requests the upstream never answers hold both connections busy.
    let mut busy = Vec::new();
    let body = completion().to_string();
    for _ in 0..2 {
        busy.push(raw_post(proxy.addr, "/v1/completions", &body).await);
    }
    let url = format!("{}/v1/completions", proxy.url());
    let reached = wait_until(Duration::from_secs(10), || async {
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    assert!(reached, "the two requests never reached the upstream");
    let reply = tokio::time::timeout(Duration::from_secs(5), post_json(&url, &completion()))
        .await
        .expect("a refused client was left waiting");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.json()["error"]["code"], "too_many_connections");
    assert_eq!(
        proxy
            .metric("sluice_connections_refused_total{listener=\"main\"}")
            .await,
        1.0
    );
    // The busy clients leave; their requests end as cut.
    drop(busy);
}

#[tokio::test]
async fn idle_and_half_open_connections_time_out() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &["--client-idle-timeout", "300ms"]);
    let mut clients = idle_clients(proxy.addr, 4).await;
    // A kept-alive connection that served one request, then went quiet.
    let kept = raw_post(proxy.addr, "/v1/completions", &completion().to_string()).await;
    clients.push(kept);
    for (i, client) in clients.iter_mut().enumerate() {
        assert!(
            closed_within(client, Duration::from_secs(10)).await,
            "idle client {i} was never closed"
        );
    }
    let closed = proxy
        .metric("sluice_connections_closed_total{listener=\"main\",reason=\"idle_timeout\"}")
        .await;
    assert_eq!(closed, 5.0, "{}", proxy.metrics().await);
}

#[tokio::test]
async fn a_long_stream_is_not_idle() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let addr = gated_stream(Arc::clone(&gate)).await;
    let proxy = ProxyProcess::start(
        &format!("http://{addr}"),
        &["--client-idle-timeout", "200ms"],
    );
    let url = format!("{}/v1/completions", proxy.url());
    let mut body = completion();
    body["stream"] = json!(true);
    let request = tokio::spawn(async move { post_json(&url, &body).await });
    // The stream stays open well past the idle timeout before it finishes:
    // time passing is the point here, not a condition to wait for.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.notify_one();
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().ends_with("data: [DONE]\n\n"),
        "{}",
        reply.text()
    );
    assert_eq!(
        proxy
            .metric("sluice_connections_closed_total{listener=\"main\",reason=\"idle_timeout\"}")
            .await,
        0.0
    );
}
