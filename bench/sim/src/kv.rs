//! The KV-cache block pool and its prefix cache, with vLLM V1's semantics.
//!
//! - The pool holds a fixed number of blocks of `block_size` tokens.
//! - A full block is identified by a *chained* hash: the hash of its tokens
//!   and of the hash of the block before it, so a hit on block `i` implies the
//!   whole prefix up to `i` matches ([`block_hashes`]).
//! - When a sequence frees its blocks, full blocks keep their hash and stay
//!   in the cache. Free blocks form a queue: allocation takes from the front,
//!   evicting whatever cached content that block held (least recently used
//!   first). A sequence frees its blocks tail first, so its last blocks are
//!   evicted before its first ones, which other prompts are likelier to share.
//! - A cache hit on a free block takes it out of the free queue and
//!   references it again; a hit on a block in use just adds a reference.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a block in the pool.
pub type BlockId = u32;

/// The chained hashes of every *full* block of `tokens`.
///
/// Deterministic across runs and machines: std's `DefaultHasher::new()` is
/// SipHash with fixed zero keys.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    chain_hashes(0, tokens, block_size)
}

/// The chained hashes of the full blocks of `tokens`, continuing a chain
/// whose last hash is `parent` (0 at the start of a sequence).
pub fn chain_hashes(mut parent: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            parent.hash(&mut h);
            block.hash(&mut h);
            parent = h.finish();
            parent
        })
        .collect()
}

#[derive(Debug, Default, Clone)]
struct Block {
    /// Sequences holding this block.
    refs: u32,
    /// Set once the block is full and computed: its content is cached.
    hash: Option<u64>,
    /// Position in the free queue while `refs == 0`.
    free_pos: Option<u64>,
}

/// A fixed pool of KV blocks with a prefix cache.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks in eviction order (front = evicted first).
    free: BTreeMap<u64, BlockId>,
    /// Next back-of-queue position.
    next_pos: u64,
    /// Cached block hash → block holding it.
    cached: HashMap<u64, BlockId>,
    /// Cached blocks evicted so far (for tests and metrics).
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` empty blocks.
    pub fn new(num_blocks: u32, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let mut pool = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks as usize],
            free: BTreeMap::new(),
            next_pos: 0,
            cached: HashMap::new(),
            evictions: 0,
        };
        for id in 0..num_blocks {
            pool.push_free(id);
        }
        pool
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks that can be allocated now (free, cached or not).
    pub fn num_free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Fraction of blocks held by sequences (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }

    /// Cached blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether block `id` is in the free queue (nobody holds it).
    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id as usize].free_pos.is_some()
    }

    /// Whether the content with this hash is cached.
    pub fn is_cached(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
    }

    /// The longest run of cached blocks at the start of `hashes`, without
    /// taking them.
    pub fn longest_hit(&self, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Adds a reference to each of `ids` (cache hits), taking free ones out
    /// of the free queue.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            let block = &mut self.blocks[id as usize];
            if let Some(pos) = block.free_pos.take() {
                self.free.remove(&pos);
            }
            block.refs += 1;
        }
    }

    /// Takes `n` blocks from the front of the free queue, evicting their
    /// cached content; `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free.pop_first()?;
            let block = &mut self.blocks[id as usize];
            block.free_pos = None;
            block.refs = 1;
            if let Some(h) = block.hash.take() {
                self.cached.remove(&h);
                self.evictions += 1;
            }
            out.push(id);
        }
        Some(out)
    }

    /// Records that block `id` is full and computed with content `hash`.
    /// If that content is already cached in another block, this one stays
    /// uncached (vLLM keeps the first copy).
    pub fn cache(&mut self, id: BlockId, hash: u64) {
        if self.blocks[id as usize].hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.blocks[id as usize].hash = Some(hash);
        self.cached.insert(hash, id);
    }

    /// Drops one reference to each of `ids`, a sequence's blocks in order;
    /// blocks nobody holds go to the back of the free queue, last block
    /// first.
    pub fn free(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.refs > 0, "double free of block {id}");
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                self.push_free(id);
            }
        }
    }

    fn push_free(&mut self, id: BlockId) {
        let pos = self.next_pos;
        self.next_pos += 1;
        self.blocks[id as usize].free_pos = Some(pos);
        self.free.insert(pos, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn hashes_are_chained_and_only_cover_full_blocks() {
        let a = block_hashes(&toks(0..10), 4);
        assert_eq!(a.len(), 2);
        // Same second block, different first block: different second hash.
        let mut other = toks(0..10);
        other[0] = 99;
        let b = block_hashes(&other, 4);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Deterministic.
        assert_eq!(a, block_hashes(&toks(0..10), 4));
    }

    #[test]
    fn freed_blocks_stay_cached_until_evicted_lru_first() {
        let mut pool = BlockPool::new(4, 4);
        let a = pool.allocate(2).unwrap();
        pool.cache(a[0], 1);
        pool.cache(a[1], 2);
        pool.free(&a);
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.longest_hit(&[1, 2, 3]), a);
        // Two never-used blocks are at the front: taking them evicts nothing.
        let b = pool.allocate(2).unwrap();
        assert_eq!(pool.evictions(), 0);
        assert!(pool.is_cached(1) && pool.is_cached(2));
        // Next comes the freed sequence's *last* block (hash 2), then hash 1.
        let c = pool.allocate(1).unwrap();
        assert_eq!(c, vec![a[1]]);
        assert!(!pool.is_cached(2));
        assert!(pool.is_cached(1));
        assert_eq!(pool.evictions(), 1);
        pool.free(&b);
        pool.free(&c);
    }

    #[test]
    fn a_hit_takes_a_free_block_out_of_the_free_queue() {
        let mut pool = BlockPool::new(2, 4);
        let a = pool.allocate(1).unwrap();
        pool.cache(a[0], 7);
        pool.free(&a);
        let hit = pool.longest_hit(&[7]);
        pool.touch(&hit);
        assert_eq!(pool.num_free(), 1);
        // The only allocatable block is the other one; the hit survives.
        let b = pool.allocate(1).unwrap();
        assert_ne!(b, hit);
        assert!(pool.is_cached(7));
        assert!(pool.allocate(1).is_none());
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut pool = BlockPool::new(3, 4);
        let _a = pool.allocate(2).unwrap();
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        assert!((pool.usage() - 2.0 / 3.0).abs() < 1e-9);
    }
}
