//! Batching: N agents each generating `--agent-tokens` tokens at once,
//! against the same N agents one after another, through the proxy.
//!
//! Each agent is one completion request with `max_tokens` = the agent's
//! tokens and `ignore_eos` (so every agent generates all of them); tokens
//! are counted from each answer's `usage`. The speedup is concurrent
//! tokens/s over sequential tokens/s. Every run uses prompts of its own, so
//! neither side is helped by the other's prefix cache.
//!
//! # JSON (`"batching"`)
//!
//! ```text
//! {"agent_tokens": 500, "rows": [{
//!    "agents": 3,
//!    "concurrent": {"elapsed_s", "output_tokens", "tokens_per_s", "ok", "failed", "errors"},
//!    "sequential": {...},
//!    "speedup": 2.9,                       // concurrent / sequential tokens/s
//!    "check": null | Check                 // > 1.5 at 3 agents, > 2.5 at 5
//! }]}
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

use super::{Args, Check, Engine, Op, short};
use crate::run::client::Conn;
use crate::workload::Item;

/// The issue's targets: speedup over sequential at 3 and 5 agents.
const TARGETS: [(usize, f64); 2] = [(3, 1.5), (5, 2.5)];

/// One side of a row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Timing {
    pub(crate) elapsed_s: f64,
    pub(crate) output_tokens: u64,
    pub(crate) tokens_per_s: f64,
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    pub(crate) errors: BTreeMap<String, usize>,
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
    pub(crate) rows: Vec<Row>,
}

impl Batching {
    pub(crate) fn checks(&self) -> impl Iterator<Item = &Check> {
        self.rows.iter().filter_map(|r| r.check.as_ref())
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = format!(
            "\n## batching: agents each generating {} tokens, concurrently vs one after another\n\n\
             | agents | concurrent tok/s | concurrent s | sequential tok/s | sequential s | speedup | target |\n\
             |---|---|---|---|---|---|---|\n",
            self.agent_tokens
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

fn agent(engine: &Engine, tokens: u32, prompt: String) -> Item {
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": true,
    });
    if let Some(model) = &engine.model {
        body["model"] = json!(model);
    }
    Item {
        path: "/v1/completions",
        body: Bytes::from(body.to_string()),
    }
}

fn timing(results: Vec<Result<u64, String>>, elapsed: f64) -> Timing {
    let mut t = Timing {
        elapsed_s: elapsed,
        output_tokens: 0,
        tokens_per_s: 0.0,
        ok: 0,
        failed: 0,
        errors: BTreeMap::new(),
    };
    for r in results {
        match r {
            Ok(tokens) => {
                t.ok += 1;
                t.output_tokens += tokens;
            }
            Err(kind) => {
                t.failed += 1;
                *t.errors.entry(kind).or_default() += 1;
            }
        }
    }
    t.tokens_per_s = t.output_tokens as f64 / elapsed.max(1e-9);
    t
}

/// Runs the category through the proxy at `proxy`.
pub(crate) async fn run(
    args: &Args,
    engine: &Engine,
    proxy: SocketAddr,
    nonce: u64,
) -> anyhow::Result<Batching> {
    let prompt = |n: usize, side: &str, k: usize| {
        format!(
            "Agent {k} of {n} ({side}, run {nonce:x}): plan the next step of task {k} and explain it."
        )
    };
    // Warm-up: connections, the engine's first step.
    let _ = Conn::new(proxy)
        .send(&agent(engine, 8, prompt(0, "warm-up", 0)))
        .await;
    let mut rows = Vec::new();
    for &n in &args.agents {
        let n = n.max(1);
        eprintln!("bench suite: batching, {n} agents");
        let started = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|k| {
                let item = agent(engine, args.agent_tokens, prompt(n, "concurrent", k));
                tokio::spawn(async move { Conn::new(proxy).send(&item).await })
            })
            .collect();
        let mut results = Vec::with_capacity(n);
        for task in tasks {
            results.push(task.await.unwrap_or_else(|_| Err("client_panic".into())));
        }
        let concurrent = timing(results, started.elapsed().as_secs_f64());

        let started = Instant::now();
        let mut conn = Conn::new(proxy);
        let mut results = Vec::with_capacity(n);
        for k in 0..n {
            let item = agent(engine, args.agent_tokens, prompt(n, "sequential", k));
            results.push(conn.send(&item).await);
        }
        let sequential = timing(results, started.elapsed().as_secs_f64());

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
        rows,
    })
}
