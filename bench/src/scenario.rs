//! The scenarios of `bench compare`, as job workers load an engine, each
//! driven against the targets its caller gives:
//!
//! - [`batch_job`]: a batch of candidates handed over at once, sent as a
//!   client [`Habit`] says (naive: by a fleet of clients back to back);
//! - [`live`]: open-loop Poisson arrivals at one rate for a span, sent as
//!   a habit says, each timed from its arrival;
//! - [`mixed`]: live arrivals at a steady rate beside a batch job, until
//!   the batch ends.
//!
//! Live requests carry `X-Priority: 10` and `X-Tenant: live` (and, for a
//! vLLM that schedules by priority, `"priority": -10` in the body), batch
//! ones `X-Priority: 0` and `X-Tenant: batch` ([`Tag`]; the bench's
//! proxies run with `--trust-tenant-header`); every request of a
//! comparison evaluates a candidate of its own ([`Feed`]). The result types
//! here are what the scorecard reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;

use crate::client::Request;
use crate::load::{Arrived, Habit, Mode, Plan, arrivals, drive_requests, poisson_offsets};
use crate::progress::Tick;
use crate::stats::{Outcomes, Summary};
use crate::workload::Workload;

/// The priority of live requests (higher is more urgent; 0 is the default).
pub(crate) const LIVE_PRIORITY: u32 = 10;

/// The body's `priority` of live requests sent to a vLLM that schedules
/// by priority (`--scheduling-policy priority`; lower goes first, 0 is the
/// default).
pub(crate) const ENGINE_LIVE_PRIORITY: i64 = -10;

/// Which traffic a request belongs to, in its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    /// `X-Priority: 10`, `X-Tenant: live`.
    Live,
    /// [`Tag::Live`], and the body's `priority` set for vLLM's own
    /// priority scheduling ([`ENGINE_LIVE_PRIORITY`]).
    LiveForEngine,
    /// `X-Priority: 0`, `X-Tenant: batch`.
    Batch,
}

impl Tag {
    fn apply(self, mut request: Request) -> Request {
        let (priority, tenant) = match self {
            Tag::Live | Tag::LiveForEngine => (LIVE_PRIORITY, "live"),
            Tag::Batch => (0, "batch"),
        };
        if self == Tag::LiveForEngine
            && let Ok(serde_json::Value::Object(mut body)) =
                serde_json::from_slice::<serde_json::Value>(&request.body)
        {
            body.insert("priority".into(), ENGINE_LIVE_PRIORITY.into());
            request.body = serde_json::Value::Object(body).to_string().into();
        }
        request
            .headers
            .insert("x-priority", HeaderValue::from(priority));
        request
            .headers
            .insert("x-tenant", HeaderValue::from_static(tenant));
        request
    }
}

/// The workload, handed out so that no two runs share a candidate.
#[derive(Debug)]
pub(crate) struct Feed {
    workload: Arc<Workload>,
    /// The next unused workload index.
    next: AtomicUsize,
}

impl Feed {
    pub(crate) fn new(workload: Arc<Workload>) -> Self {
        Self {
            workload,
            next: AtomicUsize::new(0),
        }
    }

    /// `n` new candidates: request `i` of a run, tagged.
    pub(crate) fn take(
        &self,
        n: usize,
        tag: Tag,
    ) -> impl Fn(usize) -> Request + Clone + Send + 'static {
        let offset = self.next.fetch_add(n, Ordering::Relaxed);
        let workload = Arc::clone(&self.workload);
        move |i| tag.apply(workload.item(offset + i))
    }
}

/// Who sends, and where to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sender {
    pub(crate) addr: SocketAddr,
    pub(crate) habit: Habit,
}

/// `n` sequential requests to `addr`: the unloaded latency.
pub(crate) async fn unloaded(addr: SocketAddr, feed: &Feed, n: usize) -> Outcomes {
    let plan = plan(Mode::Inngest, n, 1, 1);
    drive_requests(addr, &plan, feed.take(n, Tag::Live), &Tick::default()).await
}

/// `n` naive requests to `addr` from `clients` clients, not measured.
pub(crate) async fn warm_up(addr: SocketAddr, feed: &Feed, n: usize, clients: usize) {
    let plan = plan(Mode::Naive, n, 1, clients);
    drive_requests(addr, &plan, feed.take(n, Tag::Batch), &Tick::default()).await;
}

fn plan(mode: Mode, requests: usize, habit_n: usize, clients: usize) -> Plan {
    Plan {
        mode,
        requests,
        duration_s: None,
        wave: habit_n,
        limit: habit_n,
        clients,
        rate: 0.0,
        seed: 0,
        offset: 0,
    }
}

/// A batch job's size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    /// Candidates handed over.
    pub(crate) n: usize,
    /// Naive clients sending them (each back to back).
    pub(crate) clients: usize,
}

/// A batch handed over at once: waves or a semaphore as the habit says,
/// or naive (`Habit::Open`) from `job.clients` clients back to back.
pub(crate) async fn batch_job(sender: Sender, feed: &Feed, job: Job) -> Outcomes {
    let Job { n, clients } = job;
    let plan = match sender.habit {
        Habit::Waves(w) => plan(Mode::Batched, n, w, 1),
        Habit::Semaphore(k) => plan(Mode::Inngest, n, k, 1),
        Habit::Open => plan(Mode::Naive, n, 1, clients.min(n)),
    };
    let requests = feed.take(n, Tag::Batch);
    drive_requests(sender.addr, &plan, requests, &Tick::default()).await
}

/// Live arrivals at `rate` per second over `span`.
pub(crate) async fn live(
    sender: Sender,
    feed: &Feed,
    rate: f64,
    span: Duration,
    seed: u64,
) -> Arrived {
    let n = (rate * span.as_secs_f64()).round().max(1.0) as usize;
    let offsets = poisson_offsets(rate, n, seed);
    let stop = Arc::new(AtomicBool::new(false));
    let requests = feed.take(n, Tag::Live);
    arrivals(
        sender.addr,
        offsets,
        sender.habit,
        stop,
        requests,
        &Tick::default(),
    )
    .await
}

/// A batch job and live traffic at the same time.
pub(crate) struct Both {
    pub(crate) batch: Outcomes,
    pub(crate) live: Arrived,
}

/// Live traffic beside a batch job: where it goes, how tagged, how often.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Beside {
    pub(crate) sender: Sender,
    pub(crate) tag: Tag,
    /// Arrivals per second.
    pub(crate) rate: f64,
}

/// The batch job of [`batch_job`] with live arrivals beside it, from its
/// start until it ends (`expected`, the batch's time alone, only sizes the
/// arrivals drawn).
pub(crate) async fn mixed(
    batch: Sender,
    live: Beside,
    feed: &Feed,
    job: Job,
    expected: Duration,
    seed: u64,
) -> Both {
    let Beside {
        sender: live,
        tag,
        rate,
    } = live;
    let most = ((expected.as_secs_f64() * 4.0 + 5.0) * rate).ceil() as usize;
    let offsets = poisson_offsets(rate, most.max(1), seed);
    let stop = Arc::new(AtomicBool::new(false));
    let requests = feed.take(offsets.len(), tag);
    let tick = Tick::default();
    let live_run = arrivals(
        live.addr,
        offsets,
        live.habit,
        Arc::clone(&stop),
        requests,
        &tick,
    );
    let batch_run = async {
        let out = batch_job(batch, feed, job).await;
        stop.store(true, Ordering::Relaxed);
        out
    };
    let (batch, live) = tokio::join!(batch_run, live_run);
    Both { batch, live }
}

/// One configuration's batch job.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BatchRun {
    pub(crate) label: String,
    /// A client habit (waves, semaphore) straight to the engine.
    pub(crate) habit: bool,
    pub(crate) client: Summary,
    /// The proxy's CPU time per request, in µs (child-process proxies).
    pub(crate) proxy_cpu_us: Option<f64>,
}

/// One configuration's live-traffic steps.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LiveRun {
    pub(crate) label: String,
    pub(crate) habit: bool,
    pub(crate) steps: Vec<LiveStep>,
}

/// One live-traffic step.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LiveStep {
    /// The offered rate as a fraction of the run's capacity.
    pub(crate) load: f64,
    pub(crate) offered_rps: f64,
    pub(crate) client: Summary,
    /// Requests per second finished within the SLO.
    pub(crate) goodput_rps: f64,
    pub(crate) proxy_cpu_us: Option<f64>,
}

/// One configuration's mixed run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MixedRun {
    pub(crate) label: String,
    pub(crate) habit: bool,
    pub(crate) live: Summary,
    pub(crate) batch: Summary,
    /// The configuration's batch-job throughput alone.
    pub(crate) batch_alone_rps: f64,
    /// `[arrival s, latency ms]` of each successful live request.
    pub(crate) live_timeline: Vec<[f64; 2]>,
    pub(crate) proxy_cpu_us: Option<f64>,
}

/// One point of the frontier: a batch through a cap (or adaptive), live
/// traffic beside it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FrontierPoint {
    pub(crate) label: String,
    /// `concurrency.wasm`'s `limit`; `None` for adaptive.
    pub(crate) limit: Option<usize>,
    pub(crate) live: Summary,
    pub(crate) batch: Summary,
    /// Live p95 over its value alone.
    pub(crate) live_p95_ratio: Option<f64>,
    /// Batch throughput over the run's capacity.
    pub(crate) batch_ratio: f64,
    pub(crate) proxy_cpu_us: Option<f64>,
}

impl FrontierPoint {
    pub(crate) fn live_p95(&self) -> Option<f64> {
        self.live.latency_ms.p95
    }
}
