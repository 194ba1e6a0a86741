//! The bundled plugins (built by `just plugins` into plugins/dist) loaded by
//! the real proxy binary, against the counting echo upstream.

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
        ],
    );
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
    assert_each_forwarded_once(&upstream, 20);
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
            "--policy-config",
            "window_ms=1000",
        ],
    );
    let replies = burst(&proxy, 30, &[("x-test-delay-ms", "200")], one_tenant).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_each_forwarded_once(&upstream, 30);
    // Waves: arrivals at the upstream come in clusters of 10, each cluster
    // only after the previous wave finished (gather semantics, waves=1).
    let waves = upstream.seen.arrival_clusters(Duration::from_millis(150));
    assert_eq!(waves, [10, 10, 10], "arrival clusters at the upstream");
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
    let stats = send(
        Method::GET,
        &format!("http://{}/stats", proxy.admin),
        &[],
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(stats["policy"]["in_flight"], 0, "{stats}");
    assert_eq!(stats["policy"]["queued"], 0, "{stats}");
    assert_eq!(stats["policy"]["fallback"], false, "{stats}");
}
