//! The component's exports: `wit-bindgen` bindings for the `admission`
//! world, forwarding each call to the one [`Batcher`] of this instance.
//!
//! A component instance is single-threaded and long-lived: the host calls
//! `init` once, then events. The state lives in a `static` between calls.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::batcher::{Batcher, Decision, Snapshot};
use crate::config::Config;

/// The generated bindings. The canonical-ABI export shims and lifting code
/// that `generate!`/`export!` emit are `unsafe` (raw pointers into linear
/// memory, `#[unsafe(export_name)]`), so this module, and only this module,
/// allows unsafe code; nothing hand-written here uses it.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "admission",
    });

    use super::Policy;
    export!(Policy);
}

use bindings::exports::sluice::policy::policy as wit;

/// The instance's scheduler; `None` until `init` succeeds.
static STATE: Mutex<Option<Batcher>> = Mutex::new(None);

/// Log levels of the WIT `log` import.
const WARN: u8 = 1;

fn state() -> MutexGuard<'static, Option<Batcher>> {
    // A panic aborts the instance (panic=abort), so poisoning cannot be observed.
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `event` on the scheduler, creating a default one if the host skipped
/// `init`, and logs what the scheduler found odd.
fn with_batcher(event: impl FnOnce(&mut Batcher) -> Decision) -> wit::Decision {
    let mut state = state();
    let batcher = state.get_or_insert_with(|| {
        bindings::log(WARN, "batched: event before init; using the default config");
        Batcher::new(Config::default())
    });
    let decision = event(batcher);
    for warning in batcher.take_warnings() {
        bindings::log(WARN, &warning);
    }
    wit::Decision {
        admit: decision.admit,
        reject: decision.reject,
        wake_after_us: decision.wake_after_us,
    }
}

fn snapshot(now: wit::Snapshot) -> Snapshot {
    Snapshot {
        now_us: now.now_us,
        in_flight: now.in_flight,
    }
}

/// The exported `policy` interface.
struct Policy;

impl wit::Guest for Policy {
    fn init(config: Vec<(String, String)>) -> Result<String, String> {
        let config = Config::parse(&config).map_err(|e| e.to_string())?;
        let description = config.to_string();
        *state() = Some(Batcher::new(config));
        Ok(description)
    }

    fn on_arrival(now: wit::Snapshot, req: wit::Request) -> wit::Decision {
        with_batcher(|b| b.on_arrival(snapshot(now), req.id, req.arrived_us))
    }

    fn on_completion(now: wit::Snapshot, done: wit::Completion) -> wit::Decision {
        with_batcher(|b| b.on_completion(snapshot(now), done.id))
    }

    fn on_cancel(now: wit::Snapshot, id: u64) -> wit::Decision {
        with_batcher(|b| b.on_cancel(snapshot(now), id))
    }

    fn on_tick(now: wit::Snapshot) -> wit::Decision {
        with_batcher(|b| b.on_tick(snapshot(now)))
    }
}
