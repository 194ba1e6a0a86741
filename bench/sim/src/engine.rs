//! The scheduler: a pure state machine with vLLM V1's semantics, driven by
//! explicit time so it tests without a clock.
//!
//! One engine step is [`Engine::schedule`] (pick the batch, allocate KV
//! blocks) followed, after the step's simulated duration, by
//! [`Engine::complete`] (advance computed tokens, cache full blocks, sample
//! tokens, finish sequences). Between the two, [`Engine::abort`] may remove
//! sequences; `complete` skips them.
//!
//! Scheduling, as in vLLM V1's `Scheduler.schedule`:
//! 1. Running sequences first, in order. Each gets `min(tokens not yet
//!    computed, budget left)` tokens: 1 when decoding, a prefill chunk
//!    otherwise (chunked prefill). When its blocks can't be allocated, the
//!    *last* running sequence is preempted (blocks freed, recomputed later,
//!    back to the front of the waiting queue) until they can, or until the
//!    sequence preempts itself.
//! 2. Then, if nothing was preempted, waiting sequences in FIFO order while
//!    budget and `max_num_seqs` allow: the longest cached prefix is reused
//!    (capped so at least one token is computed), and the rest is scheduled
//!    as far as the budget goes.
//!
//! The step that computes a sequence's last known token samples its next
//! token. Output tokens are a deterministic function of the sequence's seed
//! and position.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::kv::{BlockId, BlockPool, chain_hashes};
use crate::metrics::{FinishReason, Gauges, Stats};

/// Identifies a sequence (one request) in the engine.
pub type SeqId = u64;

/// The engine's shape: batch limits and KV pool size.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens (prefill + decode) computed in one step.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: u32,
    /// Longest sequence (prompt + output).
    pub max_model_len: usize,
    /// Reuse cached prefix blocks.
    pub enable_prefix_caching: bool,
    /// Output token ids are drawn from `0..vocab_size`.
    pub vocab_size: u32,
}

/// A request entering the engine.
#[derive(Debug, Clone)]
pub struct NewSeq {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Output tokens to produce (at least 1).
    pub max_tokens: usize,
    /// Seeds the output tokens.
    pub seed: u64,
}

/// One scheduled step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// `(sequence, tokens computed for it this step)`, in schedule order.
    pub scheduled: Vec<(SeqId, usize)>,
    /// Tokens of prompts (or of recomputation after preemption).
    pub prefill_tokens: usize,
    /// Sequences computing one decode token.
    pub decode_seqs: usize,
    /// Sum over scheduled sequences of their context length after the step.
    pub context_tokens: usize,
}

/// What a completed step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The sequence.
    pub id: SeqId,
    /// The sampled token.
    pub token: u32,
    /// Its position in the output (0 = first token).
    pub index: usize,
    /// Prompt tokens served from the prefix cache at first scheduling.
    pub cached_tokens: usize,
    /// Set on the sequence's last token.
    pub finished: Option<FinishReason>,
}

#[derive(Debug)]
struct Seq {
    /// Prompt then output tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    seed: u64,
    /// Tokens whose KV is computed.
    num_computed: usize,
    blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks of `tokens`, extended lazily.
    hashes: Vec<u64>,
    /// Blocks (from the start) registered in the prefix cache.
    num_cached_blocks: usize,
    /// Set at first scheduling.
    cached_tokens: Option<usize>,
    arrived: Duration,
    first_scheduled: Option<Duration>,
    last_token_at: Option<Duration>,
}

impl Seq {
    fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The scheduler and KV manager.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    kv: BlockPool,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    next_id: SeqId,
    stats: Stats,
}

impl Engine {
    /// An idle engine with an empty KV pool.
    pub fn new(cfg: EngineConfig) -> Self {
        let kv = BlockPool::new(cfg.num_blocks, cfg.block_size);
        Self {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            stats: Stats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queues a request arriving at `now`.
    pub fn add(&mut self, req: NewSeq, now: Duration) -> SeqId {
        let id = self.reserve_id();
        self.insert(id, req, now);
        id
    }

    /// A fresh id for a request that will [`Engine::insert`] later (one
    /// still on its way through the API server).
    pub fn reserve_id(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues a request arriving at `now` under an id from
    /// [`Engine::reserve_id`].
    pub fn insert(&mut self, id: SeqId, req: NewSeq, now: Duration) {
        let prompt_len = req.prompt.len();
        self.stats.prompt_tokens += prompt_len as u64;
        self.seqs.insert(
            id,
            Seq {
                tokens: req.prompt,
                prompt_len,
                max_tokens: req.max_tokens.max(1),
                seed: req.seed,
                num_computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                num_cached_blocks: 0,
                cached_tokens: None,
                arrived: now,
                first_scheduled: None,
                last_token_at: None,
            },
        );
        self.waiting.push_back(id);
    }

    /// Removes a sequence (client gone), freeing its blocks. Unknown ids
    /// (already finished) are ignored.
    pub fn abort(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.kv.free(&seq.blocks);
        self.stats.finished_abort += 1;
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Counters and histograms so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The KV pool (for inspection).
    pub fn kv(&self) -> &BlockPool {
        &self.kv
    }

    /// Current gauges.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.kv.usage(),
            block_size: self.cfg.block_size,
            num_blocks: self.cfg.num_blocks,
        }
    }

    /// Ids of running sequences, in batch order.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Ids of waiting sequences, in queue order.
    pub fn waiting(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Picks the next step's batch at `now`; `None` when idle.
    pub fn schedule(&mut self, now: Duration) -> Option<Batch> {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled: Vec<(SeqId, usize)> = Vec::new();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let n = (seq.tokens.len() - seq.num_computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let need = self.blocks_needed(id, n);
            let new = loop {
                if let Some(blocks) = self.kv.allocate(need) {
                    break Some(blocks);
                }
                let victim = self.running.pop().expect("running holds at least `id`");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    break None;
                }
            };
            let Some(new) = new else {
                break;
            };
            self.seqs
                .get_mut(&id)
                .expect("running ids are live")
                .blocks
                .extend(new);
            scheduled.push((id, n));
            budget -= n;
            i += 1;
        }

        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let bs = self.cfg.block_size;
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            let total = seq.tokens.len();
            let mut hit: Vec<BlockId> = Vec::new();
            if self.cfg.enable_prefix_caching {
                let full = total / bs;
                ensure_hashes(seq, full, bs);
                let max_blocks = (total - 1) / bs;
                hit = self.kv.longest_hit(&seq.hashes[..max_blocks.min(full)]);
            }
            let computed = hit.len() * bs;
            let n = (total - computed).min(budget);
            let need = (computed + n).div_ceil(bs) - hit.len();
            let hit_free = hit.iter().filter(|&&b| self.kv.is_free(b)).count();
            if need + hit_free > self.kv.num_free() as usize {
                break;
            }
            self.kv.touch(&hit);
            let new = self.kv.allocate(need).expect("checked free blocks above");
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            seq.blocks = hit;
            seq.blocks.extend(new);
            seq.num_computed = computed;
            seq.num_cached_blocks = computed / bs;
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(computed);
                seq.first_scheduled = Some(now);
                self.stats
                    .queue
                    .observe(now.saturating_sub(seq.arrived).as_secs_f64());
            }
            if self.cfg.enable_prefix_caching {
                self.stats.prefix_queries += total as u64;
                self.stats.prefix_hits += computed as u64;
            }
            self.waiting.pop_front();
            self.running.push(id);
            scheduled.push((id, n));
            budget -= n;
        }

        if scheduled.is_empty() {
            return None;
        }
        let mut batch = Batch {
            scheduled,
            ..Batch::default()
        };
        for &(id, n) in &batch.scheduled {
            let seq = &self.seqs[&id];
            let decoding = n == 1 && seq.num_computed >= seq.prompt_len;
            if decoding {
                batch.decode_seqs += 1;
            } else {
                batch.prefill_tokens += n;
            }
            batch.context_tokens += seq.num_computed + n;
        }
        self.stats.steps += 1;
        Some(batch)
    }

    /// Applies a scheduled step that finished at `now`, returning the tokens
    /// it sampled.
    pub fn complete(&mut self, batch: &Batch, now: Duration) -> Vec<TokenEvent> {
        let bs = self.cfg.block_size;
        let mut events = Vec::new();
        for &(id, n) in &batch.scheduled {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue; // aborted during the step
            };
            seq.num_computed += n;
            if self.cfg.enable_prefix_caching {
                let full = seq.num_computed / bs;
                ensure_hashes(seq, full, bs);
                for b in seq.num_cached_blocks..full {
                    self.kv.cache(seq.blocks[b], seq.hashes[b]);
                }
                seq.num_cached_blocks = seq.num_cached_blocks.max(full);
            }
            if seq.num_computed < seq.tokens.len() {
                continue; // a prefill chunk that didn't reach the end
            }
            let index = seq.output_len();
            let token = sample(seq.seed, index, self.cfg.vocab_size);
            seq.tokens.push(token);
            self.stats.generation_tokens += 1;
            match seq.last_token_at {
                None => {
                    self.stats
                        .ttft
                        .observe(now.saturating_sub(seq.arrived).as_secs_f64());
                    let first = seq.first_scheduled.unwrap_or(seq.arrived);
                    self.stats
                        .prefill
                        .observe(now.saturating_sub(first).as_secs_f64());
                }
                Some(prev) => self.stats.itl.observe((now - prev).as_secs_f64()),
            }
            seq.last_token_at = Some(now);
            let done =
                seq.output_len() >= seq.max_tokens || seq.tokens.len() >= self.cfg.max_model_len;
            events.push(TokenEvent {
                id,
                token,
                index,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
                finished: done.then_some(FinishReason::Length),
            });
            if done {
                self.stats.finished_length += 1;
                self.stats
                    .e2e
                    .observe(now.saturating_sub(seq.arrived).as_secs_f64());
                let seq = self.seqs.remove(&id).expect("present above");
                self.running.retain(|&r| r != id);
                self.kv.free(&seq.blocks);
            }
        }
        events
    }

    fn blocks_needed(&self, id: SeqId, n: usize) -> usize {
        let seq = &self.seqs[&id];
        (seq.num_computed + n)
            .div_ceil(self.cfg.block_size)
            .saturating_sub(seq.blocks.len())
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running ids are live");
        self.kv.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_cached_blocks = 0;
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }
}

/// Extends `seq.hashes` to cover its first `full` blocks.
fn ensure_hashes(seq: &mut Seq, full: usize, bs: usize) {
    let start = seq.hashes.len();
    if start >= full {
        return;
    }
    let parent = seq.hashes.last().copied().unwrap_or(0);
    let more = chain_hashes(parent, &seq.tokens[start * bs..full * bs], bs);
    seq.hashes.extend(more);
}

/// The output token at `index` of a sequence seeded with `seed`.
pub fn sample(seed: u64, index: usize, vocab: u32) -> u32 {
    (splitmix64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        % u64::from(vocab.max(1))) as u32
}

/// SplitMix64: a small, well-mixed, deterministic generator step.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_num_seqs: usize, budget: usize, num_blocks: u32) -> EngineConfig {
        EngineConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            block_size: 16,
            num_blocks,
            max_model_len: 4096,
            enable_prefix_caching: true,
            vocab_size: 1000,
        }
    }

    fn req(prompt: Vec<u32>, max_tokens: usize) -> NewSeq {
        NewSeq {
            prompt,
            max_tokens,
            seed: 7,
        }
    }

    fn prompt(tag: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| tag * 10_000 + i).collect()
    }

    const T: Duration = Duration::ZERO;

    /// Runs steps until idle; returns every event with its step number.
    fn drain(e: &mut Engine) -> Vec<(usize, TokenEvent)> {
        let mut out = Vec::new();
        let mut step = 0;
        while let Some(b) = e.schedule(T) {
            for ev in e.complete(&b, T) {
                out.push((step, ev));
            }
            step += 1;
            assert!(step < 10_000, "engine did not finish");
        }
        out
    }

    #[test]
    fn batches_hold_at_most_max_num_seqs_and_admit_fifo() {
        let mut e = Engine::new(cfg(2, 1000, 100));
        let ids: Vec<_> = (0..3).map(|i| e.add(req(prompt(i, 8), 3), T)).collect();
        let b = e.schedule(T).unwrap();
        assert_eq!(b.scheduled, vec![(ids[0], 8), (ids[1], 8)]);
        assert_eq!(b.prefill_tokens, 16);
        assert_eq!(e.waiting().collect::<Vec<_>>(), vec![ids[2]]);
        let ev = e.complete(&b, T);
        assert_eq!(ev.len(), 2, "prefill completion samples the first token");
        // Decode step: two sequences, one token each; the third still waits.
        let b = e.schedule(T).unwrap();
        assert_eq!(b.scheduled, vec![(ids[0], 1), (ids[1], 1)]);
        assert_eq!(b.decode_seqs, 2);
        e.complete(&b, T);
        let b = e.schedule(T).unwrap();
        e.complete(&b, T); // third tokens: both finish
        assert_eq!(e.running(), &[] as &[SeqId]);
        let b = e.schedule(T).unwrap();
        assert_eq!(b.scheduled, vec![(ids[2], 8)]);
    }

    #[test]
    fn token_budget_chunks_prefill_and_decodes_go_first() {
        let mut e = Engine::new(cfg(8, 32, 100));
        let a = e.add(req(prompt(1, 10), 5), T);
        let b0 = e.schedule(T).unwrap();
        e.complete(&b0, T);
        let b = e.add(req(prompt(2, 100), 2), T);
        // `a` decodes (1 token), `b` gets the other 31 of the budget.
        let s = e.schedule(T).unwrap();
        assert_eq!(s.scheduled, vec![(a, 1), (b, 31)]);
        assert_eq!((s.decode_seqs, s.prefill_tokens), (1, 31));
        assert!(e.complete(&s, T).iter().all(|ev| ev.id == a));
        let s = e.schedule(T).unwrap();
        assert_eq!(s.scheduled, vec![(a, 1), (b, 31)]);
        e.complete(&s, T);
        let s = e.schedule(T).unwrap();
        assert_eq!(s.scheduled, vec![(a, 1), (b, 31)]);
        e.complete(&s, T);
        // 93 of 100 computed: the last chunk is 7 and samples b's first token.
        let s = e.schedule(T).unwrap();
        assert_eq!(s.scheduled, vec![(a, 1), (b, 7)]);
        let ev = e.complete(&s, T);
        assert!(ev.iter().any(|ev| ev.id == b && ev.index == 0));
        assert!(
            ev.iter()
                .any(|ev| ev.id == a && ev.finished == Some(FinishReason::Length))
        );
    }

    #[test]
    fn a_repeated_prompt_hits_its_full_blocks_but_computes_one_token() {
        let mut e = Engine::new(cfg(8, 4096, 100));
        e.add(req(prompt(1, 70), 1), T);
        let first = drain(&mut e);
        assert_eq!(first[0].1.cached_tokens, 0);
        // 70 tokens: 4 full blocks (64) cached.
        e.add(req(prompt(1, 70), 1), T);
        let b = e.schedule(T).unwrap();
        assert_eq!(b.prefill_tokens, 6);
        assert_eq!(e.complete(&b, T)[0].cached_tokens, 64);
        // Exactly 64 tokens: the last block is recomputed so one token is.
        e.add(req(prompt(1, 64), 1), T);
        let b = e.schedule(T).unwrap();
        assert_eq!(b.prefill_tokens, 16);
        assert_eq!(e.complete(&b, T)[0].cached_tokens, 48);
        // A different first token shares nothing (hashes are chained).
        let mut p = prompt(1, 70);
        p[0] = 1;
        e.add(req(p, 1), T);
        let b = e.schedule(T).unwrap();
        assert_eq!(b.prefill_tokens, 70);
        let s = e.stats();
        assert_eq!(s.prefix_queries, 70 + 70 + 64 + 70);
        assert_eq!(s.prefix_hits, 64 + 48);
    }

    #[test]
    fn eviction_takes_least_recently_freed_blocks_tail_first() {
        // 6 blocks of 16. A (4 blocks) finishes and stays cached.
        let mut e = Engine::new(cfg(8, 4096, 6));
        e.add(req(prompt(1, 63), 1), T);
        drain(&mut e);
        assert_eq!(e.kv().num_free(), 6);
        // A cached 3 full blocks (48 of its 63 computed tokens); its 4th
        // block is partial and uncached. B needs 4 blocks: the 2 never used,
        // then A's blocks tail first: the partial one, then cached block 2.
        e.add(req(prompt(2, 63), 1), T);
        drain(&mut e);
        assert_eq!(e.kv().evictions(), 1);
        // A's first two blocks survived: a rerun of A hits 32 tokens.
        e.add(req(prompt(1, 63), 1), T);
        let ev = drain(&mut e);
        assert_eq!(ev[0].1.cached_tokens, 32);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_which_recomputes_later() {
        // 4 blocks of 16; two sequences of 16-token prompts growing to 40.
        let mut e = Engine::new(cfg(8, 4096, 4));
        let a = e.add(req(prompt(1, 16), 24), T);
        let b = e.add(req(prompt(2, 16), 24), T);
        let events = drain(&mut e);
        assert!(e.stats().preemptions >= 1);
        for id in [a, b] {
            let mine: Vec<_> = events.iter().filter(|(_, ev)| ev.id == id).collect();
            assert_eq!(mine.len(), 24, "every token arrives exactly once");
            assert!(mine.iter().enumerate().all(|(i, (_, ev))| ev.index == i));
            assert_eq!(mine.last().unwrap().1.finished, Some(FinishReason::Length));
        }
        // `a` (older) was never the victim: it finishes first.
        let done = |id| {
            events
                .iter()
                .find(|(_, ev)| ev.id == id && ev.finished.is_some())
                .unwrap()
                .0
        };
        assert!(done(a) < done(b));
        assert_eq!(e.kv().num_free(), 4);
    }

    #[test]
    fn abort_frees_blocks_and_skips_the_in_flight_step() {
        let mut e = Engine::new(cfg(8, 4096, 10));
        let a = e.add(req(prompt(1, 40), 5), T);
        let b = e.schedule(T).unwrap();
        assert_eq!(e.kv().num_free(), 7);
        e.abort(a);
        assert!(e.complete(&b, T).is_empty());
        assert_eq!(e.kv().num_free(), 10);
        assert!(!e.has_work());
        assert_eq!(e.stats().finished_abort, 1);
    }

    #[test]
    fn a_reserved_id_waits_outside_the_engine_until_inserted() {
        let mut e = Engine::new(cfg(8, 4096, 10));
        let late = e.reserve_id();
        let early = e.add(req(prompt(1, 8), 1), T);
        assert!(early > late, "ids are unique whichever enters first");
        assert_eq!(e.waiting().collect::<Vec<_>>(), vec![early]);
        e.abort(late); // not in the engine yet: nothing to count
        assert_eq!(e.stats().finished_abort, 0);
        e.insert(late, req(prompt(2, 8), 1), T);
        let b = e.schedule(T).unwrap();
        assert_eq!(b.scheduled, vec![(early, 8), (late, 8)], "FIFO by entry");
    }

    #[test]
    fn outputs_are_a_function_of_seed_and_position() {
        let run = |seed| {
            let mut e = Engine::new(cfg(8, 4096, 10));
            e.add(
                NewSeq {
                    prompt: prompt(1, 5),
                    max_tokens: 6,
                    seed,
                },
                T,
            );
            drain(&mut e)
                .into_iter()
                .map(|(_, ev)| ev.token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn timing_histograms_use_the_times_given() {
        let mut e = Engine::new(cfg(8, 4096, 10));
        e.add(req(prompt(1, 5), 2), Duration::from_millis(0));
        let b = e.schedule(Duration::from_millis(100)).unwrap();
        e.complete(&b, Duration::from_millis(150));
        let b = e.schedule(Duration::from_millis(150)).unwrap();
        e.complete(&b, Duration::from_millis(170));
        let s = e.stats();
        // Arrived at 0, first scheduled at 100 ms, first token at 150 ms,
        // second (and last) token at 170 ms.
        for (name, h, seconds) in [
            ("queue", &s.queue, 0.100),
            ("prefill", &s.prefill, 0.050),
            ("ttft", &s.ttft, 0.150),
            ("itl", &s.itl, 0.020),
            ("e2e", &s.e2e, 0.170),
        ] {
            assert_eq!(h.count(), 1, "{name}");
            assert!(
                (h.sum() - seconds).abs() < 1e-9,
                "{name}: observed {}s, expected {seconds}s",
                h.sum()
            );
        }
    }
}
