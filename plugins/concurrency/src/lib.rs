//! `concurrency`: a concurrency-cap admission policy for the Sluice proxy.
//!
//! At most `limit` requests in flight, the way Inngest limits functions.
//! Waiting requests go in the order of the SDK's `FairQueue`: higher
//! priority (`X-Priority`) first; within a priority, tenants take turns in
//! proportion to their `weights` (1 each by default), so one tenant's burst
//! cannot starve another's trickle; first in, first out within a tenant.
//! `reserve=N` keeps the last N slots for priority ≥ `reserve_priority`:
//! a backlog never fills the engine ahead of live traffic. With
//! `key=tenant` the limit applies to each tenant (`request.tenant`)
//! separately, like Inngest's concurrency keys, and a tenant at its limit
//! never holds up another.
//!
//! With several upstream replicas (contract 0.2: the snapshot lists them),
//! `limit` applies to each replica, and each admission names a healthy
//! replica with room: the one predicted to hold most of the prompt in its
//! prefix cache, then the least busy (see [`limiter`]). With one upstream
//! it behaves as described above.
//!
//! # Configuration
//!
//! | key                | default  | meaning                                          |
//! |--------------------|----------|--------------------------------------------------|
//! | `limit`            | 10       | most requests in flight (≥ 1), per `key`         |
//! | `key`              | `global` | `global`: one shared limit; `tenant`: per tenant |
//! | `reserve`          | 0        | slots (of `limit`) kept for high priority        |
//! | `reserve_priority` | 1        | the priority that may use the reserved slots     |
//! | `weights`          | (none)   | tenants' shares, e.g. `live:4,batch:1`           |
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
