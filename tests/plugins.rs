//! The bundled plugins (built by `just plugins` into plugins/dist) loaded by
//! the real proxy binary, against the counting echo upstream. Where tenants
//! matter the test plays the gateway: `X-Tenant` with `--trust-tenant-header`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::upstream::EchoUpstream;
use common::{ProxyProcess, Reply, send, spawn_all, wait_until};
use http::Method;

const BODY: &str = r#"{"model":"m","prompt":"hello","max_tokens":4}"#;

fn plugin(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `just plugins`",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// Sends `n` requests at once, each with `x-test-id` and the given headers.
async fn burst(
    proxy: &ProxyProcess,
    n: usize,
    headers: &[(&str, &str)],
    tenant_of: fn(usize) -> String,
) -> Vec<Reply> {
    let url = format!("{}/v1/completions", proxy.url());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spawn_all(n, |i| {
        let (url, mut headers) = (url.clone(), headers.clone());
        headers.push(("x-test-id".into(), i.to_string()));
        headers.push(("x-tenant".into(), tenant_of(i)));
        async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            send(Method::POST, &url, &h, Bytes::from_static(BODY.as_bytes())).await
        }
    })
    .await
    .unwrap()
}

fn one_tenant(_: usize) -> String {
    "t".into()
}

fn assert_each_forwarded_once(upstream: &EchoUpstream, n: usize) {
    let mut counts = BTreeMap::new();
    for (_, id) in upstream.seen.arrivals.lock().unwrap().iter() {
        *counts.entry(id.clone()).or_insert(0usize) += 1;
    }
    assert_eq!(counts.len(), n, "{counts:?}");
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
}

#[tokio::test]
async fn concurrency_caps_the_upstream_at_its_limit() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("concurrency"),
            "--policy-config",
            "limit=10",
        ],
    );
    let replies = burst(&proxy, 50, &[("x-test-delay-ms", "40")], one_tenant).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let max = upstream.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 10, "upstream saw {max} in flight with limit=10");
    assert_each_forwarded_once(&upstream, 50);
}

#[tokio::test]
async fn concurrency_per_tenant_limits_each_tenant() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("concurrency"),
            "--policy-config",
            "limit=2",
            "--policy-config",
            "key=tenant",
            "--trust-tenant-header",
        ],
    );
    // Tenant a takes both of its slots and queues a third request.
    let a1 = blocker_for(&proxy, &upstream, "a", 1).await;
    let a2 = blocker_for(&proxy, &upstream, "a", 2).await;
    let a3 = queue_one(&proxy, "a-3", "a", 0);
    until_queued(&proxy, 1).await;
    // Tenant b is not held up by a's full limit: both of its requests are
    // forwarded and answered while a's third still waits.
    for id in ["b-1", "b-2"] {
        let reply = tokio::time::timeout(Duration::from_secs(20), queue_one(&proxy, id, "b", 0))
            .await
            .expect("tenant b waited behind tenant a's limit")
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let order = arrival_order(&upstream);
    assert_eq!(
        order,
        ["blocker", "blocker", "b-1", "b-2"],
        "a-3 must still wait"
    );
    assert_eq!(proxy.metric("sluice_queued_requests").await, 1.0);
    // A slot of a's frees: its third goes in.
    drop(a1);
    assert_eq!(a3.await.unwrap().status, 200);
    assert_eq!(arrival_order(&upstream).last().unwrap(), "a-3");
    drop(a2);
    let idle = wait_until(Duration::from_secs(10), || async {
        upstream.seen.in_flight.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(idle, "the blockers' upstream requests were not ended");

    // Under a burst from two tenants the upstream never sees more than both limits.
    let before = upstream.seen.total.load(Ordering::SeqCst);
    upstream.seen.max_in_flight.store(0, Ordering::SeqCst);
    let replies = burst(&proxy, 20, &[("x-test-delay-ms", "40")], |i| {
        format!("tenant-{}", i % 2)
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    let max = upstream.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= 4,
        "two tenants with limit=2 each, upstream saw {max}"
    );
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), before + 20);
}

#[tokio::test]
async fn batched_releases_waves_of_max_batch() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("batched"),
            "--policy-config",
            "max_batch=10",
            // Long enough that only full waves are ever released, however
            // slowly a loaded machine delivers the burst.
            "--policy-config",
            "window_ms=60000",
        ],
    );
    let replies = burst(&proxy, 30, &[("x-test-delay-ms", "50")], one_tenant).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_each_forwarded_once(&upstream, 30);
    // Waves (gather semantics, waves=1): each request of wave k arrived
    // after the 10·k answers before it and before any later wave's.
    let waves = upstream.seen.waves_by_completions(10);
    assert_eq!(waves, [10, 10, 10], "arrivals grouped by completed answers");
    assert!(upstream.seen.max_in_flight.load(Ordering::SeqCst) <= 10);
}

#[tokio::test]
async fn batched_window_releases_a_partial_wave() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("batched"),
            "--policy-config",
            "max_batch=50",
            "--policy-config",
            "window_ms=20",
        ],
    );
    // Far fewer than max_batch: the window, not the batch size, releases them.
    let replies = burst(&proxy, 3, &[], one_tenant).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_each_forwarded_once(&upstream, 3);
}

#[tokio::test]
async fn hot_reload_under_load_loses_nothing() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("concurrency"),
            "--policy-config",
            "limit=4",
        ],
    );
    let url = format!("{}/v1/completions", proxy.url());
    let load = spawn_all(60, |i| {
        let url = url.clone();
        async move {
            let id = i.to_string();
            let h = [("x-test-id", id.as_str()), ("x-test-delay-ms", "20")];
            send(Method::POST, &url, &h, Bytes::from_static(BODY.as_bytes())).await
        }
    });
    let busy = wait_until(Duration::from_secs(10), || async {
        upstream.seen.total.load(Ordering::SeqCst) >= 8
    })
    .await;
    assert!(busy);
    let bytes = std::fs::read(plugin("batched")).unwrap();
    let reload = send(
        Method::PUT,
        &format!(
            "http://{}/admin/policy?max_batch=8&window_ms=5",
            proxy.admin
        ),
        &[],
        Bytes::from(bytes),
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    let replies = load.await.unwrap();
    assert!(
        replies.iter().all(|r| r.status == 200),
        "a request failed across the reload"
    );
    assert_each_forwarded_once(&upstream, 60);
    let stats = proxy.stats().await;
    assert_eq!(stats["policy"]["in_flight"], 0, "{stats}");
    assert_eq!(stats["policy"]["queued"], 0, "{stats}");
    assert_eq!(stats["policy"]["fallback"], false, "{stats}");
}

/// A request that holds the policy's only slot: sent on a raw connection
/// with a minute's delay; dropping the connection ends it (the proxy counts
/// a client that left as a completion), which frees the slot.
async fn blocker(proxy: &ProxyProcess, upstream: &EchoUpstream) -> tokio::net::TcpStream {
    blocker_for(proxy, upstream, "blocker", 1).await
}

/// [`blocker`] from `tenant`, once the upstream has seen `nth` requests in all.
async fn blocker_for(
    proxy: &ProxyProcess,
    upstream: &EchoUpstream,
    tenant: &str,
    nth: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-test-id: blocker\r\nx-test-delay-ms: 60000\r\nx-tenant: {tenant}\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let reached = wait_until(Duration::from_secs(10), || async {
        upstream.seen.total.load(Ordering::SeqCst) == nth
    })
    .await;
    assert!(reached, "the blocker never reached the upstream");
    conn
}

/// Sends request `id` from `tenant` at `priority`, in the background.
fn queue_one(
    proxy: &ProxyProcess,
    id: &str,
    tenant: &str,
    priority: i32,
) -> tokio::task::JoinHandle<Reply> {
    let url = format!("{}/v1/completions", proxy.url());
    let (id, tenant, priority) = (id.to_owned(), tenant.to_owned(), priority.to_string());
    tokio::spawn(async move {
        let h = [
            ("x-test-id", id.as_str()),
            ("x-tenant", tenant.as_str()),
            ("x-priority", priority.as_str()),
        ];
        send(Method::POST, &url, &h, Bytes::from_static(BODY.as_bytes())).await
    })
}

/// Waits until the proxy holds `n` requests in its queue.
async fn until_queued(proxy: &ProxyProcess, n: usize) {
    let queued = wait_until(Duration::from_secs(20), || async {
        proxy.metric("sluice_queued_requests").await == n as f64
    })
    .await;
    assert!(queued, "the proxy never held {n} requests in its queue");
}

/// The `x-test-id` of every request the upstream saw, in arrival order.
fn arrival_order(upstream: &EchoUpstream) -> Vec<String> {
    let arrivals = upstream.seen.arrivals.lock().unwrap();
    arrivals.iter().map(|(_, id)| id.clone()).collect()
}

#[tokio::test]
async fn concurrency_admits_a_priority_request_ahead_of_a_backlog() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("concurrency"),
            "--policy-config",
            "limit=1",
            "--trust-tenant-header",
        ],
    );
    let conn = blocker(&proxy, &upstream).await;
    let mut waiting = Vec::new();
    for i in 0..100 {
        waiting.push(queue_one(&proxy, &format!("batch-{i}"), "batch", 0));
        // One at a time, so that the queue's order is the order sent.
        until_queued(&proxy, i + 1).await;
    }
    waiting.push(queue_one(&proxy, "urgent", "batch", 10));
    until_queued(&proxy, 101).await;
    drop(conn);
    for reply in waiting {
        assert_eq!(reply.await.unwrap().status, 200);
    }
    let order = arrival_order(&upstream);
    assert_eq!(order.len(), 102);
    assert_eq!(order[1], "urgent", "admitted after the blocker: {order:?}");
    let batch: Vec<String> = (0..100).map(|i| format!("batch-{i}")).collect();
    assert_eq!(order[2..], batch, "the backlog keeps its own order");
}

#[tokio::test]
async fn concurrency_shares_turns_between_tenants_by_weight() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            &plugin("concurrency"),
            "--policy-config",
            "limit=1",
            "--policy-config",
            "weights=trickle:3",
            "--trust-tenant-header",
        ],
    );
    let conn = blocker(&proxy, &upstream).await;
    let mut waiting = Vec::new();
    // A burst of 40 from one tenant queues first, then 12 from another.
    for i in 0..52 {
        let (tenant, id) = if i < 40 {
            ("burst", format!("burst-{i}"))
        } else {
            ("trickle", format!("trickle-{i}"))
        };
        waiting.push(queue_one(&proxy, &id, tenant, 0));
        until_queued(&proxy, i + 1).await;
    }
    drop(conn);
    for reply in waiting {
        assert_eq!(reply.await.unwrap().status, 200);
    }
    let order = arrival_order(&upstream);
    assert_eq!(order.len(), 53);
    // Turns of 1 (burst) and 3 (trickle): the trickle's 12 are all in by
    // the 16th admission, though they queued behind 40.
    let first_16 = &order[1..17];
    let trickle = first_16
        .iter()
        .filter(|id| id.starts_with("trickle"))
        .count();
    assert_eq!(trickle, 12, "{first_16:?}");
}

#[tokio::test]
async fn adaptive_admits_live_traffic_while_the_batch_waits() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--policy", &plugin("adaptive"), "--trust-tenant-header"],
    );
    // Adaptive starts at one batch request in flight.
    let conn = blocker(&proxy, &upstream).await;
    let mut waiting = Vec::new();
    for i in 0..20 {
        waiting.push(queue_one(&proxy, &format!("batch-{i}"), "batch", 0));
    }
    until_queued(&proxy, 20).await;
    // Live traffic (priority ≥ 1) goes straight in, past the waiting batch.
    let live = queue_one(&proxy, "live", "live", 5).await.unwrap();
    assert_eq!(live.status, 200);
    assert_eq!(arrival_order(&upstream)[..2], ["blocker", "live"]);
    assert_eq!(proxy.metric("sluice_queued_requests").await, 20.0);
    // Its limit is published as a gauge.
    let limit = proxy
        .metric("sluice_policy_value{name=\"batch_limit\"}")
        .await;
    assert_eq!(limit, 1.0);
    drop(conn);
    for reply in waiting {
        assert_eq!(reply.await.unwrap().status, 200);
    }
    assert_each_forwarded_once(&upstream, 22);
}
