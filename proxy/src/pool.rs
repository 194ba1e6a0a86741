//! Idle HTTP/1.1 connections to the upstream, reused across requests.
//!
//! A connection is lent out for one request ([`Lease`]) and comes back once
//! the upstream has sent that request's whole response body (its last frame
//! read, on its way to the client); a response that ends any other way
//! (client gone, upstream failure) drops its lease, and hyper closes the
//! connection. Compared with hyper-util's legacy client
//! this does no per-request task spawn (the legacy pool spawns one to wait for
//! the connection to become idle again), no hashing of pool keys and no
//! `Authority` comparisons: there is one upstream, so a pool is one stack.
//!
//! Each serving thread (see [`crate::server`]) has a pool of its own
//! ([`Pools`]): a connection's task is spawned on the thread that opened it,
//! so the client connection, the request and the upstream connection it
//! uses are all polled by one thread and no wakeup crosses threads.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use crate::body::ProxyBody;

/// A connection's request side.
pub type Sender = SendRequest<ProxyBody>;

thread_local! {
    // The serving thread this is (0 outside them).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as serving thread `index`: the requests it
/// forwards use that thread's pool.
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// One [`Pool`] per serving thread.
#[derive(Debug)]
pub struct Pools(Vec<Arc<Pool>>);

impl Pools {
    /// `workers` pools (at least one), each keeping at most `max_idle` idle
    /// connections, each reused within `keepalive` of its last response.
    pub fn new(workers: usize, max_idle: usize, keepalive: Duration) -> Self {
        Self(
            (0..workers.max(1))
                .map(|_| Pool::new(max_idle, keepalive))
                .collect(),
        )
    }

    /// The calling thread's pool.
    pub fn local(&self) -> &Arc<Pool> {
        &self.0[WORKER.with(Cell::get) % self.0.len()]
    }
}

/// The idle connections, most recently returned last.
///
/// A connection is reused only within `keepalive` of its return. An
/// upstream closes a connection that has been idle for its own keep-alive
/// timeout (vLLM's server: 5 s), and a request written just as it does
/// fails after it has left, which no client can safely retry. Connections
/// returned together expire together, so a burst of requests after a pause
/// would otherwise meet several such closes at once.
#[derive(Debug)]
pub struct Pool {
    // Short critical sections only (push, or a scan of flags); never held across an await.
    idle: Mutex<Vec<(Sender, Instant)>>,
    max_idle: usize,
    keepalive: Duration,
}

impl Pool {
    /// An empty pool that keeps at most `max_idle` idle connections, each
    /// reused within `keepalive` of its return.
    pub fn new(max_idle: usize, keepalive: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            keepalive,
        })
    }

    /// The most recently used connection that is ready for a request.
    /// Connections idle for `keepalive` or more (the oldest, at the
    /// bottom) and closed ones found on the way are dropped, which closes
    /// them; one still finishing its previous response (returned a moment
    /// before hyper marked it idle) is left for later.
    pub fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let expired = idle
            .iter()
            .position(|(_, since)| now.duration_since(*since) < self.keepalive)
            .unwrap_or(idle.len());
        idle.drain(..expired);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].0.is_closed() {
                idle.remove(i);
            } else if idle[i].0.is_ready() {
                return Some(idle.remove(i).0);
            }
        }
        None
    }

    /// Returns a connection whose last response completed.
    pub fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push((sender, Instant::now()));
        }
    }
}

/// One request's use of a connection.
#[derive(Debug)]
pub struct Lease {
    sender: Sender,
    pool: Arc<Pool>,
}

impl Lease {
    pub(crate) fn new(sender: Sender, pool: Arc<Pool>) -> Self {
        Self { sender, pool }
    }

    /// The whole response was read: the connection can serve another request.
    pub fn release(self) {
        self.pool.put(self.sender);
    }
}
