//! The component's exports: `wit-bindgen` bindings for the `admission`
//! world, forwarding each call to the one [`Limiter`] of this instance.
//!
//! A component instance is single-threaded and long-lived: the host calls
//! `init` once, then events. The state lives in a `static` between calls.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::config::Config;
use crate::limiter::{Decision, Limiter, Snapshot};

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

/// The instance's limiter; `None` until `init` succeeds.
static STATE: Mutex<Option<Limiter>> = Mutex::new(None);

/// Log levels of the WIT `log` import.
const WARN: u8 = 1;

fn state() -> MutexGuard<'static, Option<Limiter>> {
    // A panic aborts the instance (panic=abort), so poisoning cannot be observed.
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `event` on the limiter, creating a default one if the host skipped
/// `init`, and logs what the limiter found odd.
fn with_limiter(event: impl FnOnce(&mut Limiter) -> Decision) -> wit::Decision {
    let mut state = state();
    let limiter = state.get_or_insert_with(|| {
        bindings::log(
            WARN,
            "concurrency: event before init; using the default config",
        );
        Limiter::new(Config::default())
    });
    let decision = event(limiter);
    for warning in limiter.take_warnings() {
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
        *state() = Some(Limiter::new(config));
        Ok(description)
    }

    fn on_arrival(now: wit::Snapshot, req: wit::Request) -> wit::Decision {
        with_limiter(|l| l.on_arrival(snapshot(now), req.id, &req.tenant))
    }

    fn on_completion(now: wit::Snapshot, done: wit::Completion) -> wit::Decision {
        with_limiter(|l| l.on_completion(snapshot(now), done.id))
    }

    fn on_cancel(now: wit::Snapshot, id: u64) -> wit::Decision {
        with_limiter(|l| l.on_cancel(snapshot(now), id))
    }

    fn on_tick(now: wit::Snapshot) -> wit::Decision {
        with_limiter(|l| l.on_tick(snapshot(now)))
    }
}
