//! `adaptive`: an admission policy for the Sluice proxy that needs no
//! hand-tuned limit, and serves live traffic and a batch job at once.
//!
//! It learns the engine's service curve from completions and keeps batch
//! work in flight at the knee, where throughput stops growing: few in
//! flight when the queue is short, the engine's best throughput when a
//! backlog builds. Live traffic (priority ≥ `live_priority`, from
//! `X-Priority`) is admitted at once, and while it runs the batch is held
//! to what the live latency objective allows. Waiting requests go in the
//! SDK's `FairQueue` order: priority, then tenants by `weights`, then
//! arrival.
//!
//! # Configuration
//!
//! | key               | default | meaning                                                        |
//! |-------------------|---------|----------------------------------------------------------------|
//! | `live_p95_ms`     | 0       | live traffic's p95 objective in ms (fractions allowed); 0: `auto_factor` × unloaded service time |
//! | `auto_factor`     | 2       | the derived objective, in unloaded service times (1–100)       |
//! | `live_priority`   | 1       | requests of this priority or higher are live traffic           |
//! | `min_batch_share` | 60      | percent of its best throughput the batch keeps beside live traffic |
//! | `max_limit`       | 256     | most requests in flight, live and batch                        |
//! | `live_window_s`   | 30      | live traffic counts as present this long after its last request |
//! | `weights`         | (none)  | tenants' shares, e.g. `live:4,batch:1`                         |
//!
//! # Layout
//!
//! - [`config`]: reading and validating the `key=value` pairs.
//! - [`curve`]: the service curve by in-flight level, and the climb to its knee.
//! - [`live`]: the live latency window and the batch limit it allows.
//! - [`adaptive`]: the scheduler, a [`Policy`](sluice_policy_sdk::Policy),
//!   unit tested natively; `tests/engine_model.rs` runs it against a
//!   model engine in virtual time.
//!
//! The component's exports come from `sluice-policy-sdk`'s `export_policy!`.
#![deny(missing_docs)]

pub mod adaptive;
pub mod config;
pub mod curve;
pub mod live;

sluice_policy_sdk::export_policy!(adaptive::Adaptive);
