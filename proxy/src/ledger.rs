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

use metrics::Counter;
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

/// One balance's counts: entries opened, and ended by each of three endings.
#[derive(Debug)]
struct Tally {
    opened: AtomicU64,
    ended: [AtomicU64; 3],
}

impl Tally {
    const fn new() -> Self {
        Self {
            opened: AtomicU64::new(0),
            ended: [const { AtomicU64::new(0) }; 3],
        }
    }

    /// Counts an entry as opened; it ends as ending `on_drop` if dropped.
    /// `exported`: the Prometheus counters that mirror this tally.
    fn open(
        &'static self,
        exported: Option<(&'static Counter, &'static [Counter; 3])>,
        on_drop: usize,
    ) -> Entry {
        self.opened.fetch_add(1, Ordering::Relaxed);
        if let Some((opened, _)) = exported {
            opened.increment(1);
        }
        Entry {
            tally: self,
            exported: exported.map(|(_, ended)| ended),
            on_drop,
            ended: false,
        }
    }

    /// Opened, and ended by each ending. The endings are read first, so a
    /// request ending between the reads is never counted as ended and not
    /// opened.
    fn counts(&self) -> (u64, [u64; 3]) {
        let ended = self.ended.each_ref().map(|a| a.load(Ordering::Relaxed));
        (self.opened.load(Ordering::Relaxed), ended)
    }
}

/// An entry of a [`Tally`] not yet ended; ends exactly once, as the ending
/// given, or as `on_drop` when dropped first.
#[derive(Debug)]
struct Entry {
    tally: &'static Tally,
    exported: Option<&'static [Counter; 3]>,
    on_drop: usize,
    ended: bool,
}

impl Entry {
    fn end(&mut self, ending: usize) {
        if !std::mem::replace(&mut self.ended, true) {
            self.tally.ended[ending].fetch_add(1, Ordering::Relaxed);
            if let Some(counters) = self.exported {
                counters[ending].increment(1);
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.end(self.on_drop);
    }
}

/// The counts behind the balances; [`global`] is the one the proxy keeps
/// and exports (tests make their own).
#[derive(Debug)]
pub struct Ledger {
    received: Tally,
    admitted: Tally,
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
            received: Tally::new(),
            admitted: Tally::new(),
            exported,
        }
    }

    /// Counts a request as received.
    pub fn receive(&'static self) -> Received {
        let exported = self.exported.then(|| {
            let hot = telemetry::hot();
            (&hot.received, &hot.ended)
        });
        Received(self.received.open(exported, Ending::Cut as usize))
    }

    /// Counts a request as admitted.
    pub fn admit(&'static self) -> Admitted {
        let exported = self.exported.then(|| {
            let hot = telemetry::hot();
            (&hot.admitted, &hot.admitted_ended)
        });
        Admitted(
            self.admitted
                .open(exported, AdmittedEnding::ClientGone as usize),
        )
    }

    /// The counts now. Each is read once; a request ending between two
    /// reads can make the in-progress figures momentarily one off.
    pub fn balance(&self) -> Balance {
        let (received, [answered, refused, cut]) = self.received.counts();
        let (admitted, [completed, failed, client_gone]) = self.admitted.counts();
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
pub struct Received(Entry);

impl Received {
    /// Ends it.
    pub fn end(mut self, ending: Ending) {
        self.0.end(ending as usize);
    }
}

/// An admitted request not yet ended; ends as `client_gone` when dropped
/// (only a dropped request future, i.e. a client that left, drops one).
#[derive(Debug)]
#[must_use = "an admitted request that is not ended counts as client_gone"]
pub struct Admitted(Entry);

impl Admitted {
    /// Ends it.
    pub fn end(mut self, ending: AdmittedEnding) {
        self.0.end(ending as usize);
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
