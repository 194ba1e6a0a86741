//! Sluice's simulated vLLM: what `bench sim` serves, `bench calibrate` and
//! `bench sim-vs-real` fit to a real engine, and `bench compare` and
//! `bench suite` run against by default. A library of its own, so it is
//! used and tested without the load generator.
//!
//! Serves vLLM's OpenAI routes and metrics from an engine model instead of
//! a model: continuous batching under `max_num_seqs` and a per-step token
//! budget with chunked prefill, a KV block pool with a real chained-hash
//! prefix cache and LRU eviction, preemption when blocks run out, and step
//! times from a profile fitted to a real engine. Responses carry
//! `"system_fingerprint": "vllm-sim"` and `vllm:cache_config_info` carries
//! `simulated="True"`, so no report can mistake it for the real thing.
//!
//! # Layout
//!
//! Bottom to top: each module uses only those listed before it.
//!
//! - [`kv`]: the KV block pool and prefix cache (chained block hashes, LRU
//!   eviction of free cached blocks).
//! - [`metrics`]: vLLM's metric names and buckets.
//! - [`tokenizer`]: the documented simple tokenizer, or a model's
//!   `tokenizer.json`.
//! - [`engine`]: the scheduler (continuous batching, token budget, chunked
//!   prefill, preemption), a pure state machine driven by explicit time.
//! - [`profile`]: engine shapes and step-time models, as TOML (the built-in
//!   ones are `profiles/*.toml`, embedded).
//! - [`timeline`]: the engine in time: the API server's serial work in
//!   front of and behind it, and its steps, as a discrete-event model run
//!   in virtual or real time.
//! - [`reference`]: the reference GPU benchmark's two client modes run in
//!   virtual time, and the `rtx4080` fit to them.
//! - [`driver`]: runs a timeline in real time (a dedicated thread) or on
//!   tokio's timer; submit, stream, abort.
//! - [`api`]: the HTTP routes, JSON and SSE shapes, errors; [`serve`].
//! - [`calibrate`]: measuring a real engine, fitting a profile, and
//!   comparing the simulator with the real engine on held-out workloads.
//! - this root: `bench sim`'s flags ([`Args`]) and [`run`].

#![deny(missing_docs)]

pub mod api;
pub mod calibrate;
pub mod driver;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod profile;
pub mod reference;
pub mod timeline;
pub mod tokenizer;

use std::net::SocketAddr;

pub use api::serve;
pub use profile::Profile;

/// `bench sim`: serve a simulated vLLM.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000", env = "SLUICE_SIM_LISTEN")]
    pub listen: SocketAddr,
    /// A built-in profile (vllm-cpu-tiny, rtx4080) or a profile TOML file.
    #[arg(long, default_value = "vllm-cpu-tiny", env = "SLUICE_SIM_PROFILE")]
    pub profile: String,
    /// The model's HF `tokenizer.json`: token counts (usage, prefix-cache
    /// blocks, context length) come from it instead of the simple tokenizer.
    #[arg(long, env = "SLUICE_SIM_TOKENIZER")]
    pub tokenizer: Option<std::path::PathBuf>,
}

/// Runs `bench sim` until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let profile = Profile::load(&args.profile)?;
    let tokenizer = match &args.tokenizer {
        Some(path) => Some(tokenizer::SimTokenizer::from_file(path)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    eprintln!(
        "simulated vLLM (profile {}, {} tokenizer) listening on {addr}",
        profile.name,
        args.tokenizer
            .as_ref()
            .map_or("simple".to_string(), |p| p.display().to_string())
    );
    api::serve_with(listener, profile, tokenizer, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
