//! `bench compare --replicas N`: one proxy in front of N engine replicas,
//! each with a prefix cache of its own, routing by prefix, by load or in
//! turn, against one replica alone — all at the same offered load.
//!
//! The workload is K rubrics (`--rubrics`, 16 by default: K functions
//! that each evaluate against a system prompt of their own, ~1,000
//! tokens), each request one rubric and a new short candidate (~75
//! tokens), the rubrics interleaved by a seeded hash. The engines are N
//! simulated vLLMs started in-process (profile `vllm-cpu-tiny` by default:
//! a prefill-bound engine, where what the cache holds decides the
//! throughput), or the engines given with `--upstream` once each.
//!
//! A simulated replica's KV pool is sized by [`CacheSizing`] so that K/N
//! rubrics fit in it with room to spare (`--cache-factor`, 1.5 × K/N) but
//! all K do not: a router that keeps each rubric on one replica can hit
//! the cache on nearly every rubric token, one that scatters them cannot.
//!
//! Configurations, each `--requests` requests (480 by default) from
//! `--clients-per-replica` × N naive clients (8 × N), after `--warmup`
//! requests:
//! 1. one replica alone, through Sluice with one `--upstream`;
//! 2. Sluice `--route round-robin` over the N replicas;
//! 3. Sluice `--route least-loaded` over them;
//! 4. Sluice `--route prefix` over them;
//! 5. the ceiling: one replica serving one rubric (a run of requests / N
//!    from `--clients-per-replica` clients), the best hit rate routing can
//!    aim for.
//!
//! Simulated engines are started afresh for each configuration, so none
//! inherits another's cache; real engines are the same throughout and
//! each configuration's warm-up re-fills their caches its own way. Each
//! engine's `/metrics` is read before and after the measured requests:
//! the prefix-cache hit rate (`vllm:prefix_cache_hits_total` over
//! `vllm:prefix_cache_queries_total`, summed over replicas) and the
//! requests each replica served (`vllm:request_success_total`, every
//! finish reason) come from the engines' own counters, not the proxy's.
//!
//! With one replica (`--replicas 1`, or one `--upstream`) no `--route` is
//! passed, so the comparison also runs on a proxy without replica support
//! (a smoke run: every configuration is then the same one engine).
//!
//! # `bench/results/replicas_YYYYMMDD_HHMMSS.json` (schema `sluice-replicas/1`)
//!
//! Beside it, `.md`: the table and the verdicts printed at the end.
//!
//! ```text
//! {
//!   "schema": "sluice-replicas/1",
//!   "created_utc", "engine", "profile", "model", "workload",
//!   "candidate_offset", "stream",          // as in every report (report::Header)
//!   "settings": {"replicas", "rubrics", "requests", "clients", "warmup",
//!                "engines": ["http://127.0.0.1:PORT", ...]},
//!   "cache": null | {                      // simulated replicas only
//!     "block_size", "rubric_blocks", "private_blocks", "rubrics_held",
//!     "num_blocks", "all_rubrics_fit"
//!   },
//!   "runs": [{
//!     "label": "sluice --route prefix (4 replicas)",
//!     "kind": "one-replica" | "round-robin" | "least-loaded" | "prefix" | "ceiling",
//!     "replicas", "rubrics", "clients",
//!     "client": {...},                     // report's client summary
//!     "prefix_cache": null | {"hit_tokens", "query_tokens", "hit_rate"},  // summed over replicas
//!     "per_replica": [{"url", "requests": null | n, "prefix_cache": null | {...}}],
//!     "balance": null | x                  // busiest / least busy replica
//!   }],
//!   "ratios": {"prefix_vs_round_robin", "prefix_vs_one_replica",
//!              "prefix_hit_vs_ceiling_points"},   // null when unknown
//!   "targets": [{"name", "value": null | x, "passed"}],
//!   "passed": true | false,
//!   "notes": [...]
//! }
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use sluice_sim::tokenizer::Tokenizer;

use crate::engine::{SimFleet, Upstream, engine_name, external, model_of};
use crate::load::Habit;
use crate::procs::{Route, route_flags};
use crate::proxy::{self, ProxyMode};
use crate::report::{Header, fresh_path};
use crate::scenario::{self, Feed, Job, Sender};
use crate::stats::{PrefixCache, Summary, prefix_counters, prom_sum};
use crate::workload::{Workload, WorkloadArgs};

/// The `schema` of the report.
pub(crate) const SCHEMA: &str = "sluice-replicas/1";

/// The simulator profile when `--profile` is not given.
pub(crate) const DEFAULT_PROFILE: &str = "vllm-cpu-tiny";

/// `--rubrics` when not given.
pub(crate) const DEFAULT_RUBRICS: usize = 16;

/// `--profile-tokens` when not given: a short candidate text.
pub(crate) const DEFAULT_CANDIDATE_TOKENS: usize = 75;

/// `--requests` when not given: per configuration.
pub(crate) const DEFAULT_REQUESTS: usize = 480;

/// The replica options of `bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReplicaArgs {
    /// Compare routing over N engine replicas (N simulated engines, or one
    /// per `--upstream`) instead of the admission scenarios; `--requests`
    /// is then per configuration (default 480).
    #[arg(long)]
    pub(crate) replicas: Option<usize>,
    /// Concurrent naive clients per replica: every configuration gets this
    /// × N, one replica alone included.
    #[arg(long, default_value_t = 8)]
    pub(crate) clients_per_replica: usize,
    /// Rubrics a simulated replica's KV cache holds, as a multiple of K/N
    /// (besides the blocks of the requests it runs at once).
    #[arg(long, default_value_t = 1.5)]
    pub(crate) cache_factor: f64,
}

/// What a replica comparison runs with (from `bench compare`'s flags).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) replica: ReplicaArgs,
    /// Engines at these URLs instead of simulated ones.
    pub(crate) upstreams: Vec<String>,
    /// The simulator profile (default [`DEFAULT_PROFILE`]).
    pub(crate) profile: Option<String>,
    /// Requests per configuration (default [`DEFAULT_REQUESTS`]).
    pub(crate) requests: Option<usize>,
    pub(crate) warmup: usize,
    pub(crate) proxy_mode: ProxyMode,
    pub(crate) out_dir: PathBuf,
    pub(crate) workload: WorkloadArgs,
}

/// How much a simulated replica's KV pool holds: `rubrics_held` rubrics'
/// shared blocks plus the private blocks of `clients` requests at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CacheSizing {
    /// Tokens per KV block (the profile's).
    pub(crate) block_size: usize,
    /// Full blocks of the longest rubric: what requests of one rubric share.
    pub(crate) rubric_blocks: usize,
    /// Blocks of one request beyond its rubric's full blocks (the rubric's
    /// partial last block, the candidate, the output).
    pub(crate) private_blocks: usize,
    /// Rubrics the pool holds beside a full batch of requests: the factor
    /// × K/N.
    pub(crate) rubrics_held: f64,
    /// The pool's size (the profile's `engine.num_blocks`).
    pub(crate) num_blocks: u32,
    /// Whether all K rubrics would fit (only with `--cache-factor` ≥ N).
    pub(crate) all_rubrics_fit: bool,
}

impl CacheSizing {
    /// The pool for one of `replicas` replicas serving `rubrics` (their
    /// texts) in requests of at most `request_tokens` tokens (prompt and
    /// answer, [`longest_request`]), `clients` requests at once, holding
    /// `factor` × K/N rubrics.
    pub(crate) fn of(
        block_size: usize,
        rubrics: &[Arc<str>],
        request_tokens: usize,
        replicas: usize,
        clients: usize,
        factor: f64,
    ) -> Self {
        let bs = block_size.max(1);
        let rubric_tokens = rubrics
            .iter()
            .map(|r| Tokenizer::pieces(r).len())
            .max()
            .unwrap_or(0);
        let rubric_blocks = rubric_tokens / bs;
        // One block more for what the engine's template adds.
        let private_blocks = request_tokens.max(rubric_tokens).div_ceil(bs) - rubric_blocks + 1;
        let k = rubrics.len();
        let rubrics_held = factor * k as f64 / replicas.max(1) as f64;
        let shared = (rubrics_held * rubric_blocks as f64).ceil() as usize;
        let num_blocks = shared + clients * private_blocks;
        let mut sizing = Self {
            block_size: bs,
            rubric_blocks,
            private_blocks,
            rubrics_held,
            num_blocks: u32::try_from(num_blocks).unwrap_or(u32::MAX),
            all_rubrics_fit: false,
        };
        sizing.all_rubrics_fit = sizing.holds(k, clients);
        sizing
    }

    /// Whether `n` rubrics fit beside `clients` requests' private blocks.
    pub(crate) fn holds(&self, n: usize, clients: usize) -> bool {
        n * self.rubric_blocks + clients * self.private_blocks <= self.num_blocks as usize
    }
}

/// Which configuration a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// One replica alone, all the clients on it.
    OneReplica,
    /// Over every replica, each in turn (`--route round-robin`).
    RoundRobin,
    /// Over every replica, the least loaded first (`--route least-loaded`).
    LeastLoaded,
    /// Over every replica, by predicted prefix, balanced against load
    /// (`--route prefix`).
    Prefix,
    /// One replica serving one rubric: the hit-rate ceiling.
    Ceiling,
}

impl Kind {
    fn route(self) -> Option<Route> {
        match self {
            Kind::RoundRobin => Some(Route::RoundRobin),
            Kind::LeastLoaded => Some(Route::LeastLoaded),
            Kind::Prefix => Some(Route::Prefix),
            Kind::OneReplica | Kind::Ceiling => None,
        }
    }
}

/// One replica's share of a run, from its own counters.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplicaShare {
    pub(crate) url: String,
    /// Requests it finished during the run (`vllm:request_success_total`).
    pub(crate) requests: Option<u64>,
    pub(crate) prefix_cache: Option<PrefixCache>,
}

/// One configuration's measured run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConfigRun {
    pub(crate) label: String,
    pub(crate) kind: Kind,
    pub(crate) replicas: usize,
    pub(crate) rubrics: usize,
    pub(crate) clients: usize,
    pub(crate) client: Summary,
    /// Summed over the replicas.
    pub(crate) prefix_cache: Option<PrefixCache>,
    pub(crate) per_replica: Vec<ReplicaShare>,
    /// Busiest over least busy replica, by requests served.
    pub(crate) balance: Option<f64>,
}

/// What the report records of its settings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Recorded {
    pub(crate) replicas: usize,
    pub(crate) rubrics: usize,
    pub(crate) requests: usize,
    pub(crate) clients: usize,
    pub(crate) warmup: usize,
    /// The real engines' URLs; empty for simulated ones.
    pub(crate) engines: Vec<String>,
}

/// The headline ratios (`None` when a side is unknown).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Ratios {
    pub(crate) prefix_vs_round_robin: Option<f64>,
    pub(crate) prefix_vs_one_replica: Option<f64>,
    /// Prefix routing's hit rate minus the ceiling's, in percentage points.
    pub(crate) prefix_hit_vs_ceiling_points: Option<f64>,
}

/// A target and whether the run met it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) value: Option<f64>,
    pub(crate) passed: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplicaReport {
    pub(crate) schema: &'static str,
    #[serde(flatten)]
    pub(crate) header: Header,
    pub(crate) settings: Recorded,
    pub(crate) cache: Option<CacheSizing>,
    pub(crate) runs: Vec<ConfigRun>,
    pub(crate) ratios: Ratios,
    pub(crate) targets: Vec<Target>,
    pub(crate) passed: bool,
    pub(crate) notes: Vec<String>,
}

/// `(num_gpu_blocks, block_size)` from an engine's `vllm:cache_config_info`.
pub(crate) fn cache_config(metrics: &str) -> Option<(u64, u64)> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let label = |name: &str| -> Option<u64> {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        line[start..].split('"').next()?.parse().ok()
    };
    Some((label("num_gpu_blocks")?, label("block_size")?))
}

/// The most tokens a request of `workload` takes (its prompt, by the
/// simulator's tokenizer, and `max_tokens`), over its first `sample`
/// requests.
pub(crate) fn longest_request(workload: &Workload, sample: usize, max_tokens: usize) -> usize {
    (0..sample)
        .map(|i| {
            let body: serde_json::Value =
                serde_json::from_slice(&workload.item(i).body).unwrap_or_default();
            let prompt = match body["messages"].as_array() {
                Some(messages) => messages
                    .iter()
                    .filter_map(|m| m["content"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => body["prompt"].as_str().unwrap_or_default().to_string(),
            };
            Tokenizer::pieces(&prompt).len() + max_tokens
        })
        .max()
        .unwrap_or(max_tokens)
}

/// The engines of a comparison: simulated ones started afresh for each
/// configuration, or real ones reused.
enum Engines {
    Simulated(sluice_sim::Profile),
    Real(Vec<Upstream>),
}

/// The engines one configuration sends to; simulated ones stop on drop.
struct Fleet {
    addrs: Vec<SocketAddr>,
    urls: Vec<String>,
    _sims: Option<SimFleet>,
}

impl Engines {
    async fn fleet(&self, n: usize) -> anyhow::Result<Fleet> {
        match self {
            Engines::Simulated(profile) => {
                let sims = SimFleet::start(profile, n).await?;
                Ok(Fleet {
                    addrs: sims.engines.iter().map(|e| e.addr).collect(),
                    urls: sims.engines.iter().map(|e| e.url.clone()).collect(),
                    _sims: Some(sims),
                })
            }
            Engines::Real(engines) => Ok(Fleet {
                addrs: engines[..n].iter().map(|e| e.addr).collect(),
                urls: engines[..n].iter().map(|e| e.url.clone()).collect(),
                _sims: None,
            }),
        }
    }
}

/// `bench compare --replicas N`: runs every configuration, prints the
/// table and the verdicts, writes the report; returns its path.
pub(crate) async fn run(settings: Settings) -> anyhow::Result<PathBuf> {
    let report = compare(&settings).await?;
    let markdown = report.markdown();
    let path = report.write(&settings.out_dir, &markdown)?;
    print!("{markdown}");
    println!("\nresults: {} (and .md)", path.display());
    Ok(path)
}

/// The number of replicas: one per `--upstream`, else `--replicas`.
fn replica_count(settings: &Settings) -> anyhow::Result<usize> {
    let given = settings.upstreams.len();
    match (settings.replica.replicas, given) {
        (Some(n), 0) => {
            anyhow::ensure!(n >= 1, "--replicas must be at least 1");
            Ok(n)
        }
        (None, 0) => Ok(1),
        (Some(n), g) if n != g => anyhow::bail!(
            "--replicas {n} with {g} --upstream: give one --upstream per replica, or none for simulated replicas"
        ),
        (_, g) => Ok(g),
    }
}

async fn compare(settings: &Settings) -> anyhow::Result<ReplicaReport> {
    let n = replica_count(settings)?;
    let args = &settings.replica;
    anyhow::ensure!(
        args.clients_per_replica >= 1,
        "--clients-per-replica must be at least 1"
    );
    anyhow::ensure!(
        args.cache_factor > 0.0 && args.cache_factor.is_finite(),
        "--cache-factor must be positive"
    );
    anyhow::ensure!(
        settings.workload.prompt_file.is_none(),
        "--replicas builds its own workload (--rubrics); --prompt-file does not apply"
    );
    let requests = settings.requests.unwrap_or(DEFAULT_REQUESTS).max(1);
    let clients = args.clients_per_replica * n;
    let mut workload_args = settings.workload.clone();
    let rubrics = *workload_args.rubrics.get_or_insert(DEFAULT_RUBRICS);
    anyhow::ensure!(rubrics >= 1, "--rubrics must be at least 1");
    workload_args
        .profile_tokens
        .get_or_insert(DEFAULT_CANDIDATE_TOKENS);
    let mut notes = Vec::new();

    let (engines, cache, engine_label, profile_name) = if settings.upstreams.is_empty() {
        let mut profile =
            sluice_sim::Profile::load(settings.profile.as_deref().unwrap_or(DEFAULT_PROFILE))?;
        let sample = workload_args.build(None)?;
        let cache = CacheSizing::of(
            profile.engine.block_size,
            &workload_args.rubric_texts(),
            longest_request(&sample, 256, workload_args.max_tokens as usize),
            n,
            args.clients_per_replica,
            args.cache_factor,
        );
        if cache.all_rubrics_fit {
            notes.push(format!(
                "each replica's cache ({} blocks) holds all {rubrics} rubrics: prefix routing has nothing to win on the cache",
                cache.num_blocks
            ));
        }
        profile.engine.num_blocks = cache.num_blocks;
        let label = format!(
            "simulated vLLM (profile {}), {n} in-process replica{}, each a KV cache of {} blocks of {} tokens (~{:.1} of {rubrics} rubrics)",
            profile.name,
            if n == 1 { "" } else { "s" },
            cache.num_blocks,
            cache.block_size,
            cache.rubrics_held,
        );
        let name = profile.name.clone();
        (Engines::Simulated(profile), Some(cache), label, Some(name))
    } else {
        let mut engines = Vec::new();
        let mut names = Vec::new();
        let rubric_tokens = workload_args
            .rubric_texts()
            .iter()
            .map(|r| Tokenizer::pieces(r).len())
            .max()
            .unwrap_or(1);
        for url in &settings.upstreams {
            let engine = external(url).await?;
            names.push(engine_name(engine.addr, url, None).await);
            let metrics = crate::client::metrics(engine.addr).await;
            if let Some((blocks, block_size)) = metrics.as_deref().and_then(cache_config) {
                let held = (blocks * block_size) as f64 / rubric_tokens as f64;
                notes.push(format!(
                    "{url} caches {blocks} blocks of {block_size} tokens: about {held:.1} rubrics (of {rubrics}) by the simulator's token count{}",
                    if held >= rubrics as f64 {
                        "; all fit, so routing cannot win on the cache (`--num-gpu-blocks-override` shrinks it)"
                    } else {
                        ""
                    }
                ));
            }
            engines.push(engine);
        }
        notes.push("engines given with --upstream keep their caches between configurations: each configuration's warm-up re-fills them".into());
        (
            Engines::Real(engines),
            None,
            format!(
                "{n} replica{}: {}",
                if n == 1 { "" } else { "s" },
                names.join(", ")
            ),
            None,
        )
    };
    eprintln!("bench compare --replicas: {engine_label}");

    let model = match &engines {
        Engines::Simulated(profile) => Some(profile.model.clone()),
        Engines::Real(engines) => model_of(engines[0].addr).await,
    };
    let workload = Arc::new(workload_args.build(model.as_deref())?);
    if let Some(offset) = workload.candidate_offset {
        eprintln!(
            "bench compare --replicas: candidate offset {offset} (repeat with --candidate-offset {offset})"
        );
    }
    let one_rubric = Arc::new(
        WorkloadArgs {
            rubrics: Some(1),
            ..workload_args.clone()
        }
        .build(model.as_deref())?,
    );
    let feed = Feed::new(Arc::clone(&workload));
    let ceiling_feed = Feed::new(one_rubric);

    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let mut plan = vec![(
        Kind::OneReplica,
        "one replica alone (sluice, one --upstream)".to_string(),
        1,
        clients,
        requests,
        &feed,
    )];
    for kind in [Kind::RoundRobin, Kind::LeastLoaded, Kind::Prefix] {
        let route = kind.route().map_or("", Route::name);
        plan.push((
            kind,
            format!("sluice --route {route} ({n} replica{})", plural(n)),
            n,
            clients,
            requests,
            &feed,
        ));
    }
    plan.push((
        Kind::Ceiling,
        "ceiling: one replica, one rubric".to_string(),
        1,
        args.clients_per_replica,
        requests.div_ceil(n),
        &ceiling_feed,
    ));

    let mut runs = Vec::new();
    for (kind, label, replicas, clients, requests, feed) in plan {
        eprintln!("bench compare --replicas: {label}, {requests} requests from {clients} clients");
        let fleet = engines.fleet(replicas).await?;
        let flags = kind
            .route()
            .map_or_else(Vec::new, |r| route_flags(r, replicas));
        let proxy = proxy::start_over(settings.proxy_mode, &fleet.addrs, &flags)
            .await
            .with_context(|| {
                format!(
                    "start the proxy for {label}{}",
                    if replicas > 1 {
                        " (it needs a proxy that takes --upstream once per replica and --route)"
                    } else {
                        ""
                    }
                )
            })?;
        let addr = proxy.addrs().0;
        if settings.warmup > 0 {
            scenario::warm_up(addr, feed, settings.warmup, clients).await;
        }
        let before = read_counters(&fleet.addrs).await;
        let sender = Sender {
            addr,
            habit: Habit::Open,
        };
        let out = scenario::batch_job(
            sender,
            feed,
            Job {
                n: requests,
                clients,
            },
        )
        .await;
        let after = read_counters(&fleet.addrs).await;
        drop(proxy);
        runs.push(ConfigRun {
            label,
            kind,
            replicas,
            rubrics: if kind == Kind::Ceiling { 1 } else { rubrics },
            clients,
            client: out.summary(),
            prefix_cache: summed_cache(&before, &after),
            per_replica: shares(&fleet.urls, &before, &after),
            balance: None,
        });
        let last = runs.last_mut().expect("just pushed");
        last.balance = balance(&last.per_replica);
    }

    let ratios = ratios(&runs);
    let targets = targets(&runs, &ratios, n);
    Ok(ReplicaReport {
        schema: SCHEMA,
        header: Header::new(engine_label, profile_name, model, &workload),
        settings: Recorded {
            replicas: n,
            rubrics,
            requests,
            clients,
            warmup: settings.warmup,
            engines: settings.upstreams.clone(),
        },
        cache,
        passed: targets.iter().all(|t| t.passed),
        runs,
        ratios,
        targets,
        notes,
    })
}

/// One engine's counters: prefix-cache (hits, queries) and requests finished.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    prefix: Option<(f64, f64)>,
    finished: Option<f64>,
}

async fn read_counters(engines: &[SocketAddr]) -> Vec<Counters> {
    let mut out = Vec::with_capacity(engines.len());
    for &engine in engines {
        let text = crate::client::metrics(engine).await;
        out.push(Counters {
            prefix: text.as_deref().and_then(prefix_counters),
            finished: text
                .as_deref()
                .and_then(|t| prom_sum(t, "vllm:request_success_total")),
        });
    }
    out
}

fn shares(urls: &[String], before: &[Counters], after: &[Counters]) -> Vec<ReplicaShare> {
    urls.iter()
        .zip(before.iter().zip(after))
        .map(|(url, (b, a))| ReplicaShare {
            url: url.clone(),
            requests: b
                .finished
                .zip(a.finished)
                .map(|(b, a)| (a - b).max(0.0).round() as u64),
            prefix_cache: b
                .prefix
                .zip(a.prefix)
                .map(|(b, a)| PrefixCache::between(b, a)),
        })
        .collect()
}

/// The prefix cache over every replica: the sums of their counter deltas.
fn summed_cache(before: &[Counters], after: &[Counters]) -> Option<PrefixCache> {
    let mut sums = ((0.0, 0.0), (0.0, 0.0));
    for (b, a) in before.iter().zip(after) {
        let (b, a) = (b.prefix?, a.prefix?);
        sums.0 = (sums.0.0 + b.0, sums.0.1 + b.1);
        sums.1 = (sums.1.0 + a.0, sums.1.1 + a.1);
    }
    Some(PrefixCache::between(sums.0, sums.1))
}

/// Busiest over least busy replica; `None` when a count is unknown or a
/// replica served none (then the ratio is unbounded).
pub(crate) fn balance(shares: &[ReplicaShare]) -> Option<f64> {
    let counts: Option<Vec<u64>> = shares.iter().map(|s| s.requests).collect();
    let counts = counts?;
    let (min, max) = (*counts.iter().min()?, *counts.iter().max()?);
    (min > 0).then(|| max as f64 / min as f64)
}

fn run_of(runs: &[ConfigRun], kind: Kind) -> Option<&ConfigRun> {
    runs.iter().find(|r| r.kind == kind)
}

fn ratios(runs: &[ConfigRun]) -> Ratios {
    let throughput = |kind| {
        run_of(runs, kind)
            .map(|r| r.client.throughput_rps)
            .filter(|t| *t > 0.0)
    };
    let hit = |kind| {
        run_of(runs, kind)
            .and_then(|r| r.prefix_cache.as_ref())
            .and_then(|p| p.hit_rate)
    };
    let prefix = throughput(Kind::Prefix);
    Ratios {
        prefix_vs_round_robin: prefix.zip(throughput(Kind::RoundRobin)).map(|(p, r)| p / r),
        prefix_vs_one_replica: prefix.zip(throughput(Kind::OneReplica)).map(|(p, o)| p / o),
        prefix_hit_vs_ceiling_points: hit(Kind::Prefix)
            .zip(hit(Kind::Ceiling))
            .map(|(p, c)| (p - c) * 100.0),
    }
}

/// Prefix routing's hit rate may be this many points under the ceiling.
pub(crate) const HIT_POINTS_BELOW_CEILING: f64 = 5.0;
/// Prefix routing's throughput over round-robin's.
pub(crate) const OVER_ROUND_ROBIN: f64 = 1.3;
/// Prefix routing's throughput over one replica's, per replica (3.5× for 4).
pub(crate) const OVER_ONE_PER_REPLICA: f64 = 3.5 / 4.0;
/// The busiest replica's requests over the least busy one's.
pub(crate) const MAX_BALANCE: f64 = 1.3;

fn targets(runs: &[ConfigRun], ratios: &Ratios, replicas: usize) -> Vec<Target> {
    let at_least = |name: String, value: Option<f64>, min: f64| Target {
        passed: value.is_some_and(|v| v >= min),
        name,
        value,
    };
    let balance = run_of(runs, Kind::Prefix).and_then(|r| r.balance);
    let over_one = OVER_ONE_PER_REPLICA * replicas as f64;
    vec![
        at_least(
            format!(
                "prefix hit rate within {HIT_POINTS_BELOW_CEILING} points of the one-rubric ceiling"
            ),
            ratios.prefix_hit_vs_ceiling_points,
            -HIT_POINTS_BELOW_CEILING,
        ),
        at_least(
            format!("prefix throughput ≥ {OVER_ROUND_ROBIN}× round-robin"),
            ratios.prefix_vs_round_robin,
            OVER_ROUND_ROBIN,
        ),
        at_least(
            format!("prefix throughput ≥ {over_one:.2}× one replica"),
            ratios.prefix_vs_one_replica,
            over_one,
        ),
        Target {
            name: format!("prefix: busiest replica ≤ {MAX_BALANCE}× the least busy"),
            passed: balance.is_some_and(|b| b <= MAX_BALANCE),
            value: balance,
        },
    ]
}

impl ReplicaReport {
    /// The table, the ratios and the verdicts.
    pub(crate) fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "engine: {}", self.header.engine);
        let _ = writeln!(s, "workload: {}", self.header.workload);
        let _ = writeln!(
            s,
            "offered load: {} requests per configuration from {} naive clients ({} per replica), after {} warm-up requests\n",
            self.settings.requests,
            self.settings.clients,
            self.settings.clients / self.settings.replicas.max(1),
            self.settings.warmup
        );
        s += "| configuration | replicas | rubrics | clients | req/s | p50 ms | p95 ms | errors | cache hit | requests per replica | busiest / least |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &self.runs {
            let c = &r.client;
            let per: Vec<String> = r
                .per_replica
                .iter()
                .map(|p| p.requests.map_or("?".into(), |n| n.to_string()))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.replicas,
                r.rubrics,
                r.clients,
                c.throughput_rps,
                ms(c.latency_ms.p50),
                ms(c.latency_ms.p95),
                c.failed,
                r.prefix_cache
                    .as_ref()
                    .and_then(|p| p.hit_rate)
                    .map_or("n/a".into(), |h| format!("{:.1}%", h * 100.0)),
                per.join(" / "),
                r.balance.map_or("–".into(), |b| format!("{b:.2}")),
            );
        }
        let ratio = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}×"));
        let _ = writeln!(
            s,
            "\nprefix vs round-robin throughput: {}",
            ratio(self.ratios.prefix_vs_round_robin)
        );
        let _ = writeln!(
            s,
            "prefix vs one replica throughput: {}",
            ratio(self.ratios.prefix_vs_one_replica)
        );
        let _ = writeln!(
            s,
            "prefix hit rate vs the one-rubric ceiling: {}\n",
            self.ratios
                .prefix_hit_vs_ceiling_points
                .map_or("n/a".into(), |p| format!("{p:+.1} points"))
        );
        for t in &self.targets {
            let _ = writeln!(
                s,
                "{} {} ({})",
                if t.passed { "PASS" } else { "FAIL" },
                t.name,
                t.value.map_or("n/a".into(), |v| format!("{v:.2}"))
            );
        }
        for note in &self.notes {
            let _ = writeln!(s, "note: {note}");
        }
        s
    }

    /// Writes `dir/replicas_YYYYMMDD_HHMMSS.json` and `.md` beside it;
    /// returns the JSON's path.
    pub(crate) fn write(&self, dir: &Path, markdown: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = fresh_path(dir, "replicas", &self.header.created_utc);
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::write(json.with_extension("md"), markdown)?;
        Ok(json)
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.1}"))
}

/// The workload a comparison sends, for tests: `settings`' with the
/// replica defaults filled in.
#[cfg(test)]
fn workload_of(settings: &WorkloadArgs) -> Workload {
    let mut w = settings.clone();
    w.rubrics.get_or_insert(DEFAULT_RUBRICS);
    w.profile_tokens.get_or_insert(DEFAULT_CANDIDATE_TOKENS);
    w.build(Some("m")).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Api;

    fn workload_args() -> WorkloadArgs {
        WorkloadArgs {
            seed: 42,
            candidates: 1_000_000_000,
            max_tokens: 8,
            rubric_tokens: 1000,
            profile_tokens: None,
            api: Api::Completions,
            stream: false,
            candidate_offset: Some(0),
            prompt_file: None,
            rubrics: None,
        }
    }

    /// The rubric a request's prompt starts with, by index in `rubrics`.
    fn rubric_of(prompt: &str, rubrics: &[Arc<str>]) -> usize {
        let found: Vec<usize> = (0..rubrics.len())
            .filter(|&k| prompt.starts_with(&*rubrics[k]))
            .collect();
        assert_eq!(found.len(), 1, "one rubric per prompt: {found:?}");
        found[0]
    }

    #[test]
    fn the_rubric_workload_has_k_distinct_shared_prefixes() {
        let args = workload_args();
        let w = workload_of(&args);
        let rubrics = WorkloadArgs {
            rubrics: Some(DEFAULT_RUBRICS),
            ..args
        }
        .rubric_texts();
        assert_eq!(rubrics.len(), DEFAULT_RUBRICS);
        // Distinct from their first block on: no two share a KV block.
        for (i, a) in rubrics.iter().enumerate() {
            let n = Tokenizer::pieces(a).len();
            assert!((1000..1100).contains(&n), "rubric {i}: {n} tokens");
            for b in &rubrics[i + 1..] {
                assert_ne!(Tokenizer::pieces(a)[..16], Tokenizer::pieces(b)[..16]);
            }
        }
        // 800 requests: every rubric used, about evenly, interleaved.
        let mut counts = vec![0usize; rubrics.len()];
        let mut picks = Vec::new();
        for i in 0..800 {
            let body: serde_json::Value = serde_json::from_slice(&w.item(i).body).unwrap();
            let prompt = body["prompt"].as_str().unwrap();
            let k = rubric_of(prompt, &rubrics);
            counts[k] += 1;
            picks.push(k);
            let candidate = Tokenizer::pieces(&prompt[rubrics[k].len()..]).len();
            assert!(
                (75..150).contains(&candidate),
                "candidate {candidate} tokens"
            );
        }
        assert!(counts.iter().all(|&c| (25..=75).contains(&c)), "{counts:?}");
        assert!(
            picks.windows(2).filter(|w| w[0] != w[1]).count() > 700,
            "interleaved"
        );
        // Seeded: the same request takes the same rubric again.
        let again = workload_of(&workload_args());
        assert_eq!(again.item(17).body, w.item(17).body);
        // One rubric: every request shares it.
        let one = WorkloadArgs {
            rubrics: Some(1),
            ..workload_args()
        };
        let only = one.rubric_texts();
        let w1 = one.build(None).unwrap();
        for i in 0..20 {
            let body: serde_json::Value = serde_json::from_slice(&w1.item(i).body).unwrap();
            assert!(body["prompt"].as_str().unwrap().starts_with(&*only[0]));
        }
    }

    #[test]
    fn each_replica_caches_its_share_of_the_rubrics_but_not_all() {
        let rubrics = WorkloadArgs {
            rubrics: Some(DEFAULT_RUBRICS),
            ..workload_args()
        }
        .rubric_texts();
        let longest = longest_request(&workload_of(&workload_args()), 256, 8);
        assert!((1080..1250).contains(&longest), "{longest}");
        let block_size = sluice_sim::Profile::load(DEFAULT_PROFILE)
            .unwrap()
            .engine
            .block_size;
        for replicas in [2, 4, 8] {
            let clients = 8;
            let c = CacheSizing::of(block_size, &rubrics, longest, replicas, clients, 1.5);
            let share = DEFAULT_RUBRICS.div_ceil(replicas);
            assert!(c.holds(share, clients), "{replicas} replicas: {c:?}");
            assert!(
                !c.holds(DEFAULT_RUBRICS, 0),
                "{replicas} replicas: all rubrics must not fit: {c:?}"
            );
            assert!(!c.all_rubrics_fit);
            // About 1.5 × K/N rubrics, besides a full batch of requests.
            let held = (c.num_blocks as usize - clients * c.private_blocks) as f64
                / c.rubric_blocks as f64;
            assert!(
                (held - 1.5 * DEFAULT_RUBRICS as f64 / replicas as f64).abs() < 0.1,
                "{held}"
            );
        }
        // One replica holds them all: nothing to route.
        let one = CacheSizing::of(block_size, &rubrics, longest, 1, 8, 1.5);
        assert!(one.all_rubrics_fit);
    }

    fn share(requests: Option<u64>) -> ReplicaShare {
        ReplicaShare {
            url: String::new(),
            requests,
            prefix_cache: None,
        }
    }

    #[test]
    fn the_cache_size_is_read_from_cache_config_info() {
        let text = "# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size=\"32\",enable_prefix_caching=\"True\",num_gpu_blocks=\"600\"} 1.0\n";
        assert_eq!(cache_config(text), Some((600, 32)));
        assert_eq!(cache_config("vllm:num_requests_running 0\n"), None);
    }

    #[test]
    fn balance_is_busiest_over_least_busy() {
        assert_eq!(balance(&[share(Some(30)), share(Some(20))]), Some(1.5));
        assert_eq!(balance(&[share(Some(30)), share(Some(0))]), None);
        assert_eq!(balance(&[share(Some(30)), share(None)]), None);
        assert_eq!(balance(&[share(Some(7))]), Some(1.0));
    }
}
