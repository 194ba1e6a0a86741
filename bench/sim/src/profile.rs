//! Profiles: an engine shape plus a step-time model, as TOML.
//!
//! Built-in profiles live in `bench/sim/profiles/*.toml` and are embedded in the
//! binary; `--profile PATH.toml` loads any other (for example one written by
//! `bench calibrate` or `bench sim-vs-real --out`).
//!
//! The step-time model is linear in what a step computes:
//!
//! ```text
//! step = step_base_ms
//!      + prefill_token_ms × prefill tokens
//!      + decode_seq_ms    × decoding sequences
//!      + context_token_ms × context tokens of the scheduled sequences
//! ```
//!
//! times `1 ± jitter` (uniform, seeded). Around the engine, each request
//! also pays:
//! - `api_in_ms` before the engine and `api_out_ms` after its last token,
//!   on the API server's one thread (vLLM's frontend is a single asyncio
//!   process: parsing and tokenizing, detokenizing and writing the
//!   response), so a burst of requests queues there. That work takes
//!   `1 + api_slowdown` times as long while the engine has work: on a small
//!   CPU machine the API server shares cores with the engine's processes
//!   (on the project's 2-core machine vLLM pins its model worker to one
//!   core; the API server and the engine-core process share the other);
//! - `request_overhead_ms` before the engine, which delays the request but
//!   occupies nothing (network and HTTP time in parallel work).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::engine::{Batch, EngineConfig, splitmix64};

/// A simulated engine's configuration and timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name, shown in logs and reports.
    pub name: String,
    /// Where the numbers come from.
    #[serde(default)]
    pub description: String,
    /// The served model name (`/v1/models`).
    pub model: String,
    /// Batch limits and KV pool.
    pub engine: EngineSection,
    /// Step-time model.
    pub timing: Timing,
}

/// `[engine]`: vLLM's scheduler and cache settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`.
    pub max_num_batched_tokens: usize,
    /// `--block-size`.
    pub block_size: usize,
    /// KV blocks in the pool (vLLM's `num_gpu_blocks`).
    pub num_blocks: u32,
    /// `--max-model-len`.
    pub max_model_len: usize,
    /// `--enable-prefix-caching`.
    #[serde(default = "yes")]
    pub enable_prefix_caching: bool,
    /// Output token ids are drawn from `0..vocab_size`.
    #[serde(default = "default_vocab")]
    pub vocab_size: u32,
}

fn yes() -> bool {
    true
}

fn default_vocab() -> u32 {
    4096
}

/// `[timing]`: the step-time model, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Fixed cost of a step.
    pub step_base_ms: f64,
    /// Per prefill token in the step.
    pub prefill_token_ms: f64,
    /// Per decoding sequence in the step.
    pub decode_seq_ms: f64,
    /// Per token of context (attention reads) of the scheduled sequences.
    #[serde(default)]
    pub context_token_ms: f64,
    /// Per request, before the engine, occupying nothing (latency only).
    #[serde(default)]
    pub request_overhead_ms: f64,
    /// Per request, before the engine, on the API server's single thread.
    #[serde(default)]
    pub api_in_ms: f64,
    /// Per request, after its last token, on the API server's single thread.
    #[serde(default)]
    pub api_out_ms: f64,
    /// The API server's work takes `1 + api_slowdown` times as long while
    /// the engine has work: a step running, sequences in it, or requests on
    /// their way in, judged when the work is booked (they share CPU cores).
    #[serde(default)]
    pub api_slowdown: f64,
    /// Uniform jitter as a fraction of the step time (0 = none).
    #[serde(default)]
    pub jitter: f64,
    /// Seeds the jitter.
    #[serde(default)]
    pub seed: u64,
}

/// The built-in profiles, by name.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "vllm-cpu-tiny",
        include_str!("../profiles/vllm-cpu-tiny.toml"),
    ),
    ("rtx4080", include_str!("../profiles/rtx4080.toml")),
];

impl Profile {
    /// Names of the built-in profiles.
    pub fn built_in_names() -> impl Iterator<Item = &'static str> {
        BUILT_IN.iter().map(|(n, _)| *n)
    }

    /// A built-in profile by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Self> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_toml(text);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            anyhow::bail!(
                "unknown profile {name_or_path:?}: not a built-in ({}) nor a file",
                Self::built_in_names().collect::<Vec<_>>().join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading profile {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in profile {}", path.display()))
    }

    /// Parses and validates a profile.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let p: Self = toml::from_str(text).map_err(|err| {
            let mut err = anyhow::Error::from(err);
            if err.to_string().contains("decode_exponent") {
                err = err.context(
                    "timing.decode_exponent was removed (the step time is linear in decoding sequences): refit with `bench sim-vs-real --out`",
                );
            }
            err
        })?;
        p.validate()?;
        Ok(p)
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("profiles serialise")
    }

    fn validate(&self) -> anyhow::Result<()> {
        let e = &self.engine;
        anyhow::ensure!(e.max_num_seqs > 0, "engine.max_num_seqs must be positive");
        anyhow::ensure!(e.block_size > 0, "engine.block_size must be positive");
        anyhow::ensure!(e.num_blocks > 0, "engine.num_blocks must be positive");
        anyhow::ensure!(
            e.max_num_batched_tokens > 0,
            "engine.max_num_batched_tokens must be positive"
        );
        anyhow::ensure!(e.max_model_len > 1, "engine.max_model_len must exceed 1");
        let t = &self.timing;
        for (name, v) in [
            ("step_base_ms", t.step_base_ms),
            ("prefill_token_ms", t.prefill_token_ms),
            ("decode_seq_ms", t.decode_seq_ms),
            ("context_token_ms", t.context_token_ms),
            ("request_overhead_ms", t.request_overhead_ms),
            ("api_in_ms", t.api_in_ms),
            ("api_out_ms", t.api_out_ms),
            ("api_slowdown", t.api_slowdown),
        ] {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "timing.{name} must be a non-negative number"
            );
        }
        anyhow::ensure!(
            (0.0..1.0).contains(&t.jitter),
            "timing.jitter must be in [0, 1)"
        );
        Ok(())
    }

    /// The engine configuration.
    pub fn engine_config(&self) -> EngineConfig {
        let e = &self.engine;
        EngineConfig {
            max_num_seqs: e.max_num_seqs,
            max_num_batched_tokens: e.max_num_batched_tokens,
            block_size: e.block_size,
            num_blocks: e.num_blocks,
            max_model_len: e.max_model_len,
            enable_prefix_caching: e.enable_prefix_caching,
            vocab_size: e.vocab_size,
        }
    }

    /// The per-request latency outside the engine that occupies nothing.
    pub fn request_overhead(&self) -> Duration {
        ms(self.timing.request_overhead_ms)
    }

    /// The API server's serial work per request: before the engine, after it.
    pub fn api_costs(&self) -> (Duration, Duration) {
        (ms(self.timing.api_in_ms), ms(self.timing.api_out_ms))
    }
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1e3)
}

impl Timing {
    /// Step time for `batch` without jitter, in milliseconds.
    pub fn step_ms(&self, batch: &Batch) -> f64 {
        self.step_base_ms
            + self.prefill_token_ms * batch.prefill_tokens as f64
            + self.decode_seq_ms * batch.decode_seqs as f64
            + self.context_token_ms * batch.context_tokens as f64
    }
}

/// A profile for engine tests: 4-token blocks, 10 ms per step plus 1 ms
/// per prefill token (decoding and context free), no jitter, and the given
/// API-server and overhead costs (the API server as fast when the engine is
/// busy as when it is idle).
#[cfg(test)]
pub(crate) fn test_profile(api_in_ms: f64, api_out_ms: f64, overhead_ms: f64) -> Profile {
    let mut p = Profile::load("vllm-cpu-tiny").unwrap();
    p.engine.block_size = 4;
    p.timing.step_base_ms = 10.0;
    p.timing.prefill_token_ms = 1.0;
    p.timing.decode_seq_ms = 0.0;
    p.timing.context_token_ms = 0.0;
    p.timing.jitter = 0.0;
    p.timing.request_overhead_ms = overhead_ms;
    p.timing.api_in_ms = api_in_ms;
    p.timing.api_out_ms = api_out_ms;
    p.timing.api_slowdown = 0.0;
    p
}

/// A timing parameter a fit may move.
pub type Knob = fn(&mut Timing) -> &mut f64;

/// How a [`fit`] searches.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    /// Stop once the step factor is this close to 1.
    pub min_factor: f64,
    /// Rounds at most (a parameter the data barely determines would
    /// otherwise creep for ever on negligible gains).
    pub max_rounds: usize,
    /// A move is kept when it lowers the loss by at least this fraction.
    pub min_gain: f64,
}

/// Fits `base`'s timing by a multiplicative coordinate search: each knob in
/// turn is multiplied and divided by a factor (2 at first, then its square
/// root whenever no move helps) and a move is kept when it lowers `loss`.
/// Jitter is switched off. Returns the fitted profile and its loss.
pub fn fit(
    base: &Profile,
    knobs: &[Knob],
    search: Search,
    loss: impl Fn(&Profile) -> f64,
) -> (Profile, f64) {
    let mut best = base.clone();
    best.timing.jitter = 0.0;
    let mut best_loss = loss(&best);
    let mut factor = 2.0_f64;
    for _ in 0..search.max_rounds {
        if factor <= search.min_factor {
            break;
        }
        let mut improved = false;
        for knob in knobs {
            for f in [factor, 1.0 / factor] {
                let mut p = best.clone();
                let slot = knob(&mut p.timing);
                *slot = slot.max(1e-5) * f;
                let l = loss(&p);
                if l < best_loss * (1.0 - search.min_gain) {
                    (best, best_loss, improved) = (p, l, true);
                }
            }
        }
        if !improved {
            factor = factor.sqrt();
        }
    }
    (best, best_loss)
}

/// Turns batches into durations, with the profile's seeded jitter.
#[derive(Debug, Clone)]
pub struct StepClock {
    timing: Timing,
    state: u64,
}

impl StepClock {
    /// A clock for `timing`, its jitter seeded by `timing.seed`.
    pub fn new(timing: Timing) -> Self {
        let state = timing.seed;
        Self { timing, state }
    }

    /// How long `batch` takes.
    pub fn step(&mut self, batch: &Batch) -> Duration {
        let mut ms = self.timing.step_ms(batch);
        if self.timing.jitter > 0.0 {
            self.state = splitmix64(self.state);
            let u = (self.state >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ms *= 1.0 + self.timing.jitter * (2.0 * u - 1.0);
        }
        Duration::from_secs_f64(ms.max(0.0) / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_parse_and_round_trip() {
        for name in Profile::built_in_names() {
            let p = Profile::load(name).unwrap();
            assert_eq!(p.name, name);
            assert_eq!(Profile::from_toml(&p.to_toml()).unwrap(), p);
        }
    }

    #[test]
    fn bad_profiles_are_refused_with_the_field_named() {
        let mut p = Profile::load("vllm-cpu-tiny").unwrap();
        p.timing.decode_seq_ms = -1.0;
        let err = Profile::from_toml(&p.to_toml()).unwrap_err().to_string();
        assert!(err.contains("decode_seq_ms"), "{err}");
        let err = Profile::load("no-such-profile").unwrap_err().to_string();
        assert!(err.contains("vllm-cpu-tiny"), "{err}");
        // A profile from before the step time became linear says what to do.
        let old = Profile::load("vllm-cpu-tiny")
            .unwrap()
            .to_toml()
            .replace("[timing]\n", "[timing]\ndecode_exponent = 0.23\n");
        let err = format!("{:#}", Profile::from_toml(&old).unwrap_err());
        assert!(
            err.contains("was removed") && err.contains("refit"),
            "{err}"
        );
    }

    #[test]
    fn step_time_is_linear_and_jitter_is_seeded_and_bounded() {
        let t = Timing {
            step_base_ms: 1.0,
            prefill_token_ms: 0.01,
            decode_seq_ms: 0.1,
            context_token_ms: 0.001,
            request_overhead_ms: 0.0,
            api_in_ms: 0.0,
            api_out_ms: 0.0,
            api_slowdown: 0.0,
            jitter: 0.0,
            seed: 0,
        };
        let b = Batch {
            scheduled: vec![],
            prefill_tokens: 100,
            decode_seqs: 10,
            context_tokens: 1000,
        };
        assert!((t.step_ms(&b) - (1.0 + 1.0 + 1.0 + 1.0)).abs() < 1e-9);
        let jittered = Timing {
            jitter: 0.2,
            seed: 42,
            ..t
        };
        let run = || {
            let mut c = StepClock::new(jittered.clone());
            (0..100).map(|_| c.step(&b)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().any(|d| *d != a[0]));
        for d in a {
            let ms = d.as_secs_f64() * 1e3;
            assert!((3.2..=4.8).contains(&ms), "{ms}");
        }
    }
}
