//! `bench sim --tokenizer`: token counts from a real `tokenizer.json`.
//!
//! The fast test writes a tiny byte-level BPE `tokenizer.json` (the shape
//! of the tiny model's own: ByteLevel pre-tokenizer and decoder, BPE with a
//! few merges) and checks that the served simulator's `usage`, prefix-cache
//! hits and context-length errors follow its counts. The ignored test uses
//! the tiny model's real tokenizer from `scripts/vllm.sh install`, and
//! compares with a real vLLM when `SLUICE_VLLM_URL` is set.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sluice_sim::Profile;
use sluice_sim::api::serve_with;
use sluice_sim::tokenizer::SimTokenizer;

/// GPT-2's byte-to-character table (what ByteLevel pre-tokenizers use).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A byte-level BPE: ids 0–255 are the bytes, then `th` (256), `the`
/// (257) and `Ġr` (258, a space and an r).
fn tiny_bpe_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), b.into());
    }
    for (id, tok) in [(256, "th"), (257, "the"), (258, "\u{120}r")] {
        vocab.insert(tok.to_string(), id.into());
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": ["t h", "th e", "\u{120} r"],
        },
    })
    .to_string()
}

fn write_fixture(test: &str) -> PathBuf {
    let name = format!("sluice-sim-tokenizer-{}-{test}.json", std::process::id());
    let path = std::env::temp_dir().join(name);
    std::fs::write(&path, tiny_bpe_json()).unwrap();
    path
}

/// A fast profile with 4-token blocks and a 64-token context.
fn profile() -> Profile {
    let mut p = Profile::load("vllm-cpu-tiny").unwrap();
    p.engine.block_size = 4;
    p.engine.max_model_len = 64;
    let t = &mut p.timing;
    (t.step_base_ms, t.prefill_token_ms, t.decode_seq_ms) = (0.05, 0.0, 0.0);
    (t.context_token_ms, t.request_overhead_ms) = (0.0, 0.0);
    (t.api_in_ms, t.api_out_ms, t.jitter) = (0.0, 0.0, 0.0);
    p
}

/// Serves the simulator with `tokenizer`; returns its base URL and a stop.
async fn start(tokenizer: &Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tokenizer = SimTokenizer::from_file(tokenizer).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_with(listener, profile(), Some(tokenizer), async {
        let _ = stopped.await;
    }));
    (base, stop)
}

async fn complete(base: &str, body: Value) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[test]
fn the_fixture_encodes_as_byte_level_bpe() {
    let path = write_fixture("encode");
    let t = SimTokenizer::from_file(&path).unwrap();
    // "the" merges whole; " rubric" is "Ġr" then one byte per letter.
    assert_eq!(
        t.encode("the rubric"),
        vec![257, 258, 117, 98, 114, 105, 99] // the, Ġr, u, b, r, i, c
    );
    assert_eq!(t.encode("é").len(), 2, "two UTF-8 bytes, no merge");
    assert_eq!(t.decode_token(257), "the");
    assert_eq!(t.vocab_size(), Some(259));
    std::fs::remove_file(path).unwrap();
}

#[tokio::test]
async fn usage_prefix_hits_and_context_checks_follow_the_tokenizer() {
    let path = write_fixture("serve");
    let (base, stop) = start(&path).await;
    let counted = SimTokenizer::from_file(&path).unwrap();

    // "the rubric " × 5: `the` + ` rubric` (Ġr u b r i c) = 7, then
    // ` the` (Ġ the) + ` rubric` = 8 four times, then the last space: 40.
    let prompt = "the rubric ".repeat(5);
    let n = counted.encode(&prompt).len();
    assert_eq!(n, 40);
    let body = json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 3});
    let (status, first) = complete(&base, body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens"], n);
    assert_eq!(first["usage"]["completion_tokens"], 3);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Again: every full 4-token block but the last is served from cache.
    let (_, second) = complete(&base, body).await;
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        (n - 1) / 4 * 4
    );

    // × 9 = 7 + 8 × 8 + 1 = 72 tokens: over the 64-token context.
    let long = json!({"model": "tiny-llama", "prompt": "the rubric ".repeat(9), "max_tokens": 1});
    let (status, err) = complete(&base, long).await;
    assert_eq!(status, 400, "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("contains at least 72 input tokens"), "{msg}");

    let _ = stop.send(());
    std::fs::remove_file(path).unwrap();
}

/// The tiny model's own tokenizer (after `scripts/vllm.sh install`).
fn tiny_llama_tokenizer() -> PathBuf {
    let cache = std::env::var_os("SLUICE_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/sluice"),
        PathBuf::from,
    );
    cache.join("tiny-llama/tokenizer.json")
}

#[tokio::test]
#[ignore = "needs the tiny model's tokenizer: scripts/vllm.sh install (and just vllm to compare)"]
async fn the_tiny_models_tokenizer_counts_as_vllm_does() {
    let path = tiny_llama_tokenizer();
    assert!(path.exists(), "{} missing", path.display());
    let (base, stop) = start(&path).await;
    let t = SimTokenizer::from_file(&path).unwrap();
    let prompt =
        "Rubric: score each candidate from 1 to 5.\nCandidate #7: Ada (12 years, Rust and CUDA).";
    let body = json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 2});
    let (status, sim) = complete(&base, body.clone()).await;
    assert_eq!(status, 200, "{sim}");
    assert_eq!(sim["usage"]["prompt_tokens"], t.encode(prompt).len());
    if let Ok(url) = std::env::var("SLUICE_VLLM_URL") {
        let (status, real) = complete(url.trim_end_matches('/'), body).await;
        assert_eq!(status, 200, "{real}");
        assert_eq!(
            sim["usage"]["prompt_tokens"], real["usage"]["prompt_tokens"],
            "simulator and vLLM count the same prompt alike"
        );
    }
    let _ = stop.send(());
}
