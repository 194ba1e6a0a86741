//! The built-in safe policy: a FIFO concurrency cap. It replaces a plugin that
//! trapped, overran its deadline or answered with an invalid decision, until a
//! new plugin is loaded. It keeps no state of its own: the scheduler's queue
//! and in-flight set are the truth, so it can take over at any moment.

use super::wasm::Decision;

/// At most `limit` requests in flight, first come first served.
#[derive(Debug, Clone, Copy)]
pub struct Fallback {
    limit: u32,
}

impl Fallback {
    /// A cap of `limit` (at least 1).
    pub fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
        }
    }

    /// The cap.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Admits the oldest queued requests while fewer than `limit` are in flight.
    pub fn decide(&self, queued_oldest_first: &[u64], in_flight: usize) -> Decision {
        let room = (self.limit as usize).saturating_sub(in_flight);
        Decision {
            admit: queued_oldest_first.iter().take(room).copied().collect(),
            ..Decision::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_oldest_up_to_the_cap() {
        let f = Fallback::new(3);
        assert_eq!(f.decide(&[4, 5, 6, 7], 1).admit, [4, 5]);
        assert!(f.decide(&[4, 5], 3).admit.is_empty());
        assert!(f.decide(&[4], 9).admit.is_empty());
        assert_eq!(Fallback::new(0).limit(), 1);
    }
}
