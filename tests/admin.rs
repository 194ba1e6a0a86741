//! The admin listener's access rules, end to end: without a token reads are
//! open and changes are taken on a loopback listener only; with a token
//! every route needs it (`/metrics` and `/healthz` may stay open); the
//! listener answers only to IP literals, localhost and allowed names (DNS
//! rebinding); statistics reset on `POST /stats/reset`, not on a GET; and
//! `GET /admin/policy` reports the running plugin as it was loaded.

mod common;

use bytes::Bytes;
use common::upstream::EchoUpstream;
use common::{ProxyProcess, Reply, metric_value, policies, send};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: &str = r#"{"model":"m","prompt":"hello","max_tokens":4}"#;
const TOKEN: &str = "s3cret-admin-token";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn admin(
    proxy: &ProxyProcess,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let url = format!("http://{}{path}", proxy.admin);
    send(method, &url, headers, body.into()).await
}

async fn get(proxy: &ProxyProcess, path: &str) -> Reply {
    admin(proxy, Method::GET, path, &[], Bytes::new()).await
}

async fn complete(proxy: &ProxyProcess) -> Reply {
    send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[("content-type", "application/json")],
        Bytes::from_static(BODY.as_bytes()),
    )
    .await
}

/// Completions counted in a `/stats` body.
fn completions(stats: &serde_json::Value) -> u64 {
    stats["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["route"] == "completions")
        .filter_map(|s| s["latency"]["total"]["count"].as_u64())
        .sum()
}

fn assert_code(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], code, "{}", reply.text());
}

#[tokio::test]
async fn stats_reset_on_post_and_a_get_that_asks_is_refused() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(&upstream.url(), &[]);
    assert_eq!(complete(&proxy).await.status, 200);
    assert_eq!(completions(&get(&proxy, "/stats").await.json()), 1);

    for query in ["reset=1", "reset=true"] {
        let refused = get(&proxy, &format!("/stats?{query}")).await;
        assert_code(&refused, 405, "method_not_allowed");
        assert_eq!(refused.headers["allow"], "POST");
        let message = refused.json()["error"]["message"].to_string();
        assert!(message.contains("POST /stats/reset"), "{message}");
    }
    // The refused GETs reset nothing.
    assert_eq!(completions(&get(&proxy, "/stats").await.json()), 1);

    // The reset answers with the statistics from before it.
    let reset = admin(&proxy, Method::POST, "/stats/reset", &[], Bytes::new()).await;
    assert_eq!(reset.status, 200, "{}", reset.text());
    assert_eq!(completions(&reset.json()), 1);
    assert_eq!(completions(&get(&proxy, "/stats").await.json()), 0);
    let wrong = get(&proxy, "/stats/reset").await;
    assert_code(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.headers["allow"], "POST");
}

#[tokio::test]
async fn the_policy_report_names_the_running_plugin_and_follows_a_reload() {
    let upstream = EchoUpstream::start().await;
    let wat = policies::admit_each_described();
    let path = policies::write("described", &wat);
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--policy-config",
            "limit=3",
        ],
    );
    let report = get(&proxy, "/admin/policy").await;
    assert_eq!(report.status, 200, "{}", report.text());
    let first = report.json();
    let plugin = &first["plugin"];
    assert_eq!(plugin["source"], path.to_str().unwrap(), "{first}");
    assert_eq!(plugin["name"], "described");
    assert_eq!(plugin["sha256"], sha256_hex(wat.as_bytes()));
    assert_eq!(plugin["size_bytes"], wat.len());
    assert_eq!(plugin["description"], "admits each arrival");
    assert_eq!(plugin["config"], serde_json::json!({ "limit": "3" }));
    assert_eq!(plugin["contract"], "sluice:policy@0.1.0");
    let loaded_at = plugin["loaded_at"].as_str().unwrap();
    assert!(
        loaded_at.len() == 20 && loaded_at.ends_with('Z') && loaded_at.as_bytes()[10] == b'T',
        "{loaded_at}"
    );
    assert!(plugin["age_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        first["reloads"],
        serde_json::json!({ "ok": 0, "rejected": 0 })
    );
    assert_eq!(first["fallback"], false);

    // No token and a loopback listener: the upload is taken.
    let next = policies::admit_each();
    let reload = admin(
        &proxy,
        Method::PUT,
        "/admin/policy?mode=fast",
        &[],
        next.clone(),
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    let answer = reload.json();
    assert_eq!(answer["status"], "reloaded");
    assert_eq!(answer["plugin"]["sha256"], sha256_hex(next.as_bytes()));
    let second = get(&proxy, "/admin/policy").await.json();
    let plugin = &second["plugin"];
    assert_eq!(plugin["source"], "uploaded");
    assert_eq!(plugin["sha256"], sha256_hex(next.as_bytes()));
    assert_eq!(plugin["size_bytes"], next.len());
    assert_eq!(plugin["config"], serde_json::json!({ "mode": "fast" }));
    assert!(plugin["loaded_at"].as_str().unwrap() >= loaded_at);
    assert_eq!(
        second["reloads"],
        serde_json::json!({ "ok": 1, "rejected": 0 })
    );
    let refused = admin(&proxy, Method::PUT, "/admin/policy", &[], "junk").await;
    assert_eq!(refused.status, 400);
    // A refused upload changes nothing but the count.
    let third = get(&proxy, "/admin/policy").await.json();
    assert_eq!(third["plugin"]["sha256"], second["plugin"]["sha256"]);
    assert_eq!(third["plugin"]["loaded_at"], second["plugin"]["loaded_at"]);
    assert_eq!(
        third["reloads"],
        serde_json::json!({ "ok": 1, "rejected": 1 })
    );
}

#[tokio::test]
async fn with_a_token_every_route_needs_it() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("token", &policies::admit_each());
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--policy", path.to_str().unwrap(), "--admin-token", TOKEN],
    );
    let routes = [
        (Method::GET, "/metrics"),
        (Method::GET, "/healthz"),
        (Method::GET, "/stats"),
        (Method::POST, "/stats/reset"),
        (Method::GET, "/admin/policy"),
        (Method::PUT, "/admin/policy"),
        (Method::GET, "/no/such/route"),
    ];
    let bearer = format!("Bearer {TOKEN}");
    for (method, route) in &routes {
        let missing = admin(&proxy, method.clone(), route, &[], Bytes::new()).await;
        assert_code(&missing, 401, "unauthorized");
        assert_eq!(
            missing.headers["www-authenticate"], r#"Bearer realm="sluice-admin""#,
            "{route}"
        );
        let wrong = admin(
            &proxy,
            method.clone(),
            route,
            &[("authorization", "Bearer s3cret-admin-toke")],
            Bytes::new(),
        )
        .await;
        assert_code(&wrong, 401, "unauthorized");
        assert!(
            wrong.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
        let body = match *route {
            "/admin/policy" if method == Method::PUT => Bytes::from(policies::admit_each()),
            _ => Bytes::new(),
        };
        let right = admin(
            &proxy,
            method.clone(),
            route,
            &[("authorization", &bearer)],
            body,
        )
        .await;
        let expected = if *route == "/no/such/route" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(right.status, expected, "{method} {route}: {}", right.text());
    }
    let metrics = admin(
        &proxy,
        Method::GET,
        "/metrics",
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await
    .text();
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_admin_denied_total{reason=\"unauthorized\"}"
        ),
        (2 * routes.len()) as f64
    );
    assert!(
        proxy.logs().iter().all(|line| !line.contains(TOKEN)),
        "the token was logged"
    );
}

#[tokio::test]
async fn open_metrics_leaves_only_metrics_and_healthz_open() {
    let upstream = EchoUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("sluice-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--admin-token-file",
            token_file.to_str().unwrap(),
            "--admin-open-metrics",
        ],
    );
    assert_eq!(get(&proxy, "/metrics").await.status, 200);
    assert_eq!(get(&proxy, "/healthz").await.status, 200);
    assert_code(&get(&proxy, "/stats").await, 401, "unauthorized");
    assert_code(&get(&proxy, "/admin/policy").await, 401, "unauthorized");
    // The file's token, without its newline.
    let bearer = format!("Bearer {TOKEN}");
    let stats = admin(
        &proxy,
        Method::GET,
        "/stats",
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    assert_eq!(
        proxy
            .metric("sluice_admin_denied_total{reason=\"unauthorized\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn the_listener_answers_only_to_ip_literals_localhost_and_allowed_names() {
    let upstream = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--admin-allowed-host", "sluice.internal"],
    );
    let with_host = |host: &'static str| {
        let proxy = &proxy;
        async move {
            admin(
                proxy,
                Method::GET,
                "/healthz",
                &[("host", host)],
                Bytes::new(),
            )
            .await
        }
    };
    let refused = with_host("evil.example").await;
    assert_code(&refused, 403, "host_not_allowed");
    assert_code(
        &with_host("evil.example:9464").await,
        403,
        "host_not_allowed",
    );
    for host in [
        "localhost",
        "localhost:9464",
        "sluice.internal:9464",
        "[::1]:1",
    ] {
        assert_eq!(with_host(host).await.status, 200, "{host}");
    }
    // The client's own Host: 127.0.0.1:PORT.
    assert_eq!(get(&proxy, "/healthz").await.status, 200);

    // No Host at all (HTTP/1.0).
    let mut conn = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");

    // HTTP/2's :authority is checked as Host is.
    let stream = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut h2_status = |authority: &str| {
        let request = http::Request::get(format!("http://{authority}/healthz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let sent = h2.send_request(request);
        async move {
            let response = sent.await.unwrap();
            let status = response.status();
            response.into_body().collect().await.unwrap();
            status
        }
    };
    assert_eq!(h2_status("evil.example").await, 403);
    assert_eq!(h2_status(&proxy.admin.to_string()).await, 200);

    assert_eq!(
        proxy
            .metric("sluice_admin_denied_total{reason=\"host_not_allowed\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn a_listener_others_can_reach_takes_no_changes_without_a_token() {
    let upstream = EchoUpstream::start().await;
    let path = policies::write("exposed", &policies::admit_each());
    // Connecting to 0.0.0.0:PORT reaches it on 127.0.0.1 (Linux).
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &[
            "--policy",
            path.to_str().unwrap(),
            "--admin-listen",
            "0.0.0.0:0",
        ],
    );
    assert!(
        proxy
            .logs()
            .iter()
            .any(|line| line.contains("not on a loopback address")),
        "no warning: {:?}",
        proxy.logs()
    );
    let put = admin(
        &proxy,
        Method::PUT,
        "/admin/policy",
        &[],
        policies::admit_each(),
    )
    .await;
    assert_code(&put, 403, "admin_token_required");
    let message = put.json()["error"]["message"].to_string();
    assert!(message.contains("--admin-token"), "{message}");
    let reset = admin(&proxy, Method::POST, "/stats/reset", &[], Bytes::new()).await;
    assert_code(&reset, 403, "admin_token_required");
    // Reads stay open.
    assert_eq!(get(&proxy, "/stats").await.status, 200);
    assert_eq!(get(&proxy, "/admin/policy").await.status, 200);
    assert_eq!(
        proxy
            .metric("sluice_admin_denied_total{reason=\"admin_token_required\"}")
            .await,
        2.0
    );
}
