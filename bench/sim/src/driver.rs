//! The step loop: runs a [`Timeline`] in real time and delivers tokens to
//! the requests waiting for them.
//!
//! [`Sim::run`] drives it from a dedicated thread that sleeps until the
//! next event: tokio's timer ticks in whole milliseconds, too coarse for
//! sub-millisecond GPU steps. [`Sim::run_on_tokio_timer`] drives it from a
//! task instead, so tests under `tokio::time::pause` see exact virtual
//! step times (whole milliseconds). Requests submit and abort through a
//! [`Sim`] handle; the timeline sits behind a mutex held only for short,
//! non-async calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::engine::{Engine, NewSeq, SeqId, TokenEvent};
use crate::metrics;
use crate::profile::Profile;
use crate::timeline::Timeline;

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
    /// Wakes a task-driven loop when work arrives.
    wake: Notify,
    /// Wakes a thread-driven loop when work arrives or on shutdown.
    wake_thread: Condvar,
    /// Tells a thread-driven loop to stop.
    stop: AtomicBool,
}

#[derive(Debug)]
struct State {
    timeline: Timeline,
    /// Where each live sequence's tokens go.
    streams: HashMap<SeqId, mpsc::UnboundedSender<TokenEvent>>,
}

impl State {
    /// Processes what is due at `now` and hands the tokens out.
    fn advance(&mut self, now: Duration) {
        for ev in self.timeline.advance(now) {
            let (id, finished) = (ev.id, ev.finished.is_some());
            let delivered = self.streams.get(&id).is_some_and(|tx| tx.send(ev).is_ok());
            if finished || !delivered {
                self.streams.remove(&id);
            }
            if !delivered && !finished {
                self.timeline.abort(id);
            }
        }
    }
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
        let timeline = Timeline::new(&profile);
        Self {
            shared: Arc::new(Shared {
                profile,
                start: Instant::now(),
                state: Mutex::new(State {
                    timeline,
                    streams: HashMap::new(),
                }),
                wake: Notify::new(),
                wake_thread: Condvar::new(),
                stop: AtomicBool::new(false),
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
            // What is already due first, so the request meets the engine
            // as it is now (a step that has ended is not still running).
            let now = self.now();
            st.advance(now);
            let id = st.timeline.submit(req, now);
            st.streams.insert(id, tx);
            id
        };
        self.shared.wake.notify_one();
        self.shared.wake_thread.notify_one();
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
        st.timeline.abort(id);
    }

    /// Runs `f` on the engine (for inspection).
    pub fn with_engine<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(self.state().timeline.engine())
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        let st = self.state();
        let engine = st.timeline.engine();
        metrics::render(&self.shared.profile.model, engine.stats(), engine.gauges())
    }

    /// Drives the engine in real time from a dedicated thread, until
    /// `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let sim = self.clone();
        let thread = std::thread::Builder::new()
            .name("sim-engine".into())
            .spawn(move || sim.thread_loop());
        if let Err(e) = thread {
            // No thread to be had: the millisecond timer still works.
            eprintln!("sim: no engine thread ({e}); stepping on tokio's timer");
            return self.run_on_tokio_timer(shutdown).await;
        }
        shutdown.await;
        self.shared.stop.store(true, Ordering::Release);
        let _guard = self.state();
        self.shared.wake_thread.notify_all();
    }

    fn thread_loop(&self) {
        let mut st = self.state();
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let now = self.now();
            st.advance(now);
            st = match st.timeline.next_due() {
                None => self
                    .shared
                    .wake_thread
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(due) => {
                    let wait = due.saturating_sub(self.now());
                    self.shared
                        .wake_thread
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Drives the engine from this task on tokio's timer (whole
    /// milliseconds; exact under `tokio::time::pause`), until `shutdown`
    /// completes.
    pub async fn run_on_tokio_timer(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let due = {
                let mut st = self.state();
                st.advance(self.now());
                st.timeline.next_due()
            };
            match due {
                None => tokio::select! {
                    () = self.shared.wake.notified() => {}
                    () = &mut shutdown => return,
                },
                Some(due) => tokio::select! {
                    () = tokio::time::sleep_until(self.shared.start + due) => {}
                    () = self.shared.wake.notified() => {}
                    () = &mut shutdown => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        crate::profile::test_profile(0.0, 0.0, 0.0)
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
        tokio::spawn(sim.clone().run_on_tokio_timer(std::future::pending()));
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
        tokio::spawn(sim.clone().run_on_tokio_timer(std::future::pending()));
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
        tokio::spawn(sim.clone().run_on_tokio_timer(std::future::pending()));
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

    #[tokio::test]
    async fn the_real_time_loop_delivers_sub_millisecond_steps_on_time() {
        // One 0.3 ms step per request. Tokio's timer would deliver at 1 ms
        // at the earliest; the engine thread sleeps to the deadline itself.
        // No step may come early, and the loop must be able to deliver one
        // before the millisecond tick: retried until it does, so a busy
        // machine's scheduling delays only make the test take longer.
        let mut p = profile();
        p.timing.step_base_ms = 0.3;
        p.timing.prefill_token_ms = 0.0;
        let sim = Sim::new(p);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let engine = tokio::spawn(sim.clone().run(async {
            let _ = stopped.await;
        }));
        let mut tries = Vec::new();
        for i in 0..2000 {
            let t0 = std::time::Instant::now();
            let mut sub = sim.submit(seq(10 + i % 1000, 1));
            let ev = sub.tokens.recv().await.unwrap();
            assert!(ev.finished.is_some());
            let took = t0.elapsed();
            assert!(took >= Duration::from_micros(300), "early: {took:?}");
            tries.push(took);
            if took < Duration::from_micros(900) {
                break;
            }
        }
        let on_time = tries
            .last()
            .is_some_and(|t| *t < Duration::from_micros(900));
        assert!(
            on_time,
            "no step within 0.9 ms in {} tries; the fastest took {:?}",
            tries.len(),
            tries.iter().min()
        );
        let _ = stop.send(());
        engine.await.unwrap();
    }
}
