//! [`FairQueue`]: the order in which a policy admits what is waiting —
//! strict priority first, then a weighted fair share across tenants, first
//! in, first out within a tenant — and [`Weights`], the per-tenant shares.
//!
//! Priority is strict: a queued request of a higher [`Request::priority`]
//! always goes before any of a lower one. Within one priority, tenants take
//! turns by deficit round robin with a cost of one request: each turn a
//! tenant may send as many requests as its weight (1 unless [`Weights`]
//! says otherwise), so one tenant's burst of 5,000 cannot hold up another
//! tenant's trickle for more than a turn. With a single tenant (every
//! request's tenant is `""` when nobody sets one) the order is arrival
//! order.
//!
//! Removal ([`FairQueue::remove`], for a cancel) forgets the entry at once
//! and leaves its slot in the tenant's queue, skipped when its turn comes
//! (O(1) in the tenant's queue; O(tenants) when it was the tenant's last).
//! An id queued again after a cancel (the host's ids are unique, so only a
//! broken host would) gets a new place; the old one stays stale.
//!
//! ```
//! use sluice_policy_sdk::{FairQueue, Request, Weights};
//!
//! let req = |id, tenant: &str, priority| Request {
//!     tenant: tenant.into(),
//!     priority,
//!     ..Request::new(id)
//! };
//! let mut queue = FairQueue::new(Weights::default());
//! for id in 1..=3 {
//!     queue.push(&req(id, "batch", 0)); // a backlog…
//! }
//! queue.push(&req(4, "live", 0)); // …does not starve another tenant,
//! queue.push(&req(5, "urgent", 10)); // and priority goes first.
//! let order: Vec<u64> = std::iter::from_fn(|| queue.pop().map(|q| q.id)).collect();
//! assert_eq!(order, [5, 1, 4, 2, 3]);
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use crate::config::Config;
use crate::types::{Request, cached_on};

/// FxHash-style hasher: ids and tenant keys come from the host, and a
/// policy runs under a per-call deadline, so speed matters more than
/// resistance to crafted keys (a flood of colliding tenants only slows the
/// policy into its deadline, where the host's fallback takes over).
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A tenant name, shared between the entries of one tenant.
pub type Tenant = Rc<str>;

/// Per-tenant shares of the fair queue: `weights=live:4,batch:1` gives
/// tenant `live` four turns for each of `batch`'s. A tenant not named has
/// weight 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Weights(Vec<(String, u32)>);

impl Weights {
    /// Reads `key` (e.g. `weights`) as `tenant:weight` pairs separated by
    /// commas, each weight from 1 to 1,000.
    pub fn read(config: &Config, key: &str) -> Weights {
        config
            .value(
                key,
                "tenant:weight pairs separated by commas, each weight 1-1000 (e.g. live:4,batch:1)",
                Weights::parse,
            )
            .unwrap_or_default()
    }

    /// Parses `live:4,batch:1`; `None` when any pair is malformed.
    pub fn parse(text: &str) -> Option<Weights> {
        let mut pairs = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tenant, weight) = pair.rsplit_once(':')?;
            let weight: u32 = weight.trim().parse().ok()?;
            if !(1..=1000).contains(&weight) {
                return None;
            }
            pairs.push((tenant.trim().to_owned(), weight));
        }
        Some(Weights(pairs))
    }

    /// The weight of `tenant` (1 when not named).
    pub fn of(&self, tenant: &str) -> u32 {
        self.0
            .iter()
            .rev()
            .find(|(t, _)| t == tenant)
            .map_or(1, |&(_, w)| w)
    }

    /// True when no tenant is named.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `live:4,batch:1`, as configured.
impl std::fmt::Display for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (tenant, weight)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{tenant}:{weight}")?;
        }
        Ok(())
    }
}

/// Slots kept for urgent requests: `reserve=N` slots that only requests of
/// priority ≥ `reserve_priority` may take (none by default; the reserved
/// priority is 1 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserve {
    /// How many slots are kept (`reserve`).
    pub slots: u32,
    /// The least priority that may take them (`reserve_priority`).
    pub priority: i32,
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve {
            slots: 0,
            priority: 1,
        }
    }
}

impl Reserve {
    /// Reads `reserve` and `reserve_priority` over the defaults.
    pub fn read(config: &Config) -> Reserve {
        let default = Reserve::default();
        Reserve {
            slots: config.u32("reserve", .., default.slots),
            priority: config.i32("reserve_priority", default.priority),
        }
    }

    /// Whether a request of `priority` may take a reserved slot.
    pub fn admits(&self, priority: i32) -> bool {
        priority >= self.priority
    }
}

/// ` reserve=N reserve_priority=P` for a log line, or nothing when no slot
/// is kept.
impl std::fmt::Display for Reserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.slots == 0 {
            return Ok(());
        }
        write!(
            f,
            " reserve={} reserve_priority={}",
            self.slots, self.priority
        )
    }
}

/// What the queue keeps of a waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The request's id.
    pub id: u64,
    /// Its tenant.
    pub tenant: Tenant,
    /// Its priority (higher goes first).
    pub priority: i32,
    /// Its shared-prefix group (0 when unknown).
    pub prefix_group: u64,
    /// Its prompt length in tokens.
    pub prompt_tokens: u32,
    /// When it arrived, on the host clock (µs).
    pub arrived_us: u64,
    /// Predicted cached prompt tokens per replica, as in
    /// [`Request::cached_by_replica`] (empty with one upstream).
    pub cached_by_replica: Vec<(u32, u32)>,
}

impl Queued {
    /// Predicted cached prompt tokens on `replica` (0 when not listed).
    pub fn cached_on(&self, replica: u32) -> u32 {
        cached_on(&self.cached_by_replica, replica)
    }
}

/// A place in a tenant's queue: the request's id, and the sequence number
/// its entry was queued with (a place whose entry is gone, or was queued
/// again later, is stale).
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    seq: u64,
}

/// One tenant's waiting requests within one priority, and its turn's credit.
#[derive(Debug, Default)]
struct Flow {
    /// Places, oldest first; some may be stale.
    ids: VecDeque<Slot>,
    /// How many of `ids` are live.
    live: usize,
    /// Requests it may still send in its current turn.
    credit: u32,
}

/// The tenants of one priority, taking turns.
#[derive(Debug, Default)]
struct Class {
    flows: FastMap<Tenant, Flow>,
    /// Tenants with something queued, in turn order; the front's turn is now.
    turns: VecDeque<Tenant>,
    /// Live requests of this priority.
    live: usize,
}

/// Waiting requests in admission order; see the [module docs](self).
#[derive(Debug, Default)]
pub struct FairQueue {
    weights: Weights,
    /// By priority, highest first.
    classes: BTreeMap<Reverse<i32>, Class>,
    /// Every live entry, with the sequence number of its slot.
    entries: FastMap<u64, (Queued, u64)>,
    /// The next slot's sequence number.
    next_seq: u64,
    /// (arrival, id) of every live entry, for the oldest.
    by_arrival: BTreeSet<(u64, u64)>,
}

impl FairQueue {
    /// An empty queue sharing turns by `weights`.
    pub fn new(weights: Weights) -> Self {
        FairQueue {
            weights,
            ..FairQueue::default()
        }
    }

    /// How many requests are waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `id` is waiting.
    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// The waiting request `id`.
    pub fn get(&self, id: u64) -> Option<&Queued> {
        self.entries.get(&id).map(|(queued, _)| queued)
    }

    /// The earliest arrival among the waiting requests (µs).
    pub fn oldest_arrival_us(&self) -> Option<u64> {
        self.by_arrival.first().map(|&(at, _)| at)
    }

    /// The highest priority waiting.
    pub fn top_priority(&self) -> Option<i32> {
        self.classes.keys().next().map(|&Reverse(p)| p)
    }

    /// How many requests of priority `min` or higher are waiting.
    pub fn count_at_least(&self, min: i32) -> usize {
        self.classes
            .range(..=Reverse(min))
            .map(|(_, class)| class.live)
            .sum()
    }

    /// Queues `req` behind its tenant's earlier requests of its priority.
    /// False (and nothing changes) when its id is already waiting.
    pub fn push(&mut self, req: &Request) -> bool {
        if self.entries.contains_key(&req.id) {
            return false;
        }
        let class = self.classes.entry(Reverse(req.priority)).or_default();
        // Names are shared (`Rc`) within a class, so only a new flow allocates.
        let tenant: Tenant = match class.flows.get_key_value(req.tenant.as_str()) {
            Some((shared, _)) => Rc::clone(shared),
            None => Rc::from(req.tenant.as_str()),
        };
        let flow = class.flows.entry(Rc::clone(&tenant)).or_default();
        if flow.live == 0 {
            class.turns.push_back(Rc::clone(&tenant));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        flow.ids.push_back(Slot { id: req.id, seq });
        flow.live += 1;
        class.live += 1;
        self.by_arrival.insert((req.arrived_us, req.id));
        let queued = Queued {
            id: req.id,
            tenant,
            priority: req.priority,
            prefix_group: req.prefix_group,
            prompt_tokens: req.prompt_tokens,
            arrived_us: req.arrived_us,
            cached_by_replica: req.cached_by_replica.clone(),
        };
        self.entries.insert(req.id, (queued, seq));
        true
    }

    /// Forgets waiting request `id` (a cancel); `None` when it was not waiting.
    pub fn remove(&mut self, id: u64) -> Option<Queued> {
        let (queued, _) = self.entries.remove(&id)?;
        self.by_arrival.remove(&(queued.arrived_us, id));
        // The id stays in its flow until its turn comes, unless the flow
        // holds nothing else live: then the flow goes now, so tenants that
        // left do not pile up.
        let key = Reverse(queued.priority);
        if let Some(class) = self.classes.get_mut(&key)
            && let Some(flow) = class.flows.get_mut(&queued.tenant)
        {
            flow.live -= 1;
            class.live -= 1;
            if flow.live == 0 {
                class.flows.remove(&queued.tenant);
                class.turns.retain(|t| *t != queued.tenant);
            }
            if class.live == 0 {
                self.classes.remove(&key);
            }
        }
        Some(queued)
    }

    /// Takes the next request in admission order.
    pub fn pop(&mut self) -> Option<Queued> {
        self.pop_where(|_| true)
    }

    /// Takes the next request in admission order among those `eligible`
    /// accepts, at priority `min_priority` or higher. `eligible` is asked
    /// about each tenant's oldest request of each priority (e.g. "is this
    /// tenant under its own limit?"); a tenant refused keeps its place.
    pub fn pop_where(&mut self, mut eligible: impl FnMut(&Queued) -> bool) -> Option<Queued> {
        let priorities: Vec<Reverse<i32>> = self.classes.keys().copied().collect();
        for key in priorities {
            if let Some(queued) = self.pop_from(key, &mut eligible) {
                return Some(queued);
            }
        }
        None
    }

    /// [`FairQueue::pop_where`] within priority `key`.
    fn pop_from(
        &mut self,
        key: Reverse<i32>,
        eligible: &mut impl FnMut(&Queued) -> bool,
    ) -> Option<Queued> {
        let class = self.classes.get_mut(&key)?;
        let mut refused = 0;
        let mut found = None;
        while refused < class.turns.len() {
            let Some(tenant) = class.turns.front().cloned() else {
                break;
            };
            let flow = class.flows.get_mut(&tenant)?;
            // Drop stale places from the front.
            let entries = &self.entries;
            let live = |slot: &Slot| {
                entries
                    .get(&slot.id)
                    .is_some_and(|&(_, seq)| seq == slot.seq)
            };
            while flow.ids.front().is_some_and(|slot| !live(slot)) {
                flow.ids.pop_front();
            }
            // A flow in the turns always holds a live place (`live` > 0);
            // were it ever not so, the flow goes rather than the class
            // stalling on it.
            let Some(&Slot { id, .. }) = flow.ids.front() else {
                class.live = class.live.saturating_sub(flow.live);
                class.flows.remove(&tenant);
                class.turns.pop_front();
                continue;
            };
            if !eligible(&self.entries[&id].0) {
                class.turns.rotate_left(1);
                refused += 1;
                continue;
            }
            if flow.credit == 0 {
                flow.credit = self.weights.of(&tenant);
            }
            flow.ids.pop_front();
            flow.credit -= 1;
            flow.live -= 1;
            class.live -= 1;
            if flow.live == 0 {
                class.flows.remove(&tenant);
                class.turns.pop_front();
            } else if flow.credit == 0 {
                class.turns.rotate_left(1);
            }
            found = Some(id);
            break;
        }
        if class.live == 0 {
            self.classes.remove(&key);
        }
        let (queued, _) = self.entries.remove(&found?)?;
        self.by_arrival.remove(&(queued.arrived_us, queued.id));
        Some(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, tenant: &str, priority: i32) -> Request {
        Request {
            tenant: tenant.into(),
            priority,
            arrived_us: id,
            ..Request::new(id)
        }
    }

    fn drain(queue: &mut FairQueue) -> Vec<u64> {
        std::iter::from_fn(|| queue.pop().map(|q| q.id)).collect()
    }

    #[test]
    fn one_tenant_is_first_in_first_out() {
        let mut queue = FairQueue::default();
        for id in [3, 1, 2] {
            queue.push(&req(id, "", 0));
        }
        assert_eq!(drain(&mut queue), [3, 1, 2]);
        assert!(queue.is_empty());
        assert!(queue.classes.is_empty(), "no tenant is kept once idle");
    }

    #[test]
    fn higher_priority_goes_first_then_arrival_order() {
        let mut queue = FairQueue::default();
        for id in 0..100 {
            queue.push(&req(id, "", 0));
        }
        queue.push(&req(100, "", 10));
        queue.push(&req(101, "", -5));
        queue.push(&req(102, "", 10));
        let order = drain(&mut queue);
        assert_eq!(order[..3], [100, 102, 0]);
        assert_eq!(*order.last().unwrap(), 101);
    }

    #[test]
    fn tenants_take_turns_in_proportion_to_their_weights() {
        let mut queue = FairQueue::new(Weights::parse("a:3").unwrap());
        for id in 0..30 {
            queue.push(&req(id, "a", 0));
        }
        for id in 100..110 {
            queue.push(&req(id, "b", 0));
        }
        let first_20: Vec<u64> = (0..20).map(|_| queue.pop().unwrap().id).collect();
        let from_a = first_20.iter().filter(|&&id| id < 100).count();
        assert_eq!(from_a, 15, "3 of every 4 turns go to a: {first_20:?}");
        // FIFO within each tenant.
        let a: Vec<u64> = first_20.iter().copied().filter(|&id| id < 100).collect();
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_burst_does_not_starve_a_trickle() {
        let mut queue = FairQueue::default();
        for id in 0..5000 {
            queue.push(&req(id, "batch", 0));
        }
        queue.pop();
        queue.push(&req(9000, "live", 0));
        // The trickle's request is at most one turn away.
        let next_two = [queue.pop().unwrap().id, queue.pop().unwrap().id];
        assert!(next_two.contains(&9000), "{next_two:?}");
    }

    #[test]
    fn removed_requests_are_skipped_and_forgotten() {
        let mut queue = FairQueue::default();
        for id in 0..4 {
            queue.push(&req(id, "a", 0));
        }
        queue.push(&req(10, "b", 0));
        assert_eq!(queue.remove(1).map(|q| q.id), Some(1));
        assert_eq!(queue.remove(1), None);
        assert_eq!(queue.remove(10).map(|q| q.id), Some(10));
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.oldest_arrival_us(), Some(0));
        assert_eq!(drain(&mut queue), [0, 2, 3]);
        assert!(queue.classes.is_empty());
    }

    #[test]
    fn a_refused_tenant_keeps_its_place() {
        let mut queue = FairQueue::default();
        queue.push(&req(1, "full", 0));
        queue.push(&req(2, "open", 0));
        queue.push(&req(3, "open", 0));
        let not_full = |q: &Queued| &*q.tenant != "full";
        assert_eq!(queue.pop_where(not_full).map(|q| q.id), Some(2));
        assert_eq!(queue.pop_where(not_full).map(|q| q.id), Some(3));
        assert_eq!(queue.pop_where(not_full), None);
        assert_eq!(queue.pop().map(|q| q.id), Some(1));
    }

    #[test]
    fn an_id_queued_again_after_a_cancel_does_not_stall_the_queue() {
        // The host never does this (ids are unique); the queue copes.
        let mut queue = FairQueue::default();
        queue.push(&req(1, "a", 0));
        queue.push(&req(2, "a", 0));
        queue.remove(1);
        queue.push(&req(1, "b", 0));
        queue.push(&req(3, "c", 0));
        // The cancelled place is stale, though its id is queued again.
        assert_eq!(drain(&mut queue), [2, 1, 3]);
        assert!(queue.is_empty());
    }

    #[test]
    fn duplicates_are_refused() {
        let mut queue = FairQueue::default();
        assert!(queue.push(&req(1, "", 0)));
        assert!(!queue.push(&req(1, "x", 5)));
        assert_eq!(queue.top_priority(), Some(0));
        assert_eq!(queue.count_at_least(1), 0);
    }

    #[test]
    fn weights_parse_and_print() {
        let w = Weights::parse(" live:4, batch:1 ").unwrap();
        assert_eq!(w.of("live"), 4);
        assert_eq!(w.of("other"), 1);
        assert_eq!(w.to_string(), "live:4,batch:1");
        for bad in ["live", "live:0", "live:x", "live:1001"] {
            assert_eq!(Weights::parse(bad), None, "{bad}");
        }
        let error = Config::parse([("weights", "a")], |c| Ok(Weights::read(c, "weights")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("tenant:weight"), "{error}");
    }
}
