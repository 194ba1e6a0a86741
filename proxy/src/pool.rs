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

use hyper::client::conn::http1::SendRequest;

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
    /// `workers` pools (at least one), each keeping at most `max_idle` idle connections.
    pub fn new(workers: usize, max_idle: usize) -> Self {
        Self((0..workers.max(1)).map(|_| Pool::new(max_idle)).collect())
    }

    /// The calling thread's pool.
    pub fn local(&self) -> &Arc<Pool> {
        &self.0[WORKER.with(Cell::get) % self.0.len()]
    }
}

/// The idle connections, most recently used last.
#[derive(Debug)]
pub struct Pool {
    // Short critical sections only (push, or a scan of flags); never held across an await.
    idle: Mutex<Vec<Sender>>,
    max_idle: usize,
}

impl Pool {
    /// An empty pool that keeps at most `max_idle` idle connections.
    pub fn new(max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    /// The most recently used connection that is ready for a request.
    /// Closed connections found on the way are dropped; one still finishing
    /// its previous response (returned a moment before hyper marked it
    /// idle) is left for later.
    pub fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_closed() {
                idle.swap_remove(i);
            } else if idle[i].is_ready() {
                return Some(idle.swap_remove(i));
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
            idle.push(sender);
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
