//! Fitting a profile to a real engine, and checking the fit.
//!
//! - `bench calibrate --upstream URL` measures the engine with closed-loop
//!   clients at a few concurrency levels and prompt lengths, then fits the
//!   profile's timing by simulating the same workloads in virtual time
//!   ([`simulate`]) and searching the parameters that minimise the squared
//!   log error of req/s and p50 latency. The result is written as TOML.
//! - `bench sim-vs-real --upstream URL` does the same fit (from
//!   `--profile`, the engine shape and starting point) on the medians of
//!   interleaved rounds, each with the fit workloads and the held-out ones
//!   (never used by the fit), then runs the held-out workloads against the
//!   fitted simulator served in-process over HTTP, and prints both side by
//!   side. `--no-fit` checks `--profile` as it is.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::engine::NewSeq;
use crate::profile::Profile;
use crate::timeline::Timeline;
use crate::tokenizer::Tokenizer;

/// A closed-loop workload: `concurrency` clients, `requests` in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Clients, each with one request in flight.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    /// Words of distinct text per prompt.
    pub words: usize,
    /// Whether prompts start with one shared ~400-word rubric.
    pub shared_prefix: bool,
    /// Output tokens per request (`ignore_eos`).
    pub max_tokens: usize,
    /// Which repetition of the workload this is: its prompts are new.
    pub round: usize,
}

impl Workload {
    fn label(&self) -> String {
        format!(
            "c={} {} prompt {}w max_tokens {}",
            self.concurrency,
            if self.shared_prefix {
                "shared-prefix"
            } else {
                "distinct"
            },
            self.words,
            self.max_tokens
        )
    }

    /// The text of prompt `i`.
    pub fn prompt(&self, i: usize) -> String {
        const WORDS: &[&str] = &[
            "candidate",
            "experience",
            "rust",
            "systems",
            "latency",
            "team",
            "design",
            "review",
            "shipped",
            "scaled",
            "mentored",
            "cache",
            "queue",
            "kernel",
            "network",
            "storage",
        ];
        let mut s = String::new();
        if self.shared_prefix {
            s.push_str("Rubric: score each candidate from 1 to 5 on");
            for k in 0..400 {
                s.push(' ');
                s.push_str(WORDS[k % WORDS.len()]);
            }
            s.push_str(".\n");
        }
        // The run's nonce and the workload's whole shape keep a real
        // engine's prefix cache from serving prompts an earlier run, or
        // another workload of this run, already sent (without the word
        // count, a 20-word prompt was the start of the 600-word one).
        s.push_str(&format!(
            "Candidate {:09}-{}-{}-{}-{}-{}-{i}:",
            run_nonce(),
            self.concurrency,
            self.max_tokens,
            self.words,
            u8::from(self.shared_prefix),
            self.round
        ));
        let mut x = i as u64 + 1;
        for _ in 0..self.words {
            x = crate::engine::splitmix64(x);
            s.push(' ');
            s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        }
        s
    }
}

/// Fixed for the process: different between runs, the same width always.
fn run_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
    })
}

/// What a workload measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Completed requests per second.
    pub req_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
}

fn summarise(mut lat_ms: Vec<f64>, elapsed_s: f64) -> Measurement {
    lat_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| lat_ms[((lat_ms.len() as f64 * q) as usize).min(lat_ms.len() - 1)];
    Measurement {
        req_s: lat_ms.len() as f64 / elapsed_s,
        p50_ms: pick(0.5),
        p95_ms: pick(0.95),
    }
}

/// A greedy completion of exactly `max_tokens` tokens.
fn completion_body(model: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
    serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "ignore_eos": true, "temperature": 0,
    })
}

/// Sends one completion and reads its whole response; a non-2xx status is
/// an error carrying the body.
async fn complete(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &hyper::Uri,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let req = hyper::Request::post(url.clone())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(())
}

/// Runs `w` against the OpenAI server at `base` (`http://host:port`); a
/// shared-prefix workload starts with its rubric cached (one untimed
/// request first).
pub async fn measure(base: &str, model: &str, w: &Workload) -> anyhow::Result<Measurement> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("{base}/v1/completions").parse()?;
    if w.shared_prefix {
        // The rubric is cached before the clock starts, as it is in the
        // simulation ([`simulate`]): otherwise whether an earlier workload
        // left it in the engine's cache decides the first requests' cost.
        complete(
            &client,
            &url,
            &completion_body(model, &w.prompt(w.requests), 1),
        )
        .await?;
    }
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..w.concurrency {
        let (client, url, next, w, model) = (
            client.clone(),
            url.clone(),
            next.clone(),
            *w,
            model.to_string(),
        );
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= w.requests {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let body = completion_body(&model, &w.prompt(i), w.max_tokens);
                let t = Instant::now();
                complete(&client, &url, &body).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        });
    }
    let mut all = Vec::with_capacity(w.requests);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(summarise(all, start.elapsed().as_secs_f64()))
}

/// Runs `w` on `profile`'s engine in virtual time (no HTTP, no sleeping):
/// the model the HTTP simulator follows, used to fit profiles. Like
/// [`measure`], a shared-prefix workload starts with its rubric cached.
pub fn simulate(profile: &Profile, w: &Workload) -> Measurement {
    let tok = Tokenizer::new(profile.engine.vocab_size);
    let mut tl = Timeline::new(profile);
    let mut t0 = Duration::ZERO;
    if w.shared_prefix {
        let warm = NewSeq {
            prompt: tok.encode(&w.prompt(w.requests)),
            max_tokens: 1,
            seed: 0,
        };
        tl.submit(warm, t0);
        while let Some(due) = tl.next_due() {
            t0 = due;
            tl.advance(due);
        }
    }
    let mut issued = 0;
    let mut started = std::collections::HashMap::new();
    let submit = |tl: &mut Timeline, issued: &mut usize, t: Duration| {
        let id = tl.submit(
            NewSeq {
                prompt: tok.encode(&w.prompt(*issued)),
                max_tokens: w.max_tokens,
                seed: *issued as u64,
            },
            t,
        );
        *issued += 1;
        (id, t)
    };
    for _ in 0..w.concurrency.min(w.requests) {
        let (id, t) = submit(&mut tl, &mut issued, t0);
        started.insert(id, t);
    }
    let mut t = t0;
    let mut lat = Vec::with_capacity(w.requests);
    while let Some(due) = tl.next_due() {
        t = due;
        for ev in tl.advance(t) {
            if ev.finished.is_some() {
                let start = started.remove(&ev.id).unwrap_or_default();
                lat.push((t - start).as_secs_f64() * 1e3);
                if issued < w.requests {
                    let (id, t) = submit(&mut tl, &mut issued, t);
                    started.insert(id, t);
                }
            }
        }
    }
    summarise(lat, (t - t0).as_secs_f64().max(1e-9))
}

/// `k` requests scaled by `scale`, at least 5.
fn scaled(k: usize, scale: f64) -> usize {
    ((k as f64 * scale) as usize).max(5)
}

/// The workloads `bench calibrate` and `bench sim-vs-real` fit on:
/// concurrency 1 (short prompts with 16 and 1 output tokens, long prompts
/// with 16 and 1, and 16 tokens after the cached rubric) and concurrency 50
/// (short and long prompts, and short ones after the cached rubric). Long
/// prompts with one output token pin the prefill cost. Decoding after the
/// cached rubric pins the cost of attending to context, which long prompts
/// alone left loose (their prefill dwarfs it): alone at concurrency 1, and
/// fifty at once, which is what decides ten at once (the held-out
/// shared-prefix workload). With concurrency 1 alone the fitted context
/// cost ranged tenfold between data sets.
pub fn fit_workloads(scale: f64) -> Vec<Workload> {
    let n = |k: usize| scaled(k, scale);
    vec![
        Workload {
            concurrency: 1,
            requests: n(40),
            words: 20,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 1,
            requests: n(40),
            words: 20,
            shared_prefix: false,
            max_tokens: 1,
            round: 0,
        },
        Workload {
            concurrency: 1,
            requests: n(20),
            words: 600,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 1,
            requests: n(20),
            words: 600,
            shared_prefix: false,
            max_tokens: 1,
            round: 0,
        },
        Workload {
            concurrency: 50,
            requests: n(300),
            words: 20,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 1,
            requests: n(30),
            words: 20,
            shared_prefix: true,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 50,
            requests: n(100),
            words: 600,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 50,
            requests: n(200),
            words: 20,
            shared_prefix: true,
            max_tokens: 16,
            round: 0,
        },
    ]
}

/// The held-out workloads `bench sim-vs-real` predicts: concurrency 10,
/// and a shared-prefix workload.
pub fn held_out_workloads(scale: f64) -> Vec<Workload> {
    let n = |k: usize| scaled(k, scale);
    vec![
        Workload {
            concurrency: 10,
            requests: n(200),
            words: 20,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        },
        Workload {
            concurrency: 10,
            requests: n(200),
            words: 20,
            shared_prefix: true,
            max_tokens: 16,
            round: 0,
        },
    ]
}

/// Held-out points beyond the target (`--extra-points`): distinct prompts
/// at concurrency 2, 5 and 20, the shared prefix at 5.
pub fn extra_held_out_workloads(scale: f64) -> Vec<Workload> {
    let n = |k: usize| scaled(k, scale);
    let [distinct, shared] = held_out_workloads(scale)[..] else {
        unreachable!("two held-out workloads")
    };
    let mut out: Vec<_> = [(2, 80), (5, 200), (20, 200)]
        .into_iter()
        .map(|(concurrency, requests)| Workload {
            concurrency,
            requests: n(requests),
            ..distinct
        })
        .collect();
    out.push(Workload {
        concurrency: 5,
        ..shared
    });
    out
}

fn loss(p: &Profile, points: &[(Workload, Measurement)]) -> f64 {
    points
        .iter()
        .map(|(w, real)| {
            let sim = simulate(p, w);
            (sim.req_s / real.req_s).ln().powi(2) + (sim.p50_ms / real.p50_ms).ln().powi(2)
        })
        .sum()
}

/// Fits `base`'s timing to `points` (see [`crate::profile::fit`]).
pub fn fit(base: &Profile, points: &[(Workload, Measurement)]) -> (Profile, f64) {
    let knobs: [crate::profile::Knob; 7] = [
        |t| &mut t.step_base_ms,
        |t| &mut t.decode_seq_ms,
        |t| &mut t.prefill_token_ms,
        |t| &mut t.context_token_ms,
        |t| &mut t.request_overhead_ms,
        |t| &mut t.api_in_ms,
        |t| &mut t.api_out_ms,
    ];
    let search = crate::profile::Search {
        min_factor: 1.01,
        max_rounds: 40,
        min_gain: 1e-3,
    };
    crate::profile::fit(base, &knobs, search, |p| loss(p, points))
}

/// `bench calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// The real engine, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "SLUICE_VLLM_URL")]
    pub upstream: String,
    /// Its served model name.
    #[arg(long, default_value = "tiny-llama")]
    pub model: String,
    /// Starting point and engine shape (built-in name or TOML path).
    #[arg(long, default_value = "vllm-cpu-tiny")]
    pub profile: String,
    /// Name of the fitted profile.
    #[arg(long, default_value = "calibrated")]
    pub name: String,
    /// Where to write the fitted profile.
    #[arg(long, default_value = "calibrated.toml")]
    pub out: std::path::PathBuf,
    /// Scales the request counts (1.0 ≈ 30 s against the CPU vLLM).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
}

/// One measurement as a progress line.
fn measured(w: &Workload, m: &Measurement) -> String {
    format!(
        "{:<48} {:>8.1} req/s  p50 {:>8.1} ms  p95 {:>8.1} ms",
        w.label(),
        m.req_s,
        m.p50_ms,
        m.p95_ms
    )
}

/// Measures, fits and writes a profile.
pub async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let base = Profile::load(&args.profile)?;
    let mut points = Vec::new();
    warm_up(&args.upstream, &args.model).await?;
    for w in fit_workloads(args.scale) {
        let m = measure(&args.upstream, &args.model, &w).await?;
        eprintln!("real  {}", measured(&w, &m));
        points.push((w, m));
    }
    let (mut fitted, l) = fit(&base, &points);
    fitted.name = args.name.clone();
    fitted.description = format!(
        "fitted by `bench calibrate` against {} on {:?}: {}",
        args.upstream,
        points.iter().map(|(w, _)| w.label()).collect::<Vec<_>>(),
        points
            .iter()
            .map(|(w, m)| {
                let s = simulate(&fitted, w);
                format!(
                    "{}: real {:.1} req/s p50 {:.1} ms, sim {:.1} req/s p50 {:.1} ms",
                    w.label(),
                    m.req_s,
                    m.p50_ms,
                    s.req_s,
                    s.p50_ms
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    eprintln!("fit loss {l:.4}; timing {:?}", fitted.timing);
    std::fs::write(&args.out, fitted.to_toml())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `bench sim-vs-real`.
#[derive(Debug, clap::Args)]
pub struct VersusArgs {
    /// The real engine, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "SLUICE_VLLM_URL")]
    pub upstream: String,
    /// Its served model name.
    #[arg(long, default_value = "tiny-llama")]
    pub model: String,
    /// The engine shape, and the fit's starting point (built-in name or
    /// TOML path); with `--no-fit`, the profile checked as it is.
    #[arg(long, default_value = "vllm-cpu-tiny")]
    pub profile: String,
    /// Check `--profile` as it is instead of fitting it in this run.
    #[arg(long)]
    pub no_fit: bool,
    /// Write the profile fitted in this run here (TOML).
    #[arg(long, conflicts_with = "no_fit")]
    pub out: Option<std::path::PathBuf>,
    /// Scales the request counts.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Rounds on the real engine. Each round runs every fit workload and
    /// every held-out one, with new prompts, so a machine that speeds up or
    /// slows down during the run moves both alike; the fit and the
    /// comparison use each workload's median over the rounds.
    #[arg(long, alias = "rounds", default_value_t = 3)]
    pub repeats: usize,
    /// Also predict distinct prompts at concurrency 2, 5 and 20 and the
    /// shared prefix at 5: more of the curve the two fitted
    /// concurrencies span, reported apart from the target (about 10 s more
    /// per round).
    #[arg(long)]
    pub extra_points: bool,
}

/// The median and range of a few measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// Over the finite values (NaN throughout when there are none).
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let extreme =
            |pick: fn(f64, f64) -> f64| v.iter().copied().reduce(pick).unwrap_or(f64::NAN);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Self {
            median,
            min: extreme(f64::min),
            max: extreme(f64::max),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} ({:.1}–{:.1})", self.median, self.min, self.max)
    }
}

/// One workload's rounds on the real engine.
#[derive(Debug, Clone)]
struct Rounds {
    workload: Workload,
    runs: Vec<Measurement>,
}

impl Rounds {
    fn req_s(&self) -> Spread {
        Spread::of(self.runs.iter().map(|m| m.req_s))
    }

    fn p50(&self) -> Spread {
        Spread::of(self.runs.iter().map(|m| m.p50_ms))
    }

    /// The point a fit sees: the median of each figure.
    fn median(&self) -> Measurement {
        Measurement {
            req_s: self.req_s().median,
            p50_ms: self.p50().median,
            p95_ms: Spread::of(self.runs.iter().map(|m| m.p95_ms)).median,
        }
    }
}

/// The signed difference of `sim` from `real`, in percent.
fn delta(sim: f64, real: f64) -> f64 {
    100.0 * (sim - real) / real
}

/// A warm-up: a few requests, batches of up to 50 short prompts, and long
/// prompts (first requests, and the first of a shape, pay one-off costs).
async fn warm_up(base: &str, model: &str) -> anyhow::Result<()> {
    for (concurrency, words) in [(4, 20), (50, 20), (8, 600)] {
        let w = Workload {
            concurrency,
            requests: concurrency * 2,
            words,
            shared_prefix: false,
            max_tokens: 4,
            round: usize::MAX,
        };
        measure(base, model, &w)
            .await
            .context("warm-up request failed")?;
    }
    Ok(())
}

/// Fits a profile on the fit workloads and predicts the held-out ones,
/// both measured in the same interleaved rounds, and prints the comparison.
pub async fn versus(args: VersusArgs) -> anyhow::Result<()> {
    let base = Profile::load(&args.profile)?;
    warm_up(&args.upstream, &args.model).await?;
    let rounds_of = |ws: Vec<Workload>| {
        ws.into_iter()
            .map(|workload| Rounds {
                workload,
                runs: Vec::new(),
            })
            .collect::<Vec<_>>()
    };
    let mut fitted_on = rounds_of(if args.no_fit {
        Vec::new()
    } else {
        fit_workloads(args.scale)
    });
    let targets = held_out_workloads(args.scale);
    let target_count = targets.len();
    let mut held_out = rounds_of(targets);
    if args.extra_points {
        held_out.extend(rounds_of(extra_held_out_workloads(args.scale)));
    }
    let repeats = args.repeats.max(1);
    for round in 0..repeats {
        eprintln!("round {} of {repeats} on the real engine", round + 1);
        for r in fitted_on.iter_mut().chain(held_out.iter_mut()) {
            let w = Workload {
                round,
                ..r.workload
            };
            let m = measure(&args.upstream, &args.model, &w).await?;
            eprintln!("  {}", measured(&w, &m));
            r.runs.push(m);
        }
    }
    let profile = if args.no_fit {
        base
    } else {
        let points: Vec<_> = fitted_on.iter().map(|r| (r.workload, r.median())).collect();
        let (mut fitted, l) = fit(&base, &points);
        fitted.description = format!(
            "fitted by `bench sim-vs-real` against {} (median of {repeats} rounds)",
            args.upstream
        );
        println!(
            "fitted {} in this run on the real engine's medians (fit loss {l:.4}):",
            base.name
        );
        println!(
            "| fit workload | real req/s (median, range) | fit req/s | Δ | real p50 ms (median, range) | fit p50 ms | Δ |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &fitted_on {
            let s = simulate(&fitted, &r.workload);
            let (req_s, p50) = (r.req_s(), r.p50());
            println!(
                "| {} | {req_s} | {:.1} | {:+.1}% | {p50} | {:.1} | {:+.1}% |",
                r.workload.label(),
                s.req_s,
                delta(s.req_s, req_s.median),
                s.p50_ms,
                delta(s.p50_ms, p50.median)
            );
        }
        println!("timing: {:?}", fitted.timing);
        if let Some(out) = &args.out {
            std::fs::write(out, fitted.to_toml())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        println!();
        fitted
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, profile.clone(), async {
        let _ = stopped.await;
    }));
    println!(
        "held out: simulated vLLM (profile {}{}, served over HTTP) vs real vLLM at {}",
        profile.name,
        if args.no_fit { "" } else { ", fitted above" },
        args.upstream
    );
    println!(
        "the real engine ran each workload {repeats} times (new prompts each time){}; Δ is the simulator against the real median",
        if args.no_fit {
            ""
        } else {
            ", interleaved with the fit workloads"
        }
    );
    println!(
        "| held-out workload | real req/s (median, range) | sim req/s | Δ | real p50 ms (median, range) | sim p50 ms | Δ |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (mut within, mut extra_within) = (0, 0);
    for (k, r) in held_out.iter().enumerate() {
        let sim = measure(&sim_url, &profile.model, &r.workload).await?;
        let (req_s, p50) = (r.req_s(), r.p50());
        let (d_req_s, d_p50) = (
            delta(sim.req_s, req_s.median),
            delta(sim.p50_ms, p50.median),
        );
        let close = usize::from(d_req_s.abs() <= 15.0) + usize::from(d_p50.abs() <= 15.0);
        if k < target_count {
            within += close;
        } else {
            extra_within += close;
        }
        println!(
            "| {} | {req_s} | {:.1} | {d_req_s:+.1}% | {p50} | {:.1} | {d_p50:+.1}% |",
            r.workload.label(),
            sim.req_s,
            sim.p50_ms,
        );
    }
    println!(
        "{within} of {} held-out comparisons within 15% (target: all)",
        2 * target_count
    );
    if held_out.len() > target_count {
        println!(
            "extra points (outside the target): {extra_within} of {} within 15%",
            2 * (held_out.len() - target_count)
        );
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median_and_range() {
        let s = Spread::of([70.9, 56.1, 74.4].into_iter());
        assert_eq!((s.median, s.min, s.max), (70.9, 56.1, 74.4));
        assert_eq!(Spread::of([2.0, 1.0].into_iter()).median, 1.5);
        assert_eq!(s.to_string(), "70.9 (56.1–74.4)");
    }

    #[test]
    fn every_round_and_workload_sends_new_prompts() {
        let w = held_out_workloads(1.0)[0];
        let again = Workload { round: 1, ..w };
        let other = Workload { max_tokens: 1, ..w };
        assert_ne!(w.prompt(0), again.prompt(0));
        assert_ne!(w.prompt(0), other.prompt(0));
        assert_eq!(w.prompt(3), w.prompt(3));
        // No workload's prompt starts like another's (after the rubric):
        // an engine's prefix cache would serve one from the other.
        let all: Vec<Workload> = fit_workloads(1.0)
            .into_iter()
            .chain(held_out_workloads(1.0))
            .collect();
        let head = |w: &Workload| {
            let p = w.prompt(0);
            let own = p.split_once(".\n").map_or(p.as_str(), |(_, rest)| rest);
            own.chars().take(40).collect::<String>()
        };
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(head(a), head(b), "{a:?} and {b:?}");
            }
        }
    }

    #[test]
    fn virtual_time_simulation_shows_batching_tradeoff() {
        let p = Profile::load("vllm-cpu-tiny").unwrap();
        let w = |c| Workload {
            concurrency: c,
            requests: 100,
            words: 20,
            shared_prefix: false,
            max_tokens: 16,
            round: 0,
        };
        let one = simulate(&p, &w(1));
        let fifty = simulate(&p, &w(50));
        assert!(fifty.req_s > 2.0 * one.req_s, "{one:?} {fifty:?}");
        assert!(fifty.p50_ms > one.p50_ms, "{one:?} {fifty:?}");
    }

    #[test]
    fn fitting_recovers_a_known_profile() {
        let mut truth = Profile::load("vllm-cpu-tiny").unwrap();
        truth.timing.step_base_ms = 3.0;
        truth.timing.decode_seq_ms = 0.5;
        truth.timing.context_token_ms *= 4.0;
        // Short prompts only, to keep the test fast.
        let points: Vec<_> = fit_workloads(0.3)
            .into_iter()
            .filter(|w| w.words < 100)
            .map(|w| (w, simulate(&truth, &w)))
            .collect();
        let (fitted, l) = fit(&Profile::load("vllm-cpu-tiny").unwrap(), &points);
        assert!(l < 0.01, "loss {l}");
        // The truth's context cost differs too, and the rubric workloads
        // have to recover it: the held-out shared prefix is checked as
        // well as the distinct prompts.
        for w in held_out_workloads(0.3) {
            let (a, b) = (simulate(&truth, &w), simulate(&fitted, &w));
            assert!((a.req_s / b.req_s - 1.0).abs() < 0.1, "{a:?} {b:?}");
        }
    }
}
