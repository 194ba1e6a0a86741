//! The reference GPU benchmark and the simulator's fit to it.
//!
//! The reference (RTX 4080, 5,000 requests of the candidate-evaluation
//! workload) measured two client habits: waves of 50 sent together, each
//! awaited whole, and a semaphore of 10. [`simulate`] runs either habit
//! against a profile in virtual time (the [`Timeline`] with the clients'
//! own logic, no HTTP and no sleeping), which is the ground truth the
//! `rtx4080` profile is fitted on; [`fit`] searches the profile's timing
//! that best reproduces [`REFERENCE`]. `bench sim-vs-reference` prints both
//! side by side, plus the same runs over HTTP against the served simulator.

use std::collections::HashMap;
use std::time::Duration;

use crate::engine::NewSeq;
use crate::profile::Profile;
use crate::timeline::Timeline;

/// How the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// Waves of this many sent together; the next leaves when all returned.
    Waves(usize),
    /// At most this many in flight.
    Semaphore(usize),
}

impl Clients {
    /// A short label.
    pub fn label(&self) -> String {
        match self {
            Self::Waves(n) => format!("waves of {n}"),
            Self::Semaphore(n) => format!("semaphore of {n}"),
        }
    }
}

/// Throughput and latency of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Requests per second.
    pub req_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
}

/// Requests in the reference benchmark's runs.
pub const REFERENCE_REQUESTS: usize = 5_000;

/// The reference benchmark's results (RTX 4080).
pub const REFERENCE: [(Clients, Point); 2] = [
    (
        Clients::Waves(50),
        Point {
            req_s: 4_292.0,
            p50_ms: 9.05,
            p95_ms: 10.38,
        },
    ),
    (
        Clients::Semaphore(10),
        Point {
            req_s: 3_687.0,
            p50_ms: 2.56,
            p95_ms: 2.79,
        },
    ),
];

/// Runs `requests` requests from `clients` against `profile` in virtual
/// time. Request `i` sends `prompts[i % prompts.len()]` with `max_tokens`
/// output tokens; a request's latency runs from its send (a wave's start
/// for waves) to its response.
pub fn simulate(
    profile: &Profile,
    clients: Clients,
    requests: usize,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Point {
    assert!(!prompts.is_empty(), "no prompts");
    let mut tl = Timeline::new(profile);
    let mut origin: HashMap<u64, Duration> = HashMap::new();
    let mut sent = 0usize;
    let send = |tl: &mut Timeline, sent: &mut usize, at: Duration, origin: &mut HashMap<_, _>| {
        let i = *sent;
        let id = tl.submit(
            NewSeq {
                prompt: prompts[i % prompts.len()].clone(),
                max_tokens,
                seed: i as u64,
            },
            at,
        );
        origin.insert(id, at);
        *sent += 1;
    };
    let width = match clients {
        Clients::Waves(n) | Clients::Semaphore(n) => n.max(1),
    };
    for _ in 0..width.min(requests) {
        send(&mut tl, &mut sent, Duration::ZERO, &mut origin);
    }
    let mut lat = Vec::with_capacity(requests);
    let mut t = Duration::ZERO;
    while let Some(due) = tl.next_due() {
        t = due;
        for ev in tl.advance(t) {
            if ev.finished.is_none() {
                continue;
            }
            let from = origin.remove(&ev.id).expect("sent requests have an origin");
            lat.push((t - from).as_secs_f64() * 1e3);
            let more = match clients {
                Clients::Semaphore(_) => 1,
                Clients::Waves(_) if origin.is_empty() => width,
                Clients::Waves(_) => 0,
            };
            for _ in 0..more.min(requests - sent) {
                send(&mut tl, &mut sent, t, &mut origin);
            }
        }
    }
    point(&mut lat, t.as_secs_f64())
}

/// Throughput and percentiles of `latencies_ms` over `elapsed_s`.
pub fn point(latencies_ms: &mut [f64], elapsed_s: f64) -> Point {
    latencies_ms.sort_by(f64::total_cmp);
    let q = |q: f64| {
        if latencies_ms.is_empty() {
            return 0.0;
        }
        let i = ((latencies_ms.len() as f64 * q).ceil() as usize).clamp(1, latencies_ms.len());
        latencies_ms[i - 1]
    };
    Point {
        req_s: latencies_ms.len() as f64 / elapsed_s.max(1e-9),
        p50_ms: q(0.5),
        p95_ms: q(0.95),
    }
}

/// `100 × (sim − reference) / reference`.
pub fn error_pct(sim: f64, reference: f64) -> f64 {
    100.0 * (sim - reference) / reference
}

fn loss(p: &Profile, requests: usize, prompts: &[Vec<u32>], max_tokens: usize) -> f64 {
    REFERENCE
        .iter()
        .map(|(clients, r)| {
            let s = simulate(p, *clients, requests, prompts, max_tokens);
            (s.req_s / r.req_s).ln().powi(2)
                + (s.p50_ms / r.p50_ms).ln().powi(2)
                + (s.p95_ms / r.p95_ms).ln().powi(2)
        })
        .sum()
}

/// Fits `base`'s timing (step base, per prefill token, per decoding
/// sequence, API server in and out, plain overhead) to [`REFERENCE`] by a
/// multiplicative coordinate search on the squared log errors of req/s,
/// p50 and p95 in both client modes. Returns the profile and its loss.
pub fn fit(
    base: &Profile,
    requests: usize,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> (Profile, f64) {
    let knobs: [crate::profile::Knob; 6] = [
        |t| &mut t.step_base_ms,
        |t| &mut t.prefill_token_ms,
        |t| &mut t.decode_seq_ms,
        |t| &mut t.api_in_ms,
        |t| &mut t.api_out_ms,
        |t| &mut t.request_overhead_ms,
    ];
    let search = crate::profile::Search {
        min_factor: 1.005,
        max_rounds: 60,
        min_gain: 1e-4,
    };
    crate::profile::fit(base, &knobs, search, |p| {
        loss(p, requests, prompts, max_tokens)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts shaped like the candidate-evaluation workload: a shared
    /// 1,000-token rubric, then 200 distinct tokens.
    fn prompts(n: usize) -> Vec<Vec<u32>> {
        (0..n as u32)
            .map(|i| {
                let mut p: Vec<u32> = (0..1000).collect();
                p.extend((0..200).map(|k| 10_000 + i * 1000 + k));
                p
            })
            .collect()
    }

    #[test]
    fn waves_trade_latency_for_throughput_as_the_reference_does() {
        let p = Profile::load("rtx4080").unwrap();
        let prompts = prompts(200);
        let waves = simulate(&p, Clients::Waves(50), 500, &prompts, 8);
        let sem = simulate(&p, Clients::Semaphore(10), 500, &prompts, 8);
        assert!(waves.req_s > sem.req_s, "{waves:?} {sem:?}");
        assert!(waves.p50_ms > 2.0 * sem.p50_ms, "{waves:?} {sem:?}");
    }

    #[test]
    fn the_rtx4080_profile_stays_within_15_percent_of_the_reference() {
        // Guards the fit against changes to the engine model. The bench's
        // own workload is checked by `bench sim-vs-reference`; these
        // prompts only share its shape.
        let p = Profile::load("rtx4080").unwrap();
        let prompts = prompts(2000);
        for (clients, want) in REFERENCE {
            let got = simulate(&p, clients, 2000, &prompts, 8);
            for (name, g, w) in [
                ("req/s", got.req_s, want.req_s),
                ("p50", got.p50_ms, want.p50_ms),
                ("p95", got.p95_ms, want.p95_ms),
            ] {
                let err = error_pct(g, w);
                assert!(
                    err.abs() < 15.0,
                    "{} {name}: {err:+.1}% ({got:?})",
                    clients.label()
                );
            }
        }
    }

    #[test]
    fn a_semaphore_of_one_measures_one_requests_latency() {
        let mut p = Profile::load("vllm-cpu-tiny").unwrap();
        p.engine.block_size = 4;
        let t = &mut p.timing;
        (t.step_base_ms, t.prefill_token_ms, t.decode_seq_ms) = (1.0, 0.0, 0.0);
        (t.context_token_ms, t.jitter) = (0.0, 0.0);
        (t.api_in_ms, t.api_out_ms, t.request_overhead_ms) = (0.5, 0.25, 0.25);
        t.api_slowdown = 0.0;
        // 4 output tokens = 4 steps of 1 ms, plus 1 ms around the engine.
        let one = simulate(&p, Clients::Semaphore(1), 10, &[vec![1, 2, 3]], 4);
        assert!((one.p50_ms - 5.0).abs() < 1e-9, "{one:?}");
        assert!((one.req_s - 200.0).abs() < 1e-6, "{one:?}");
        // A wave of 4 enters the engine 0.5 ms apart (0.75, 1.25, 1.75,
        // 2.25 ms) and joins the running batch step by step; the last
        // finishes its 4th step at 6.75 ms and is written by 7 ms.
        let wave = simulate(&p, Clients::Waves(4), 4, &[vec![1, 2, 3]], 4);
        assert!((wave.req_s - 4.0 / 7.0e-3).abs() < 1e-6, "{wave:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut lat: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = point(&mut lat, 2.0);
        assert_eq!((p.req_s, p.p50_ms, p.p95_ms), (50.0, 50.0, 95.0));
    }
}
