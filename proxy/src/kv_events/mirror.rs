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
