//! Prefix tracker cost per request: one lookup and one insert of a
//! 4,000-token prompt, against a table filled to capacity (the steady state
//! of a busy engine), for the text, token-id and chat cuts.
//!
//! `cargo bench -p sluice-proxy --bench prefix`; the target is a median
//! under 5 µs. With `SLUICE_BENCH_TOKENIZER=path/to/tokenizer.json` it also
//! measures `--tokenizer`'s extra cost: encoding the 4,000-token text, and
//! lookup + insert with the tokenizer cutting it (the encode dominates).

mod fixtures;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use fixtures::{CAPACITY, PROMPT_BYTES, filler};
use sluice::classify::{ChatMessage, Prompt};
use sluice::prefix::{BlockUnit, PrefixTracker};
use sluice::tokens::HfTokenizer;
use sluice::tokens::Tokenizer;

/// A tracker whose table is full of other prompts, with `prompt` in it.
fn warm(block_size: u32, prompt: &Prompt) -> PrefixTracker {
    let tracker = PrefixTracker::new(CAPACITY, block_size);
    let mut seed = 1;
    while tracker.len() < CAPACITY {
        let other = Prompt::Text(vec![filler(seed, PROMPT_BYTES)]);
        tracker.insert(&tracker.lookup(&other));
        seed += 1;
    }
    tracker.insert(&tracker.lookup(prompt));
    tracker
}

fn lookup_and_insert(c: &mut Criterion) {
    let text = Prompt::Text(vec![filler(0, PROMPT_BYTES)]);
    let tokens = Prompt::Tokens(vec![(0..4_000u32).map(|i| i * 7919 % 32_000).collect()]);
    let chat = Prompt::Messages(vec![
        ChatMessage {
            role: "system".into(),
            content: filler(0, PROMPT_BYTES / 2),
        },
        ChatMessage {
            role: "user".into(),
            content: filler(1, PROMPT_BYTES / 2 - 20),
        },
    ]);
    let cases = [
        ("text/16", 16, &text),
        ("text/32", 32, &text),
        ("tokens/16", 16, &tokens),
        ("chat/16", 16, &chat),
    ];
    let mut group = c.benchmark_group("prefix 4000 tokens");
    for (name, block_size, prompt) in cases {
        let tracker = warm(block_size, prompt);
        let expected = tracker.lookup(prompt).cached_tokens;
        assert!(
            expected >= 3_900,
            "{name}: the prompt is cached ({expected})"
        );
        group.bench_function(format!("lookup+insert/{name}"), |b| {
            b.iter(|| {
                let prediction = tracker.lookup(black_box(prompt));
                tracker.insert(&prediction);
                prediction.cached_tokens
            })
        });
    }
    // The parts, for the text cuts: lookup alone, insert alone, hashing alone.
    for (name, block_size, prompt) in cases.into_iter().filter(|c| c.0.starts_with("text")) {
        let tracker = warm(block_size, prompt);
        group.bench_function(format!("lookup/{name}"), |b| {
            b.iter(|| tracker.lookup(black_box(prompt)).cached_tokens)
        });
        let prediction = tracker.lookup(prompt);
        group.bench_function(format!("insert/{name}"), |b| {
            b.iter(|| tracker.insert(black_box(&prediction)))
        });
        let empty = PrefixTracker::new(0, block_size);
        group.bench_function(format!("hash/{name}"), |b| {
            b.iter(|| empty.lookup(black_box(prompt)).blocks.len())
        });
    }
    group.finish();
}

/// `--tokenizer`: encoding a ~4,000-token text with the model's tokenizer.
fn with_tokenizer(c: &mut Criterion) {
    let Ok(path) = std::env::var("SLUICE_BENCH_TOKENIZER") else {
        eprintln!("SLUICE_BENCH_TOKENIZER unset: skipping the tokenizer cases");
        return;
    };
    let tokenizer = Arc::new(HfTokenizer::from_file(path.as_ref()).expect("tokenizer.json"));
    // English-like words: BPE merges them, unlike the letter soup above.
    let words = [
        "candidate ",
        "rubric ",
        "score ",
        "the ",
        "engineer ",
        "latency ",
        "design\n",
    ];
    let mut text = String::new();
    let mut i = 0usize;
    while tokenizer.encode(&text).len() < 4_000 {
        for _ in 0..100 {
            text.push_str(words[(i * 7 + i / 3) % words.len()]);
            i += 1;
        }
    }
    let tokens = tokenizer.encode(&text).len();
    let mut group = c.benchmark_group(format!("tokenizer {tokens} tokens"));
    group.bench_function("encode", |b| {
        b.iter(|| tokenizer.encode(black_box(&text)).len())
    });
    let tracker = PrefixTracker::with_unit(CAPACITY, 32, BlockUnit::Tokenizer(tokenizer.clone()));
    let prompt = Prompt::Text(vec![text.clone()]);
    tracker.insert(&tracker.lookup(&prompt));
    group.bench_function("lookup+insert/text/32", |b| {
        b.iter(|| {
            let prediction = tracker.lookup(black_box(&prompt));
            tracker.insert(&prediction);
            prediction.cached_tokens
        })
    });
    group.finish();
}

criterion_group!(benches, lookup_and_insert, with_tokenizer);
criterion_main!(benches);
