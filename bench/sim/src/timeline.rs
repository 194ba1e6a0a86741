//! The engine in time: the API server in front of it, and its steps.
//!
//! A [`Timeline`] is a discrete-event model driven by explicit time, so the
//! same code runs in virtual time (fitting, `bench sim-vs-reference`, the
//! scheduler tests) and in real time (the HTTP simulator's step thread).
//! A request's path:
//! 1. [`Timeline::submit`]: it queues for the API server's one thread,
//!    which spends `api_in_ms` on it (parse, tokenize; like all the API
//!    server's work, `1 + api_slowdown` times as long while the engine
//!    has work, for they share CPU cores: judged when the work is booked),
//!    then waits `request_overhead_ms` (latency that occupies nothing);
//! 2. it enters the engine, and is batched step by step; a step takes the
//!    profile's step time for its batch;
//! 3. its last token queues for the API server again (`api_out_ms`:
//!    detokenize, write the response) before it is delivered. Earlier
//!    tokens (streaming) are delivered when their step ends.
//!
//! The API server is first come, first served, in the order work becomes
//! ready. Every event is processed at its own (ideal) time even when
//! [`Timeline::advance`] is called late, so a real-time driver that wakes
//! up late delays deliveries but never drifts.

use std::collections::VecDeque;
use std::time::Duration;

use crate::engine::{Batch, Engine, NewSeq, SeqId, TokenEvent};
use crate::profile::{Profile, StepClock};

/// The engine, its step clock and the API server around it.
#[derive(Debug)]
pub struct Timeline {
    engine: Engine,
    clock: StepClock,
    api_in: Duration,
    api_out: Duration,
    overhead: Duration,
    /// The API server's work takes `1 + api_slowdown` times as long while
    /// the engine has work.
    api_slowdown: f64,
    /// When the API server's thread is next free.
    api_free: Duration,
    /// Requests on their way into the engine, by entry time (FIFO, so
    /// entry times never decrease).
    entering: VecDeque<(Duration, SeqId, NewSeq)>,
    /// The step in progress and when it ends.
    step: Option<(Duration, Batch)>,
    /// Last tokens waiting for the API server, by delivery time.
    leaving: VecDeque<(Duration, TokenEvent)>,
}

impl Timeline {
    /// An idle engine for `profile`.
    pub fn new(profile: &Profile) -> Self {
        let (api_in, api_out) = profile.api_costs();
        Self {
            engine: Engine::new(profile.engine_config()),
            clock: StepClock::new(profile.timing.clone()),
            api_in,
            api_out,
            overhead: profile.request_overhead(),
            api_slowdown: profile.timing.api_slowdown,
            api_free: Duration::ZERO,
            entering: VecDeque::new(),
            step: None,
            leaving: VecDeque::new(),
        }
    }

    /// The engine (for inspection and metrics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A request arriving at `now`; it enters the engine after the API
    /// server has handled it.
    pub fn submit(&mut self, req: NewSeq, now: Duration) -> SeqId {
        let id = self.engine.reserve_id();
        let entry = self.api_slot(now, self.api_in) + self.overhead;
        self.entering.push_back((entry, id, req));
        id
    }

    /// Drops a request wherever it is (client gone).
    pub fn abort(&mut self, id: SeqId) {
        self.entering.retain(|(_, e, _)| *e != id);
        self.leaving.retain(|(_, ev)| ev.id != id);
        self.engine.abort(id);
    }

    /// When the next event is due; `None` when nothing will happen until
    /// the next [`Timeline::submit`].
    pub fn next_due(&self) -> Option<Duration> {
        [
            self.entering.front().map(|e| e.0),
            self.step.as_ref().map(|s| s.0),
            self.leaving.front().map(|l| l.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Processes every event due at or before `now`, in time order, and
    /// returns the tokens now delivered, in order.
    pub fn advance(&mut self, now: Duration) -> Vec<TokenEvent> {
        let mut out = Vec::new();
        while let Some(t) = self.next_due().filter(|&t| t <= now) {
            // At equal times: deliveries, then entries (so an arrival joins
            // the step that starts at the same instant), then the step end.
            if self.leaving.front().is_some_and(|l| l.0 == t) {
                let (_, ev) = self.leaving.pop_front().expect("checked");
                out.push(ev);
            } else if self.entering.front().is_some_and(|e| e.0 == t) {
                let (_, id, req) = self.entering.pop_front().expect("checked");
                self.engine.insert(id, req, t);
                if self.step.is_none() {
                    self.start_step(t);
                }
            } else {
                let (_, batch) = self.step.take().expect("the step is what is due");
                for ev in self.engine.complete(&batch, t) {
                    if ev.finished.is_some() {
                        let at = self.api_slot(t, self.api_out);
                        self.leaving.push_back((at, ev));
                    } else {
                        out.push(ev);
                    }
                }
                self.start_step(t);
            }
        }
        out
    }

    fn start_step(&mut self, now: Duration) {
        if let Some(batch) = self.engine.schedule(now) {
            self.step = Some((now + self.clock.step(&batch), batch));
        }
    }

    /// Books `cost` on the API server's thread for work ready at `ready`;
    /// returns when it is done.
    fn api_slot(&mut self, ready: Duration, cost: Duration) -> Duration {
        let cost = if self.engine_busy() {
            cost.mul_f64(1.0 + self.api_slowdown)
        } else {
            cost
        };
        let done = ready.max(self.api_free) + cost;
        self.api_free = done;
        done
    }

    /// Whether the engine has work: a step running, sequences in it, or
    /// requests on their way in. Judged when API-server work is booked.
    fn engine_busy(&self) -> bool {
        self.step.is_some() || self.engine.has_work() || !self.entering.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(api_in_ms: f64, api_out_ms: f64, overhead_ms: f64) -> Profile {
        crate::profile::test_profile(api_in_ms, api_out_ms, overhead_ms)
    }

    fn seq(len: u32, max_tokens: usize) -> NewSeq {
        NewSeq {
            prompt: (100..100 + len).collect(),
            max_tokens,
            seed: 1,
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Runs until idle; every delivered event with its time.
    fn run(tl: &mut Timeline) -> Vec<(Duration, TokenEvent)> {
        let mut out = Vec::new();
        while let Some(t) = tl.next_due() {
            out.extend(tl.advance(t).into_iter().map(|ev| (t, ev)));
        }
        out
    }

    #[test]
    fn without_api_costs_tokens_arrive_at_step_ends() {
        let mut tl = Timeline::new(&profile(0.0, 0.0, 0.0));
        tl.submit(seq(10, 3), ms(0));
        let at: Vec<_> = run(&mut tl).into_iter().map(|(t, _)| t).collect();
        // Prefill 10 + 10 × 1 ms, then two 10 ms decode steps.
        assert_eq!(at, vec![ms(20), ms(30), ms(40)]);
    }

    #[test]
    fn a_burst_queues_on_the_api_server_in_and_out() {
        // 2 ms in, 3 ms out, 5 ms of plain latency; three requests at once.
        let mut tl = Timeline::new(&profile(2.0, 3.0, 5.0));
        for _ in 0..3 {
            tl.submit(seq(4, 1), ms(0));
        }
        // Entries at 2+5, 4+5, 6+5 ms: the first starts a 14 ms step alone
        // (7..21, out 21..24); the other two share the next (21..39) and
        // are written one after the other (39..42, 42..45).
        let done: Vec<_> = run(&mut tl).into_iter().map(|(t, _)| t).collect();
        assert_eq!(done, vec![ms(24), ms(42), ms(45)]);
    }

    #[test]
    fn the_api_server_serves_work_in_the_order_it_became_ready() {
        let mut tl = Timeline::new(&profile(2.0, 3.0, 0.0));
        tl.submit(seq(4, 1), ms(0)); // enters at 2, step 2..16, out 16..19
        let first = tl.advance(ms(16));
        assert!(
            first.is_empty(),
            "the last token still waits for the API server"
        );
        // A request arriving at 17 waits for the response being written.
        tl.submit(seq(4, 1), ms(17));
        let done: Vec<_> = run(&mut tl).into_iter().map(|(t, _)| t).collect();
        // Second: in 19..21, step 21..35 (its prompt is not cached: 4 tokens
        // is one full block, and the last block is always recomputed).
        assert_eq!(done, vec![ms(19), ms(38)]);
    }

    #[test]
    fn the_api_server_is_slower_while_the_engine_has_work() {
        let run_with = |slowdown: f64| {
            let mut p = profile(2.0, 3.0, 0.0);
            p.timing.api_slowdown = slowdown;
            let mut tl = Timeline::new(&p);
            tl.submit(seq(4, 1), ms(0)); // in 0..2 (engine idle), step 2..16
            tl.advance(ms(15));
            tl.submit(seq(4, 1), ms(15)); // in while the step runs
            run(&mut tl).into_iter().map(|(t, _)| t).collect::<Vec<_>>()
        };
        // Without: second in 15..17, its step 17..31; first out 17..20,
        // second out 31..34.
        assert_eq!(run_with(0.0), vec![ms(20), ms(34)]);
        // Doubled while busy: second in 15..19 (a step runs), its step
        // 19..33; the first's out, booked at 16 with the second on its way
        // in, 19..25; the second's out, booked at 33 with nothing else
        // left, 33..36.
        assert_eq!(run_with(1.0), vec![ms(25), ms(36)]);
    }

    #[test]
    fn arrivals_join_the_step_that_starts_when_they_enter() {
        let mut tl = Timeline::new(&profile(0.0, 0.0, 0.0));
        tl.submit(seq(4, 2), ms(0)); // step 0..14
        tl.advance(ms(5));
        tl.submit(seq(4, 1), ms(14)); // enters exactly as the step ends
        tl.advance(ms(14));
        let (end, batch) = tl.step.clone().unwrap();
        assert_eq!(
            batch.scheduled.len(),
            2,
            "decode and the new prefill together"
        );
        assert_eq!(end, ms(14 + 10 + 4));
    }

    #[test]
    fn a_late_advance_processes_events_at_their_own_times() {
        let mut tl = Timeline::new(&profile(0.0, 0.0, 0.0));
        tl.submit(seq(10, 3), ms(0));
        // One call long after everything was due: same tokens as step by step.
        let late = tl.advance(ms(1000));
        assert_eq!(late.len(), 3);
        assert_eq!(tl.engine().stats().ttft.count(), 1);
        assert!(tl.next_due().is_none());
    }

    #[test]
    fn aborting_before_the_engine_or_while_leaving_drops_the_request() {
        let mut tl = Timeline::new(&profile(2.0, 3.0, 0.0));
        let a = tl.submit(seq(4, 1), ms(0));
        tl.abort(a);
        assert!(tl.next_due().is_none());
        let b = tl.submit(seq(4, 1), ms(0));
        assert!(tl.advance(ms(18)).is_empty()); // finished at 18, leaving at 21
        tl.abort(b);
        assert!(tl.next_due().is_none());
        assert!(run(&mut tl).is_empty());
    }
}
