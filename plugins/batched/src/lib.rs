//! `batched`: a batch-coalescing admission policy for the Sluice proxy.
//!
//! Holds arrivals until `max_batch` are queued or `window_ms` has passed
//! since the oldest, then admits them together. With `waves=1` (the
//! default) the next wave waits until every request of the current one has
//! completed, the gather semantics of a client that fires waves of 50 and
//! waits for each; with `waves=0` waves overlap. Each wave is filled in the
//! SDK's `FairQueue` order: higher priority (`X-Priority`) first, then
//! tenants taking turns by `weights`, oldest first within a tenant. With
//! `reserve=N`, up to N requests of priority ≥ `reserve_priority` run at
//! once beside the waves instead of waiting for one.
//!
//! # Configuration
//!
//! | key                | default | meaning                                                    |
//! |--------------------|---------|------------------------------------------------------------|
//! | `max_batch`        | 50      | most requests admitted together (≥ 1)                      |
//! | `window_ms`        | 10      | longest wait of the oldest queued request for its wave     |
//! | `waves`            | 1       | 1: a wave waits for the previous one to finish; 0: overlap |
//! | `reserve`          | 0       | slots beside the waves for high priority, admitted at once |
//! | `reserve_priority` | 1       | the priority that may use the reserved slots               |
//! | `weights`          | (none)  | tenants' shares, e.g. `live:4,batch:1`                     |
//!
//! # Layout
//!
//! - [`config`]: reading and validating the `key=value` pairs.
//! - [`batcher`]: the scheduler itself, a [`Policy`](sluice_policy_sdk::Policy)
//!   in plain Rust with time passed in, unit tested natively.
//!
//! The component's exports come from `sluice-policy-sdk`'s `export_policy!`.
#![deny(missing_docs)]

pub mod batcher;
pub mod config;

sluice_policy_sdk::export_policy!(batcher::Batcher);
