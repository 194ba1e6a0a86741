//! The prefix tracker's table, its hand-written slab LRU against the `lru`
//! crate (issue 14), measured in one run so that their ratio holds even on a
//! busy machine.
//!
//! Every variant serves the same 4,000-token text prompt (250 blocks of 16
//! tokens) against a table of 65,536 blocks filled to capacity, as
//! `benches/prefix.rs` does, and cuts and hashes it with the tracker's own
//! code; only the table differs:
//!
//! - `slab`: [`PrefixTracker`] itself: one probe per block under the read
//!   lock, then, under the write lock, a promotion per block that reuses the
//!   slot the lookup found;
//! - `lru+foldhash`, `lru+fxhash`: an [`LruCache`] behind the same kind of
//!   lock, keyed by foldhash's per-instance seed or by rustc-hash's fixed
//!   one: `contains` per leading block under the read lock (no promotion, as
//!   in the tracker), then `put` per block, last block first, under the
//!   write lock. The hashing goes through a tracker with an empty table,
//!   which costs these variants one more uncontended read lock.
//!
//! Two cases: `hit`, the same prompt every time (the tracker's target, a
//! median under 5 µs: 250 probes and 250 promotions), and `miss`, 300
//! prompts in turn, more than the table holds, so that each lookup misses at
//! its first block and each insert evicts 250 blocks. `hash` is the cutting
//! and hashing alone, common to all variants.
//!
//! `cargo bench -p sluice-proxy --bench prefix_lru`

mod fixtures;

use std::hash::BuildHasher;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::RwLock;

use criterion::{Criterion, criterion_group, criterion_main};
use fixtures::{CAPACITY, PROMPT_BYTES, filler};
use lru::LruCache;
use sluice::classify::Prompt;
use sluice::prefix::PrefixTracker;

const BLOCK_SIZE: u32 = 16;
/// Prompts in turn for the `miss` case: 75,000 blocks, more than `CAPACITY`.
const CHURN: u64 = 300;

/// The table under test: what the tracker does per request, in tokens hit.
trait Table {
    fn serve(&self, prompt: &Prompt) -> u32;
}

impl Table for PrefixTracker {
    fn serve(&self, prompt: &Prompt) -> u32 {
        let prediction = self.lookup(prompt);
        self.insert(&prediction);
        prediction.cached_tokens
    }
}

/// The tracker's table path rebuilt on [`LruCache`].
struct LruTable<S> {
    /// Cuts and hashes with the tracker's code; its own table is empty.
    chains: PrefixTracker,
    cache: RwLock<LruCache<u64, (), S>>,
}

impl<S: BuildHasher> LruTable<S> {
    fn new(hasher: S) -> Self {
        let capacity = NonZeroUsize::new(CAPACITY).expect("a capacity");
        Self {
            chains: PrefixTracker::new(0, BLOCK_SIZE),
            cache: RwLock::new(LruCache::with_hasher(capacity, hasher)),
        }
    }
}

impl<S: BuildHasher + Sync> Table for LruTable<S> {
    fn serve(&self, prompt: &Prompt) -> u32 {
        let prediction = self.chains.lookup(prompt);
        // As in the tracker: the last token is recomputed, so the last full
        // block of a prompt cut exactly at a block boundary is not a hit.
        let eligible = (prediction.prompt_tokens.saturating_sub(1) / BLOCK_SIZE) as usize;
        let found = {
            let cache = self.cache.read().expect("not poisoned");
            prediction.blocks[..eligible.min(prediction.blocks.len())]
                .iter()
                .take_while(|hash| cache.contains(*hash))
                .count()
        };
        let mut cache = self.cache.write().expect("not poisoned");
        for &hash in prediction.blocks.iter().rev() {
            cache.put(hash, ());
        }
        found as u32 * BLOCK_SIZE
    }
}

fn text(seed: u64) -> Prompt {
    Prompt::Text(vec![filler(seed, PROMPT_BYTES)])
}

/// Fills `table` to capacity with prompts other than `text(0)` and the
/// churn set, then serves `text(0)` once.
fn warm(table: &dyn Table) {
    for seed in CHURN + 1..CHURN + 1 + CAPACITY as u64 / 250 + 2 {
        table.serve(&text(seed));
    }
    table.serve(&text(0));
}

fn slab_against_lru(c: &mut Criterion) {
    let hit = text(0);
    let churn: Vec<Prompt> = (1..=CHURN).map(text).collect();
    let variants: [(&str, Box<dyn Table>); 3] = [
        ("slab", Box::new(PrefixTracker::new(CAPACITY, BLOCK_SIZE))),
        (
            "lru+foldhash",
            Box::new(LruTable::new(foldhash::fast::RandomState::default())),
        ),
        (
            "lru+fxhash",
            Box::new(LruTable::new(rustc_hash::FxBuildHasher)),
        ),
    ];
    let mut group = c.benchmark_group("prefix table 4000 tokens");
    let hashing = PrefixTracker::new(0, BLOCK_SIZE);
    group.bench_function("hash", |b| {
        b.iter(|| hashing.lookup(black_box(&hit)).blocks.len())
    });
    for (name, table) in &variants {
        warm(table.as_ref());
        assert_eq!(table.serve(&hit), 3_984, "{name}: the prompt is cached");
        group.bench_function(format!("hit/{name}"), |b| {
            b.iter(|| table.serve(black_box(&hit)))
        });
    }
    for (name, table) in &variants {
        // One round of the churn, then each prompt was served 300 prompts
        // ago: evicted.
        for prompt in &churn {
            table.serve(prompt);
        }
        assert_eq!(table.serve(&churn[0]), 0, "{name}: the churn misses");
        let mut next = churn.iter().cycle().skip(1);
        group.bench_function(format!("miss/{name}"), |b| {
            b.iter(|| table.serve(black_box(next.next().expect("a cycle"))))
        });
    }
    group.finish();
}

criterion_group!(benches, slab_against_lru);
criterion_main!(benches);
