//! The step loop: runs the [`Engine`] in (tokio) time and delivers tokens
//! to the requests waiting for them.
//!
//! One task owns the loop: schedule a batch, sleep the profile's step time,
//! complete the batch, send each sampled token to its request's channel.
//! Requests submit and abort through a [`Sim`] handle; the engine sits
//! behind a mutex held only for those short, non-async calls. Under
//! `tokio::time::pause` the loop runs in virtual time, so tests see exact
//! step timings.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::engine::{Engine, NewSeq, SeqId, TokenEvent};
use super::metrics;
use super::profile::{Profile, StepClock};

/// A running simulated engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sim {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    profile: Profile,
    start: Instant,
    state: Mutex<State>,
    /// Wakes the step loop when work arrives while it is idle.
    wake: Notify,
}

#[derive(Debug)]
struct State {
    engine: Engine,
    /// Where each live sequence's tokens go.
    streams: HashMap<SeqId, mpsc::UnboundedSender<TokenEvent>>,
}

/// A submitted request: its tokens arrive on `tokens`; dropping it before
/// the last token aborts the sequence (a client disconnect).
#[derive(Debug)]
pub struct Submission {
    /// The engine's id for it.
    pub id: SeqId,
    /// Sampled tokens, in order; the last has `finished` set.
    pub tokens: mpsc::UnboundedReceiver<TokenEvent>,
    guard: AbortOnDrop,
}

impl Submission {
    /// Marks the sequence finished so dropping this aborts nothing.
    pub fn disarm(&mut self) {
        self.guard.armed = false;
    }
}

#[derive(Debug)]
struct AbortOnDrop {
    sim: Sim,
    id: SeqId,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.sim.abort(self.id);
        }
    }
}

impl Sim {
    /// An idle engine for `profile`; call [`Sim::run`] to drive it.
    pub fn new(profile: Profile) -> Self {
        let engine = Engine::new(profile.engine_config());
        Self {
            shared: Arc::new(Shared {
                profile,
                start: Instant::now(),
                state: Mutex::new(State {
                    engine,
                    streams: HashMap::new(),
                }),
                wake: Notify::new(),
            }),
        }
    }

    /// The profile it runs.
    pub fn profile(&self) -> &Profile {
        &self.shared.profile
    }

    fn now(&self) -> Duration {
        self.shared.start.elapsed()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a request.
    pub fn submit(&self, req: NewSeq) -> Submission {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut st = self.state();
            let id = st.engine.add(req, self.now());
            st.streams.insert(id, tx);
            id
        };
        self.shared.wake.notify_one();
        Submission {
            id,
            tokens: rx,
            guard: AbortOnDrop {
                sim: self.clone(),
                id,
                armed: true,
            },
        }
    }

    /// Aborts a sequence (no-op once finished).
    pub fn abort(&self, id: SeqId) {
        let mut st = self.state();
        st.streams.remove(&id);
        st.engine.abort(id);
    }

    /// Runs `f` on the engine (for inspection).
    pub fn with_engine<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(&self.state().engine)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        let st = self.state();
        metrics::render(
            &self.shared.profile.model,
            st.engine.stats(),
            st.engine.gauges(),
        )
    }

    /// The step loop, until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut clock = StepClock::new(self.shared.profile.timing.clone());
        tokio::pin!(shutdown);
        loop {
            let batch = self.state().engine.schedule(self.now());
            let Some(batch) = batch else {
                tokio::select! {
                    () = self.shared.wake.notified() => continue,
                    () = &mut shutdown => return,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(clock.step(&batch)) => {}
                () = &mut shutdown => return,
            }
            let now = self.now();
            let mut st = self.state();
            let events = st.engine.complete(&batch, now);
            for ev in events {
                let (id, finished) = (ev.id, ev.finished.is_some());
                let delivered = st.streams.get(&id).is_some_and(|tx| tx.send(ev).is_ok());
                if finished || !delivered {
                    st.streams.remove(&id);
                }
                if !delivered && !finished {
                    st.engine.abort(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        let mut p = Profile::load("vllm-cpu-tiny").unwrap();
        p.engine.block_size = 4;
        p.timing.step_base_ms = 10.0;
        p.timing.prefill_token_ms = 1.0;
        p.timing.decode_seq_ms = 0.0;
        p.timing.context_token_ms = 0.0;
        p.timing.jitter = 0.0;
        p
    }

    fn seq(len: u32, max_tokens: usize) -> NewSeq {
        NewSeq {
            prompt: (0..len).collect(),
            max_tokens,
            seed: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_arrive_at_the_profiles_step_times() {
        let sim = Sim::new(profile());
        tokio::spawn(sim.clone().run(std::future::pending()));
        let t0 = Instant::now();
        let mut sub = sim.submit(seq(10, 3));
        // Prefill: 10 + 10 × 1 ms; then two decode steps of 10 ms.
        let mut at = Vec::new();
        while let Some(ev) = sub.tokens.recv().await {
            at.push(t0.elapsed().as_millis());
            if ev.finished.is_some() {
                break;
            }
        }
        assert_eq!(at, vec![20, 30, 40]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_identical_prompt_prefills_less() {
        let sim = Sim::new(profile());
        tokio::spawn(sim.clone().run(std::future::pending()));
        for expect_cached in [0, 8] {
            let t0 = Instant::now();
            let mut sub = sim.submit(seq(10, 1));
            let ev = sub.tokens.recv().await.unwrap();
            assert_eq!(ev.cached_tokens, expect_cached);
            assert_eq!(
                t0.elapsed().as_millis(),
                10 + 10 - expect_cached as u128,
                "prefill time covers only the uncached tokens"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_submission_aborts_its_sequence() {
        let sim = Sim::new(profile());
        tokio::spawn(sim.clone().run(std::future::pending()));
        let mut sub = sim.submit(seq(10, 1000));
        sub.tokens.recv().await.unwrap();
        assert_eq!(sim.with_engine(|e| e.running().len()), 1);
        drop(sub);
        assert_eq!(sim.with_engine(|e| e.running().len()), 0);
        assert!(sim.metrics_text().contains(
            "vllm:request_success_total{engine=\"0\",finished_reason=\"abort\",model_name=\"tiny-llama\"} 1.0"
        ));
        assert_eq!(sim.with_engine(|e| e.kv().usage()), 0.0);
    }
}
