//! [`Inherited`]: the requests a new policy instance finds in flight after
//! a hot reload, admitted by the instance before it.
//!
//! The host's [`Snapshot::in_flight`] counts them; the instance never
//! admitted them, so it knows them only by that count and by completions of
//! ids it does not know. The count is learned from the first snapshot and
//! then only ever lowered (by later snapshots or by those completions), so
//! a host that under-reports cannot hold slots forever.

use crate::types::Snapshot;

/// The count of inherited requests; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inherited(Option<u32>);

impl Inherited {
    /// Learns from `now`, given that `own` of its in-flight requests are
    /// this instance's.
    pub fn observe(&mut self, now: Snapshot, own: u32) {
        let foreign = now.in_flight.saturating_sub(own);
        self.0 = Some(self.0.map_or(foreign, |n| n.min(foreign)));
    }

    /// How many inherited requests still run (0 before the first snapshot).
    pub fn count(&self) -> u32 {
        self.0.unwrap_or(0)
    }

    /// A completion of an id this instance does not know: one inherited
    /// request fewer. False when none is left to account for it (a host
    /// contract violation, worth a warning). Before the first snapshot it
    /// is taken as inherited; the next snapshot gives the true count.
    pub fn completed(&mut self) -> bool {
        match &mut self.0 {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            None => true,
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_follows_the_host_downwards_only() {
        let mut inherited = Inherited::default();
        assert!(
            inherited.completed(),
            "before any snapshot: taken as inherited"
        );
        inherited.observe(Snapshot::at(0).with_in_flight(5), 2);
        assert_eq!(inherited.count(), 3);
        inherited.observe(Snapshot::at(0).with_in_flight(9), 2);
        assert_eq!(inherited.count(), 3, "a higher report does not raise it");
        assert!(inherited.completed());
        inherited.observe(Snapshot::at(0).with_in_flight(2), 1);
        assert_eq!(inherited.count(), 1);
        assert!(inherited.completed());
        assert!(!inherited.completed(), "none left to account for it");
    }
}
