//! The KV-event mirror against a real vLLM that publishes its cache events
//! (`SLUICE_VLLM_KV_EVENTS=1 just vllm`): what the engine reports it holds,
//! Sluice's tracker predicts, and the engine's own `cached_tokens` agrees.
//!
//! `#[ignore]`d in the fast tier; needs `SLUICE_VLLM_URL` and
//! `SLUICE_VLLM_KV_ENDPOINT` (e.g. `tcp://127.0.0.1:5557`), and is skipped
//! with a message when the endpoint is not set.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{post_json, wait_until};
use serde_json::json;
use sluice::classify::Prompt;
use sluice::prefix::PrefixTracker;

/// Token ids no earlier run sent: the engine reports only blocks it newly
/// caches, so a prompt it already holds would publish nothing.
fn fresh_ids(n: usize, salt: u64) -> Vec<u32> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    let mut state = nanos ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            200 + ((state >> 33) % 3800) as u32
        })
        .collect()
}

/// Sends a token-id prompt; returns the engine's `cached_tokens`.
async fn complete(url: &str, ids: &[u32]) -> u64 {
    let reply = post_json(
        &format!("{url}/v1/completions"),
        &json!({"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert!(reply.status.is_success(), "{}", reply.text());
    reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "needs a real vLLM publishing KV events (SLUICE_VLLM_URL, SLUICE_VLLM_KV_ENDPOINT)"]
async fn mirrors_a_real_engine() {
    let url = std::env::var("SLUICE_VLLM_URL").expect("set SLUICE_VLLM_URL");
    let Some(endpoint) = std::env::var("SLUICE_VLLM_KV_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
    else {
        eprintln!(
            "skipped: set SLUICE_VLLM_KV_ENDPOINT (and start vLLM with SLUICE_VLLM_KV_EVENTS=1)"
        );
        return;
    };
    let tracker = Arc::new(PrefixTracker::new(100_000, 16));
    let handle = sluice::kv_events::spawn("real".into(), endpoint, "kv".into(), tracker.clone());
    assert!(wait_until(Duration::from_secs(10), || async { handle.live() }).await);

    // The subscription reaches the engine a moment after the connect: send
    // fresh prompts until their events arrive.
    let mut salt = 0;
    let arrived = wait_until(Duration::from_secs(60), || {
        salt += 1;
        let (url, ids, handle) = (&url, fresh_ids(40, salt), &handle);
        async move {
            complete(url, &ids).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            handle.events() > 0
        }
    })
    .await;
    assert!(arrived, "no KV event within 60 s");
    assert_eq!(
        tracker.block_size(),
        32,
        "the engine's block size was adopted"
    );

    // A shared 64-token prefix: the first prompt caches it, the second hits it.
    let prefix = fresh_ids(64, 1_000);
    let first = [prefix.clone(), fresh_ids(40, 1_001)].concat();
    let second = [prefix.clone(), fresh_ids(40, 1_002)].concat();
    assert_eq!(complete(&url, &first).await, 0);
    let lookup = |ids: &[u32]| {
        tracker
            .lookup(&Prompt::Tokens(vec![ids.to_vec()]))
            .cached_tokens
    };
    assert!(
        wait_until(Duration::from_secs(10), || async { lookup(&first) == 96 }).await,
        "the first prompt's three blocks were mirrored"
    );
    let predicted = lookup(&second);
    assert_eq!(predicted, 64);
    assert_eq!(
        complete(&url, &second).await,
        u64::from(predicted),
        "the engine agrees"
    );
    assert_eq!(handle.gaps(), 0);
}
