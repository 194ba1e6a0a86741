//! The wasm host, end to end, with policies written inline in WAT (no guest
//! toolchain needed): faults switch to the fallback and are counted, queue
//! bounds and timeouts answer correctly, cancels free their place, rate
//! limits apply per tenant (named as the trust model says, and never shown),
//! and reloads hand the queue over without losing a request.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::upstream::EchoUpstream;
use common::{ProxyProcess, Reply, policies, send, spawn_all, wait_until};
use http::Method;
use sluice::headers::Tenants;
use tokio::io::AsyncWriteExt;

const BODY: &str = r#"{"model":"m","prompt":"hello","max_tokens":4}"#;

async fn complete(proxy: &ProxyProcess, id: usize, extra: &[(&str, &str)]) -> Reply {
    let id = id.to_string();
    let mut headers = vec![
        ("x-test-id", id.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &headers,
        Bytes::from_static(BODY.as_bytes()),
    )
    .await
}

/// Sends `n` requests at once; returns the replies in id order.
async fn burst(proxy: &ProxyProcess, n: usize, extra: &[(&str, &str)]) -> Vec<Reply> {
    let url = proxy.url();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spawn_all(n, |i| {
        let (url, extra) = (url.clone(), extra.clone());
        async move {
            let id = i.to_string();
            let mut headers: Vec<(&str, &str)> =
                vec![("x-test-id", &id), ("content-type", "application/json")];
            headers.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            send(
                Method::POST,
                &format!("{url}/v1/completions"),
                &headers,
                Bytes::from_static(BODY.as_bytes()),
            )
            .await
        }
    })
    .await
    .unwrap()
}

/// How many times each `x-test-id` reached the upstream.
fn arrivals_by_id(upstream: &EchoUpstream) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, id) in upstream.seen.arrivals.lock().unwrap().iter() {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

/// A faulty policy: the fault is logged and counted, the fallback cap takes
/// over, and every request is answered and forwarded exactly once.
/// `deadline` is `--policy-deadline`: generous where the fault is not a
/// missed deadline, so that a slow call on a busy machine is not one.
async fn fault_falls_back(name: &str, wat: String, kind: &str, deadline: &str) {
    let upstream = EchoUpstream::start().await;
    let path = policies::write(name, &wat);
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--fallback-limit",
            "3",
            "--policy-deadline",
            deadline,
            "--policy-memory",
            "4MiB",
        ],
    );
    let replies = burst(&proxy, 12, &[("x-test-delay-ms", "50")]).await;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let counts = arrivals_by_id(&upstream);
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "a request reached the upstream twice: {counts:?}"
    );
    assert!(
        upstream.seen.max_in_flight.load(Ordering::SeqCst) <= 3,
        "the fallback cap was not applied"
    );
    assert_eq!(
        proxy
            .metric(&format!("sluice_policy_faults_total{{kind=\"{kind}\"}}"))
            .await,
        1.0
    );
    assert_eq!(proxy.metric("sluice_policy_fallback_active").await, 1.0);
    let s = proxy.stats().await;
    assert_eq!(s["policy"]["fallback"], true, "{s}");
    assert_eq!(s["policy"]["queued"], 0);
    assert_eq!(s["policy"]["in_flight"], 0, "{s}");
    assert!(
        proxy
            .logs()
            .iter()
            .any(|l| l.contains("admission policy fault") && l.contains(kind))
    );
}

#[tokio::test]
async fn a_trapping_policy_falls_back() {
    fault_falls_back("traps", policies::traps(), "trap", "30s").await;
}

#[tokio::test]
async fn a_looping_policy_misses_its_deadline_and_falls_back() {
    fault_falls_back("loops", policies::loops_forever(), "deadline", "20ms").await;
}

#[tokio::test]
async fn a_policy_growing_memory_without_bound_falls_back() {
    fault_falls_back("grows", policies::grows_memory(), "trap", "30s").await;
}

#[tokio::test]
async fn admitting_an_unknown_id_falls_back() {
    fault_falls_back(
        "unknown",
        policies::admits_unknown_id(),
        "invalid_decision",
        "30s",
    )
    .await;
}

#[tokio::test]
async fn admitting_an_id_twice_falls_back() {
    fault_falls_back("twice", policies::admits_twice(), "invalid_decision", "30s").await;
}

#[tokio::test]
async fn a_good_policy_admits_without_faults() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("admit", &policies::admit_each());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    let replies = burst(&proxy, 20, &[]).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(proxy.metric("sluice_policy_faults_total").await, 0.0);
    assert_eq!(
        proxy
            .metric("sluice_policy_calls_total{event=\"arrival\"}")
            .await,
        20.0
    );
    assert_eq!(
        proxy
            .metric("sluice_policy_calls_total{event=\"completion\"}")
            .await,
        20.0
    );
    assert_eq!(proxy.stats().await["policy"]["fallback"], false);
}

#[tokio::test]
async fn init_refusing_its_config_stops_startup_with_64() {
    let path = policies::write("refuses", &policies::rejects_config());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args([
            "--policy",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `x`"), "{err}");
}

/// Sends a completion on a raw connection and leaves it waiting; dropping
/// the connection is the client leaving.
async fn raw_request(proxy: &ProxyProcess) -> tokio::net::TcpStream {
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

async fn until_queued(proxy: &ProxyProcess, n: usize) {
    let queued = wait_until(Duration::from_secs(10), || async {
        proxy.stats().await["policy"]["queued"] == n
    })
    .await;
    assert!(queued, "the proxy never held {n} requests in its queue");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("hold", &policies::hold_all());
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--max-queue",
            "2",
            "--queue-timeout",
            "600s",
        ],
    );
    let waiting = [raw_request(&proxy).await, raw_request(&proxy).await];
    until_queued(&proxy, 2).await;
    let full = complete(&proxy, 99, &[]).await;
    assert_eq!(full.status, 429, "{}", full.text());
    assert_eq!(full.json()["error"]["code"], "queue_full");
    assert_eq!(full.headers["retry-after"], "1");
    assert_eq!(
        proxy
            .metric("sluice_requests_shed_total{reason=\"queue_full\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"queue_full\"}")
            .await,
        1.0
    );
    // The waiting clients leave: the queue empties, nothing was forwarded.
    drop(waiting);
    until_queued(&proxy, 0).await;
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_long_wait_answers_503_with_retry_after() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("hold", &policies::hold_all());
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--queue-timeout",
            "300ms",
        ],
    );
    let replies = burst(&proxy, 2, &[]).await;
    for r in &replies {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "queue_timeout");
        assert_eq!(r.headers["retry-after"], "1");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--queue-timeout")
        );
    }
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.stats().await["policy"]["queued"], 0);
    let counted = wait_until(Duration::from_secs(5), || async {
        proxy
            .metric("sluice_requests_total{outcome=\"queue_timeout\"}")
            .await
            == 2.0
    })
    .await;
    assert!(counted, "{}", proxy.metrics().await);
}

#[tokio::test]
async fn a_policy_rejection_is_429_counted_and_never_forwarded() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("rejects", &policies::rejects_each());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    let replies = burst(&proxy, 3, &[]).await;
    for r in &replies {
        assert_eq!(r.status, 429, "{}", r.text());
        let body = r.json();
        assert_eq!(body["error"]["code"], "policy_rejected", "{body}");
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("too busy"),
            "the policy's reason is passed on: {body}"
        );
    }
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 0);
    let counted = wait_until(Duration::from_secs(5), || async {
        proxy
            .metric("sluice_requests_total{outcome=\"policy_rejected\"}")
            .await
            == 3.0
    })
    .await;
    assert!(counted, "{}", proxy.metrics().await);
    // A rejection is the policy's answer, not a fault.
    assert_eq!(proxy.metric("sluice_policy_faults_total").await, 0.0);
    let s = proxy.stats().await;
    assert_eq!(s["policy"]["fallback"], false, "{s}");
    assert_eq!(s["policy"]["queued"], 0, "{s}");
}

#[tokio::test]
async fn a_client_leaving_the_queue_frees_its_place() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("hold", &policies::hold_all());
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--policy", path.to_str().unwrap(), "--max-queue", "1"],
    );
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            proxy.stats().await["policy"]["queued"] == 1
        })
        .await
    );
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            proxy.stats().await["policy"]["queued"] == 0
        })
        .await,
        "the departed client still holds its queue place"
    );
    assert_eq!(
        proxy
            .metric("sluice_policy_calls_total{event=\"cancel\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn rate_limits_apply_per_tenant_with_retry_after() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("admit", &policies::admit_each());
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--rate-limit",
            "1/m",
            "--rate-burst",
            "2",
            "--trust-tenant-header",
        ],
    );
    let started = std::time::Instant::now();
    assert_eq!(complete(&proxy, 1, &[("x-tenant", "a")]).await.status, 200);
    assert_eq!(complete(&proxy, 2, &[("x-tenant", "a")]).await.status, 200);
    let limited = complete(&proxy, 3, &[("x-tenant", "a")]).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"]["code"], "rate_limited");
    let retry: f64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // GCRA, 1/min with a burst of 2: the third request may come 60 s after
    // the first, so the wait is 60 s less the time between the first
    // request and the third, rounded up to whole seconds: 60 unless that
    // took a second or more (bounded by what the test measured around them).
    assert!(
        retry <= 60.0 && retry >= (60.0 - elapsed).ceil(),
        "Retry-After {retry}s, {elapsed:.3}s after the first request"
    );
    assert_eq!(complete(&proxy, 4, &[("x-tenant", "b")]).await.status, 200);
    assert_eq!(
        proxy
            .metric("sluice_requests_shed_total{reason=\"rate_limited\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"rate_limited\"}")
            .await,
        1.0
    );
}

/// The `--tenant-hash-key-file` secret of the tests that know digests.
const SECRET: &[u8] = b"a shared secret for several proxies";

/// A proxy in front of `upstream` that admits each request, allows each
/// tenant 2 requests a minute, and takes `extra` flags.
fn rate_limited(upstream: &EchoUpstream, extra: &[&str]) -> ProxyProcess {
    let path = policies::write("admit", &policies::admit_each());
    let mut args = vec![
        "--policy",
        path.to_str().unwrap(),
        "--rate-limit",
        "1/m",
        "--rate-burst",
        "2",
    ];
    args.extend_from_slice(extra);
    ProxyProcess::start(&upstream.url(), &args)
}

/// The statuses of `replies`, counted.
fn statuses(replies: &[Reply]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.status.as_u16()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn without_trust_the_api_key_names_the_tenant_whatever_x_tenant_says() {
    let upstream = EchoUpstream::start().await;
    let secret = std::env::temp_dir().join(format!("sluice-hash-key-{}", std::process::id()));
    std::fs::write(&secret, [SECRET, b"\n"].concat()).unwrap();
    let proxy = rate_limited(
        &upstream,
        &["--tenant-hash-key-file", secret.to_str().unwrap()],
    );

    // One key, twenty tenants claimed: one budget.
    let mut replies = Vec::new();
    for i in 0..20 {
        let tenant = format!("claimed-{i}");
        let headers = [("authorization", "Bearer sk-alice"), ("x-tenant", &tenant)];
        replies.push(complete(&proxy, i, &headers).await);
    }
    assert_eq!(statuses(&replies), BTreeMap::from([(200, 2), (429, 18)]));
    let limited = &replies[19];
    assert_eq!(limited.json()["error"]["code"], "rate_limited");
    let message = limited.json()["error"]["message"].to_string();
    assert!(message.contains("this tenant"), "{message}");
    for hidden in ["claimed-19", "key:", "sk-alice"] {
        assert!(!limited.text().contains(hidden), "{}", limited.text());
    }

    // A client without a key claiming bob's tenant, by its digest (which a
    // proxy sharing the secret file computes alike), is the anonymous tenant.
    let bob = [("authorization", "Bearer sk-bob")];
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Bearer sk-bob".parse().unwrap());
    let bob_tenant = Tenants::new(false, SECRET).of(&headers, None).unwrap();
    let mut claims = Vec::new();
    for i in 20..23 {
        claims.push(complete(&proxy, i, &[("x-tenant", &bob_tenant)]).await);
    }
    assert_eq!(statuses(&claims), BTreeMap::from([(200, 2), (429, 1)]));
    // Bob's own budget is untouched.
    assert_eq!(complete(&proxy, 23, &bob).await.status, 200);
    assert_eq!(complete(&proxy, 24, &bob).await.status, 200);
    assert_eq!(complete(&proxy, 25, &bob).await.status, 429);

    // Neither keys, their digests nor claimed tenants reach the log.
    let logs = proxy.logs().join("\n");
    assert!(logs.contains("rate limit exceeded"), "{logs}");
    for hidden in ["key:", "sk-alice", "sk-bob", "claimed-"] {
        assert!(!logs.contains(hidden), "{hidden} in the log:\n{logs}");
    }
}

#[tokio::test]
async fn a_trusted_x_tenant_that_is_no_tenant_name_is_refused_briefly() {
    let upstream = EchoUpstream::start().await;
    let proxy = rate_limited(&upstream, &["--trust-tenant-header"]);
    let huge = "x".repeat(60 * 1024);
    let reply = complete(&proxy, 1, &[("x-tenant", &huge)]).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.body.len() < 1024, "{} bytes", reply.body.len());
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "invalid_tenant");
    assert_eq!(error["param"], "x-tenant");
    assert!(
        error["message"].as_str().unwrap().contains("61440 bytes"),
        "{error}"
    );
    let refused = complete(&proxy, 2, &[("x-tenant", "team a")]).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 0);
    assert_eq!(
        proxy
            .metric("sluice_requests_total{outcome=\"invalid_tenant\"}")
            .await,
        2.0
    );
    let logs = proxy.logs().join("\n");
    assert!(!logs.contains("xxxxxxxx"), "the value reached the log");
    assert!(logs.len() < 16 * 1024, "{} bytes of log", logs.len());
    // A valid name is the tenant, the key notwithstanding.
    let team = [("x-tenant", "team-a"), ("authorization", "Bearer sk-1")];
    assert_eq!(complete(&proxy, 3, &team).await.status, 200);
    assert_eq!(complete(&proxy, 4, &team).await.status, 200);
    assert_eq!(complete(&proxy, 5, &team).await.status, 429);
    let other = [("x-tenant", "team-b"), ("authorization", "Bearer sk-1")];
    assert_eq!(complete(&proxy, 6, &other).await.status, 200);
}

#[tokio::test]
async fn reload_hands_the_queue_over_and_rejects_bad_plugins() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("hold", &policies::hold_all());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    let url = format!("{}/v1/completions", proxy.url());
    let waiting = spawn_all(5, |_| {
        let url = url.clone();
        async move { send(Method::POST, &url, &[], Bytes::from_static(BODY.as_bytes())).await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            proxy.stats().await["policy"]["queued"] == 5
        })
        .await
    );
    let admin = format!("http://{}/admin/policy", proxy.admin);
    // A broken component is refused and the running policy stays.
    let bad = send(
        Method::PUT,
        &admin,
        &[],
        Bytes::from_static(b"(component (core module))junk"),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("policy rejected")
    );
    assert_eq!(proxy.stats().await["policy"]["queued"], 5);
    // A good one takes over the queue.
    let good = send(
        Method::PUT,
        &admin,
        &[],
        Bytes::from(policies::admit_each()),
    )
    .await;
    assert_eq!(good.status, 200, "{}", good.text());
    let replies = waiting.await.unwrap();
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(upstream.seen.total.load(Ordering::SeqCst), 5);
    assert_eq!(
        proxy
            .metric("sluice_policy_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sluice_policy_reloads_total{result=\"rejected\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn reload_after_a_fault_leaves_the_fallback() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("traps", &policies::traps());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    assert_eq!(complete(&proxy, 1, &[]).await.status, 200);
    assert_eq!(proxy.metric("sluice_policy_fallback_active").await, 1.0);
    let admin = format!("http://{}/admin/policy", proxy.admin);
    let good = send(
        Method::PUT,
        &admin,
        &[],
        Bytes::from(policies::admit_each()),
    )
    .await;
    assert_eq!(good.status, 200);
    assert_eq!(proxy.metric("sluice_policy_fallback_active").await, 0.0);
    assert_eq!(complete(&proxy, 2, &[]).await.status, 200);
    assert_eq!(proxy.stats().await["policy"]["fallback"], false);
}

#[tokio::test]
async fn sighup_reloads_the_policy_file() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("sighup", &policies::hold_all());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    let url = proxy.url();
    let waiting = tokio::spawn(async move {
        send(
            Method::POST,
            &format!("{url}/v1/completions"),
            &[],
            Bytes::from_static(BODY.as_bytes()),
        )
        .await
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            proxy.stats().await["policy"]["queued"] == 1
        })
        .await
    );
    std::fs::write(&path, policies::admit_each()).unwrap();
    proxy.signal("HUP");
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn sighup_with_a_broken_policy_file_keeps_the_running_policy() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("sighup-broken", &policies::admit_each());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", path.to_str().unwrap()]);
    assert_eq!(complete(&proxy, 1, &[]).await.status, 200);
    let rejected_reloads = |n: f64| {
        let proxy = &proxy;
        async move {
            wait_until(Duration::from_secs(10), || async {
                proxy
                    .metric("sluice_policy_reloads_total{result=\"rejected\"}")
                    .await
                    == n
            })
            .await
        }
    };
    // Not a component.
    std::fs::write(&path, "(component (core module))junk").unwrap();
    proxy.signal("HUP");
    assert!(rejected_reloads(1.0).await, "{}", proxy.metrics().await);
    // Gone.
    std::fs::remove_file(&path).unwrap();
    proxy.signal("HUP");
    assert!(rejected_reloads(2.0).await, "{}", proxy.metrics().await);
    // The policy loaded at start still decides: no fallback, no fault, and
    // its calls go on being counted.
    assert_eq!(complete(&proxy, 2, &[]).await.status, 200);
    assert_eq!(
        proxy
            .metric("sluice_policy_calls_total{event=\"arrival\"}")
            .await,
        2.0
    );
    assert_eq!(proxy.metric("sluice_policy_faults_total").await, 0.0);
    assert_eq!(
        proxy
            .metric("sluice_policy_reloads_total{result=\"ok\"}")
            .await,
        0.0
    );
    assert_eq!(proxy.stats().await["policy"]["fallback"], false);
    let logged = wait_until(Duration::from_secs(5), || {
        let failures = proxy
            .logs()
            .iter()
            .filter(|l| l.contains("policy reload failed"))
            .count();
        async move { failures == 2 }
    })
    .await;
    assert!(logged, "{:#?}", proxy.logs());
}
