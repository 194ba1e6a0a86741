//! The benchmark workload: a synthetic candidate-evaluation set, or a JSONL
//! prompt file.
//!
//! The synthetic set is the reference benchmark's shape: one shared rubric
//! system prompt (about 1,000 tokens) followed by a distinct candidate
//! profile per request (about 200 tokens), generated deterministically.
//! With `--rubrics K` there are K rubrics, as from K functions that each
//! evaluate against a rubric of their own; each request takes one, chosen
//! by a seeded hash of its candidate index (uniform, interleaved), so the
//! engine sees K shared prefixes instead of one.
//!
//! Determinism: request `i` of a run evaluates candidate
//! `candidate_offset + i` (modulo `--candidates` when that is given), and
//! its bytes are a function of that index, `--seed` and the shaping flags
//! alone. The rubrics depend on the seed only, so they are the only
//! prefixes requests share. The offset defaults to the current Unix time in
//! microseconds: a run started later never re-sends an earlier run's
//! candidates (which a warm engine would still have cached, inflating the
//! hit rate) unless it sends more than a million requests per second. The
//! offset is printed and recorded in the report; `--candidate-offset N`
//! with the same seed and flags repeats a run byte for byte.
//! Token counts use the simulator's documented tokenizer (about 1.3 tokens
//! per English word, close to real BPE vocabularies).
//!
//! A `--prompt-file` holds one JSON object per line: an object with
//! `messages` goes to `/v1/chat/completions`, anything else to
//! `/v1/completions`; `model` and `max_tokens` are filled in when absent.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::{Value, json};
use sluice_sim::engine::splitmix64;
use sluice_sim::tokenizer::Tokenizer;

use crate::client::Request;

/// Which OpenAI route the synthetic workload uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Api {
    /// `/v1/completions` with the rubric and profile in one prompt.
    Completions,
    /// `/v1/chat/completions`: the rubric as the system message.
    Chat,
}

/// Workload options shared by `bench run` and `bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkloadArgs {
    /// Seed of the synthetic candidate set.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Distinct candidate profiles (request `i` evaluates candidate
    /// `i % candidates`); by default every request a new candidate, so only
    /// the rubric is shared.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub(crate) candidates: usize,
    /// Output tokens per request (`max_tokens`).
    #[arg(long, default_value_t = 8)]
    pub(crate) max_tokens: u32,
    /// Approximate tokens of the shared rubric.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rubric_tokens: usize,
    /// Approximate tokens of each candidate profile (default 200; 75 with
    /// `bench compare --replicas`).
    #[arg(long)]
    pub(crate) profile_tokens: Option<usize>,
    /// Distinct rubrics (system prompts), each request taking one by a
    /// seeded hash of its candidate (default 1; 16 with `bench compare
    /// --replicas`).
    #[arg(long)]
    pub(crate) rubrics: Option<usize>,
    /// Completions or chat.
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub(crate) api: Api,
    /// Stream the answers (SSE, with `stream_options.include_usage`): the
    /// client then measures time to first token.
    #[arg(long)]
    pub(crate) stream: bool,
    /// Candidate index of the run's first request (default: the Unix time
    /// in microseconds, so repeated runs send new candidates; printed and
    /// recorded so a run can be repeated).
    #[arg(long)]
    pub(crate) candidate_offset: Option<u64>,
    /// JSONL file of request bodies instead of the synthetic set.
    #[arg(long)]
    pub(crate) prompt_file: Option<std::path::PathBuf>,
}

/// The requests of a run, by index.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    source: Source,
    /// A short description for reports.
    pub(crate) description: String,
    /// The candidate index of request 0 (synthetic set).
    pub(crate) candidate_offset: Option<u64>,
    /// Whether the bodies ask for a stream.
    pub(crate) stream: bool,
}

#[derive(Debug, Clone)]
enum Source {
    /// Request `i` evaluates candidate `i % candidates`, built on demand.
    Synthetic {
        /// The shared prefixes; request `i` takes [`rubric_index`]'s.
        rubrics: Arc<[Arc<str>]>,
        seed: u64,
        /// `None`: a new candidate per request.
        candidates: Option<u64>,
        candidate_offset: u64,
        profile_tokens: usize,
        max_tokens: u32,
        api: Api,
        model: Option<String>,
        stream: bool,
    },
    /// Bodies from a file, cycled.
    File(Vec<Request>),
}

impl Workload {
    /// The request for index `i`.
    pub(crate) fn item(&self, i: usize) -> Request {
        match &self.source {
            Source::File(items) => items[i % items.len()].clone(),
            Source::Synthetic {
                rubrics,
                seed,
                candidates,
                candidate_offset,
                profile_tokens,
                max_tokens,
                api,
                model,
                stream,
            } => {
                let n = candidate_offset.wrapping_add(i as u64);
                let candidate = candidates.map_or(n, |c| n % c) as usize;
                let rubric = &rubrics[rubric_index(*seed, candidate, rubrics.len())];
                let profile = profile(*seed, candidate, *profile_tokens);
                let mut body = match api {
                    Api::Completions => json!({
                        "prompt": format!("{rubric}\n\n### Candidate\n{profile}\n\n### Evaluation\n"),
                    }),
                    Api::Chat => json!({
                        "messages": [
                            {"role": "system", "content": &**rubric},
                            {"role": "user", "content": profile},
                        ],
                    }),
                };
                fill(&mut body, model.as_deref(), *max_tokens, *stream);
                Request::post(path_for(&body), body.to_string())
            }
        }
    }
}

const WORDS: &[&str] = &[
    "candidate",
    "experience",
    "leadership",
    "evidence",
    "score",
    "rubric",
    "criteria",
    "communication",
    "ownership",
    "impact",
    "design",
    "systems",
    "team",
    "project",
    "delivery",
    "quality",
    "review",
    "judgment",
    "clarity",
    "growth",
    "mentoring",
    "tradeoffs",
    "customers",
    "reliability",
    "metrics",
    "strong",
    "weak",
    "mixed",
    "signal",
    "the",
    "and",
    "with",
    "for",
    "of",
    "a",
    "in",
    "on",
    "shows",
    "needs",
    "exceeds",
];
const NAMES: &[&str] = &[
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie",
];
const SKILLS: &[&str] = &[
    "Rust",
    "Python",
    "Go",
    "Kubernetes",
    "PostgreSQL",
    "CUDA",
    "React",
    "Kafka",
    "Terraform",
    "TypeScript",
];

/// Deterministic text of about `tokens` tokens, from `seed`.
fn prose(seed: u64, tokens: usize, lead: &str) -> String {
    let mut text = String::from(lead);
    let mut state = seed;
    let mut n = Tokenizer::pieces(&text).len();
    let mut sentence = 0usize;
    while n < tokens {
        state = splitmix64(state);
        let len = 6 + (state % 10) as usize;
        let mut s = format!("\n{}. ", sentence + 1);
        for w in 0..len {
            state = splitmix64(state);
            if w > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
        }
        s.push('.');
        n += Tokenizer::pieces(&s).len();
        text.push_str(&s);
        sentence += 1;
    }
    text
}

/// The shared rubric system prompt.
pub(crate) fn rubric(seed: u64, tokens: usize) -> String {
    prose(
        seed,
        tokens,
        "You are a hiring committee assistant. Evaluate the candidate against this rubric and answer with a score from 1 to 5 and one sentence of justification.",
    )
}

/// Rubric `k` of a set of several: its first words already name it, so no
/// two share even their first KV block.
pub(crate) fn rubric_of_set(seed: u64, k: usize, tokens: usize) -> String {
    prose(
        splitmix64(seed ^ splitmix64(k as u64 + 0x5eed)),
        tokens,
        &format!(
            "Function evaluate-candidate-{k}: you are hiring committee {k}'s assistant. Evaluate the candidate against committee {k}'s rubric and answer with a score from 1 to 5 and one sentence of justification."
        ),
    )
}

/// The rubric of `candidate` among `rubrics`: a seeded hash, so requests
/// interleave the rubrics uniformly and a run is repeatable.
pub(crate) fn rubric_index(seed: u64, candidate: usize, rubrics: usize) -> usize {
    if rubrics <= 1 {
        return 0;
    }
    (splitmix64(seed.rotate_left(17) ^ splitmix64(candidate as u64)) % rubrics as u64) as usize
}

/// The profile of candidate `i`.
pub(crate) fn profile(seed: u64, i: usize, tokens: usize) -> String {
    let h = splitmix64(seed ^ splitmix64(i as u64 + 1));
    let lead = format!(
        "Candidate #{i}: {} ({} years, {} and {}).",
        NAMES[(h % NAMES.len() as u64) as usize],
        1 + h % 20,
        SKILLS[((h >> 8) % SKILLS.len() as u64) as usize],
        SKILLS[((h >> 16) % SKILLS.len() as u64) as usize],
    );
    prose(h, tokens, &lead)
}

impl WorkloadArgs {
    /// Builds the workload; `model` is put in each body when known.
    pub(crate) fn build(&self, model: Option<&str>) -> anyhow::Result<Workload> {
        if let Some(path) = &self.prompt_file {
            return from_file(path, model, self.max_tokens, self.stream);
        }
        let candidates =
            (self.candidates < NEW_EVERY_TIME).then_some(self.candidates.max(1) as u64);
        let candidate_offset = self.candidate_offset.unwrap_or_else(clock_offset);
        let profile_tokens = self.profile_tokens.unwrap_or(DEFAULT_PROFILE_TOKENS);
        let rubrics = self.rubrics.unwrap_or(1);
        anyhow::ensure!(rubrics >= 1, "--rubrics must be at least 1");
        let source = Source::Synthetic {
            rubrics: self.rubric_texts(),
            seed: self.seed,
            candidates,
            candidate_offset,
            profile_tokens,
            max_tokens: self.max_tokens,
            api: self.api,
            model: model.map(str::to_string),
            stream: self.stream,
        };
        Ok(Workload {
            source,
            description: format!(
                "synthetic candidate evaluation (seed {}, {}, candidate offset {candidate_offset}, {}rubric ~{} tokens, profile ~{} tokens, max_tokens {}, {:?}{})",
                self.seed,
                match candidates {
                    None => "a new candidate per request".to_string(),
                    Some(c) => format!("{c} distinct candidates"),
                },
                if rubrics > 1 {
                    format!("{rubrics} rubrics interleaved, each ")
                } else {
                    String::new()
                },
                self.rubric_tokens,
                profile_tokens,
                self.max_tokens,
                self.api,
                if self.stream { ", streamed" } else { "" },
            )
            .to_lowercase(),
            candidate_offset: Some(candidate_offset),
            stream: self.stream,
        })
    }

    /// The rubrics of the synthetic set: the one shared rubric, or
    /// `--rubrics K` distinct ones.
    pub(crate) fn rubric_texts(&self) -> Arc<[Arc<str>]> {
        match self.rubrics.unwrap_or(1) {
            0 | 1 => [rubric(self.seed, self.rubric_tokens).into()].into(),
            k => (0..k)
                .map(|i| rubric_of_set(self.seed, i, self.rubric_tokens).into())
                .collect(),
        }
    }
}

/// `--profile-tokens` when not given.
pub(crate) const DEFAULT_PROFILE_TOKENS: usize = 200;

/// `--candidates` at or above this (its default) means a new candidate per request.
const NEW_EVERY_TIME: usize = 1_000_000_000;

/// The default candidate offset: the Unix time in microseconds.
fn clock_offset() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn fill(body: &mut Value, model: Option<&str>, max_tokens: u32, stream: bool) {
    if let Some(obj) = body.as_object_mut() {
        if let Some(m) = model {
            obj.entry("model").or_insert_with(|| m.into());
        }
        obj.entry("max_tokens").or_insert_with(|| max_tokens.into());
        obj.entry("temperature").or_insert_with(|| 0.into());
        if stream {
            obj.entry("stream").or_insert_with(|| true.into());
            obj.entry("stream_options")
                .or_insert_with(|| json!({"include_usage": true}));
        }
    }
}

fn path_for(body: &Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

fn from_file(
    path: &Path,
    model: Option<&str>,
    max_tokens: u32,
    stream: bool,
) -> anyhow::Result<Workload> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut body: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        anyhow::ensure!(
            body.is_object(),
            "{}:{}: not a JSON object",
            path.display(),
            n + 1
        );
        fill(&mut body, model, max_tokens, stream);
        items.push(Request::post(path_for(&body), body.to_string()));
    }
    anyhow::ensure!(!items.is_empty(), "{}: no requests", path.display());
    Ok(Workload {
        description: format!("prompt file {} ({} requests)", path.display(), items.len()),
        source: Source::File(items),
        candidate_offset: None,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_set_is_deterministic_and_sized() {
        let r = rubric(7, 1000);
        assert_eq!(r, rubric(7, 1000));
        let n = Tokenizer::pieces(&r).len();
        assert!((1000..1100).contains(&n), "rubric tokens {n}");
        let p0 = profile(7, 0, 200);
        let p1 = profile(7, 1, 200);
        assert_ne!(p0, p1);
        let n = Tokenizer::pieces(&p0).len();
        assert!((200..260).contains(&n), "profile tokens {n}");
    }

    #[test]
    fn bodies_share_the_rubric_prefix() {
        let args = WorkloadArgs {
            seed: 1,
            candidates: 3,
            max_tokens: 4,
            rubric_tokens: 100,
            profile_tokens: Some(20),
            rubrics: None,
            api: Api::Completions,
            stream: false,
            candidate_offset: Some(0),
            prompt_file: None,
        };
        let w = args.build(Some("m")).unwrap();
        let a: Value = serde_json::from_slice(&w.item(0).body).unwrap();
        let b: Value = serde_json::from_slice(&w.item(4).body).unwrap();
        let c: Value = serde_json::from_slice(&w.item(1).body).unwrap();
        assert_eq!(b, c, "request 4 is candidate 1 again");
        let rubric = rubric(1, 100);
        assert!(a["prompt"].as_str().unwrap().starts_with(&rubric));
        assert!(b["prompt"].as_str().unwrap().starts_with(&rubric));
        assert_ne!(a["prompt"], b["prompt"]);
        assert_eq!(a["model"], "m");
        assert_eq!(a["max_tokens"], 4);
        assert_eq!(w.item(0).path, "/v1/completions");
        assert_eq!(a.get("stream"), None);
    }

    fn args(candidate_offset: Option<u64>) -> WorkloadArgs {
        WorkloadArgs {
            seed: 1,
            candidates: NEW_EVERY_TIME,
            max_tokens: 4,
            rubric_tokens: 50,
            profile_tokens: Some(20),
            rubrics: None,
            api: Api::Chat,
            stream: true,
            candidate_offset,
            prompt_file: None,
        }
    }

    #[test]
    fn the_candidate_offset_shifts_candidates_and_repeats_runs() {
        let w = args(Some(1000)).build(None).unwrap();
        assert_eq!(w.candidate_offset, Some(1000));
        assert!(
            w.description.contains("candidate offset 1000"),
            "{}",
            w.description
        );
        // Byte for byte: same offset, same requests.
        let again = args(Some(1000)).build(None).unwrap();
        assert_eq!(w.item(5).body, again.item(5).body);
        // Request 5 of a run at offset 995 is request 10 of this one.
        let earlier = args(Some(995)).build(None).unwrap();
        assert_eq!(earlier.item(10).body, w.item(5).body);
        assert_ne!(earlier.item(5).body, w.item(5).body);
        // By default the offset comes from the clock and is recorded.
        let by_clock = args(None).build(None).unwrap();
        assert!(by_clock.candidate_offset.unwrap() > 1_700_000_000_000_000);
    }

    #[test]
    fn streamed_chat_bodies_ask_for_usage() {
        let w = args(Some(0)).build(Some("m")).unwrap();
        let item = w.item(0);
        assert_eq!(item.path, "/v1/chat/completions");
        let body: Value = serde_json::from_slice(&item.body).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][0]["role"], "system");
    }
}
