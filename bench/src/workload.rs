//! The benchmark workload: a synthetic candidate-evaluation set, or a JSONL
//! prompt file.
//!
//! The synthetic set is the reference benchmark's shape: one shared rubric
//! system prompt (about 1,000 tokens) followed by a distinct candidate
//! profile per request (about 200 tokens), generated deterministically from
//! a seed, so every configuration of a comparison sends the same bytes.
//! Token counts use the simulator's documented tokenizer (about 1.3 tokens
//! per English word, close to real BPE vocabularies).
//!
//! A `--prompt-file` holds one JSON object per line: an object with
//! `messages` goes to `/v1/chat/completions`, anything else to
//! `/v1/completions`; `model` and `max_tokens` are filled in when absent.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_bench::sim::engine::splitmix64;
use sluice_bench::sim::tokenizer::Tokenizer;

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
    /// Approximate tokens of each candidate profile.
    #[arg(long, default_value_t = 200)]
    pub(crate) profile_tokens: usize,
    /// Completions or chat.
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub(crate) api: Api,
    /// JSONL file of request bodies instead of the synthetic set.
    #[arg(long)]
    pub(crate) prompt_file: Option<std::path::PathBuf>,
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// Route path.
    pub(crate) path: &'static str,
    /// JSON body.
    pub(crate) body: Bytes,
}

/// The requests of a run, by index.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    source: Source,
    /// A short description for reports.
    pub(crate) description: String,
}

#[derive(Debug, Clone)]
enum Source {
    /// Request `i` evaluates candidate `i % candidates`, built on demand.
    Synthetic {
        rubric: Arc<str>,
        seed: u64,
        candidates: usize,
        profile_tokens: usize,
        max_tokens: u32,
        api: Api,
        model: Option<String>,
    },
    /// Bodies from a file, cycled.
    File(Vec<Item>),
}

impl Workload {
    /// The request for index `i`.
    pub(crate) fn item(&self, i: usize) -> Item {
        match &self.source {
            Source::File(items) => items[i % items.len()].clone(),
            Source::Synthetic {
                rubric,
                seed,
                candidates,
                profile_tokens,
                max_tokens,
                api,
                model,
            } => {
                let profile = profile(*seed, i % candidates, *profile_tokens);
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
                fill(&mut body, model.as_deref(), *max_tokens);
                Item {
                    path: path_for(&body),
                    body: Bytes::from(body.to_string()),
                }
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
            return from_file(path, model, self.max_tokens);
        }
        let candidates = self.candidates.max(1);
        let source = Source::Synthetic {
            rubric: rubric(self.seed, self.rubric_tokens).into(),
            seed: self.seed,
            candidates,
            profile_tokens: self.profile_tokens,
            max_tokens: self.max_tokens,
            api: self.api,
            model: model.map(str::to_string),
        };
        Ok(Workload {
            source,
            description: format!(
                "synthetic candidate evaluation (seed {}, {}, rubric ~{} tokens, profile ~{} tokens, max_tokens {}, {:?})",
                self.seed,
                if candidates >= 1_000_000_000 {
                    "a new candidate per request".to_string()
                } else {
                    format!("{candidates} distinct candidates")
                },
                self.rubric_tokens,
                self.profile_tokens,
                self.max_tokens,
                self.api
            )
            .to_lowercase(),
        })
    }
}

fn fill(body: &mut Value, model: Option<&str>, max_tokens: u32) {
    if let Some(obj) = body.as_object_mut() {
        if let Some(m) = model {
            obj.entry("model").or_insert_with(|| m.into());
        }
        obj.entry("max_tokens").or_insert_with(|| max_tokens.into());
        obj.entry("temperature").or_insert_with(|| 0.into());
    }
}

fn path_for(body: &Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

fn from_file(path: &Path, model: Option<&str>, max_tokens: u32) -> anyhow::Result<Workload> {
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
        fill(&mut body, model, max_tokens);
        items.push(Item {
            path: path_for(&body),
            body: Bytes::from(body.to_string()),
        });
    }
    anyhow::ensure!(!items.is_empty(), "{}: no requests", path.display());
    Ok(Workload {
        description: format!("prompt file {} ({} requests)", path.display(), items.len()),
        source: Source::File(items),
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
            profile_tokens: 20,
            api: Api::Completions,
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
    }
}
