//! Shared-prompt prefix tracking: a prediction of how much of a prompt the
//! engine's prefix cache already holds.
//!
//! # The model
//!
//! vLLM keeps the KV cache in blocks of `block_size` tokens (16 by default;
//! the upstream says which in `vllm:cache_config_info`'s `block_size` label).
//! A *full* block is cached under a hash of its parent block's hash and its
//! own tokens, so a block's hash covers everything before it. A new request
//! reuses the longest run of its leading blocks found in the cache; blocks
//! no running request uses wait in an LRU free queue and are evicted from its
//! cold end. The tracker mirrors that:
//!
//! - a prompt is cut into blocks ([`BlockUnit`]) and chain-hashed: block `i`'s
//!   hash is `link(hash(i - 1), contents(i))`; a partial last block is not
//!   hashed (vLLM caches only full blocks);
//! - [`PrefixTracker::lookup`] finds the longest run of leading blocks in an
//!   LRU of block hashes sized like the engine's cache (`num_gpu_blocks`);
//!   that run × `block_size` is the predicted [`Prediction::cached_tokens`];
//! - [`PrefixTracker::insert`] records a request's blocks once the engine has
//!   computed them (when the request completes). Like vLLM, which frees a
//!   finished request's blocks in reverse order, the first block ends up the
//!   most recently used and the last the first to go: eviction trims chains
//!   from their ends and never leaves a gap that would strand the blocks
//!   behind it.
//! - As in vLLM, a prompt that is entirely cached still recomputes its last
//!   token, so at most `(prompt_tokens - 1) / block_size` blocks count as hits.
//!
//! Predictions feed the admission policy (`cached-tokens`, `prefix-group`)
//! and the query/hit counters, in tokens, comparable with the engine's
//! `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits`.
//!
//! # Units
//!
//! Token-id prompts are cut exactly, `block_size` ids per block. Text has no
//! tokens without a tokenizer, so [`BlockUnit::Bytes`] cuts it every
//! `block_size ×` [`CHARS_PER_TOKEN`] *bytes* (UTF-8 bytes, not characters:
//! cutting needs no decoding, and non-ASCII text merely counts as more
//! "tokens"); the tracker's token counts for text are in that unit.
//! [`BlockUnit::Tokenizer`] is the seam for exact text blocks: anything that
//! implements [`Tokenizer`] (an HF `tokenizer.json`, for instance) turns text
//! into ids, which are then cut like a token-id prompt.
//!
//! Chat messages are rendered canonically, `role\ncontent\n` per message
//! (the same text as [`crate::classify::InferenceRequest::prompt_text`]).
//! That is not the model's chat template, so block boundaries are not
//! vLLM's; but identical leading messages give identical leading blocks,
//! which is what a shared-prompt prediction needs. Text, chat and token
//! prompts hash in separate domains (and each block size in its own), so
//! their chains never meet; text encoded by a tokenizer shares the token
//! domain with token-id prompts, as it would in the engine.
//!
//! # Limits
//!
//! It is a prediction from what this proxy has seen, not the engine's state:
//! traffic that bypasses the proxy, eviction under memory pressure from
//! running requests, preemption, and cache keys outside the prompt (LoRA
//! adapter, images, `cache_salt`) are invisible to it; keep one tracker per
//! upstream model. vLLM pins blocks while a request runs and shares them with
//! requests that arrive after the prefill; here blocks become known only at
//! [`insert`](PrefixTracker::insert) and can be evicted at any time. Hashes
//! are 64-bit and unkeyed (stable across restarts): a collision is a wrong
//! prediction, nothing worse. The table's own bucket hashing is keyed per
//! tracker, so crafted prompts cannot degrade its probes.
//!
//! # Concurrency and cost
//!
//! The table is behind one [`RwLock`]. Prompts are hashed before it is
//! taken; lookups share the read lock and never write (see
//! [`PrefixTracker::lookup`] for why a lookup does not promote its hits);
//! inserts take the write lock only for the table updates. A lookup holds it
//! for one probe per block; an insert reuses the slots its lookup found
//! (checked, since they may have been reused since) and probes only the
//! others. Counters are atomics.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::classify::{ChatMessage, Prompt};
use crate::tokens::{CHARS_PER_TOKEN, Tokenizer};

/// vLLM's default block size in tokens, used until the upstream tells.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// How text is cut into blocks. Token-id prompts are always cut exactly.
#[derive(Debug, Clone, Default)]
pub enum BlockUnit {
    /// [`CHARS_PER_TOKEN`] bytes of text stand for one token.
    #[default]
    Bytes,
    /// A tokenizer supplies the token ids; blocks are exact.
    Tokenizer(Arc<dyn Tokenizer>),
}

/// What [`PrefixTracker::lookup`] predicts for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prediction {
    /// The chained hashes of the prompt's full blocks, in order. A request
    /// with several prompts (a completions batch) has their chains one after
    /// another; each hash encodes its position, so they need no separator.
    pub blocks: Vec<u64>,
    /// Predicted prefix-cache hit, in tokens.
    pub cached_tokens: u32,
    /// Prompt length, in tokens (for text: in the [`BlockUnit`]'s tokens).
    pub prompt_tokens: u32,
    /// The first block's hash, identifying the shared prefix (a system
    /// prompt, say); 0 when the prompt is shorter than a block.
    pub prefix_group: u64,
    /// The block size the chain was cut with; [`PrefixTracker::insert`]
    /// ignores a prediction made before the block size changed.
    pub block_size: u32,
    /// Where the lookup found each block in the table (`NIL` where it did
    /// not): lets the insert skip the probe while the slot still holds it.
    slots: Vec<u32>,
}

impl Prediction {
    /// This prediction for another tracker (another replica's) that holds
    /// `cached_tokens` of it (its [`PrefixTracker::held_tokens`]): the same
    /// blocks, and no slot hints (they belong to the tracker that made it),
    /// ready for [`PrefixTracker::insert`] there.
    pub fn with_cached(&self, cached_tokens: u32) -> Self {
        Self {
            blocks: self.blocks.clone(),
            cached_tokens,
            prompt_tokens: self.prompt_tokens,
            prefix_group: self.prefix_group,
            block_size: self.block_size,
            slots: Vec::new(),
        }
    }
}

/// The LRU of block hashes and the counters; shared by every request.
pub struct PrefixTracker {
    unit: BlockUnit,
    /// A copy of `table.block_size`, read without the lock to hash prompts
    /// before taking it; written only under the write lock.
    block_size: AtomicU32,
    /// Lookups take it shared, inserts and resets exclusively.
    table: RwLock<Table>,
    /// Prompt tokens looked up.
    queries: AtomicU64,
    /// Predicted cached tokens.
    hits: AtomicU64,
}

impl PrefixTracker {
    /// A tracker for an engine with `capacity_blocks` KV blocks of
    /// `block_size` tokens (0: [`DEFAULT_BLOCK_SIZE`]), cutting text by bytes.
    /// A capacity of 0 predicts no hits.
    pub fn new(capacity_blocks: usize, block_size: u32) -> Self {
        Self::with_unit(capacity_blocks, block_size, BlockUnit::Bytes)
    }

    /// [`new`](Self::new), cutting text with `unit`.
    pub fn with_unit(capacity_blocks: usize, block_size: u32, unit: BlockUnit) -> Self {
        let block_size = if block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            block_size
        };
        Self {
            unit,
            block_size: AtomicU32::new(block_size),
            table: RwLock::new(Table {
                block_size,
                lru: Lru::new(capacity_blocks),
            }),
            queries: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// An empty tracker cutting like this one (same unit, block size and
    /// capacity): another replica's.
    pub fn sibling(&self) -> Self {
        Self::with_unit(self.capacity(), self.block_size(), self.unit.clone())
    }

    /// Cuts and hashes `prompt` and predicts its cached prefix; counts the
    /// query and the hit.
    ///
    /// A lookup does not promote the blocks it finds. In vLLM a hit block is
    /// taken out of the free queue while the request runs and goes back to
    /// its warm end when the request finishes; [`insert`](Self::insert) at
    /// completion reproduces that end state. Promoting at lookup would also
    /// refresh prefixes of requests that are later shed or time out in the
    /// queue and never reach the engine, and would make every lookup a
    /// writer.
    pub fn lookup(&self, prompt: &Prompt) -> Prediction {
        let block_size = self.block_size.load(Ordering::Relaxed);
        let mut prediction = Prediction {
            block_size,
            ..Prediction::default()
        };
        match prompt {
            Prompt::Tokens(sequences) => {
                for ids in sequences {
                    self.predict(&mut prediction, |out| {
                        chain_tokens(Domain::Tokens, ids, block_size, out)
                    });
                }
            }
            Prompt::Text(parts) => {
                for text in parts {
                    self.predict(&mut prediction, |out| {
                        self.chain_text(Domain::Text, text, block_size, out)
                    });
                }
            }
            Prompt::Messages(messages) => {
                let text = render_chat(messages);
                self.predict(&mut prediction, |out| {
                    self.chain_text(Domain::Chat, &text, block_size, out)
                });
            }
        }
        prediction.prefix_group = prediction.blocks.first().copied().unwrap_or(0);
        self.queries
            .fetch_add(u64::from(prediction.prompt_tokens), Ordering::Relaxed);
        self.hits
            .fetch_add(u64::from(prediction.cached_tokens), Ordering::Relaxed);
        prediction
    }

    /// Records `prediction`'s blocks as cached and most recently used, the
    /// first block warmest, evicting the least recently used beyond capacity.
    /// Call it when the engine has computed the prompt (the request
    /// completed). Ignored if the block size changed since the lookup.
    pub fn insert(&self, prediction: &Prediction) {
        if prediction.blocks.is_empty() {
            return;
        }
        let mut table = self.write();
        if table.block_size != prediction.block_size {
            return;
        }
        for (i, &hash) in prediction.blocks.iter().enumerate().rev() {
            let hint = prediction.slots.get(i).copied().unwrap_or(NIL);
            let _evicted = table.lru.touch(hash, hint);
        }
    }

    /// The chain hashes of the full blocks of token ids `ids`, continuing the
    /// chain from `parent` (a hash this method or a lookup produced), or
    /// from the token domain's root when `None`; cut with the current block
    /// size. A block's hash is the one a token-id (or tokenizer-encoded)
    /// [`lookup`](Self::lookup) gives the same tokens at the same position.
    /// A partial last block is not hashed.
    pub fn token_chain(&self, parent: Option<u64>, ids: &[u32]) -> Vec<u64> {
        let block_size = self.block_size();
        let mut prev = parent.unwrap_or_else(|| root(Domain::Tokens, block_size));
        ids.chunks_exact(block_size as usize)
            .map(|block| {
                prev = link(prev, hash_ids(block));
                prev
            })
            .collect()
    }

    /// Records `chain`'s blocks as cached and most recently used, the first
    /// warmest, as [`insert`](Self::insert) does for a prediction; returns
    /// the hashes evicted to make room (which may include some of `chain`'s
    /// own when it is longer than the capacity).
    pub fn insert_hashes(&self, chain: &[u64]) -> Vec<u64> {
        let mut evicted = Vec::new();
        if chain.is_empty() {
            return evicted;
        }
        let mut table = self.write();
        for &hash in chain.iter().rev() {
            evicted.extend(table.lru.touch(hash, NIL));
        }
        evicted
    }

    /// Forgets the given blocks (those not held are ignored); returns how
    /// many were held.
    pub fn remove_hashes(&self, hashes: &[u64]) -> usize {
        if hashes.is_empty() {
            return 0;
        }
        let mut table = self.write();
        hashes
            .iter()
            .filter(|&&hash| table.lru.remove(hash))
            .count()
    }

    /// Whether the block `hash` is held.
    pub fn contains(&self, hash: u64) -> bool {
        self.read().lru.map.contains_key(&hash)
    }

    /// Forgets every block (the engine's cache was reset).
    pub fn clear(&self) {
        self.write().lru.clear();
    }

    /// Adopts the upstream's block size; a change forgets every block, since
    /// the engine's blocks are then cut differently. 0 (unknown) is ignored.
    pub fn set_block_size(&self, block_size: u32) {
        if block_size == 0 {
            return;
        }
        let mut table = self.write();
        if table.block_size != block_size {
            table.block_size = block_size;
            table.lru.clear();
            self.block_size.store(block_size, Ordering::Relaxed);
        }
    }

    /// Resizes the table to the engine's cache, keeping the most recently
    /// used blocks when it shrinks.
    pub fn set_capacity(&self, capacity_blocks: usize) {
        self.write().lru.set_capacity(capacity_blocks);
    }

    /// Whether text is cut by a tokenizer: a lookup may then take
    /// milliseconds (encoding), too long for an async worker.
    pub fn tokenizes(&self) -> bool {
        matches!(self.unit, BlockUnit::Tokenizer(_))
    }

    /// The block size in tokens.
    pub fn block_size(&self) -> u32 {
        self.block_size.load(Ordering::Relaxed)
    }

    /// The capacity in blocks.
    pub fn capacity(&self) -> usize {
        self.read().lru.capacity
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.read().lru.map.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompt tokens looked up so far (the engine's prefix-cache queries).
    pub fn query_tokens(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Predicted cached tokens so far (the engine's prefix-cache hits).
    pub fn hit_tokens(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The tokens of `prediction` (made by any tracker with the same block
    /// size and unit, e.g. the proxy's hashing tracker) that this tracker
    /// holds: its leading run of blocks here, under the same last-token
    /// rule as [`lookup`](Self::lookup). Counts nothing; for a request with
    /// several prompts, only the run from the first block counts. Used to
    /// ask each replica's tracker about one prompt hashed once.
    pub fn held_tokens(&self, prediction: &Prediction) -> u32 {
        let block_size = prediction.block_size.max(1);
        if block_size != self.block_size() {
            return 0;
        }
        let eligible = (prediction.prompt_tokens.saturating_sub(1) / block_size) as usize;
        let chain = &prediction.blocks[..eligible.min(prediction.blocks.len())];
        let table = self.read();
        let found = chain
            .iter()
            .take_while(|hash| table.lru.map.contains_key(hash))
            .count();
        saturating_u32(found * block_size as usize)
    }

    /// Adds one sequence: `cut` appends its chain and returns its length in
    /// tokens; the leading blocks found in the table count as cached.
    fn predict(&self, prediction: &mut Prediction, cut: impl FnOnce(&mut Vec<u64>) -> usize) {
        let start = prediction.blocks.len();
        let tokens = cut(&mut prediction.blocks);
        let block_size = prediction.block_size as usize;
        // The last prompt token is always recomputed, even on a full hit.
        let eligible = (tokens.saturating_sub(1) / block_size).min(prediction.blocks.len() - start);
        let found = self.read().lru.leading_run(
            &prediction.blocks[start..start + eligible],
            &mut prediction.slots,
        );
        prediction.slots.resize(prediction.blocks.len(), NIL);
        prediction.cached_tokens = prediction
            .cached_tokens
            .saturating_add(saturating_u32(found * block_size));
        prediction.prompt_tokens = prediction
            .prompt_tokens
            .saturating_add(saturating_u32(tokens));
    }

    /// Appends the chain of `text`, returning its length in tokens.
    fn chain_text(&self, domain: Domain, text: &str, block_size: u32, out: &mut Vec<u64>) -> usize {
        match &self.unit {
            BlockUnit::Bytes => {
                let block_bytes = block_size as usize * CHARS_PER_TOKEN;
                let mut prev = root(domain, block_size);
                out.reserve(text.len() / block_bytes);
                for block in text.as_bytes().chunks_exact(block_bytes) {
                    prev = link(prev, hash_bytes(block));
                    out.push(prev);
                }
                text.len().div_ceil(CHARS_PER_TOKEN)
            }
            BlockUnit::Tokenizer(tokenizer) => {
                let domain = match domain {
                    Domain::Chat => Domain::ChatTokens,
                    _ => Domain::Tokens,
                };
                chain_tokens(domain, &tokenizer.encode(text), block_size, out)
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // The table is a prediction: whatever a panicking writer left is still usable.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for PrefixTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.read();
        f.debug_struct("PrefixTracker")
            .field("unit", &self.unit)
            .field("block_size", &table.block_size)
            .field("capacity", &table.lru.capacity)
            .field("len", &table.lru.map.len())
            .field("query_tokens", &self.query_tokens())
            .field("hit_tokens", &self.hit_tokens())
            .finish()
    }
}

/// Appends the chain of token ids, returning its length in tokens.
fn chain_tokens(domain: Domain, ids: &[u32], block_size: u32, out: &mut Vec<u64>) -> usize {
    let mut prev = root(domain, block_size);
    out.reserve(ids.len() / block_size as usize);
    for block in ids.chunks_exact(block_size as usize) {
        prev = link(prev, hash_ids(block));
        out.push(prev);
    }
    ids.len()
}

/// The canonical chat rendering, `role\ncontent\n` per message.
fn render_chat(messages: &[ChatMessage]) -> String {
    let len = messages
        .iter()
        .map(|m| m.role.len() + m.content.len() + 2)
        .sum();
    let mut text = String::with_capacity(len);
    for m in messages {
        text.push_str(&m.role);
        text.push('\n');
        text.push_str(&m.content);
        text.push('\n');
    }
    text
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Hashing: a folded 64×64→128-bit multiply (as in wyhash and foldhash), one per
// 16 bytes. Each block's contents hash independently of the chain, so the CPU
// overlaps the blocks; only `link` is sequential.

/// Where a chain starts: kinds of prompt never share blocks.
#[derive(Debug, Clone, Copy)]
enum Domain {
    Text = 1,
    Chat = 2,
    Tokens = 3,
    ChatTokens = 4,
}

/// Digits of π, as arbitrary odd-looking constants.
const K: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

fn root(domain: Domain, block_size: u32) -> u64 {
    fold(K[0] ^ domain as u64, K[1] ^ u64::from(block_size))
}

/// The hash of a block given its parent's: covers everything before it.
#[inline]
fn link(parent: u64, contents: u64) -> u64 {
    fold(parent ^ K[2], contents ^ K[3])
}

/// Contents hash of one block of bytes (every block of a chain has one length).
#[inline]
fn hash_bytes(block: &[u8]) -> u64 {
    let (words, tail) = block.as_chunks::<8>();
    let (pairs, odd) = words.as_chunks::<2>();
    let mut acc = K[0];
    for [a, b] in pairs {
        acc = fold(u64::from_le_bytes(*a) ^ acc, u64::from_le_bytes(*b) ^ K[1]);
    }
    if !odd.is_empty() || !tail.is_empty() {
        let a = odd.first().map_or(0, |w| u64::from_le_bytes(*w));
        let mut b = [0; 8];
        b[..tail.len()].copy_from_slice(tail);
        acc = fold(a ^ acc, u64::from_le_bytes(b) ^ K[2]);
    }
    acc
}

/// Contents hash of one block of token ids.
#[inline]
fn hash_ids(block: &[u32]) -> u64 {
    let pair = |a: u32, b: u32| u64::from(a) | u64::from(b) << 32;
    let (quads, tail) = block.as_chunks::<4>();
    let mut acc = K[0];
    for [a, b, c, d] in quads {
        acc = fold(pair(*a, *b) ^ acc, pair(*c, *d) ^ K[1]);
    }
    if !tail.is_empty() {
        let at = |i: usize| tail.get(i).copied().unwrap_or(0);
        acc = fold(pair(at(0), at(1)) ^ acc, pair(at(2), 0) ^ K[2]);
    }
    acc
}

// ---------------------------------------------------------------------------
// The LRU: a slab of nodes linked by index (no allocation per block once
// full: the coldest node's slot is reused) and a map from block hash to slot.
//
// Why not the `lru` crate (issue 14): `benches/prefix_lru.rs` serves a
// 4,000-token prompt (250 blocks) against a full 65,536-block table with
// this slab and with `LruCache` behind the same lock, in one run. Measured
// 2026-12-06 on a 2-core shared VM with other builds running (load ~7.5),
// medians of two runs:
//
//   all hits (lookup + 250 promotions):  slab 5.87 / 5.58 µs,
//     lru + foldhash 6.28 / 6.80 µs (1.07× / 1.22×),
//     lru + rustc-hash 6.02 / 6.02 µs (1.02× / 1.08×);
//   all misses (250 evictions):          slab 22.2 / 19.4 µs,
//     lru + foldhash 45.1 / 40.3 µs (2.03× / 2.08×),
//     lru + rustc-hash 45.3 / 38.1 µs (2.04× / 1.97×).
//
// `lru` missed the 5 µs target in both runs (under that load, so did the
// slab: 1.5–1.7 µs of each figure is hashing, common to both) and was
// slower in every case: its map's keys live in boxed nodes, so every probe
// and eviction follows a pointer, and a promotion probes again where the
// slab reuses the slot its lookup found.

struct Table {
    block_size: u32,
    lru: Lru,
}

const NIL: u32 = u32::MAX;

struct Node {
    hash: u64,
    /// Warmer neighbour.
    prev: u32,
    /// Colder neighbour.
    next: u32,
}

struct Lru {
    capacity: usize,
    map: HashMap<u64, u32, Keyed>,
    nodes: Vec<Node>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        // Slots are u32 indices.
        let capacity = capacity.min(NIL as usize);
        Self {
            capacity,
            map: HashMap::with_hasher(Keyed::new()),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// How many of `chain`'s leading blocks are held; appends their slots.
    fn leading_run(&self, chain: &[u64], slots: &mut Vec<u32>) -> usize {
        let before = slots.len();
        slots.extend(chain.iter().map_while(|hash| self.map.get(hash).copied()));
        slots.len() - before
    }

    /// Makes `hash` the most recently used, adding it (and evicting the
    /// least recently used at capacity) if absent. `hint` is the slot a
    /// lookup found it in, if any; trusted only while that slot holds it.
    /// Returns the evicted hash, if any.
    fn touch(&mut self, hash: u64, hint: u32) -> Option<u64> {
        let found = match self.nodes.get(hint as usize) {
            Some(node) if node.hash == hash => Some(hint),
            _ => self.map.get(&hash).copied(),
        };
        if let Some(slot) = found {
            if slot != self.head {
                self.unlink(slot);
                self.push_front(slot);
            }
            return None;
        }
        if self.capacity == 0 {
            return None;
        }
        let mut evicted = None;
        let slot = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                hash,
                prev: NIL,
                next: NIL,
            });
            (self.nodes.len() - 1) as u32
        } else {
            let slot = self.tail;
            self.unlink(slot);
            let node = &mut self.nodes[slot as usize];
            self.map.remove(&node.hash);
            evicted = Some(node.hash);
            node.hash = hash;
            slot
        };
        self.map.insert(hash, slot);
        self.push_front(slot);
        evicted
    }

    /// Drops `hash` if held; the last node moves into its slot, so the slab
    /// stays dense. Returns whether it was held.
    fn remove(&mut self, hash: u64) -> bool {
        let Some(slot) = self.map.remove(&hash) else {
            return false;
        };
        self.unlink(slot);
        let last = (self.nodes.len() - 1) as u32;
        if slot != last {
            let Node { hash, prev, next } = self.nodes[last as usize];
            self.nodes[slot as usize] = Node { hash, prev, next };
            match prev {
                NIL => self.head = slot,
                p => self.nodes[p as usize].next = slot,
            }
            match next {
                NIL => self.tail = slot,
                n => self.nodes[n as usize].prev = slot,
            }
            self.map.insert(hash, slot);
        }
        self.nodes.pop();
        true
    }

    fn unlink(&mut self, slot: u32) {
        let Node { prev, next, .. } = self.nodes[slot as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let head = self.head;
        let node = &mut self.nodes[slot as usize];
        node.prev = NIL;
        node.next = head;
        match head {
            NIL => self.tail = slot,
            h => self.nodes[h as usize].prev = slot,
        }
        self.head = slot;
    }

    fn clear(&mut self) {
        self.map.clear();
        self.nodes.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    /// Keeps the `capacity` most recently used blocks.
    fn set_capacity(&mut self, capacity: usize) {
        let mut warmest_first = Vec::with_capacity(self.map.len().min(capacity));
        let mut slot = self.head;
        while slot != NIL && warmest_first.len() < capacity {
            let node = &self.nodes[slot as usize];
            warmest_first.push(node.hash);
            slot = node.next;
        }
        self.clear();
        self.capacity = capacity.min(NIL as usize);
        for hash in warmest_first.into_iter().rev() {
            let _evicted = self.touch(hash, NIL);
        }
    }
}

/// The map's hasher: block hashes are already uniform, so one keyed mix
/// suffices; the per-tracker key keeps bucket placement unpredictable.
#[derive(Clone)]
struct Keyed(u64);

impl Keyed {
    fn new() -> Self {
        Self(RandomState::new().hash_one(0x5eed_u64) | 1)
    }
}

impl BuildHasher for Keyed {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            key: self.0,
            hash: 0,
        }
    }
}

struct KeyedHasher {
    key: u64,
    hash: u64,
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte) ^ self.hash.rotate_left(8));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.hash = fold(n ^ self.key, K[3]);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{InferenceRequest, Route};

    /// A text prompt of `fill.len()` blocks of 16 tokens (64 bytes), block
    /// `i` filled with `fill[i]`, and one byte more, so that every block is
    /// eligible for a hit (the last token is always recomputed).
    fn text(fill: &[u8]) -> Prompt {
        let mut bytes: Vec<u8> = fill.iter().flat_map(|&b| [b; 64]).collect();
        bytes.push(b'!');
        Prompt::Text(vec![String::from_utf8(bytes).expect("ASCII")])
    }

    fn chat(system: &str, user: &str) -> Prompt {
        Prompt::Messages(vec![
            ChatMessage {
                role: "system".into(),
                content: system.into(),
            },
            ChatMessage {
                role: "user".into(),
                content: user.into(),
            },
        ])
    }

    /// Looks up and inserts, returning the prediction made before the insert.
    fn serve(tracker: &PrefixTracker, prompt: &Prompt) -> Prediction {
        let prediction = tracker.lookup(prompt);
        tracker.insert(&prediction);
        prediction
    }

    #[test]
    fn chained_hashing() {
        let tracker = PrefixTracker::new(0, 16);
        let aab = tracker.lookup(&text(b"aab"));
        let aac = tracker.lookup(&text(b"aac"));
        assert_eq!(aab.blocks.len(), 3);
        // The same contents at another position hash differently.
        assert_ne!(aab.blocks[0], aab.blocks[1]);
        // Identical prefixes share hashes, and part where the prompts part.
        assert_eq!(aab.blocks[..2], aac.blocks[..2]);
        assert_ne!(aab.blocks[2], aac.blocks[2]);
        // A block's hash covers everything before it.
        let bab = tracker.lookup(&text(b"bab"));
        assert!(aab.blocks.iter().zip(&bab.blocks).all(|(x, y)| x != y));
        // Deterministic, and the prefix group is the first block.
        assert_eq!(aab, tracker.lookup(&text(b"aab")));
        assert_eq!(aab.prefix_group, aab.blocks[0]);
        assert_eq!(aab.prefix_group, aac.prefix_group);
    }

    #[test]
    fn longest_prefix_match() {
        let tracker = PrefixTracker::new(100, 16);
        assert_eq!(serve(&tracker, &text(b"abcd")).cached_tokens, 0);
        // The shared leading blocks hit, up to where the prompts part.
        assert_eq!(tracker.lookup(&text(b"abxd")).cached_tokens, 32);
        assert_eq!(tracker.lookup(&text(b"abcde")).cached_tokens, 64);
        assert_eq!(tracker.lookup(&text(b"xbcd")).cached_tokens, 0);

        // A gap stops the match, even if later blocks are held.
        let tracker = PrefixTracker::new(100, 16);
        let mut gapped = tracker.lookup(&text(b"abcde"));
        gapped.blocks.remove(1);
        tracker.insert(&gapped);
        assert_eq!(tracker.lookup(&text(b"abcde")).cached_tokens, 16);
    }

    #[test]
    fn partial_last_block_is_not_counted() {
        let tracker = PrefixTracker::new(100, 16);
        let mut long = String::from_utf8(vec![b'a'; 64 + 40]).expect("ASCII");
        let prediction = serve(&tracker, &Prompt::Text(vec![long.clone()]));
        assert_eq!(prediction.blocks.len(), 1);
        assert_eq!(prediction.prompt_tokens, 26);
        long.push_str(&"b".repeat(24)); // now exactly two blocks
        let prediction = serve(&tracker, &Prompt::Text(vec![long.clone()]));
        assert_eq!((prediction.blocks.len(), prediction.cached_tokens), (2, 16));
        // A fully cached prompt still recomputes its last token (as vLLM
        // does), so its last block does not count...
        assert_eq!(
            tracker
                .lookup(&Prompt::Text(vec![long.clone()]))
                .cached_tokens,
            16
        );
        // ...until one more token follows it.
        long.push('c');
        assert_eq!(tracker.lookup(&Prompt::Text(vec![long])).cached_tokens, 32);
        // Shorter than a block: nothing to hash, no group.
        let short = tracker.lookup(&Prompt::Text(vec!["hello".into()]));
        assert_eq!((short.blocks.len(), short.prefix_group), (0, 0));
        assert_eq!(short.prompt_tokens, 2);
    }

    #[test]
    fn eviction_order_is_lru() {
        let tracker = PrefixTracker::new(4, 16);
        serve(&tracker, &text(b"aa")); // blocks a, aa
        serve(&tracker, &text(b"bb")); // blocks b, bb
        serve(&tracker, &text(b"aa")); // a, aa become the warmest
        serve(&tracker, &text(b"cc")); // evicts b, bb
        assert_eq!(tracker.len(), 4);
        assert_eq!(tracker.lookup(&text(b"aa")).cached_tokens, 32);
        assert_eq!(tracker.lookup(&text(b"cc")).cached_tokens, 32);
        assert_eq!(tracker.lookup(&text(b"bb")).cached_tokens, 0);

        // A lookup alone does not promote: "a" stays the coldest and goes.
        let tracker = PrefixTracker::new(2, 16);
        serve(&tracker, &text(b"a"));
        serve(&tracker, &text(b"b"));
        assert_eq!(tracker.lookup(&text(b"a")).cached_tokens, 16);
        serve(&tracker, &text(b"c"));
        assert_eq!(tracker.lookup(&text(b"a")).cached_tokens, 0);
        assert_eq!(tracker.lookup(&text(b"b")).cached_tokens, 16);
    }

    #[test]
    fn a_chain_is_evicted_from_its_end() {
        // Three blocks into room for two: the first two stay.
        let tracker = PrefixTracker::new(2, 16);
        serve(&tracker, &text(b"abc"));
        assert_eq!(tracker.len(), 2);
        assert_eq!(tracker.lookup(&text(b"abc")).cached_tokens, 32);
        // Another prompt pushes out the cold end of the chain, not its head.
        serve(&tracker, &text(b"x"));
        assert_eq!(tracker.lookup(&text(b"abc")).cached_tokens, 16);
        assert_eq!(tracker.lookup(&text(b"x")).cached_tokens, 16);
    }

    #[test]
    fn stale_slots_are_not_trusted() {
        let tracker = PrefixTracker::new(2, 16);
        serve(&tracker, &text(b"ab"));
        let stale = tracker.lookup(&text(b"ab")); // found in both slots
        serve(&tracker, &text(b"cd")); // evicts a and ab, reusing their slots
        tracker.insert(&stale);
        assert_eq!(tracker.len(), 2);
        assert_eq!(tracker.lookup(&text(b"ab")).cached_tokens, 32);
        assert_eq!(tracker.lookup(&text(b"cd")).cached_tokens, 0);
    }

    #[test]
    fn chat_canonicalisation() {
        let tracker = PrefixTracker::new(100, 4);
        let rubric = "You grade candidates against this rubric. ".repeat(4);
        let one = tracker.lookup(&chat(&rubric, "Candidate one: ten years of Rust."));
        let again = tracker.lookup(&chat(&rubric, "Candidate one: ten years of Rust."));
        assert_eq!(one, again);
        // The shared system prompt gives shared leading blocks and one group.
        let two = tracker.lookup(&chat(&rubric, "Candidate two: a fresh graduate."));
        assert_eq!(one.prefix_group, two.prefix_group);
        let shared = one
            .blocks
            .iter()
            .zip(&two.blocks)
            .take_while(|(a, b)| a == b);
        assert!(shared.count() >= (rubric.len() + 7) / 16);
        // A different system prompt changes the first block and all after it.
        let other = tracker.lookup(&chat("Be terse.", "Candidate one: ten years of Rust."));
        assert_ne!(one.prefix_group, other.prefix_group);
        assert!(one.blocks.iter().zip(&other.blocks).all(|(a, b)| a != b));

        // The rendering is the request's canonical prompt text...
        let body = br#"{"messages":[{"role":"system","content":"Grade this candidate well."},
                                      {"role":"user","content":[{"type":"text","text":"Ada, 36."}]}]}"#;
        let request = InferenceRequest::parse(Route::ChatCompletions, body).expect("valid");
        assert_eq!(
            render_chat(match &request.prompt {
                Prompt::Messages(m) => m,
                _ => unreachable!("a chat body"),
            }),
            request.prompt_text()
        );
        // ...hashed apart from the same text sent as a completion.
        let as_text = tracker.lookup(&Prompt::Text(vec![request.prompt_text()]));
        let as_chat = tracker.lookup(&request.prompt);
        assert_eq!(as_text.blocks.len(), as_chat.blocks.len());
        assert_ne!(as_text.prefix_group, as_chat.prefix_group);
    }

    #[test]
    fn block_size_change_clears() {
        let tracker = PrefixTracker::new(100, 16);
        let stale = serve(&tracker, &text(b"abc"));
        assert_eq!(tracker.len(), 3);
        tracker.set_block_size(16); // unchanged: keeps the table
        tracker.set_block_size(0); // unknown: ignored
        assert_eq!(tracker.len(), 3);

        tracker.set_block_size(32);
        assert_eq!((tracker.block_size(), tracker.len()), (32, 0));
        // A prediction cut with the old size is not inserted.
        tracker.insert(&stale);
        assert!(tracker.is_empty());
        let prediction = serve(&tracker, &text(b"abcde"));
        assert_eq!((prediction.blocks.len(), prediction.block_size), (2, 32));
        assert_eq!(tracker.lookup(&text(b"abcde")).cached_tokens, 64);
        // Chains of different block sizes never meet.
        assert_ne!(prediction.prefix_group, stale.prefix_group);
    }

    #[test]
    fn token_id_prompts() {
        let tracker = PrefixTracker::new(100, 4);
        let ids: Vec<u32> = (0..10).collect();
        // Exact blocks: 10 ids are two blocks of 4 and a partial one.
        let prediction = serve(&tracker, &Prompt::Tokens(vec![ids.clone()]));
        assert_eq!(prediction.blocks.len(), 2);
        assert_eq!(prediction.prompt_tokens, 10);
        assert_eq!(
            tracker
                .lookup(&Prompt::Tokens(vec![ids.clone()]))
                .cached_tokens,
            8
        );
        // One changed id in block 1 keeps block 0.
        let mut changed = ids.clone();
        changed[5] = 99;
        assert_eq!(
            tracker.lookup(&Prompt::Tokens(vec![changed])).cached_tokens,
            4
        );
        // A batch sums its sequences; each chain starts from the root.
        let batch = tracker.lookup(&Prompt::Tokens(vec![ids.clone(), ids[..6].to_vec()]));
        assert_eq!(batch.blocks.len(), 3);
        assert_eq!(batch.blocks[0], batch.blocks[2]);
        assert_eq!((batch.prompt_tokens, batch.cached_tokens), (16, 12));
        // Token ids and text of the same bytes hash alike but in separate domains.
        let aaaa = u32::from_le_bytes(*b"aaaa");
        assert_eq!(hash_ids(&[aaaa; 4]), hash_bytes(&[b'a'; 16]));
        let as_ids = tracker.lookup(&Prompt::Tokens(vec![vec![aaaa; 4]]));
        let as_text = tracker.lookup(&Prompt::Text(vec!["a".repeat(16)]));
        assert_eq!((as_ids.blocks.len(), as_text.blocks.len()), (1, 1));
        assert_ne!(as_ids.blocks, as_text.blocks);
    }

    #[test]
    fn chains_from_outside() {
        let tracker = PrefixTracker::new(4, 4);
        let ids: Vec<u32> = (0..10).collect();
        // The chain a lookup computes, and its continuation from a parent.
        let chain = tracker.token_chain(None, &ids);
        let prompt = Prompt::Tokens(vec![ids.clone()]);
        assert_eq!(chain, tracker.lookup(&prompt).blocks);
        assert_eq!(tracker.token_chain(Some(chain[0]), &ids[4..]), chain[1..]);

        assert!(tracker.insert_hashes(&chain).is_empty());
        assert!(tracker.contains(chain[1]));
        assert_eq!(tracker.lookup(&prompt).cached_tokens, 8);
        // Removing the second block ends the run at the first.
        assert_eq!(tracker.remove_hashes(&[chain[1], 42]), 1);
        assert!(!tracker.contains(chain[1]));
        assert_eq!(tracker.lookup(&prompt).cached_tokens, 4);
        // The slab stays consistent: fill it and evict in LRU order.
        let other = tracker.token_chain(None, &[9; 12]);
        assert!(tracker.insert_hashes(&other).is_empty());
        assert_eq!(tracker.len(), 4);
        assert_eq!(tracker.insert_hashes(&[7]), vec![chain[0]]);
        assert_eq!(tracker.insert_hashes(&[8, 9]), vec![other[2], other[1]]);
        assert_eq!(tracker.len(), 4);
        tracker.clear();
        assert!(tracker.is_empty());
        assert_eq!(tracker.lookup(&prompt).cached_tokens, 0);
    }

    #[test]
    fn a_tokenizer_gives_exact_blocks() {
        /// One token per byte.
        #[derive(Debug)]
        struct ByteTokens;
        impl Tokenizer for ByteTokens {
            fn encode(&self, text: &str) -> Vec<u32> {
                text.bytes().map(u32::from).collect()
            }
        }
        let tracker = PrefixTracker::with_unit(100, 4, BlockUnit::Tokenizer(Arc::new(ByteTokens)));
        let text = tracker.lookup(&Prompt::Text(vec!["abcdefghij".into()]));
        assert_eq!((text.blocks.len(), text.prompt_tokens), (2, 10));
        // Encoded text and the same token ids share a chain.
        let ids = tracker.lookup(&Prompt::Tokens(vec![b"abcdefghij".map(u32::from).to_vec()]));
        assert_eq!(text.blocks, ids.blocks);
        // Chat stays apart.
        let chat = tracker.lookup(&chat("abcdefghij", ""));
        assert_ne!(chat.prefix_group, text.prefix_group);
    }

    #[test]
    fn counters_are_in_tokens() {
        let tracker = PrefixTracker::new(100, 16);
        serve(&tracker, &text(b"abc")); // 193 bytes: 49 queried, 0 hit
        tracker.lookup(&text(b"abcd")); // 257 bytes: 65 queried, 48 hit
        assert_eq!((tracker.query_tokens(), tracker.hit_tokens()), (114, 48));
    }

    #[test]
    fn capacity_changes_keep_the_warmest() {
        let tracker = PrefixTracker::new(100, 16);
        serve(&tracker, &text(b"ab"));
        serve(&tracker, &text(b"cd"));
        tracker.set_capacity(3); // keeps c, cd and a
        assert_eq!((tracker.capacity(), tracker.len()), (3, 3));
        assert_eq!(tracker.lookup(&text(b"cd")).cached_tokens, 32);
        assert_eq!(tracker.lookup(&text(b"ab")).cached_tokens, 16);
        tracker.set_capacity(0);
        assert!(tracker.is_empty());
        assert_eq!(serve(&tracker, &text(b"ab")).cached_tokens, 0);
        assert!(tracker.is_empty());
    }

    #[test]
    fn block_hashes_spread_over_odd_lengths() {
        // Block sizes whose byte length is not a multiple of 16 still hash
        // every byte.
        for block_size in [1, 3, 5] {
            let tracker = PrefixTracker::new(0, block_size);
            let len = block_size as usize * CHARS_PER_TOKEN;
            let base = "a".repeat(len);
            let mut last = base.clone();
            last.replace_range(len - 1.., "b");
            let x = tracker.lookup(&Prompt::Text(vec![base]));
            let y = tracker.lookup(&Prompt::Text(vec![last]));
            assert_ne!(x.blocks, y.blocks, "block size {block_size}");
            let ids = |last: u32| {
                let mut ids = vec![7; block_size as usize];
                ids[block_size as usize - 1] = last;
                tracker.lookup(&Prompt::Tokens(vec![ids])).blocks
            };
            assert_ne!(ids(7), ids(8), "block size {block_size}");
        }
    }
}
