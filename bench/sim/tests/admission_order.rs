//! Admission order and fair shares through the proxy in front of the
//! simulated vLLM (`rtx4080`), judged by counting completions, not by
//! timing: `concurrency.wasm` with a limit of 4 faces a backlog of 200
//! requests from one tenant, then a trickle of 40 from another, then one
//! request of higher priority.
//!
//! Each response, when it ends, takes the next number of a shared counter.
//! First in, first out would finish the trickle after the whole backlog
//! (about 200 completions after it queued); turns between the tenants
//! finish it within about twice its size.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice_sim::{Profile, serve};

const LIMIT: usize = 4;
const BACKLOG: usize = 200;
const TRICKLE: usize = 40;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Sends one completion as `tenant` at `priority`; returns the counter's
/// number when its response ended.
async fn send(
    client: HttpClient,
    url: String,
    tenant: &str,
    priority: i32,
    done: Arc<AtomicUsize>,
) -> usize {
    let body = r#"{"model":"tiny-llama","prompt":"Evaluate the candidate against the rubric.","max_tokens":64,"ignore_eos":true}"#;
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-tenant", tenant)
        .header("x-priority", priority.to_string())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = client.request(request).await.expect("the proxy answers");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("a whole body");
    done.fetch_add(1, Ordering::SeqCst)
}

/// The proxy's queue length, from `/stats` on its admin listener.
async fn queued(client: &HttpClient, admin: &str) -> usize {
    let request = http::Request::get(format!("{admin}/stats"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = client
        .request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    stats["policy"]["queued"].as_u64().unwrap_or(0) as usize
}

async fn until_queued(client: &HttpClient, admin: &str, at_least: usize) -> bool {
    for _ in 0..2_000 {
        if queued(client, admin).await >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_between_tenants_and_priority_first_by_counting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        Profile::load("rtx4080").unwrap(),
        std::future::pending(),
    ));

    let plugin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../plugins/dist/concurrency.wasm"
    );
    assert!(
        std::path::Path::new(plugin).is_file(),
        "{plugin} is missing: run `just plugins`"
    );
    let argv = [
        "proxy",
        "--upstream",
        &engine,
        "--policy",
        plugin,
        "--policy-config",
        &format!("limit={LIMIT}"),
        // The test is the gateway that names each request's tenant.
        "--trust-tenant-header",
    ];
    let config = sluice::cli::load(argv).unwrap();
    let app = sluice::App::new(config).unwrap();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/completions", main.local_addr().unwrap());
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let listeners = sluice::server::Listeners { main, admin };
    tokio::spawn(sluice::server::run(app, listeners, std::future::pending()));

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let done = Arc::new(AtomicUsize::new(0));
    let spawn = |tenant: &'static str, priority: i32| {
        tokio::spawn(send(
            client.clone(),
            url.clone(),
            tenant,
            priority,
            Arc::clone(&done),
        ))
    };
    let backlog: Vec<_> = (0..BACKLOG).map(|_| spawn("backlog", 0)).collect();
    assert!(
        until_queued(&client, &admin_url, BACKLOG / 2).await,
        "no backlog built up"
    );

    let before_trickle = done.load(Ordering::SeqCst);
    let trickle: Vec<_> = (0..TRICKLE).map(|_| spawn("trickle", 0)).collect();
    let backlog_left = BACKLOG - before_trickle - LIMIT;
    assert!(
        backlog_left >= TRICKLE * 2,
        "the backlog drained too soon ({backlog_left} left)"
    );

    let mut trickle_done = Vec::new();
    for task in trickle {
        trickle_done.push(task.await.unwrap());
    }
    // Turns alternate: the trickle's 40 finish within its 40 turns and the
    // backlog's 40 beside them, plus the requests already running and the
    // ones still being queued as the trickle arrived.
    let last = *trickle_done.iter().max().unwrap();
    eprintln!("trickle queued after {before_trickle} completions; its last finished {last}th");
    let bound = before_trickle + 2 * TRICKLE + 2 * LIMIT;
    assert!(
        last < bound,
        "the trickle's last finished {last}th; turns bound it by {bound}"
    );

    // One request of priority 10 behind what is left of the backlog.
    let before_urgent = done.load(Ordering::SeqCst);
    let left = BACKLOG + TRICKLE - before_urgent;
    let urgent = spawn("backlog", 10).await.unwrap();
    eprintln!(
        "priority request queued after {before_urgent} completions, {left} left; finished {urgent}th"
    );
    assert!(
        left > 4 * LIMIT,
        "too little left behind the priority request ({left})"
    );
    assert!(
        urgent < before_urgent + 2 * LIMIT + 1,
        "the priority request finished {urgent}th, {} after it queued",
        urgent - before_urgent
    );
    for task in backlog {
        task.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), BACKLOG + TRICKLE + 1);
}
