//! The engine's own account of its prefix cache: vLLM's KV-cache events,
//! mirrored into a per-replica [`PrefixTracker`](crate::prefix::PrefixTracker).
//!
//! vLLM started with `--kv-events-config
//! '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv"}'`
//! publishes every block it caches, evicts or clears on a ZeroMQ PUB socket.
//! A router that knows which replica holds which prefix can send a request
//! where its prompt is already cached.
//!
//! - [`decode`]: a message's msgpack payload → an [`EventBatch`] of
//!   [`KvEvent`]s (vLLM 0.32's schema; unknown events skipped and counted).
//! - [`mirror`]: applies events to a replica's tracker, translating the
//!   engine's block hashes into Sluice's chain hashes of the same tokens.
//! - [`subscriber`]: the tokio task per replica (SUB socket, reconnects,
//!   sequence gaps, metrics) and the [`KvEventsHandle`] the router reads.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use sluice::classify::Prompt;
//! use sluice::prefix::PrefixTracker;
//!
//! let tracker = Arc::new(PrefixTracker::new(65_536, 32));
//! let handle = sluice::kv_events::spawn(
//!     "replica-0".into(),
//!     "tcp://10.0.0.5:5557".into(),
//!     "kv".into(),
//!     tracker.clone(),
//! );
//! let prompt = Prompt::Tokens(vec![vec![1; 100]]);
//! if handle.live() {
//!     let held = tracker.lookup(&prompt).cached_tokens;
//! #   let _ = held;
//! }
//! # }
//! ```

pub mod decode;
pub mod mirror;
pub mod subscriber;

pub use decode::{DecodeError, EngineHash, EventBatch, KvEvent, decode_batch};
pub use mirror::{Applied, Ignored, Mirror};
pub use subscriber::{KvEventsHandle, spawn};

/// The recordings of a real vLLM's events (`tests/fixtures/kv_events/`).
#[cfg(test)]
pub(crate) mod fixture {
    /// Four prompts sharing a prefix, then a prefix-cache reset.
    pub(crate) const TOKENS: &str = "vllm-0.32-tokens";
    /// The same four prompts and twelve more, in a 64-block cache: evictions.
    pub(crate) const EVICT: &str = "vllm-0.32-evict";

    fn files(name: &str) -> (&'static [u8], &'static str) {
        macro_rules! recording {
            ($name:literal) => {
                (
                    include_bytes!(concat!("../../../tests/fixtures/kv_events/", $name, ".bin")),
                    include_str!(concat!(
                        "../../../tests/fixtures/kv_events/",
                        $name,
                        ".prompts.json"
                    )),
                )
            };
        }
        match name {
            TOKENS => recording!("vllm-0.32-tokens"),
            EVICT => recording!("vllm-0.32-evict"),
            _ => panic!("no recording {name}"),
        }
    }

    /// The messages, each as its frames (format in the fixture's README).
    pub(crate) fn messages(name: &str) -> Vec<Vec<&'static [u8]>> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
            let (head, tail) = bytes.split_at(n);
            *bytes = tail;
            head
        }
        fn len(bytes: &mut &[u8]) -> usize {
            u32::from_be_bytes(take(bytes, 4).try_into().expect("4 bytes")) as usize
        }
        let mut rest = files(name).0;
        let mut messages = Vec::new();
        while !rest.is_empty() {
            let frames = len(&mut rest);
            let message = (0..frames)
                .map(|_| {
                    let n = len(&mut rest);
                    take(&mut rest, n)
                })
                .collect();
            messages.push(message);
        }
        messages
    }

    /// The token-id prompts sent while recording.
    pub(crate) fn prompts(name: &str) -> Vec<Vec<u32>> {
        serde_json::from_str(files(name).1).expect("the prompts are JSON")
    }
}
