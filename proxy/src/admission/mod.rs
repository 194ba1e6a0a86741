//! Admission: when each inference request may enter the engine.
//!
//! Requests wait in a bounded queue owned by one [scheduler](scheduler) task,
//! which asks a [`Policy`] — a wasm component ([`wasm`]) or, after a plugin
//! fault, the built-in [`fallback`] cap — what to release. The request task
//! holds an [`Admission`] handle ([`handle`]):
//!
//! 1. the per-tenant [`ratelimit`] answers 429 before anything is queued;
//! 2. `--max-queue` is checked next (429 with `Retry-After`, policy not asked);
//! 3. the request waits for its verdict up to `--queue-timeout` (then 503);
//!    a client that goes away while waiting becomes `on-cancel`;
//! 4. an admitted request holds a [`Permit`]; dropping or completing it
//!    reports `on-completion` exactly once.
//!
//! Modules, bottom to top (each uses only the ones before it):
//! [`policy`] (the contract and the `Policy` trait) → [`fallback`], [`wasm`]
//! (its two implementations) → [`ratelimit`] → [`channel`] (commands and
//! permits) → [`scheduler`] (the task) → [`handle`] (`Admission`).

pub mod channel;
pub mod fallback;
pub mod handle;
pub mod policy;
pub mod ratelimit;
pub mod scheduler;
pub mod wasm;

#[cfg(test)]
mod tests;

pub use channel::{Permit, SchedulerStatus};
pub use handle::{Admission, AdmissionConfig};
pub use policy::{
    Admit, CompletionReport, Decision, Event, Fault, Policy, ReplicaSource, ReplicaState,
    RequestInfo, Snapshot,
};
