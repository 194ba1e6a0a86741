//! The admin listener's Prometheus exposition, checked by Prometheus's own
//! tools: `promtool check metrics` on real output (format and lint), and a
//! real Prometheus server scraping the proxy and answering a
//! `histogram_quantile` query over Sluice's latency histogram, the way users
//! consume these metrics.
//!
//! Needs `promtool` and `prometheus` on PATH (Debian's `prometheus` package;
//! `scripts/install-test-tools.sh` installs it, `just test` runs that first).
//! Without them these tests fail, they do not skip.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::policies;
use common::prometheus::{INSTALL_HINT, PrometheusServer, require_tool};
use common::upstream::EchoUpstream;
use common::{ProxyProcess, post_json, send, wait_until};
use http::{Method, StatusCode};
use serde_json::json;

fn completion() -> serde_json::Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 4})
}

/// The three kinds of traffic that create Sluice's series: a completion that
/// succeeds, a 400 for bad JSON (answered by the proxy), a 404 passed
/// through from the upstream.
async fn mixed_traffic(proxy: &ProxyProcess) {
    let url = format!("{}/v1/completions", proxy.url());
    let ok = post_json(&url, &completion()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let bad = send(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"prompt\": "),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    let missing = send(
        Method::POST,
        &url,
        &[
            ("content-type", "application/json"),
            ("x-test-status", "404"),
        ],
        Bytes::from(completion().to_string()),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
}

/// Runs `promtool check metrics` on `text`: (exit code, stdout + stderr).
fn promtool_check_metrics(text: &str) -> (Option<i32>, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start promtool ({e}): {INSTALL_HINT}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), report)
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    require_tool("promtool");
    let upstream = EchoUpstream::start().await;
    // A pass-through policy, so the policy and queue families are exposed too.
    let policy = policies::write("prometheus-admit", &policies::admit_each());
    let proxy = ProxyProcess::start(&upstream.url(), &["--policy", policy.to_str().unwrap()]);
    mixed_traffic(&proxy).await;
    // Usage (token counters) is recorded as the response body ends; wait for
    // it so that the exposition holds every kind of series the traffic makes.
    let settled = wait_until(Duration::from_secs(5), || async {
        let text = proxy.metrics().await;
        common::metric_value(&text, "sluice_output_tokens_total") >= 1.0
            && common::metric_value(&text, "sluice_requests_total") >= 3.0
    })
    .await;
    let text = proxy.metrics().await;
    assert!(settled, "traffic not recorded in /metrics:\n{text}");
    for family in [
        "sluice_requests_total",
        "sluice_request_duration_seconds_bucket",
        "sluice_upstream_duration_seconds_bucket",
        "sluice_queue_wait_seconds_bucket",
        "sluice_policy_calls_total",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }

    let started = Instant::now();
    let (code, report) = promtool_check_metrics(&text);
    eprintln!(
        "promtool check metrics: exit {code:?} in {:?}; output: {:?}",
        started.elapsed(),
        report.trim()
    );
    // promtool exits 1 on a parse error and 3 on lint problems (printed one
    // per line as `metric_name: problem`). Both fail: no lint finding on
    // Sluice's metrics is unavoidable, so none is filtered.
    assert_eq!(
        code,
        Some(0),
        "promtool check metrics rejected Sluice's /metrics:\n{report}\n--- exposition ---\n{text}"
    );
}

#[tokio::test]
async fn prometheus_answers_histogram_quantile_over_sluice_latency() {
    let test_started = Instant::now();
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    let url = format!("{}/v1/completions", proxy.url());
    // One request first, so the histogram's series exist from Prometheus's
    // first scrape: rate() needs two samples of a series, and counts an
    // increase only between them.
    assert_eq!(post_json(&url, &completion()).await.status, StatusCode::OK);

    let mut prometheus = PrometheusServer::start(proxy.admin);
    let ready = wait_until(Duration::from_secs(30), || async {
        prometheus
            .get("/-/ready")
            .await
            .is_some_and(|r| r.status == StatusCode::OK)
    })
    .await;
    prometheus.assert_running();
    assert!(
        ready,
        "prometheus not ready in 30 s; log:\n{}",
        prometheus.log()
    );
    let ready_after = test_started.elapsed();

    // Wait for the first scrape of the proxy to land (the target is up and
    // the latency histogram is stored).
    let scraped = wait_until(Duration::from_secs(30), || async {
        prometheus.query(r#"up{job="sluice"}"#).await == Some(1.0)
            && prometheus
                .query("sum(sluice_request_duration_seconds_count)")
                .await
                .is_some_and(|n| n >= 1.0)
    })
    .await;
    prometheus.assert_running();
    let targets = prometheus
        .get("/api/v1/targets")
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    assert!(
        scraped,
        "prometheus did not scrape the admin listener {}; targets: {targets}\nlog:\n{}",
        proxy.admin,
        prometheus.log()
    );
    let first_scrape_after = test_started.elapsed();

    for i in 0..50 {
        let reply = post_json(&url, &completion()).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
    }

    let promql =
        "histogram_quantile(0.5, sum by (le) (rate(sluice_request_duration_seconds_bucket[30s])))";
    let last = std::cell::Cell::new(None);
    let answered = wait_until(Duration::from_secs(30), || async {
        // NaN until a scrape after the 50 requests shows an increase.
        let value = prometheus.query(promql).await;
        last.set(value);
        value.is_some_and(|m| m.is_finite() && m > 0.0)
    })
    .await;
    prometheus.assert_running();
    let median = last.get().unwrap_or(f64::NAN);
    assert!(
        answered,
        "no finite median from Prometheus in 30 s (last: {median}); /metrics:\n{}\nlog:\n{}",
        proxy.metrics().await,
        prometheus.log()
    );
    eprintln!(
        "prometheus: ready after {ready_after:?}, first scrape after {first_scrape_after:?}, \
         median request duration {median} s after {:?}",
        test_started.elapsed()
    );
    // The echo upstream answers at once: the median is far below a second.
    assert!(
        median < 1.0,
        "median request duration {median} s; /metrics:\n{}",
        proxy.metrics().await
    );
}
