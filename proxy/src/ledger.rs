//! The request ledger: two exact balances that say nothing was lost.
//!
//! Every client request on the main listener is **received** once and ends
//! exactly once, as one of
//! - `answered`: a response reached the client whole (the engine's, of any
//!   status, or Sluice's own `/healthz`, `/readyz`);
//! - `refused`: Sluice answered it with an error of its own (bad input,
//!   queue full, rate limit, upstream unreachable …);
//! - `cut`: it ended without a whole response (the client left, the
//!   engine's stream broke, or shutdown cut it at `--drain-timeout`).
//!
//! Every request **admitted** (sent towards the engine) ends exactly once
//! as `completed` (the engine's response reached the client whole),
//! `failed` (the upstream call or its stream failed, or shutdown cut it) or
//! `client_gone` (the client left first).
//!
//! So at any moment received = answered + refused + cut + in progress, and
//! admitted = completed + failed + client_gone + in flight; when the proxy
//! is idle, both hold with nothing in progress. The guarantee comes from the
//! types: a [`Received`] or [`Admitted`] token is made when the count goes
//! up, and ends exactly once — explicitly, or in `Drop` (a dropped request
//! future means the client went away). Exported as
//! `sluice_requests_received_total`, `sluice_requests_ended_total{ending}`,
//! `sluice_requests_admitted_total` and `sluice_admitted_ended_total{ending}`,
//! and as `"accounting"` in `/stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::telemetry;

/// How a received request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A whole response reached the client.
    Answered = 0,
    /// Sluice answered with an error of its own.
    Refused = 1,
    /// It ended without a whole response.
    Cut = 2,
}

impl Ending {
    /// The `ending` label.
    pub fn label(self) -> &'static str {
        telemetry::REQUEST_ENDINGS[self as usize]
    }
}

/// How an admitted request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmittedEnding {
    /// The engine's response reached the client whole.
    Completed = 0,
    /// The upstream call or its stream failed (or shutdown cut it).
    Failed = 1,
    /// The client went away first.
    ClientGone = 2,
}

impl AdmittedEnding {
    /// The `ending` label.
    pub fn label(self) -> &'static str {
        telemetry::ADMITTED_ENDINGS[self as usize]
    }
}

/// The counts behind the balances; [`global`] is the one the proxy keeps
/// and exports (tests make their own).
#[derive(Debug)]
pub struct Ledger {
    received: AtomicU64,
    ended: [AtomicU64; 3],
    admitted: AtomicU64,
    admitted_ended: [AtomicU64; 3],
    // Whether the counts also go to Prometheus.
    exported: bool,
}

static GLOBAL: Ledger = Ledger::new(true);

/// The proxy's ledger.
pub fn global() -> &'static Ledger {
    &GLOBAL
}

impl Ledger {
    /// An empty ledger; `exported`: also count in Prometheus.
    pub const fn new(exported: bool) -> Self {
        Self {
            received: AtomicU64::new(0),
            ended: [const { AtomicU64::new(0) }; 3],
            admitted: AtomicU64::new(0),
            admitted_ended: [const { AtomicU64::new(0) }; 3],
            exported,
        }
    }

    /// Counts a request as received.
    pub fn receive(&'static self) -> Received {
        self.received.fetch_add(1, Ordering::Relaxed);
        if self.exported {
            telemetry::hot().received.increment(1);
        }
        Received {
            ledger: self,
            ended: false,
        }
    }

    /// Counts a request as admitted.
    pub fn admit(&'static self) -> Admitted {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        if self.exported {
            telemetry::hot().admitted.increment(1);
        }
        Admitted {
            ledger: self,
            ended: false,
        }
    }

    /// The counts now. Each is read once; a request ending between two
    /// reads can make the in-progress figures momentarily one off.
    pub fn balance(&self) -> Balance {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let admitted = load(&self.admitted);
        let [completed, failed, client_gone] = self.admitted_ended.each_ref().map(load);
        let [answered, refused, cut] = self.ended.each_ref().map(load);
        let received = load(&self.received);
        Balance {
            received,
            answered,
            refused,
            cut,
            in_progress: received.saturating_sub(answered + refused + cut),
            admitted,
            completed,
            failed,
            client_gone,
            in_flight: admitted.saturating_sub(completed + failed + client_gone),
        }
    }
}

/// A received request not yet ended; ends as `cut` when dropped.
#[derive(Debug)]
#[must_use = "a request that is not ended counts as cut"]
pub struct Received {
    ledger: &'static Ledger,
    ended: bool,
}

impl Received {
    /// Ends it.
    pub fn end(mut self, ending: Ending) {
        self.record(ending);
    }

    fn record(&mut self, ending: Ending) {
        if !std::mem::replace(&mut self.ended, true) {
            self.ledger.ended[ending as usize].fetch_add(1, Ordering::Relaxed);
            if self.ledger.exported {
                telemetry::hot().ended[ending as usize].increment(1);
            }
        }
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        self.record(Ending::Cut);
    }
}

/// An admitted request not yet ended; ends as `client_gone` when dropped
/// (only a dropped request future, i.e. a client that left, drops one).
#[derive(Debug)]
#[must_use = "an admitted request that is not ended counts as client_gone"]
pub struct Admitted {
    ledger: &'static Ledger,
    ended: bool,
}

impl Admitted {
    /// Ends it.
    pub fn end(mut self, ending: AdmittedEnding) {
        self.record(ending);
    }

    fn record(&mut self, ending: AdmittedEnding) {
        if !std::mem::replace(&mut self.ended, true) {
            self.ledger.admitted_ended[ending as usize].fetch_add(1, Ordering::Relaxed);
            if self.ledger.exported {
                telemetry::hot().admitted_ended[ending as usize].increment(1);
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.record(AdmittedEnding::ClientGone);
    }
}

/// The ledger's counts since start.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Balance {
    /// Requests received.
    pub received: u64,
    /// … answered whole.
    pub answered: u64,
    /// … refused by Sluice.
    pub refused: u64,
    /// … cut short.
    pub cut: u64,
    /// Received and not yet ended.
    pub in_progress: u64,
    /// Requests admitted towards the engine.
    pub admitted: u64,
    /// … completed.
    pub completed: u64,
    /// … failed.
    pub failed: u64,
    /// … left by their client.
    pub client_gone: u64,
    /// Admitted and not yet ended.
    pub in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_ends_exactly_once() {
        let ledger: &'static Ledger = Box::leak(Box::new(Ledger::new(false)));
        ledger.receive().end(Ending::Answered);
        ledger.receive().end(Ending::Refused);
        drop(ledger.receive());
        let in_progress = ledger.receive();
        let admitted = ledger.admit();
        ledger.admit().end(AdmittedEnding::Completed);
        ledger.admit().end(AdmittedEnding::Failed);
        let now = ledger.balance();
        assert_eq!(
            (
                now.received,
                now.answered,
                now.refused,
                now.cut,
                now.in_progress
            ),
            (4, 1, 1, 1, 1),
            "a dropped request counts as cut"
        );
        assert_eq!(
            (
                now.admitted,
                now.completed,
                now.failed,
                now.client_gone,
                now.in_flight
            ),
            (3, 1, 1, 0, 1)
        );
        drop(admitted);
        in_progress.end(Ending::Answered);
        assert_eq!(Ending::Cut.label(), "cut");
        assert_eq!(AdmittedEnding::ClientGone.label(), "client_gone");
        let last = ledger.balance();
        assert_eq!((last.client_gone, last.in_flight), (1, 0));
        assert_eq!((last.answered, last.in_progress), (2, 0));
    }
}
