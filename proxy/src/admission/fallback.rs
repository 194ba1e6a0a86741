//! The built-in safe policy: a FIFO concurrency cap. It replaces a plugin that
//! trapped, overran its deadline or answered with an invalid decision, until a
//! new plugin is loaded. It is an ordinary [`Policy`]: the scheduler hands it
//! the queue as arrivals, oldest first, exactly as it hands the queue to a
//! reloaded plugin, so it can take over at any moment. It never names a
//! replica: the router places what it admits.

use std::collections::VecDeque;

use super::policy::{Admit, Decision, Event, Fault, Policy, Snapshot};

/// At most `limit` requests in flight, first come first served.
#[derive(Debug, Clone)]
pub struct Fallback {
    limit: u32,
    // Queued ids, oldest first (arrivals not yet admitted or cancelled).
    queue: VecDeque<u64>,
}

impl Fallback {
    /// A cap of `limit` (at least 1).
    pub fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            queue: VecDeque::new(),
        }
    }

    /// The cap.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Admits the oldest queued requests while fewer than `limit` are in flight.
    fn admit_oldest(&mut self, in_flight: u32) -> Decision {
        let room = self.limit.saturating_sub(in_flight) as usize;
        let take = room.min(self.queue.len());
        Decision {
            admit: self.queue.drain(..take).map(Admit::id).collect(),
            ..Decision::default()
        }
    }
}

impl Policy for Fallback {
    fn name(&self) -> &str {
        "fallback"
    }

    fn call(&mut self, now: Snapshot<'_>, event: &Event) -> Result<Decision, Fault> {
        match event {
            Event::Arrival { id, .. } => self.queue.push_back(*id),
            Event::Cancel { id } => self.queue.retain(|queued| queued != id),
            Event::Completion { .. } | Event::Tick => {}
        }
        Ok(self.admit_oldest(now.in_flight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::policy::RequestInfo;

    fn arrive(f: &mut Fallback, id: u64, in_flight: u32) -> Vec<u64> {
        let event = Event::Arrival {
            id,
            info: RequestInfo::default(),
            arrived_us: 0,
        };
        let now = Snapshot {
            in_flight,
            ..Snapshot::default()
        };
        ids(f.call(now, &event).unwrap())
    }

    fn ids(decision: Decision) -> Vec<u64> {
        assert!(decision.admit.iter().all(|a| a.replica.is_none()));
        decision.admit.iter().map(|a| a.id).collect()
    }

    #[test]
    fn admits_oldest_up_to_the_cap() {
        let mut f = Fallback::new(3);
        // With 1 in flight, two of 4, 5, 6, 7 fit: the oldest.
        assert_eq!(arrive(&mut f, 4, 3), [] as [u64; 0]);
        assert_eq!(arrive(&mut f, 5, 3), [] as [u64; 0]);
        assert_eq!(arrive(&mut f, 6, 3), [] as [u64; 0]);
        assert_eq!(arrive(&mut f, 7, 1), [4, 5]);
        let full = Snapshot {
            in_flight: 3,
            queued: 2,
            ..Snapshot::default()
        };
        assert!(f.call(full, &Event::Tick).unwrap().admit.is_empty());
        let over = Snapshot {
            in_flight: 9,
            ..full
        };
        assert!(f.call(over, &Event::Tick).unwrap().admit.is_empty());
        assert_eq!(Fallback::new(0).limit(), 1);
    }

    #[test]
    fn a_cancelled_request_is_never_admitted() {
        let mut f = Fallback::new(1);
        assert_eq!(arrive(&mut f, 1, 1), [] as [u64; 0]);
        assert_eq!(arrive(&mut f, 2, 1), [] as [u64; 0]);
        let now = Snapshot {
            in_flight: 1,
            queued: 2,
            ..Snapshot::default()
        };
        f.call(now, &Event::Cancel { id: 1 }).unwrap();
        let free = Snapshot {
            in_flight: 0,
            ..now
        };
        assert_eq!(ids(f.call(free, &Event::Tick).unwrap()), [2]);
    }
}
