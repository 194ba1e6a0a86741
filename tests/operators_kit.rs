//! The operators' kit (`deploy/`) against a live Sluice: the Grafana
//! dashboard's panels are well formed, the Prometheus rules pass `promtool
//! check rules` and their unit tests (`promtool test rules`), and every
//! PromQL expression of the dashboard and the rules parses and returns
//! series from a real Prometheus scraping a proxy in front of an in-test
//! engine after some traffic. A renamed metric breaks this test, naming
//! each expression that came back empty, instead of breaking a dashboard.
//!
//! Needs `promtool` and `prometheus` on PATH (`scripts/install-test-tools.sh`).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::prometheus::{PrometheusServer, require_tool};
use common::{ProxyProcess, send, wait_until};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(deploy("grafana/sluice.json")).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// The dashboard's panels that chart something (rows only group them).
fn charts(dashboard: &Value) -> Vec<&Value> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// Every query of the dashboard: (panel title, PromQL with Grafana's
/// `$__rate_interval` as 1m).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard = dashboard();
    charts(&dashboard)
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| {
                    let expr = t["expr"].as_str().unwrap_or("");
                    (title.clone(), expr.replace("$__rate_interval", "1m"))
                })
        })
        .collect()
}

/// Every rule of rules.yml: (its record or alert name, its expression).
/// Each expression is written on one line.
fn rules() -> Vec<(String, String, bool)> {
    let text = std::fs::read_to_string(deploy("prometheus/rules.yml")).expect("read the rules");
    let mut rules = Vec::new();
    let mut name: Option<(String, bool)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(record) = line.strip_prefix("- record:") {
            name = Some((record.trim().to_owned(), false));
        } else if let Some(alert) = line.strip_prefix("- alert:") {
            name = Some((alert.trim().to_owned(), true));
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let (name, alert) = name.take().expect("an expr follows its record or alert");
            rules.push((name, expr.trim().to_owned(), alert));
        }
    }
    rules
}

/// The Sluice series an expression reads: metric and recording-rule names.
fn sluice_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.contains("sluice") && !w.is_empty())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_chart_has_a_title_a_unit_and_the_datasource_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of Prometheus data sources"
    );
    let charts = charts(&dashboard);
    assert!(charts.len() >= 20, "{} charts", charts.len());
    for panel in charts {
        let title = panel["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("");
        assert!(!unit.is_empty(), "{title}: no unit");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}"
            );
        }
    }
}

#[test]
fn promtool_checks_the_rules_and_runs_their_tests() {
    require_tool("promtool");
    let dir = deploy("prometheus");
    for args in [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(dir.join("rules.test.yml")).unwrap();
    for (name, _, alert) in rules() {
        if alert {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "{name} has no test"
            );
        }
    }
}

/// An engine just rich enough to give Sluice every series: completions with
/// usage (and cached tokens), streams of several tokens, and a vLLM-shaped
/// `/metrics` whose prefix-cache counters move.
async fn engine() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scrapes = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let scrapes = Arc::clone(&scrapes);
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(Arc::clone(&scrapes), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn answer(
    scrapes: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = |ctype: &str, body: String| {
        Response::builder()
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if path == "/metrics" {
        let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
        return Ok(text(
            "text/plain",
            format!(
                "vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"1000\"}} 1.0\n\
                 vllm:num_requests_running{{model_name=\"m\"}} 2.0\n\
                 vllm:num_requests_waiting{{model_name=\"m\"}} 1.0\n\
                 vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.25\n\
                 vllm:prefix_cache_queries_total{{model_name=\"m\"}} {}\n\
                 vllm:prefix_cache_hits_total{{model_name=\"m\"}} {}\n",
                n * 100,
                n * 40
            ),
        ));
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let usage = json!({"prompt_tokens": 40, "completion_tokens": 4, "total_tokens": 44,
                       "prompt_tokens_details": {"cached_tokens": 16}});
    if request["stream"] == true {
        let mut events = String::new();
        for token in ["a", "b", "c", "d"] {
            let chunk = json!({"id": "c", "object": "text_completion",
                               "choices": [{"index": 0, "text": token}], "usage": null});
            events.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = json!({"id": "c", "object": "text_completion", "choices": [], "usage": usage});
        events.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        return Ok(text("text/event-stream", events));
    }
    let completion = json!({"id": "c", "object": "text_completion",
                            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                            "usage": usage});
    Ok(text("application/json", completion.to_string()))
}

/// Completions plain and streamed, live and batch, and one refused.
async fn traffic(proxy: &ProxyProcess) {
    let url = format!("{}/v1/completions", proxy.url());
    let prompt = "You are a careful reviewer. Score the candidate against the rubric. ".repeat(8);
    for i in 0..12 {
        let stream = i % 3 == 0;
        let priority = if i % 2 == 0 { "0" } else { "5" };
        let body = json!({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": stream});
        let reply = send(
            Method::POST,
            &url,
            &[
                ("content-type", "application/json"),
                ("x-priority", priority),
            ],
            Bytes::from(body.to_string()),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let bad = send(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"prompt\": "),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

// Multi-threaded: the proxy scrapes this test's engine while the test
// waits on Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_expression_returns_series_from_a_live_sluice() {
    let engine = engine().await;
    let plugin = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/dist/adaptive.wasm");
    let proxy = ProxyProcess::start(
        &format!("http://{engine}"),
        &["--policy", plugin, "--scrape-interval", "1s"],
    );
    traffic(&proxy).await;
    let rule_file = deploy("prometheus/rules.yml");
    let mut prometheus = PrometheusServer::with_rules(proxy.admin, &[rule_file.as_path()]);
    // Ready once the recording rules have two scrapes to take a rate over.
    let recorded = wait_until(Duration::from_secs(60), || async {
        prometheus
            .series("route_quantile:sluice_request_duration_seconds:5m")
            .await
            .is_ok_and(|n| n > 0)
            && prometheus
                .series("sluice:prefix_engine_hit_ratio:5m")
                .await
                .is_ok_and(|n| n > 0)
    })
    .await;
    prometheus.assert_running();
    assert!(
        recorded,
        "no recorded series in 60 s; log:\n{}",
        prometheus.log()
    );
    // More traffic between scrapes, so rates see it.
    traffic(&proxy).await;

    let metrics = send(
        Method::GET,
        &format!("http://{}/metrics", proxy.admin),
        &[],
        Bytes::new(),
    )
    .await
    .text();
    let has_gpu = metrics.contains("sluice_gpu_memory_used_bytes{");
    let needs_gpu = |expr: &str| {
        sluice_names(expr)
            .iter()
            .all(|n| n.starts_with("sluice_gpu_"))
    };

    let mut empty = Vec::new();
    let mut broken = Vec::new();
    let mut gpu_only = Vec::new();
    let mut checked = 0;
    for (title, expr) in dashboard_queries() {
        match prometheus.series(&expr).await {
            Err(e) => broken.push(format!("panel {title:?}: {expr}: {e}")),
            Ok(0) if !has_gpu && needs_gpu(&expr) => gpu_only.push(title),
            Ok(0) => empty.push(format!("panel {title:?}: {expr}")),
            Ok(_) => checked += 1,
        }
    }
    for (name, expr, alert) in rules() {
        match prometheus.series(&expr).await {
            Err(e) => broken.push(format!("rule {name}: {expr}: {e}")),
            // An alert that is not firing returns nothing: each series it
            // reads must exist instead.
            Ok(_) if alert => {
                for series in sluice_names(&expr) {
                    match prometheus.series(&series).await {
                        Ok(n) if n > 0 => checked += 1,
                        _ => empty.push(format!("alert {name}: {series}")),
                    }
                }
            }
            Ok(0) => empty.push(format!("rule {name}: {expr}")),
            Ok(_) => checked += 1,
        }
    }
    prometheus.assert_running();
    assert!(
        broken.is_empty(),
        "expressions Prometheus refused:\n{}",
        broken.join("\n")
    );
    assert!(
        empty.is_empty(),
        "expressions that returned no series from a live Sluice:\n{}",
        empty.join("\n")
    );
    // Without a GPU only the GPU panels may be empty.
    if !has_gpu {
        assert_eq!(gpu_only, ["GPU memory", "GPU memory", "GPU utilization"]);
    }
    assert!(checked > 30, "{checked} expressions checked");
}
