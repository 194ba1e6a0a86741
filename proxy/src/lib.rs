//! Sluice: an admission proxy for OpenAI-compatible inference servers.
//!
//! A hyper reverse proxy in front of vLLM that forwards every route, and
//! decides *when* each completion/chat request may enter the engine with an
//! admission policy loaded as a wasm component.
//!
//! # Layers
//!
//! Modules import only from layers below their own; no two import each
//! other. From the bottom:
//!
//! 1. **Leaves.** [`units`] (how durations read), [`config`] (every
//!    setting, defined once), [`body`] (the body type), [`headers`]
//!    (hop-by-hop, `X-Forwarded-For`, who the tenant is), [`usage`] and
//!    [`stream_usage`] (the engine's token counts in a response).
//! 2. **Vocabulary.** [`error`] (the one mapping from failure to status code
//!    and OpenAI error body), [`cli`] (flags, environment and file →
//!    [`config::Config`]), [`pool`] (idle upstream connections).
//! 3. **Requests and the engine.** [`classify`] (route labels, the typed view
//!    of completion/chat bodies), [`intake`] (reading bodies within
//!    `--max-body` and the shared `--body-memory`), [`upstream`] (connections, deadlines,
//!    upstream health), [`tokens`] (prompt lengths, the HF tokenizer),
//!    [`prefix`] (chained block hashes in an LRU → predicted cached tokens).
//! 4. **Measurement.** [`stats`] (exact HDR percentiles for `/stats`), then
//!    [`telemetry`] (every Prometheus metric, described once), [`gpu`] (the
//!    NVML sampler), [`scrape`] (the upstream's own `/metrics`),
//!    [`resources`] (the proxy's memory, CPU and open connections),
//!    [`ledger`] (every request received and admitted ends exactly once),
//!    [`kv_events`] (an engine's own KV-cache events, mirrored into a
//!    prefix tracker).
//! 5. **Admission.** [`admission`]: the `Policy` trait, the wasm host and the
//!    fallback behind it, the scheduler task, the `Admission` handle.
//! 6. **Where it goes.** [`replicas`] (the replicas, their health and
//!    load, and `--route`).
//! 7. **One request.** [`exchange`] (its timings; the single place it is
//!    logged and measured), [`observed`] (the streaming pass-through that
//!    finishes it), [`proxy`] (classify → admit → forward → stream back).
//! 8. **The process.** [`app`] (the services built from a config; policy
//!    reloads), [`admin`] (`/metrics`, `/stats`, `/admin/policy`, and who
//!    may use them), [`connections`] (each listener's connection limit,
//!    idle timeout and refusals), [`server`] (listeners, HTTP/1.1 + h2c,
//!    drain).
#![deny(missing_docs)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod body;
pub mod classify;
pub mod cli;
pub mod config;
pub mod connections;
pub mod error;
pub mod exchange;
pub mod gpu;
pub mod headers;
pub mod intake;
pub mod kv_events;
pub mod ledger;
pub mod observed;
pub mod pool;
pub mod prefix;
pub mod proxy;
pub mod replicas;
pub mod resources;
pub mod scrape;
pub mod server;
pub mod stats;
pub mod stream_usage;
pub mod telemetry;
pub mod tokens;
pub mod units;
pub mod upstream;
pub mod usage;

pub use app::{App, StartError};

#[cfg(test)]
mod layers;
