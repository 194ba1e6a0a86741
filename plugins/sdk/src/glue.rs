//! The component's exports (wasm32 only, not part of the API): the
//! `wit-bindgen` bindings of the `admission` world (`sluice:policy@0.2.0`), and one generic
//! implementation of its `policy` interface that forwards every call to the
//! instance's [`Policy`]. [`export_policy!`](crate::export_policy) hands
//! [`Export<P>`] to the bindings' `export!` in the plugin crate, which
//! emits the `extern "C"` entry points there.
//!
//! A component instance is single-threaded and long-lived: the host calls
//! `init` once, then events. The policy lives between calls in a
//! thread-local (one thread, so one value) that `export_policy!` declares
//! in the plugin crate, where its type is known, and hands over as [`Slot`].

use std::marker::PhantomData;

use crate::config::Config;
use crate::policy::{Level, Policy, log};
use crate::types::{Completion, Decision, Replica, Request, Snapshot};

/// The generated bindings, exported for `export_policy!`. The canonical-ABI
/// shims and lifting code that `generate!` emits are `unsafe` (raw
/// pointers into linear memory, `#[unsafe(export_name)]`), so this module,
/// and only this module, allows unsafe code; nothing hand-written uses it.
#[allow(unsafe_code, missing_docs, unreachable_pub)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "admission",
        // `export!` is used from the plugin crates.
        pub_export_macro: true,
    });
}

use bindings::exports::sluice::policy::policy as wit;

/// The exported `policy` interface, implemented by policy `P`.
pub struct Export<P>(PhantomData<fn() -> P>);

/// Where the instance's policy is kept: `None` until `init` succeeds.
/// Implemented by `export_policy!` over a thread-local of the plugin crate
/// (a static of the SDK's cannot be generic over the policy type).
pub trait Slot: Policy {
    /// Runs `f` on the slot.
    fn with_slot<R>(f: impl FnOnce(&mut Option<Self>) -> R) -> R;
}

impl<P: Slot> wit::Guest for Export<P> {
    fn init(config: Vec<(String, String)>) -> Result<String, String> {
        let policy = Config::parse(config, P::init).map_err(|e| e.to_string())?;
        let description = policy.describe();
        P::with_slot(|slot| *slot = Some(policy));
        Ok(description)
    }

    fn on_arrival(now: wit::Snapshot, req: wit::Request) -> wit::Decision {
        event::<P>(Event::Arrival(now.into(), req.into()))
    }

    fn on_completion(now: wit::Snapshot, done: wit::Completion) -> wit::Decision {
        event::<P>(Event::Completion(now.into(), done.into()))
    }

    fn on_cancel(now: wit::Snapshot, id: u64) -> wit::Decision {
        event::<P>(Event::Cancel(now.into(), id))
    }

    fn on_tick(now: wit::Snapshot) -> wit::Decision {
        event::<P>(Event::Tick(now.into()))
    }
}

/// One event from the host, as the policy sees it.
enum Event {
    Arrival(Now, Request),
    Completion(Now, Completion),
    Cancel(Now, u64),
    Tick(Now),
}

/// The host's snapshot with its replicas owned, for [`Snapshot`] to borrow.
struct Now {
    now_us: u64,
    in_flight: u32,
    queued: u32,
    replicas: Vec<Replica>,
}

impl Now {
    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            now_us: self.now_us,
            in_flight: self.in_flight,
            queued: self.queued,
            replicas: &self.replicas,
        }
    }
}

/// Delivers `event` to the instance's policy, creating one with the default
/// config if the host skipped `init`, and logs the warnings it leaves.
fn event<P: Slot>(event: Event) -> wit::Decision {
    P::with_slot(|slot| {
        if slot.is_none() {
            *slot = default_instance::<P>();
        }
        let Some(policy) = slot.as_mut() else {
            return Decision::default().into();
        };
        let decision = match event {
            Event::Arrival(now, req) => policy.on_arrival(now.snapshot(), &req),
            Event::Completion(now, done) => policy.on_completion(now.snapshot(), done),
            Event::Cancel(now, id) => policy.on_cancel(now.snapshot(), id),
            Event::Tick(now) => policy.on_tick(now.snapshot()),
        };
        for warning in policy.take_warnings() {
            log(Level::Warn, &warning);
        }
        decision.into()
    })
}

fn default_instance<P: Policy>() -> Option<P> {
    // The same pair type as `init`'s, so that one copy of the parsing is built.
    match Config::parse(Vec::<(String, String)>::new(), P::init) {
        Ok(policy) => {
            let description = policy.describe();
            log(
                Level::Warn,
                &format!("event before init; using the default config ({description})"),
            );
            Some(policy)
        }
        Err(e) => {
            log(
                Level::Error,
                &format!("event before init, and the default config is refused: {e}"),
            );
            None
        }
    }
}

impl From<wit::Snapshot> for Now {
    fn from(s: wit::Snapshot) -> Self {
        Now {
            now_us: s.now_us,
            in_flight: s.in_flight,
            queued: s.queued,
            replicas: s.replicas.into_iter().map(Replica::from).collect(),
        }
    }
}

impl From<wit::Replica> for Replica {
    fn from(r: wit::Replica) -> Self {
        Replica {
            id: r.id,
            name: r.name,
            healthy: r.healthy,
            in_flight: r.in_flight,
            engine_running: r.engine_running,
            engine_waiting: r.engine_waiting,
            kv_usage: r.kv_usage,
        }
    }
}

impl From<wit::Request> for Request {
    fn from(r: wit::Request) -> Self {
        Request {
            id: r.id,
            tenant: r.tenant,
            model: r.model,
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            cached_tokens: r.cached_tokens,
            prefix_group: r.prefix_group,
            priority: r.priority,
            arrived_us: r.arrived_us,
            cached_by_replica: r.cached_by_replica,
        }
    }
}

impl From<wit::Completion> for Completion {
    fn from(c: wit::Completion) -> Self {
        Completion {
            id: c.id,
            ok: c.ok,
            queue_us: c.queue_us,
            ttft_us: c.ttft_us,
            e2e_us: c.e2e_us,
            prompt_tokens: c.prompt_tokens,
            output_tokens: c.output_tokens,
        }
    }
}

impl From<Decision> for wit::Decision {
    fn from(d: Decision) -> Self {
        let admit = d
            .admit
            .iter()
            .map(|&id| wit::Admission {
                id,
                replica: d.replica_of(id),
            })
            .collect();
        wit::Decision {
            admit,
            reject: d.reject,
            wake_after_us: d.wake_after_us,
        }
    }
}
