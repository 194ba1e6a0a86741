//! Applies a replica's KV-cache events to its [`PrefixTracker`].
//!
//! The engine names blocks by its own hashes; the tracker by Sluice's chain
//! hashes of token ids ([`PrefixTracker::token_chain`]). For each stored
//! block the mirror computes Sluice's hash from the event's tokens,
//! continuing from the Sluice hash of the engine's parent block, inserts it,
//! and remembers engine → Sluice so that later children and removals can be
//! translated. A later `lookup(&Prompt::Tokens(prompt))` (or text encoded by
//! the same tokenizer) on the tracker then finds exactly the blocks the
//! engine reported.
//!
//! Rules, each counted in [`Applied`]:
//!
//! - **Unknown parent.** A stored block whose parent the mirror never saw
//!   (stored before it subscribed, missed in a gap, evicted here but not
//!   there) is *ignored*: its tokens do not start a prompt, and hashing them
//!   as a chain start would predict hits for prompts that begin with them.
//! - **Block size.** The engine's block size wins: an event whose
//!   `block_size` differs from the tracker's calls
//!   [`PrefixTracker::set_block_size`], which forgets every block (they were
//!   cut differently), and the mirror forgets its map with them.
//! - **Other tiers, other keys.** Only the GPU tier (`medium` `"GPU"` or
//!   unspecified) is mirrored; blocks keyed by more than their tokens (LoRA,
//!   multimodal inputs, cache salt) are ignored, since a plain token prompt
//!   would not hit them.
//! - **Bounds.** The map holds one entry per Sluice hash held by the
//!   tracker: entries go when the tracker evicts their block on an insert by
//!   the mirror, on removal and on clear. Evictions caused by other writers
//!   of the same tracker are not reported; when the map outgrows the
//!   tracker's capacity, entries whose block the tracker no longer holds are
//!   dropped.

use std::collections::HashMap;
use std::sync::Arc;

use super::decode::{EngineHash, KvEvent};
use crate::prefix::PrefixTracker;

/// What one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Blocks inserted into the tracker.
    Stored(usize),
    /// Blocks removed from the tracker (those it held).
    Removed(usize),
    /// The tracker was cleared.
    Cleared,
    /// Nothing was applied, and why.
    Ignored(Ignored),
}

/// Why an event changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// A stored block's parent is not known here.
    UnknownParent,
    /// Not the GPU tier.
    Medium,
    /// Blocks keyed by more than their tokens.
    Keyed,
}

impl Ignored {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ignored::UnknownParent => "unknown_parent",
            Ignored::Medium => "other_medium",
            Ignored::Keyed => "keyed",
        }
    }
}

/// One replica's tracker and the engine → Sluice hash map that feeds it.
#[derive(Debug)]
pub struct Mirror {
    tracker: Arc<PrefixTracker>,
    /// Engine hash → Sluice hash, for every block mirrored and still held.
    sluice: HashMap<EngineHash, u64>,
    /// Sluice hash → engine hash: the inverse, to drop what the tracker evicts.
    engine: HashMap<u64, EngineHash>,
}

impl Mirror {
    /// A mirror into `tracker`.
    pub fn new(tracker: Arc<PrefixTracker>) -> Self {
        Self {
            tracker,
            sluice: HashMap::new(),
            engine: HashMap::new(),
        }
    }

    /// The tracker it feeds.
    pub fn tracker(&self) -> &Arc<PrefixTracker> {
        &self.tracker
    }

    /// Engine blocks it can translate (at most the tracker's capacity,
    /// unless other writers evicted some since the last insert).
    pub fn len(&self) -> usize {
        self.sluice.len()
    }

    /// Whether it knows no block.
    pub fn is_empty(&self) -> bool {
        self.sluice.is_empty()
    }

    /// Sluice's hash for an engine block, if mirrored.
    pub fn sluice_hash(&self, engine: &EngineHash) -> Option<u64> {
        self.sluice.get(engine).copied()
    }

    /// Forgets everything, in the map and the tracker (the engine restarted).
    pub fn clear(&mut self) {
        self.sluice.clear();
        self.engine.clear();
        self.tracker.clear();
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &KvEvent) -> Applied {
        match event {
            KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                medium,
                keyed,
            } => {
                if !gpu(medium.as_deref()) {
                    return Applied::Ignored(Ignored::Medium);
                }
                if *keyed {
                    return Applied::Ignored(Ignored::Keyed);
                }
                if *block_size != self.tracker.block_size() {
                    self.tracker.set_block_size(*block_size);
                    self.sluice.clear();
                    self.engine.clear();
                }
                let parent = match parent {
                    None => None,
                    Some(engine) => match self.sluice.get(engine) {
                        Some(&hash) => Some(hash),
                        None => return Applied::Ignored(Ignored::UnknownParent),
                    },
                };
                self.store(block_hashes, parent, token_ids)
            }
            KvEvent::BlockRemoved {
                block_hashes,
                medium,
            } => {
                if !gpu(medium.as_deref()) {
                    return Applied::Ignored(Ignored::Medium);
                }
                let gone: Vec<u64> = block_hashes
                    .iter()
                    .filter_map(|engine| {
                        let hash = self.sluice.remove(engine)?;
                        self.engine.remove(&hash);
                        Some(hash)
                    })
                    .collect();
                Applied::Removed(self.tracker.remove_hashes(&gone))
            }
            KvEvent::AllCleared => {
                self.clear();
                Applied::Cleared
            }
        }
    }

    fn store(&mut self, engine: &[EngineHash], parent: Option<u64>, ids: &[u32]) -> Applied {
        let chain = self.tracker.token_chain(parent, ids);
        // Both are one per full block; a short side bounds the other.
        let n = chain.len().min(engine.len());
        let evicted = self.tracker.insert_hashes(&chain[..n]);
        for (e, &s) in engine.iter().zip(&chain[..n]) {
            if let Some(old) = self.engine.insert(s, e.clone())
                && old != *e
            {
                self.sluice.remove(&old);
            }
            if let Some(old) = self.sluice.insert(e.clone(), s)
                && old != s
            {
                self.engine.remove(&old);
            }
        }
        for hash in evicted {
            if let Some(e) = self.engine.remove(&hash) {
                self.sluice.remove(&e);
            }
        }
        if self.engine.len() > self.tracker.capacity() {
            // Others evicted blocks the mirror had inserted.
            let tracker = &self.tracker;
            self.engine.retain(|&hash, _| tracker.contains(hash));
            let engine = &self.engine;
            self.sluice.retain(|_, hash| engine.contains_key(hash));
        }
        Applied::Stored(n)
    }
}

/// Whether `medium` is the engine's own (GPU) cache.
fn gpu(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("GPU"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Prompt;
    use crate::kv_events::{decode_batch, fixture};

    fn stored(hashes: &[u64], parent: Option<u64>, ids: &[u32]) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
            parent: parent.map(EngineHash::Int),
            token_ids: ids.to_vec(),
            block_size: 4,
            medium: Some("GPU".into()),
            keyed: false,
        }
    }

    fn removed(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockRemoved {
            block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
            medium: Some("GPU".into()),
        }
    }

    fn cached(tracker: &PrefixTracker, ids: &[u32]) -> u32 {
        tracker
            .lookup(&Prompt::Tokens(vec![ids.to_vec()]))
            .cached_tokens
    }

    #[test]
    fn stored_removed_cleared() {
        let tracker = Arc::new(PrefixTracker::new(100, 4));
        let mut mirror = Mirror::new(tracker.clone());
        let ids: Vec<u32> = (0..13).collect();
        // The engine stores the first two blocks, then the third as their child.
        assert_eq!(
            mirror.apply(&stored(&[10, 11], None, &ids[..8])),
            Applied::Stored(2)
        );
        assert_eq!(cached(&tracker, &ids), 8);
        assert_eq!(
            mirror.apply(&stored(&[12], Some(11), &ids[8..12])),
            Applied::Stored(1)
        );
        assert_eq!(cached(&tracker, &ids), 12);
        assert_eq!(mirror.len(), 3);
        // A prompt sharing only the first block hits only it.
        let mut other = ids.clone();
        other[5] = 99;
        assert_eq!(cached(&tracker, &other), 4);

        // Removing the middle block ends the run there, as in the engine.
        assert_eq!(mirror.apply(&removed(&[11, 999])), Applied::Removed(1));
        assert_eq!(cached(&tracker, &ids), 4);
        assert_eq!(mirror.sluice_hash(&EngineHash::Int(11)), None);
        assert_eq!((tracker.len(), mirror.len()), (2, 2));

        assert_eq!(mirror.apply(&KvEvent::AllCleared), Applied::Cleared);
        assert!(tracker.is_empty() && mirror.is_empty());
        assert_eq!(cached(&tracker, &ids), 0);
    }

    #[test]
    fn what_is_ignored() {
        let tracker = Arc::new(PrefixTracker::new(100, 4));
        let mut mirror = Mirror::new(tracker.clone());
        let ids: Vec<u32> = (0..9).collect();
        // A parent never seen: its tokens do not start a prompt.
        assert_eq!(
            mirror.apply(&stored(&[21], Some(20), &ids[4..8])),
            Applied::Ignored(Ignored::UnknownParent)
        );
        let mut cpu = stored(&[10], None, &ids[..4]);
        if let KvEvent::BlockStored { medium, .. } = &mut cpu {
            *medium = Some("CPU".into());
        }
        assert_eq!(mirror.apply(&cpu), Applied::Ignored(Ignored::Medium));
        let mut salted = stored(&[10], None, &ids[..4]);
        if let KvEvent::BlockStored { keyed, .. } = &mut salted {
            *keyed = true;
        }
        assert_eq!(mirror.apply(&salted), Applied::Ignored(Ignored::Keyed));
        assert!(tracker.is_empty() && mirror.is_empty());
        // Removing what was never stored changes nothing.
        assert_eq!(mirror.apply(&removed(&[10])), Applied::Removed(0));
    }

    #[test]
    fn the_engines_block_size_wins() {
        let tracker = Arc::new(PrefixTracker::new(100, 16));
        let mut mirror = Mirror::new(tracker.clone());
        let ids: Vec<u32> = (0..9).collect();
        assert_eq!(
            mirror.apply(&stored(&[1, 2], None, &ids[..8])),
            Applied::Stored(2)
        );
        assert_eq!(tracker.block_size(), 4);
        assert_eq!(cached(&tracker, &ids), 8);
    }

    #[test]
    fn the_map_is_bounded_by_the_tracker() {
        let tracker = Arc::new(PrefixTracker::new(3, 4));
        let mut mirror = Mirror::new(tracker.clone());
        for chain in 0..10u32 {
            let ids: Vec<u32> = (0..8).map(|i| chain * 100 + i).collect();
            let base = u64::from(chain) * 10;
            mirror.apply(&stored(&[base, base + 1], None, &ids));
            assert!(mirror.len() <= 3, "{}", mirror.len());
            assert_eq!(mirror.len(), tracker.len());
        }
        // The newest chain survives whole; children of an evicted block are ignored.
        let newest: Vec<u32> = (0..9).map(|i| 900 + i).collect();
        assert_eq!(cached(&tracker, &newest), 8);
        assert_eq!(
            mirror.apply(&stored(&[2], Some(1), &[1; 4])),
            Applied::Ignored(Ignored::UnknownParent)
        );
        // Evictions by another writer of the tracker are caught up with.
        tracker.insert_hashes(&[7, 8, 9]);
        mirror.apply(&stored(&[500], None, &[5; 4]));
        assert!(mirror.len() <= 3);
    }

    /// The recording of a real vLLM, mirrored: lookups of the prompts sent
    /// find their full blocks; a prompt sharing the prefix finds the prefix.
    #[test]
    fn the_real_engine_mirrored() {
        let prompts = fixture::prompts(fixture::TOKENS);
        let messages = fixture::messages(fixture::TOKENS);
        let batches: Vec<_> = messages
            .iter()
            .map(|frames| decode_batch(frames[2]).expect("decodes"))
            .collect();
        let tracker = Arc::new(PrefixTracker::new(10_000, 16));
        let mut mirror = Mirror::new(tracker.clone());
        let (last, before) = batches.split_last().expect("batches");
        for batch in before {
            for event in &batch.events {
                assert!(!matches!(mirror.apply(event), Applied::Ignored(_)));
            }
        }
        assert_eq!(tracker.block_size(), 32);
        for prompt in &prompts {
            // 104 tokens: three full blocks; the engine cached them all.
            let full = (prompt.len() - 1) / 32 * 32;
            assert_eq!(cached(&tracker, prompt) as usize, full);
        }
        // The shared 64-token prefix and a tail the engine never saw.
        let mut fresh = prompts[0][..64].to_vec();
        fresh.extend(3000..3040);
        assert_eq!(cached(&tracker, &fresh), 64);
        assert_eq!(mirror.len(), tracker.len());
        // The recording ends with a reset of the engine's prefix cache.
        for event in &last.events {
            mirror.apply(event);
        }
        assert!(tracker.is_empty() && mirror.is_empty());
        assert_eq!(cached(&tracker, &prompts[0]), 0);
    }

    /// A real vLLM with a 64-block cache, evicting: the tracker ends up
    /// holding exactly the blocks the engine still holds, and each prompt's
    /// lookup finds the leading blocks the engine has.
    #[test]
    fn the_real_engine_evicting() {
        use std::collections::{HashMap, HashSet};

        let mut mirror = Mirror::new(Arc::new(PrefixTracker::new(10_000, 32)));
        let tracker = mirror.tracker().clone();
        // The engine's view, rebuilt from the events: held hashes, and each
        // block's tokens from the start of its prompt.
        let mut held = HashSet::new();
        let mut prefixes: HashMap<EngineHash, Vec<u32>> = HashMap::new();
        let mut removals = 0;
        for frames in fixture::messages(fixture::EVICT) {
            for event in decode_batch(frames[2]).expect("decodes").events {
                match &event {
                    KvEvent::BlockStored {
                        block_hashes,
                        parent,
                        token_ids,
                        ..
                    } => {
                        let mut tokens = parent
                            .as_ref()
                            .map_or_else(Vec::new, |p| prefixes[p].clone());
                        for (hash, block) in block_hashes.iter().zip(token_ids.chunks(32)) {
                            tokens.extend_from_slice(block);
                            prefixes.insert(hash.clone(), tokens.clone());
                            held.insert(hash.clone());
                        }
                    }
                    KvEvent::BlockRemoved { block_hashes, .. } => {
                        removals += block_hashes.len();
                        for hash in block_hashes {
                            assert!(held.remove(hash), "removes only what it stored");
                        }
                    }
                    KvEvent::AllCleared => held.clear(),
                }
                assert!(!matches!(mirror.apply(&event), Applied::Ignored(_)));
            }
        }
        assert!(removals > 0, "the recording evicts");
        assert_eq!((tracker.len(), mirror.len()), (held.len(), held.len()));
        let by_tokens: HashMap<&[u32], &EngineHash> =
            prefixes.iter().map(|(h, t)| (t.as_slice(), h)).collect();
        let mut partly_evicted = 0;
        for prompt in fixture::prompts(fixture::EVICT) {
            let engine_run = (1..=(prompt.len() - 1) / 32)
                .take_while(|&n| {
                    by_tokens
                        .get(&prompt[..n * 32])
                        .is_some_and(|h| held.contains(*h))
                })
                .count();
            partly_evicted += usize::from(engine_run < (prompt.len() - 1) / 32);
            assert_eq!(cached(&tracker, &prompt) as usize, engine_run * 32);
        }
        assert!(partly_evicted > 0);
    }
}
