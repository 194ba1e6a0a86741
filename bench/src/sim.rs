//! `bench sim`: a simulated vLLM.
//!
//! # Layout
//!
//! - [`kv`]: the KV block pool and prefix cache (chained block hashes, LRU
//!   eviction of free cached blocks).
//! - [`engine`]: the scheduler (continuous batching, token budget, chunked
//!   prefill, preemption), a pure state machine driven by explicit time.
//! - [`profile`]: engine shapes and step-time models, as TOML.
//! - [`metrics`]: vLLM's metric names and buckets.

pub mod engine;
pub mod kv;
pub mod metrics;
pub mod profile;
