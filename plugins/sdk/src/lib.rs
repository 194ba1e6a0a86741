//! `sluice-policy-sdk`: what a Sluice admission policy is written against.
//!
//! A policy is a WebAssembly component implementing `wit/policy.wit`: a
//! scheduler that hears about requests (arrivals, completions, cancels,
//! ticks) and answers each event with a [`Decision`]. This crate holds
//! everything but the scheduling: plain Rust twins of the WIT records, the
//! `key=value` configuration with typed getters and clear errors, the
//! [`Policy`] trait, and [`export_policy!`], which generates the
//! component's exports. A policy crate is its logic, its tests, and one
//! line of export.
//!
//! # Example
//!
//! Admit in arrival order, at most `limit` in flight (`--policy-config limit=4`):
//!
//! ```
//! use std::collections::VecDeque;
//! use sluice_policy_sdk::{Completion, Config, ConfigError, Decision, Policy, Request, Snapshot};
//!
//! pub struct Cap { limit: u32, running: u32, queue: VecDeque<u64> }
//!
//! impl Cap {
//!     fn admit(&mut self) -> Decision {
//!         let free = self.limit.saturating_sub(self.running) as usize;
//!         let ids: Vec<u64> = self.queue.drain(..free.min(self.queue.len())).collect();
//!         self.running += ids.len() as u32;
//!         Decision::default().admit_all(ids)
//!     }
//! }
//!
//! impl Policy for Cap {
//!     fn init(config: &Config) -> Result<Self, ConfigError> {
//!         let limit = config.u32("limit", 1.., 10);
//!         Ok(Cap { limit, running: 0, queue: VecDeque::new() })
//!     }
//!     fn describe(&self) -> String {
//!         format!("cap: limit={}", self.limit)
//!     }
//!     fn on_arrival(&mut self, _: Snapshot, req: &Request) -> Decision {
//!         self.queue.push_back(req.id);
//!         self.admit()
//!     }
//!     fn on_completion(&mut self, _: Snapshot, _: Completion) -> Decision {
//!         self.running = self.running.saturating_sub(1);
//!         self.admit()
//!     }
//!     fn on_cancel(&mut self, _: Snapshot, id: u64) -> Decision {
//!         self.queue.retain(|&queued| queued != id);
//!         Decision::default()
//!     }
//! }
//!
//! sluice_policy_sdk::export_policy!(Cap);
//! # let mut cap = Config::parse([("limit", "1")], Cap::init).unwrap();
//! # let now = Snapshot::at(0);
//! # assert_eq!(cap.on_arrival(now, &Request::new(1)).admit, [1]);
//! # assert!(cap.on_arrival(now, &Request::new(2)).is_empty());
//! # assert_eq!(cap.on_completion(now, Completion::new(1)).admit, [2]);
//! ```
//!
//! Its crate is a `cdylib` (the component) and an `rlib` (for native tests):
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! sluice-policy-sdk = { path = "../sdk" }
//! ```
//!
//! `scripts/build-plugins.sh` builds every such crate under `plugins/` into
//! `plugins/dist/NAME.wasm`; `cargo test -p NAME` runs its tests natively,
//! where [`export_policy!`] expands to nothing.
//!
//! # Layout
//!
//! - [`types`]: [`Request`], [`Completion`], [`Snapshot`], [`Decision`]
//!   (with builder helpers), mirroring the WIT records.
//! - [`config`]: [`Config`], the `key=value` pairs read through typed
//!   getters; unknown keys and bad values become a [`ConfigError`] naming
//!   the key and what it accepts.
//! - [`inherited`]: [`Inherited`], the requests a reloaded instance
//!   finds in flight.
//! - [`policy`]: the [`Policy`] trait, [`log`] to the host's log, and
//!   [`gauge`] for numbers the host exports.
//! - [`queue`]: [`FairQueue`], the admission order the bundled policies
//!   share: strict priority, then a weighted fair share across tenants
//!   ([`Weights`]), first in, first out within a tenant; and [`Reserve`],
//!   slots kept for urgent requests.
//! - `glue` (wasm32 only): the bindings `wit-bindgen` generates from `wit/`
//!   and the exports that forward to one `Policy` value, used through
//!   [`export_policy!`].
#![deny(missing_docs)]

pub mod config;
pub mod inherited;
pub mod policy;
pub mod queue;
pub mod types;

#[cfg(target_arch = "wasm32")]
mod glue;

pub use config::{Config, ConfigError};
pub use inherited::Inherited;
pub use policy::{Level, Policy, gauge, log};
pub use queue::{FairQueue, FastMap, Queued, Reserve, Weights};
pub use types::{Completion, Decision, Replica, Request, Snapshot};

/// Makes `$policy` (a type implementing [`Policy`]) the component's
/// `sluice:policy/policy` export. Use it once, in the policy crate's
/// `lib.rs`. Off wasm32 it expands to nothing, so the crate still builds
/// and tests natively.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static SLUICE_POLICY: ::std::cell::RefCell<::std::option::Option<$policy>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            impl $crate::__private::Slot for $policy {
                fn with_slot<R>(f: impl FnOnce(&mut ::std::option::Option<Self>) -> R) -> R {
                    SLUICE_POLICY.with_borrow_mut(f)
                }
            }
            type SluicePolicyExport = $crate::__private::Export<$policy>;
            $crate::__private::bindings::export!(
                SluicePolicyExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// What [`export_policy!`] expands to; not part of the API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private {
    pub use crate::glue::{Export, Slot, bindings};
}
