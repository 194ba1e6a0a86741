//! The [`Policy`] trait a scheduler implements, [`log`] for what it wants
//! the host's log to show, and [`gauge`] for the numbers it publishes.

use crate::config::{Config, ConfigError};
use crate::types::{Completion, Decision, Request, Snapshot};

/// An admission policy: a scheduler that hears about requests and answers
/// each event with a [`Decision`].
///
/// One value lives for the life of the component instance. The host calls
/// [`Policy::init`] once, then events one at a time; the rules it keeps
/// (every admitted request completes exactly once, a cancelled one is never
/// admitted, …) are in `wit/policy.wit`. [`export_policy!`](crate::export_policy)
/// turns an implementation into the component's exports.
pub trait Policy: Sized + 'static {
    /// Builds the policy from the host's `--policy-config` pairs, reading
    /// every key it accepts through `config`'s getters. A bad value, or a
    /// key it did not ask for, is refused after it returns (see
    /// [`Config::parse`]); an `Err` of its own is for what the getters cannot
    /// check, such as one key bounded by another.
    ///
    /// Also called with no pairs when the host sends an event before
    /// `init` (it should not), so the defaults should be a working policy.
    fn init(config: &Config) -> Result<Self, ConfigError>;

    /// One line for the host's log, e.g. `concurrency: limit=10 key=global`.
    fn describe(&self) -> String;

    /// A request joined the queue. When the host replays its queue after a
    /// reload, `req.arrived_us` is earlier than `now.now_us`.
    fn on_arrival(&mut self, now: Snapshot<'_>, req: &Request) -> Decision;

    /// An admitted request finished, successfully or not.
    fn on_completion(&mut self, now: Snapshot<'_>, done: Completion) -> Decision;

    /// A queued request left without being admitted (client gone, or the
    /// host's queue timeout). It must not be admitted afterwards.
    fn on_cancel(&mut self, now: Snapshot<'_>, id: u64) -> Decision;

    /// The wake-up asked for by [`Decision::wake_after_us`] is due (the
    /// host's timer may fire a little early or late). By default, nothing
    /// to do: enough for a policy that never asks for a tick.
    fn on_tick(&mut self, now: Snapshot<'_>) -> Decision {
        let _ = now;
        Decision::default()
    }

    /// Messages for the host's log at [`Level::Warn`] (an unknown id, a
    /// duplicate arrival), drained after every event. Keeping them here
    /// rather than calling [`log`] lets unit tests see them.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// How much a log line matters (the WIT `log` import's `level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error = 0,
    /// Something odd that the policy worked around.
    Warn = 1,
    /// A normal event worth a line.
    Info = 2,
    /// Detail for debugging a policy.
    Debug = 3,
    /// Everything.
    Trace = 4,
}

/// Logs `message` through the host's logger. Outside a component (native
/// unit tests, doc examples) it goes to stderr.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::glue::bindings::log(level as u8, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Publishes `value` as the host's gauge `sluice_policy_value{name}` (the
/// host keeps a plugin's first 16 names). Outside a component it does
/// nothing.
pub fn gauge(name: &str, value: f64) {
    #[cfg(target_arch = "wasm32")]
    crate::glue::bindings::gauge(name, value);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (name, value);
}
