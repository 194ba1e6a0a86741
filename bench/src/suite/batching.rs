//! Batching: N agents each generating `--agent-tokens` tokens at once,
//! against the same N agents one after another, through the proxy.
//!
//! Each agent is one completion request with `max_tokens` = the agent's
//! tokens and `ignore_eos` (so every agent generates all of them); tokens
//! are counted from each answer's `usage`. The speedup is concurrent
//! tokens/s over sequential tokens/s, each side's wall time the median of
//! `--batching-repeats` runs (the two sides alternate). Every run uses
//! prompts of its own, so neither side is helped by the other's prefix
//! cache.
//!
//! # JSON (`"batching"`)
//!
//! ```text
//! {"agent_tokens": 500, "repeats": 3, "rows": [{
//!    "agents": 3,
//!    "concurrent": {"elapsed_s_runs": [..], "elapsed_s" (median), "output_tokens" (per repeat),
//!                   "tokens_per_s" (output_tokens / elapsed_s), "ok", "failed", "errors"},
//!    "sequential": {...},
//!    "speedup": 2.9,                       // concurrent / sequential tokens/s
//!    "check": null | Check                 // > 1.5 at 3 agents, > 2.5 at 5
//! }]}
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::{Args, Check, Engine, Op, short};
use crate::client::{Conn, Request};
use crate::stats::median;

/// The issue's targets: speedup over sequential at 3 and 5 agents.
const TARGETS: [(usize, f64); 2] = [(3, 1.5), (5, 2.5)];

/// One side of a row, over every repeat.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Timing {
    /// Wall time of each repeat.
    pub(crate) elapsed_s_runs: Vec<f64>,
    /// Their median.
    pub(crate) elapsed_s: f64,
    /// Tokens generated in one repeat (the median over repeats).
    pub(crate) output_tokens: u64,
    /// `output_tokens / elapsed_s`.
    pub(crate) tokens_per_s: f64,
    /// Agents answered and failed, over every repeat.
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    pub(crate) errors: BTreeMap<String, usize>,
}

impl Timing {
    fn new() -> Self {
        Self {
            elapsed_s_runs: Vec::new(),
            elapsed_s: 0.0,
            output_tokens: 0,
            tokens_per_s: 0.0,
            ok: 0,
            failed: 0,
            errors: BTreeMap::new(),
        }
    }

    /// Adds one repeat; returns its tokens.
    fn add(&mut self, results: Vec<Result<u64, String>>, elapsed: f64) -> u64 {
        self.elapsed_s_runs.push(elapsed);
        let mut tokens = 0;
        for r in results {
            match r {
                Ok(t) => {
                    self.ok += 1;
                    tokens += t;
                }
                Err(kind) => {
                    self.failed += 1;
                    *self.errors.entry(kind).or_default() += 1;
                }
            }
        }
        tokens
    }

    fn finish(&mut self, tokens: &[u64]) {
        self.elapsed_s = median(&self.elapsed_s_runs);
        let tokens: Vec<f64> = tokens.iter().map(|&t| t as f64).collect();
        self.output_tokens = median(&tokens) as u64;
        self.tokens_per_s = self.output_tokens as f64 / self.elapsed_s.max(1e-9);
    }
}

/// One agent count.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) agents: usize,
    pub(crate) concurrent: Timing,
    pub(crate) sequential: Timing,
    pub(crate) speedup: f64,
    pub(crate) check: Option<Check>,
}

/// The batching category.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Batching {
    pub(crate) agent_tokens: u32,
    pub(crate) repeats: usize,
    pub(crate) rows: Vec<Row>,
}

impl Batching {
    pub(crate) fn checks(&self) -> impl Iterator<Item = &Check> {
        self.rows.iter().filter_map(|r| r.check.as_ref())
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = format!(
            "\n## batching: agents each generating {} tokens, concurrently vs one after another (median of {})\n\n\
             | agents | concurrent tok/s | concurrent s | sequential tok/s | sequential s | speedup | target |\n\
             |---|---|---|---|---|---|---|\n",
            self.agent_tokens, self.repeats
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {:.2} | {} | {:.2} | {}× | {} |\n",
                r.agents,
                short(r.concurrent.tokens_per_s),
                r.concurrent.elapsed_s,
                short(r.sequential.tokens_per_s),
                r.sequential.elapsed_s,
                short(r.speedup),
                r.check.as_ref().map_or("–".into(), Check::verdict),
            );
        }
        s
    }
}

fn agent(engine: &Engine, tokens: u32, prompt: String) -> Request {
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": true,
    });
    if let Some(model) = &engine.model {
        body["model"] = json!(model);
    }
    Request::post("/v1/completions", body.to_string())
}

/// Sends `request` on `conn`: its output tokens, or the failure's kind.
async fn send(conn: &mut Conn, request: &Request) -> Result<u64, String> {
    conn.send(request)
        .await
        .map(|answer| answer.output_tokens)
        .map_err(|failure| failure.kind)
}

/// Runs the category through the proxy at `proxy`.
pub(crate) async fn run(
    args: &Args,
    engine: &Engine,
    proxy: SocketAddr,
    nonce: u64,
) -> anyhow::Result<Batching> {
    let prompt = |n: usize, repeat: usize, side: &str, k: usize| {
        format!(
            "Agent {k} of {n} ({side}, repeat {repeat}, run {nonce:x}): plan the next step of task {k} and explain it."
        )
    };
    let repeats = args.batching_repeats.max(1);
    // Warm-up: connections, the engine's first step.
    let _ = send(
        &mut Conn::new(proxy),
        &agent(engine, 8, prompt(0, 0, "warm-up", 0)),
    )
    .await;
    let mut rows = Vec::new();
    for &n in &args.agents {
        let n = n.max(1);
        eprintln!("bench suite: batching, {n} agents");
        let (mut concurrent, mut sequential) = (Timing::new(), Timing::new());
        let (mut concurrent_tokens, mut sequential_tokens) = (Vec::new(), Vec::new());
        for r in 0..repeats {
            let started = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|k| {
                    let item = agent(engine, args.agent_tokens, prompt(n, r, "concurrent", k));
                    tokio::spawn(async move { send(&mut Conn::new(proxy), &item).await })
                })
                .collect();
            let mut results = Vec::with_capacity(n);
            for task in tasks {
                results.push(task.await.unwrap_or_else(|_| Err("client_panic".into())));
            }
            concurrent_tokens.push(concurrent.add(results, started.elapsed().as_secs_f64()));

            let started = Instant::now();
            let mut conn = Conn::new(proxy);
            let mut results = Vec::with_capacity(n);
            for k in 0..n {
                let item = agent(engine, args.agent_tokens, prompt(n, r, "sequential", k));
                results.push(send(&mut conn, &item).await);
            }
            sequential_tokens.push(sequential.add(results, started.elapsed().as_secs_f64()));
        }
        concurrent.finish(&concurrent_tokens);
        sequential.finish(&sequential_tokens);

        let speedup = concurrent.tokens_per_s / sequential.tokens_per_s.max(1e-9);
        let check = TARGETS
            .iter()
            .find(|(agents, _)| *agents == n)
            .map(|&(_, target)| {
                // A failed agent makes the two sides incomparable: no pass.
                let value = if concurrent.failed + sequential.failed == 0 {
                    speedup
                } else {
                    f64::NAN
                };
                Check::new(format!("speedup at {n} agents"), value, Op::Greater, target)
            });
        rows.push(Row {
            agents: n,
            concurrent,
            sequential,
            speedup,
            check,
        });
    }
    Ok(Batching {
        agent_tokens: args.agent_tokens,
        repeats,
        rows,
    })
}
