//! Client connections of one listener: the `--max-connections` bound, what
//! each connection is doing, and the rules that keep idle clients from
//! holding every slot.
//!
//! - **Idle timeout.** A connection with no request in progress for
//!   `--client-idle-timeout` is closed: before its first request (a socket
//!   that sends nothing, half an HTTP/2 preface, or only SETTINGS), between
//!   keep-alive requests, and an HTTP/2 connection with no open stream.
//!   A request is in progress from its head until its response body has
//!   been sent (or dropped), so a long stream is never idle.
//! - **At the limit.** A new connection first takes the place of the
//!   connection that has been idle longest (asked to close at once, as
//!   nginx reuses its idle keep-alive connections); when none is idle, it
//!   gets `503` with an OpenAI-shaped body and `Retry-After` right away,
//!   instead of waiting unanswered in the kernel's backlog.
//! - **Shutdown.** [`Tracker::close_all`] asks every connection to finish
//!   its in-flight requests and close; [`Tracker::closed`] waits for it.
//!
//! Counted in `sluice_connections_closed_total{listener, reason}` (reason
//! `idle_timeout` or `evicted`) and `sluice_connections_refused_total{listener}`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::telemetry;

/// Refusals being written at once; beyond it a refused socket is closed
/// without an answer (it cannot cost more than this many tasks).
const MAX_REFUSING: usize = 64;
/// How long writing a refusal (and reading what the client sent) may take.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Milliseconds since the first call: the clock connections stamp their
/// idle time with (an atomic `u64`, unlike an `Instant`).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What one connection is doing, shared by its task, its requests and the
/// listener's [`Tracker`].
#[derive(Debug)]
pub struct Activity {
    id: u64,
    // Requests in progress (head received, response body not yet done).
    active: AtomicU32,
    // When `active` last fell to 0 (or the connection opened), in `now_ms`.
    idle_since: AtomicU64,
    // Asks the connection to close (eviction or shutdown).
    close: Notify,
    // Why it was asked: true for eviction, false for shutdown.
    evicted: AtomicBool,
}

impl Activity {
    /// Whether no request is in progress; with the time since that began.
    fn idle_for(&self) -> Option<Duration> {
        (self.active.load(Ordering::Acquire) == 0).then(|| {
            Duration::from_millis(now_ms().saturating_sub(self.idle_since.load(Ordering::Acquire)))
        })
    }

    /// Marks a request in progress until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// Resolves when the connection is asked to close.
    pub async fn close_requested(&self) {
        self.close.notified().await;
    }

    /// Whether the close was an eviction (else shutdown).
    pub fn was_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// When this connection will have been idle for `limit`, if it stays
    /// idle; `None` while a request is in progress.
    pub fn idle_deadline(&self, limit: Duration) -> Option<tokio::time::Instant> {
        self.idle_for()
            .map(|idle| tokio::time::Instant::now() + limit.saturating_sub(idle))
    }
}

/// A request in progress on a connection; dropping it ends the request.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Stamp before the count falls, so a reader that sees 0 sees the stamp.
        self.0.idle_since.store(now_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in progress until it is sent
    /// or dropped.
    pub struct TrackedBody {
        #[pin]
        inner: ProxyBody,
        busy: Busy,
    }
}

impl TrackedBody {
    /// `inner`, holding `busy` for as long as it lives.
    pub fn new(inner: ProxyBody, busy: Busy) -> Self {
        Self { inner, busy }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The open connections of one listener.
#[derive(Debug)]
pub struct Tracker {
    listener: &'static str,
    limit: usize,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    // The map's size, readable without the lock (the open-connections gauge).
    count: Arc<AtomicUsize>,
    next_id: AtomicU64,
    // Woken whenever the last connection closes.
    emptied: Notify,
    refusing: AtomicUsize,
}

/// A connection's place in its listener's count; leaving drops it.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
    activity: Arc<Activity>,
}

impl Slot {
    /// What the connection is doing.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Counts the connection as closed for idling past the timeout.
    pub fn count_idle_close(&self) {
        metrics::counter!(telemetry::CONNECTIONS_CLOSED, "listener" => self.tracker.listener, "reason" => "idle_timeout")
            .increment(1);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.leave(self.activity.id);
    }
}

impl Tracker {
    /// A listener named `listener` serving at most `limit` connections.
    pub fn new(listener: &'static str, limit: usize) -> Arc<Self> {
        for reason in ["idle_timeout", "evicted"] {
            metrics::counter!(telemetry::CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason)
                .increment(0);
        }
        metrics::counter!(telemetry::CONNECTIONS_REFUSED, "listener" => listener).increment(0);
        let count = Arc::new(AtomicUsize::new(0));
        crate::resources::watch_listener(listener, &count);
        Arc::new(Self {
            listener,
            limit,
            open: Mutex::new(HashMap::new()),
            count,
            next_id: AtomicU64::new(0),
            emptied: Notify::new(),
            refusing: AtomicUsize::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The most connections served at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for a new connection: a free one, or the longest-idle
    /// connection's (which is asked to close); `None` when every
    /// connection has a request in progress.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().ok()?;
        if open.len() >= self.limit {
            let oldest = open
                .values()
                .filter_map(|a| a.idle_for().map(|idle| (idle, Arc::clone(a))))
                .max_by_key(|(idle, _)| *idle)
                .map(|(_, a)| a)?;
            open.remove(&oldest.id);
            self.count.store(open.len(), Ordering::Release);
            oldest.evicted.store(true, Ordering::Release);
            oldest.close.notify_one();
            metrics::counter!(telemetry::CONNECTIONS_CLOSED, "listener" => self.listener, "reason" => "evicted")
                .increment(1);
            tracing::debug!(
                listener = self.listener,
                "connection limit: closing the longest-idle connection"
            );
        }
        let activity = Arc::new(Activity {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            close: Notify::new(),
            evicted: AtomicBool::new(false),
        });
        open.insert(activity.id, Arc::clone(&activity));
        self.count.store(open.len(), Ordering::Release);
        Some(Slot {
            tracker: Arc::clone(self),
            activity,
        })
    }

    fn leave(&self, id: u64) {
        if let Ok(mut open) = self.open.lock()
            && open.remove(&id).is_some()
        {
            self.count.store(open.len(), Ordering::Release);
            if open.is_empty() {
                self.emptied.notify_waiters();
            }
        }
    }

    /// Asks every open connection to finish its requests and close.
    pub fn close_all(&self) {
        if let Ok(open) = self.open.lock() {
            for activity in open.values() {
                activity.close.notify_one();
            }
        }
    }

    /// Resolves once no connection is open.
    pub async fn closed(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.open() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Answers `stream` with 503 (too many connections) and closes it,
    /// within [`REFUSAL_TIME`]; closes it at once when [`MAX_REFUSING`]
    /// refusals are already being written.
    pub fn refuse(self: &Arc<Self>, mut stream: TcpStream) {
        metrics::counter!(telemetry::CONNECTIONS_REFUSED, "listener" => self.listener).increment(1);
        tracing::warn!(
            listener = self.listener,
            limit = self.limit,
            "connection refused: every connection has a request in progress (--max-connections)"
        );
        if self.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let tracker = Arc::clone(self);
        tokio::spawn(async move {
            let answer = refusal(tracker.limit);
            let _ = tokio::time::timeout(REFUSAL_TIME, async {
                // The request head first: an HTTP/1.1 client takes a
                // response that arrives before its request as an error.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                stream.write_all(&answer).await?;
                stream.shutdown().await?;
                // Read what the client sent until it closes: closing with
                // unread bytes would reset the connection, and the client
                // might never see the answer.
                while stream.read(&mut buf).await? > 0 {}
                std::io::Result::Ok(())
            })
            .await;
            tracker.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The whole HTTP/1.1 response a refused connection gets.
fn refusal(limit: usize) -> Vec<u8> {
    let error = ProxyError::TooManyConnections { limit };
    let body = error.body_json().to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        error.status().as_u16(),
        error.status().canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(tracker: &Arc<Tracker>) -> Slot {
        tracker.admit().expect("a slot")
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room() {
        let tracker = Tracker::new("test", 2);
        let first = idle(&tracker);
        // Make the first connection the longest idle.
        first.activity.idle_since.store(0, Ordering::Release);
        let second = idle(&tracker);
        let _busy = second.activity.busy();
        let third = idle(&tracker);
        assert!(
            first.activity.was_evicted(),
            "the idle one was asked to close"
        );
        assert!(!second.activity.was_evicted());
        assert_eq!(tracker.open(), 2);
        // Now both are busy or new: the third has no request yet, so it is
        // idle; make it busy too and nothing can be evicted.
        let _busy3 = third.activity.busy();
        assert!(tracker.admit().is_none(), "every connection is busy");
        drop(first);
        assert_eq!(tracker.open(), 2, "an evicted slot was already given up");
    }

    #[test]
    fn a_request_in_progress_is_not_idle_until_its_guard_drops() {
        let tracker = Tracker::new("test", 1);
        let slot = idle(&tracker);
        assert!(slot.activity.idle_for().is_some());
        let busy = slot.activity.busy();
        assert!(slot.activity.idle_for().is_none());
        assert!(
            slot.activity
                .idle_deadline(Duration::from_secs(1))
                .is_none()
        );
        drop(busy);
        assert!(slot.activity.idle_for().is_some());
    }

    #[test]
    fn the_refusal_is_a_complete_http_response_with_an_openai_body() {
        let text = String::from_utf8(refusal(7)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("retry-after: 1"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
        assert!(json["error"]["message"].as_str().unwrap().contains('7'));
    }

    #[tokio::test]
    async fn closed_resolves_when_the_last_connection_leaves() {
        let tracker = Tracker::new("test", 4);
        let a = idle(&tracker);
        let b = idle(&tracker);
        let waiter = tokio::spawn({
            let tracker = Arc::clone(&tracker);
            async move { tracker.closed().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("closed() resolved")
            .unwrap();
    }
}
