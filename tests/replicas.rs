//! Several replicas behind one proxy (`--upstream A,B`): where requests go
//! under each `--route`, failover before a request is sent, never sending
//! one twice, and the answer when every replica is down.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::upstream::{EchoUpstream, Seen, raw_server, read_request};
use common::{ProxyProcess, post_json, send};
use http::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// A completion whose prompt starts with rubric `group`'s shared text
/// (several prefix blocks long) and ends with its own candidate `i`.
fn rubric_request(group: usize, i: usize) -> bytes::Bytes {
    let rubric = format!("Rubric {group}: ").repeat(40);
    let body = json!({"model": "m", "max_tokens": 1, "prompt": format!("{rubric} candidate {i}")});
    bytes::Bytes::from(body.to_string())
}

async fn post_tagged(proxy: &ProxyProcess, tag: &str, body: bytes::Bytes) -> common::Reply {
    send(
        Method::POST,
        &format!("{}/v1/completions", proxy.url()),
        &[("content-type", "application/json"), ("x-test-id", tag)],
        body,
    )
    .await
}

/// The tags (`x-test-id`) each upstream received, by upstream index.
fn tags_by_upstream(seen: &[&Arc<Seen>]) -> Vec<Vec<String>> {
    seen.iter()
        .map(|s| {
            s.arrivals
                .lock()
                .unwrap()
                .iter()
                .map(|(_, tag)| tag.clone())
                .filter(|tag| !tag.is_empty())
                .collect()
        })
        .collect()
}

/// Sends `rounds` requests for each of `groups` rubrics, one at a time,
/// and returns which upstreams each group's requests reached.
async fn spread(route: &str, groups: usize, rounds: usize) -> HashMap<usize, Vec<usize>> {
    let (a, b) = (EchoUpstream::start().await, EchoUpstream::start().await);
    let proxy = ProxyProcess::start(&format!("{},{}", a.url(), b.url()), &["--route", route]);
    for i in 0..rounds {
        for group in 0..groups {
            let reply =
                post_tagged(&proxy, &format!("g{group}-{i}"), rubric_request(group, i)).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    let mut reached: HashMap<usize, Vec<usize>> = HashMap::new();
    for (upstream, tags) in tags_by_upstream(&[&a.seen, &b.seen])
        .into_iter()
        .enumerate()
    {
        for tag in tags {
            let group: usize = tag[1..tag.find('-').unwrap()].parse().unwrap();
            reached.entry(group).or_default().push(upstream);
        }
    }
    reached
}

#[tokio::test]
async fn prefix_routing_keeps_each_rubric_on_one_replica() {
    let reached = spread("prefix", 4, 6).await;
    assert_eq!(reached.len(), 4, "{reached:?}");
    for (group, upstreams) in &reached {
        assert_eq!(upstreams.len(), 6, "group {group}: {upstreams:?}");
        assert!(
            upstreams.iter().all(|u| *u == upstreams[0]),
            "group {group} was split over replicas: {upstreams:?}"
        );
    }
}

#[tokio::test]
async fn round_robin_alternates_whatever_the_prompt() {
    let reached = spread("round-robin", 1, 6).await;
    let upstreams = &reached[&0];
    assert_eq!(
        upstreams.iter().filter(|u| **u == 0).count(),
        3,
        "{upstreams:?}"
    );
    assert_eq!(
        upstreams.iter().filter(|u| **u == 1).count(),
        3,
        "{upstreams:?}"
    );
}

/// An address nothing listens on.
async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_replica_that_refuses_connections_is_skipped_without_losing_the_request() {
    let dead = dead_address().await;
    let live = EchoUpstream::start().await;
    // Round-robin's first turn is the first replica: the dead one.
    let proxy = ProxyProcess::start(
        &format!("http://{dead},{}", live.url()),
        &["--route", "round-robin"],
    );
    for i in 0..4 {
        let reply = post_tagged(&proxy, &format!("r{i}"), rubric_request(0, i)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(tags_by_upstream(&[&live.seen])[0].len(), 4);
    let failovers = format!("sluice_replica_failovers_total{{replica=\"{dead}\"}}");
    assert_eq!(
        proxy.metric(&failovers).await,
        1.0,
        "{}",
        proxy.metrics().await
    );
    let failed_over = "sluice_replica_requests_total{reason=\"failover\"}";
    assert_eq!(proxy.metric(failed_over).await, 1.0);
    let replicas = proxy.stats().await["replicas"].clone();
    assert_eq!(replicas[0]["healthy"], false, "{replicas}");
    assert_eq!(replicas[1]["healthy"], true, "{replicas}");
}

/// Answers `GET /health`; reads every other request whole and closes the
/// connection without an answer, counting it.
async fn takes_requests_and_dies(requests: Arc<AtomicUsize>) -> SocketAddr {
    raw_server(move |mut stream| {
        let requests = Arc::clone(&requests);
        async move {
            while let Some(request) = read_request(&mut stream).await {
                if request.starts_with(b"GET /health") {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                    continue;
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let _ = stream.shutdown().await;
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_request_that_reached_a_replica_is_never_sent_to_another() {
    let died_with = Arc::new(AtomicUsize::new(0));
    let dying = takes_requests_and_dies(Arc::clone(&died_with)).await;
    let live = EchoUpstream::start().await;
    let proxy = ProxyProcess::start(
        &format!("http://{dying},{}", live.url()),
        &["--route", "round-robin"],
    );
    let first = post_tagged(&proxy, "first", rubric_request(0, 0)).await;
    assert_eq!(first.status, 502, "{}", first.text());
    assert_eq!(first.json()["error"]["code"], "upstream_bad_response");
    assert_eq!(died_with.load(Ordering::SeqCst), 1);
    assert!(
        tags_by_upstream(&[&live.seen])[0].is_empty(),
        "the request was sent again to the other replica"
    );
    let second = post_tagged(&proxy, "second", rubric_request(0, 1)).await;
    assert_eq!(second.status, 200, "{}", second.text());
}

#[tokio::test]
async fn with_every_replica_down_the_answer_is_503_with_retry_after() {
    let (a, b) = (dead_address().await, dead_address().await);
    let proxy = ProxyProcess::start(&format!("http://{a},http://{b}"), &[]);
    // The first request finds both down by trying them (502); the next is
    // refused at once.
    let first = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &json!({"model": "m", "prompt": "x"}),
    )
    .await;
    assert_eq!(first.status, 502, "{}", first.text());
    let second = post_json(
        &format!("{}/v1/completions", proxy.url()),
        &json!({"model": "m", "prompt": "x"}),
    )
    .await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.json()["error"]["code"], "upstream_down");
    assert!(second.headers.contains_key("retry-after"));
    assert!(
        second.text().contains("all 2 replicas"),
        "{}",
        second.text()
    );
    let ready = send(
        Method::GET,
        &format!("{}/readyz", proxy.url()),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(ready.status, 503);
}
