//! The task that follows one replica's event stream: a ZeroMQ SUB socket
//! connected to the engine's PUB endpoint, decoding each message and
//! applying it to the replica's [`Mirror`].
//!
//! A message is three frames: the topic, an 8-byte big-endian sequence
//! number, the msgpack [`EventBatch`](super::decode::EventBatch). Sequence
//! numbers go up by one per batch: a jump forward is a *gap* (batches lost,
//! counted; the mirror keeps what it has, since missed stores only make it
//! predict less and missed removals age out of its LRU); a step back means
//! the engine restarted with an empty cache, so the mirror is cleared.
//!
//! Every wait is bounded: a connect gives up after [`CONNECT_TIMEOUT`] and
//! is retried after a backoff doubling from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`] (reset by a successful connect); a disconnect reported by
//! the socket drops it and reconnects the same way; receiving wakes at least
//! every [`IDLE_WAKE`]. The task ends when its [`KvEventsHandle`] is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use metrics::{Counter, Gauge, counter, gauge};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use zeromq::{Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket, ZmqMessage};

use super::decode::{KvEvent, decode_batch};
use super::mirror::{Applied, Ignored, Mirror};
use crate::prefix::PrefixTracker;
use crate::telemetry::{KV_EVENT_GAPS, KV_EVENTS, KV_EVENTS_CONNECTED, KV_EVENTS_IGNORED};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait before reconnecting.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest a receive waits before the loop looks around again.
pub const IDLE_WAKE: Duration = Duration::from_secs(5);
/// [`KvEventsHandle::live`]: how recent an event or a connect must be when
/// the socket is not connected now.
pub const LIVE_WINDOW: Duration = Duration::from_secs(30);

/// What the task shares with its handle.
#[derive(Debug)]
struct Shared {
    /// The clock's zero for `last_seen_ms`.
    started: Instant,
    /// Milliseconds after `started` of the last event or connect, plus one
    /// (0: never).
    last_seen_ms: AtomicU64,
    /// Whether the socket is connected now.
    connected: AtomicBool,
    /// Events received, of every kind.
    events: AtomicU64,
    /// Sequence gaps seen.
    gaps: AtomicU64,
}

impl Shared {
    fn seen(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }
}

/// A running subscriber: what the router reads about one replica's stream.
/// Dropping it stops the task.
#[derive(Debug)]
pub struct KvEventsHandle {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl KvEventsHandle {
    /// Whether the stream is to be trusted now: the socket is connected, or
    /// an event arrived or a connect succeeded within [`LIVE_WINDOW`].
    pub fn live(&self) -> bool {
        if self.shared.connected.load(Ordering::Relaxed) {
            return true;
        }
        let seen = self.shared.last_seen_ms.load(Ordering::Relaxed);
        seen != 0
            && self.shared.started.elapsed().as_millis() as u64 + 1 - seen
                <= LIVE_WINDOW.as_millis() as u64
    }

    /// Events received so far, of every kind (unknown ones included).
    pub fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// Sequence gaps seen so far (each a run of lost batches).
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::Relaxed)
    }

    /// Stops the task now (dropping the handle does too).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for KvEventsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts following `endpoint` (`tcp://host:port`, the engine's
/// `--kv-events-config` endpoint with its host) on `topic`, mirroring
/// replica `replica`'s cache into `tracker`. Call it inside a tokio runtime.
pub fn spawn(
    replica: String,
    endpoint: String,
    topic: String,
    tracker: Arc<PrefixTracker>,
) -> KvEventsHandle {
    let shared = Arc::new(Shared {
        started: Instant::now(),
        last_seen_ms: AtomicU64::new(0),
        connected: AtomicBool::new(false),
        events: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
    });
    let metrics = Metrics::new(&replica);
    let follower = Follower {
        replica,
        endpoint,
        topic,
        mirror: Mirror::new(tracker),
        shared: shared.clone(),
        metrics,
        expected: None,
    };
    let task = tokio::spawn(follower.run());
    KvEventsHandle { shared, task }
}

/// The task's state.
struct Follower {
    replica: String,
    endpoint: String,
    topic: String,
    mirror: Mirror,
    shared: Arc<Shared>,
    metrics: Metrics,
    /// The next sequence number, once one batch has arrived.
    expected: Option<u64>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.set_connected(false);
    }
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.connect().await {
                Ok(socket) => {
                    backoff = BACKOFF_MIN;
                    self.follow(socket).await;
                }
                Err(e) => {
                    tracing::debug!(replica = %self.replica, endpoint = %self.endpoint,
                        "kv events: cannot connect: {e}");
                }
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<SubSocket, String> {
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_TIMEOUT);
        let mut socket = SubSocket::with_options(options);
        // The crate's own connect timeout is not trusted to cover the handshake.
        let connect = async {
            socket.connect(&self.endpoint).await?;
            socket.subscribe(&self.topic).await
        };
        match timeout(CONNECT_TIMEOUT + Duration::from_secs(1), connect).await {
            Ok(Ok(())) => Ok(socket),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Applies messages until the socket fails or reports a disconnect.
    async fn follow(&mut self, mut socket: SubSocket) {
        let mut monitor = socket.monitor();
        self.set_connected(true);
        self.shared.seen();
        tracing::info!(replica = %self.replica, endpoint = %self.endpoint, "kv events: connected");
        loop {
            tokio::select! {
                received = timeout(IDLE_WAKE, socket.recv()) => match received {
                    Ok(Ok(message)) => self.handle(message),
                    Ok(Err(e)) => {
                        tracing::warn!(replica = %self.replica, "kv events: receive failed: {e}");
                        break;
                    }
                    Err(_idle) => {}
                },
                event = monitor.next() => match event {
                    Some(SocketEvent::Disconnected(_)) | None => {
                        tracing::warn!(replica = %self.replica, "kv events: engine disconnected");
                        break;
                    }
                    Some(_) => {}
                },
            }
        }
        self.set_connected(false);
    }

    fn handle(&mut self, message: ZmqMessage) {
        let frames = message.into_vec();
        let [topic, seq, payload] = frames.as_slice() else {
            self.malformed(&format!("{} frames, not 3", frames.len()));
            return;
        };
        // SUB filters by prefix: "kv" would also receive "kv2".
        if !self.topic.is_empty() && topic.as_ref() != self.topic.as_bytes() {
            return;
        }
        let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()).map(u64::from_be_bytes) else {
            self.malformed("the sequence number is not 8 bytes");
            return;
        };
        let batch = match decode_batch(payload) {
            Ok(batch) => batch,
            Err(e) => {
                self.malformed(&e.to_string());
                return;
            }
        };
        self.sequence(seq);
        for event in &batch.events {
            if let Applied::Ignored(why) = self.mirror.apply(event) {
                self.metrics.ignored(why).increment(1);
            }
            self.metrics.kind(event).increment(1);
        }
        self.metrics.unknown.increment(batch.unknown as u64);
        let n = (batch.events.len() + batch.unknown) as u64;
        self.shared.events.fetch_add(n, Ordering::Relaxed);
        self.shared.seen();
    }

    /// Checks `seq` against the one expected.
    fn sequence(&mut self, seq: u64) {
        match self.expected {
            Some(expected) if seq > expected => {
                self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                self.metrics.gaps.increment(1);
                tracing::warn!(replica = %self.replica,
                    "kv events: batches {expected}..{seq} lost; the mirror may hold removed blocks");
            }
            Some(expected) if seq < expected => {
                tracing::info!(replica = %self.replica,
                    "kv events: sequence went back from {expected} to {seq}: the engine restarted; clearing");
                self.mirror.clear();
            }
            _ => {}
        }
        self.expected = Some(seq.wrapping_add(1));
    }

    fn malformed(&self, why: &str) {
        self.metrics.malformed.increment(1);
        tracing::warn!(replica = %self.replica, "kv events: malformed message skipped: {why}");
    }

    fn set_connected(&self, connected: bool) {
        self.shared.connected.store(connected, Ordering::Relaxed);
        self.metrics.connected.set(f64::from(u8::from(connected)));
    }
}

/// One replica's metric handles, registered once (after
/// [`telemetry::install`](crate::telemetry::install), or they record nothing).
struct Metrics {
    stored: Counter,
    removed: Counter,
    cleared: Counter,
    unknown: Counter,
    malformed: Counter,
    /// By [`Ignored`] reason, in declaration order.
    ignored: [Counter; 3],
    gaps: Counter,
    connected: Gauge,
}

impl Metrics {
    fn new(replica: &str) -> Self {
        let kind = |kind: &'static str| counter!(KV_EVENTS, "replica" => replica.to_owned(), "kind" => kind);
        let ignored = |why: Ignored| counter!(KV_EVENTS_IGNORED, "replica" => replica.to_owned(), "reason" => why.label());
        Self {
            stored: kind("stored"),
            removed: kind("removed"),
            cleared: kind("cleared"),
            unknown: kind("unknown"),
            malformed: kind("malformed"),
            ignored: [
                ignored(Ignored::UnknownParent),
                ignored(Ignored::Medium),
                ignored(Ignored::Keyed),
            ],
            gaps: counter!(KV_EVENT_GAPS, "replica" => replica.to_owned()),
            connected: gauge!(KV_EVENTS_CONNECTED, "replica" => replica.to_owned()),
        }
    }

    fn kind(&self, event: &KvEvent) -> &Counter {
        match event {
            KvEvent::BlockStored { .. } => &self.stored,
            KvEvent::BlockRemoved { .. } => &self.removed,
            KvEvent::AllCleared => &self.cleared,
        }
    }

    fn ignored(&self, why: Ignored) -> &Counter {
        &self.ignored[why as usize]
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rmpv::Value;
    use zeromq::{PubSocket, SocketSend};

    use super::*;
    use crate::classify::Prompt;
    use crate::kv_events::fixture;

    /// Waits until `done` holds, failing after 10 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(10)).await;
        }
    }

    async fn publish(socket: &mut PubSocket, seq: u64, payload: &[u8]) {
        let frames = vec![
            Bytes::from_static(b"kv"),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            Bytes::copy_from_slice(payload),
        ];
        let message = ZmqMessage::try_from(frames).expect("three frames");
        socket.send(message).await.expect("publish");
    }

    /// A batch of one event of a kind the decoder does not know: counted,
    /// applied to nothing.
    fn probe() -> Vec<u8> {
        let batch = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![Value::Map(vec![("type".into(), "Probe".into())])]),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &batch).expect("writing to a Vec");
        out
    }

    /// Publishes probes as sequence 0 until the subscriber has counted one:
    /// a PUB socket drops what it sends before the subscription arrives.
    async fn prime(socket: &mut PubSocket, handle: &KvEventsHandle) {
        let before = handle.events();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.events() == before {
            assert!(Instant::now() < deadline, "the subscriber never received");
            publish(socket, 0, &probe()).await;
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn cached(tracker: &PrefixTracker, ids: &[u32]) -> usize {
        tracker
            .lookup(&Prompt::Tokens(vec![ids.to_vec()]))
            .cached_tokens as usize
    }

    /// The recording of a real vLLM, replayed over loopback with one batch
    /// number skipped; then the publisher goes away and comes back.
    #[tokio::test]
    async fn follows_a_publisher_over_tcp() {
        let mut publisher = PubSocket::new();
        let endpoint = publisher
            .bind("tcp://127.0.0.1:0")
            .await
            .expect("bind")
            .to_string();
        let tracker = Arc::new(PrefixTracker::new(10_000, 32));
        let handle = spawn("r0".into(), endpoint.clone(), "kv".into(), tracker.clone());
        prime(&mut publisher, &handle).await;
        assert!(handle.live());
        assert_eq!(handle.gaps(), 0);

        // The recording, renumbered after the probes, batch 2 never sent.
        let messages = fixture::messages(fixture::TOKENS);
        let (last, before) = messages.split_last().expect("messages");
        let mut seq = 1;
        for frames in before {
            if seq == 2 {
                seq += 1;
            }
            publish(&mut publisher, seq, frames[2]).await;
            seq += 1;
        }
        let prompts = fixture::prompts(fixture::TOKENS);
        // Each prompt's blocks were stored by one batch; batch 2's prompt
        // (sent as number 3) arrived.
        until("the prompts' blocks", || {
            prompts
                .iter()
                .all(|p| cached(&tracker, p) == (p.len() - 1) / 32 * 32)
        })
        .await;
        assert_eq!(handle.gaps(), 1);
        publish(&mut publisher, seq, last[2]).await;
        until("the reset", || tracker.is_empty()).await;
        let events = handle.events();

        // The engine goes away and comes back on the same port, with its
        // sequence starting again: the subscriber reconnects.
        drop(publisher);
        until("the disconnect", || {
            !handle.shared.connected.load(Ordering::Relaxed)
        })
        .await;
        assert!(handle.live(), "within the live window");
        let mut publisher = PubSocket::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = publisher.bind(&endpoint).await {
            assert!(
                Instant::now() < deadline,
                "cannot bind {endpoint} again: {e}"
            );
            sleep(Duration::from_millis(50)).await;
        }
        prime(&mut publisher, &handle).await;
        publish(&mut publisher, 1, before[0][2]).await;
        until("blocks after the reconnect", || {
            cached(&tracker, &prompts[0]) == 96
        })
        .await;
        assert!(handle.events() > events);
        assert_eq!(handle.gaps(), 1);

        // Aborting stops the task.
        handle.abort();
        until("the task to end", || handle.task.is_finished()).await;
        assert!(!handle.shared.connected.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn malformed_messages_are_skipped() {
        let mut publisher = PubSocket::new();
        let endpoint = publisher
            .bind("tcp://127.0.0.1:0")
            .await
            .expect("bind")
            .to_string();
        let tracker = Arc::new(PrefixTracker::new(100, 32));
        // The metric handles bind to the recorder present at the spawn.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let handle = metrics::with_local_recorder(&recorder, || {
            spawn("r1".into(), endpoint, "kv".into(), tracker.clone())
        });
        prime(&mut publisher, &handle).await;
        publish(&mut publisher, 1, b"\xc1 not msgpack").await;
        // Another topic that "kv" prefixes: not ours, not counted.
        let other = vec![
            Bytes::from_static(b"kv2"),
            Bytes::copy_from_slice(&5u64.to_be_bytes()),
            Bytes::from_static(b"anything"),
        ];
        publisher
            .send(ZmqMessage::try_from(other).expect("three frames"))
            .await
            .expect("publish");
        let short = ZmqMessage::try_from(vec![Bytes::from_static(b"kv")]).expect("one frame");
        publisher.send(short).await.expect("publish");
        // Still following: the next good batch is applied, with no gap.
        let messages = fixture::messages(fixture::TOKENS);
        publish(&mut publisher, 1, messages[0][2]).await;
        let prompt = &fixture::prompts(fixture::TOKENS)[0];
        until("the good batch", || cached(&tracker, prompt) == 96).await;
        assert_eq!(handle.gaps(), 0);
        let text = metrics.render();
        for line in [
            r#"sluice_kv_events_total{replica="r1",kind="malformed"} 2"#,
            r#"sluice_kv_events_total{replica="r1",kind="stored"} 1"#,
            r#"sluice_kv_events_total{replica="r1",kind="cleared"} 1"#,
            r#"sluice_kv_event_gaps_total{replica="r1"} 0"#,
            r#"sluice_kv_events_connected{replica="r1"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop(handle);
    }

    #[tokio::test(start_paused = true)]
    async fn no_engine_is_not_live() {
        // Nothing listens there: connects fail, each within its timeout.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("tcp://{}", probe.local_addr().expect("addr"));
        drop(probe);
        let tracker = Arc::new(PrefixTracker::new(100, 32));
        let handle = spawn("r2".into(), endpoint, "kv".into(), tracker);
        sleep(Duration::from_secs(60)).await;
        assert!(!handle.live());
        assert_eq!(handle.events(), 0);
        assert!(!handle.task.is_finished());
    }
}
