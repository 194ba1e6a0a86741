//! Cache resume: time to first token of a long context sent cold, then of
//! the same context resumed (a new turn appended) once its prefix is cached.
//!
//! Each pair uses a context never sent before (the run's nonce is in its
//! first line). Both requests stream, each on a new connection; time to
//! first token runs from sending the request to the first SSE event that
//! carries text (read by [`crate::client`]). `max_tokens` is 2, so the
//! figure is the prefill.
//!
//! Context sizes are in the engine's tokens. Against an engine with
//! `POST /tokenize` (real vLLM) the prompt is sent as token ids cut to the
//! exact size; otherwise it is text sized with the simulator's tokenizer.
//! The engine's own `usage.prompt_tokens` (and `cached_tokens`, when it
//! reports them) go in the report. A size that does not fit
//! `max_model_len` with the new turn and the output is capped to what fits
//! when that is at least 90% of it, and skipped otherwise.
//!
//! # JSON (`"cache_resume"`)
//!
//! ```text
//! {"repeats": 3, "rows": [{
//!    "context_tokens": 2048,        // asked
//!    "sent_tokens": 2048 | null,    // context actually sent (capped); null when skipped
//!    "skipped": null | "reason", "capped": null | "reason",
//!    "prompt_tokens": n | null,     // the engine's usage of the resumed request
//!    "cached_tokens": n | null,     // the engine's prompt_tokens_details (resumed), when reported
//!    "cold_cached_tokens": n | null, // the same for the cold request (expected 0)
//!    "cold_ttft_ms": [..], "resumed_ttft_ms": [..],   // each pair
//!    "cold_ttft_ms_median", "resumed_ttft_ms_median",
//!    "speedup": 8.1,                // cold median / resumed median
//!    "check": null | Check          // > 3
//! }]}
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sluice_sim::tokenizer::Tokenizer;
use tokio::time::Instant;

use super::{Args, Check, Engine, Op, short};
use crate::client::{Conn, Request, post_json};
use crate::stats::median;
use crate::workload;

/// The issue's target: resumed time to first token this many times faster.
const TARGET: f64 = 3.0;
/// Tokens kept free for the new turn and the output.
const HEADROOM: usize = 48;
/// Cap a context only when at least this share of it still fits.
const MIN_CAP_SHARE: f64 = 0.9;

/// One context size.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) context_tokens: usize,
    pub(crate) sent_tokens: Option<usize>,
    pub(crate) skipped: Option<String>,
    pub(crate) capped: Option<String>,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) cold_cached_tokens: Option<u64>,
    pub(crate) cached_tokens: Option<u64>,
    pub(crate) cold_ttft_ms: Vec<f64>,
    pub(crate) resumed_ttft_ms: Vec<f64>,
    pub(crate) cold_ttft_ms_median: Option<f64>,
    pub(crate) resumed_ttft_ms_median: Option<f64>,
    pub(crate) speedup: Option<f64>,
    pub(crate) check: Option<Check>,
}

/// The cache-resume category.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CacheResume {
    pub(crate) repeats: usize,
    pub(crate) rows: Vec<Row>,
}

impl CacheResume {
    pub(crate) fn checks(&self) -> impl Iterator<Item = &Check> {
        self.rows.iter().filter_map(|r| r.check.as_ref())
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = format!(
            "\n## cache resume: time to first token, cold vs prefix cached (median of {})\n\n\
             | context | sent tokens | cold TTFT ms | resumed TTFT ms | engine cached tokens (cold / resumed) | speedup | target |\n\
             |---|---|---|---|---|---|---|\n",
            self.repeats
        );
        for r in &self.rows {
            if let Some(reason) = &r.skipped {
                s += &format!(
                    "| {} | – | – | – | – | – | skipped: {reason} |\n",
                    r.context_tokens
                );
                continue;
            }
            let opt = |v: Option<f64>| v.map_or("–".into(), short);
            s += &format!(
                "| {} | {}{} | {} | {} | {} | {}× | {} |\n",
                r.context_tokens,
                r.sent_tokens.map_or("–".into(), |t| t.to_string()),
                if r.capped.is_some() { " (capped)" } else { "" },
                opt(r.cold_ttft_ms_median),
                opt(r.resumed_ttft_ms_median),
                match (r.cold_cached_tokens, r.cached_tokens) {
                    (None, None) => "n/a".to_string(),
                    (c, w) => format!(
                        "{} / {}",
                        c.map_or("n/a".into(), |t| t.to_string()),
                        w.map_or("n/a".into(), |t| t.to_string())
                    ),
                },
                opt(r.speedup),
                r.check.as_ref().map_or("–".into(), Check::verdict),
            );
        }
        s
    }
}

/// How a context of some size fits the engine.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    Whole,
    /// Cut to `tokens`: at least [`MIN_CAP_SHARE`] of it fits.
    Capped {
        tokens: usize,
        limit: usize,
    },
    /// Less than [`MIN_CAP_SHARE`] of it fits.
    Skipped {
        limit: usize,
    },
}

/// Whether `size` tokens, plus [`HEADROOM`], fit `max_model_len`.
fn fit(size: usize, max_model_len: Option<u64>) -> Fit {
    let Some(limit) = max_model_len.map(|l| l as usize) else {
        return Fit::Whole;
    };
    if size + HEADROOM <= limit {
        return Fit::Whole;
    }
    let tokens = limit.saturating_sub(HEADROOM);
    if tokens as f64 >= MIN_CAP_SHARE * size as f64 {
        Fit::Capped { tokens, limit }
    } else {
        Fit::Skipped { limit }
    }
}

/// A prompt: text, or token ids.
#[derive(Debug, Clone)]
enum Prompt {
    Text(String),
    Ids(Vec<u64>),
}

impl Prompt {
    fn json(&self) -> Value {
        match self {
            Prompt::Text(t) => json!(t),
            Prompt::Ids(ids) => json!(ids),
        }
    }
}

/// The engine's token ids of `text` (`POST /tokenize`).
async fn tokenize(engine: &Engine, text: &str) -> anyhow::Result<Vec<u64>> {
    let (status, body) = post_json(
        engine.addr,
        "/tokenize",
        &json!({"model": engine.model, "prompt": text, "add_special_tokens": false}),
    )
    .await?;
    if status != 200 {
        bail!("/tokenize answered {status}");
    }
    let v: Value = serde_json::from_slice(&body)?;
    v["tokens"]
        .as_array()
        .context("no tokens in /tokenize's answer")?
        .iter()
        .map(|t| t.as_u64().context("token id"))
        .collect()
}

/// A context of exactly `tokens` engine tokens (simulator tokens for text),
/// distinct for each `id`.
async fn context(engine: &Engine, id: u64, tokens: usize) -> anyhow::Result<Prompt> {
    if engine.tokenize {
        // Real BPE vocabularies may spend more or fewer tokens per word:
        // ask for twice the size, then cut the ids.
        let text = workload::profile(id, id as usize, tokens * 2);
        let mut ids = tokenize(engine, &text).await?;
        anyhow::ensure!(
            ids.len() >= tokens,
            "a {tokens}-token context came out {} tokens long",
            ids.len()
        );
        ids.truncate(tokens);
        return Ok(Prompt::Ids(ids));
    }
    let text = workload::profile(id, id as usize, tokens + 16);
    let pieces = Tokenizer::pieces(&text);
    let end = pieces
        .iter()
        .take(tokens)
        .map(|p| p.len())
        .sum::<usize>()
        .min(text.len());
    Ok(Prompt::Text(text[..end].to_string()))
}

/// The context with a new turn appended.
async fn resume(engine: &Engine, context: &Prompt, turn: &str) -> anyhow::Result<Prompt> {
    Ok(match context {
        Prompt::Text(t) => Prompt::Text(format!("{t}\n{turn}")),
        Prompt::Ids(ids) => {
            let mut ids = ids.clone();
            ids.extend(tokenize(engine, &format!("\n{turn}")).await?);
            Prompt::Ids(ids)
        }
    })
}

/// What one streamed request measured.
struct Streamed {
    ttft: Duration,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
}

/// Sends one streaming completion to `addr` over a new connection and
/// times its first token from the send.
async fn stream(addr: SocketAddr, engine: &Engine, prompt: &Prompt) -> anyhow::Result<Streamed> {
    let mut body = json!({
        "prompt": prompt.json(),
        "max_tokens": 2,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(model) = &engine.model {
        body["model"] = json!(model);
    }
    let request =
        Request::post("/v1/completions", body.to_string()).timeout(Some(Duration::from_secs(300)));
    let mut conn = Conn::open(addr).await?;
    let sent = Instant::now();
    let answer = conn.send(&request).await?;
    let first_token = answer.first_token.context("the stream carried no token")?;
    Ok(Streamed {
        ttft: first_token.duration_since(sent),
        prompt_tokens: answer.prompt_tokens,
        cached_tokens: answer.cached_tokens,
    })
}

/// Runs the category through the proxy at `proxy`.
pub(crate) async fn run(
    args: &Args,
    engine: &Engine,
    proxy: SocketAddr,
    nonce: u64,
) -> anyhow::Result<CacheResume> {
    let repeats = args.cache_repeats.max(1);
    let mut rows = Vec::new();
    for (size_index, &size) in args.contexts.iter().enumerate() {
        let mut row = Row {
            context_tokens: size,
            sent_tokens: None,
            skipped: None,
            capped: None,
            prompt_tokens: None,
            cold_cached_tokens: None,
            cached_tokens: None,
            cold_ttft_ms: Vec::new(),
            resumed_ttft_ms: Vec::new(),
            cold_ttft_ms_median: None,
            resumed_ttft_ms_median: None,
            speedup: None,
            check: None,
        };
        let tokens = match fit(size, engine.max_model_len) {
            Fit::Whole => size,
            Fit::Capped { tokens, limit } => {
                row.capped = Some(format!(
                    "capped to {tokens} tokens: max_model_len is {limit}"
                ));
                tokens
            }
            Fit::Skipped { limit } => {
                row.skipped = Some(format!(
                    "does not fit: max_model_len is {limit} (with {HEADROOM} tokens for the new turn and the output)"
                ));
                rows.push(row);
                continue;
            }
        };
        eprintln!("bench suite: cache resume, {tokens}-token context");
        row.sent_tokens = Some(tokens);
        for r in 0..repeats {
            let id = nonce
                .wrapping_mul(1000)
                .wrapping_add((size_index * repeats + r) as u64);
            let ctx = context(engine, id, tokens).await?;
            let cold_prompt = resume(engine, &ctx, "Question: summarise the context.").await?;
            let cold = stream(proxy, engine, &cold_prompt)
                .await
                .with_context(|| format!("cold {tokens}-token request"))?;
            let resumed_prompt = resume(engine, &ctx, "Question: what comes next?").await?;
            let resumed = stream(proxy, engine, &resumed_prompt)
                .await
                .with_context(|| format!("resumed {tokens}-token request"))?;
            row.cold_ttft_ms.push(cold.ttft.as_secs_f64() * 1000.0);
            row.resumed_ttft_ms
                .push(resumed.ttft.as_secs_f64() * 1000.0);
            row.prompt_tokens = resumed.prompt_tokens.or(row.prompt_tokens);
            row.cached_tokens = resumed.cached_tokens.or(row.cached_tokens);
            row.cold_cached_tokens = cold.cached_tokens.or(row.cold_cached_tokens);
        }
        let (cold, resumed) = (median(&row.cold_ttft_ms), median(&row.resumed_ttft_ms));
        let speedup = cold / resumed;
        row.cold_ttft_ms_median = Some(cold);
        row.resumed_ttft_ms_median = Some(resumed);
        row.speedup = Some(speedup);
        row.check = Some(Check::new(
            format!("resume speedup at {tokens} tokens"),
            speedup,
            Op::Greater,
            TARGET,
        ));
        rows.push(row);
    }
    Ok(CacheResume { repeats, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_fit_are_capped_or_skipped() {
        assert_eq!(fit(8192, None), Fit::Whole);
        assert_eq!(fit(8192, Some(9000)), Fit::Whole);
        assert_eq!(fit(2048, Some(4096)), Fit::Whole);
        assert_eq!(
            fit(4096, Some(4096)),
            Fit::Capped {
                tokens: 4096 - HEADROOM,
                limit: 4096
            }
        );
        assert_eq!(fit(8192, Some(4096)), Fit::Skipped { limit: 4096 });
        assert_eq!(fit(100, Some(48)), Fit::Skipped { limit: 48 });
    }
}
