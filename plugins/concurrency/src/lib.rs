//! `concurrency`: a concurrency-cap admission policy for the Sluice proxy.
//!
//! At most `limit` requests in flight, admitted first in, first out, the way
//! Inngest limits functions. With `key=tenant` the limit applies to each
//! tenant (`request.tenant`) separately, like Inngest's concurrency keys:
//! FIFO within a tenant, arrival order across tenants, and a tenant at its
//! limit never holds up another.
//!
//! # Configuration
//!
//! | key     | default  | meaning                                        |
//! |---------|----------|------------------------------------------------|
//! | `limit` | 10       | most requests in flight (≥ 1), per `key`       |
//! | `key`   | `global` | `global`: one shared limit; `tenant`: per tenant |
//!
//! # Layout
//!
//! - [`config`]: reading and validating the `key=value` pairs.
//! - [`limiter`]: the limiter itself, a [`Policy`](sluice_policy_sdk::Policy)
//!   in plain Rust, unit tested natively.
//!
//! The component's exports come from `sluice-policy-sdk`'s `export_policy!`.
#![deny(missing_docs)]

pub mod config;
pub mod limiter;

sluice_policy_sdk::export_policy!(limiter::Limiter);
