//! Reading a request body that Sluice must parse (completions and chat),
//! within two bounds: `--max-body` per request, and `--body-memory` for all
//! the bodies being read and parsed at once.
//!
//! A body takes a share of the budget of twice its length (the buffer, and
//! what parsing builds from it: a token-id prompt becomes 4 bytes per id),
//! and gives it back once it is parsed. The first [`FREE_BYTES`] of every
//! body need no share, so ordinary requests never wait on large ones.
//!
//! - A larger body with a `Content-Length` waits for its whole share before
//!   its first byte is read, up to [`BUDGET_WAIT`], in arrival order (it
//!   holds nothing while it waits, so waiters cannot block each other).
//! - A body without one (chunked) takes its share as its bytes arrive, and
//!   only when the budget has it at that moment.
//!
//! Past either bound the request gets `503` with `Retry-After`. The bytes
//! go straight into one buffer, sized by `Content-Length` when given.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// How much of the budget one body byte takes: the byte, and what parsing
/// builds from it.
const BUDGET_PER_BYTE: usize = 2;

/// The bytes of every body that need no share of the budget.
pub const FREE_BYTES: usize = 64 * 1024;

/// The longest a body waits for its share of the budget.
pub const BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The shared budget of memory for bodies being read and parsed.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: usize,
    permits: Arc<Semaphore>,
    /// Declared bodies waiting for their share now.
    waiting: Arc<AtomicUsize>,
}

/// A body's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share(Option<OwnedSemaphorePermit>);

impl Share {
    fn add(&mut self, taken: OwnedSemaphorePermit) {
        match &mut self.0 {
            Some(held) => held.merge(taken),
            none => *none = Some(taken),
        }
    }
}

/// One body counted as waiting until dropped (also when the client leaves
/// while it waits).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BodyBudget {
    /// A budget of `bytes` in total.
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            bytes,
            permits: Arc::new(Semaphore::new(bytes)),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The bytes not taken now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The bytes taken now by bodies being read and parsed.
    pub fn held(&self) -> usize {
        self.bytes - self.available()
    }

    /// Declared bodies waiting for their share now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn full(&self) -> ProxyError {
        ProxyError::BodyMemoryFull {
            budget: self.bytes as u64,
        }
    }

    /// Takes `bytes` body bytes' worth more for `share`, or fails at once.
    fn take(&self, share: &mut Share, bytes: usize) -> Result<(), ProxyError> {
        let cost = bytes.saturating_mul(BUDGET_PER_BYTE);
        let taken = u32::try_from(cost)
            .ok()
            .and_then(|cost| Arc::clone(&self.permits).try_acquire_many_owned(cost).ok())
            .ok_or_else(|| self.full())?;
        share.add(taken);
        Ok(())
    }

    /// Waits up to `wait` for `bytes` body bytes' worth for an empty `share`.
    async fn wait_for(
        &self,
        share: &mut Share,
        bytes: usize,
        wait: std::time::Duration,
    ) -> Result<(), ProxyError> {
        let cost = u32::try_from(bytes.saturating_mul(BUDGET_PER_BYTE))
            .ok()
            .filter(|&cost| cost as usize <= self.bytes)
            .ok_or_else(|| self.full())?;
        let acquire = Arc::clone(&self.permits).acquire_many_owned(cost);
        let acquired = {
            let _counted = Waiting::count(&self.waiting);
            tokio::time::timeout(wait, acquire).await
        };
        match acquired {
            Ok(Ok(taken)) => {
                share.add(taken);
                Ok(())
            }
            _ => Err(self.full()),
        }
    }

    /// Reads `body` whole into one buffer, within `max_body` bytes and the
    /// budget; the share is held until the caller drops it (after parsing).
    pub async fn read(
        &self,
        mut body: Incoming,
        declared: Option<u64>,
        max_body: u64,
    ) -> Result<(Bytes, Share), ProxyError> {
        let too_large = || ProxyError::BodyTooLarge { limit: max_body };
        let mut share = Share(None);
        let expected = declared.unwrap_or(0);
        if expected > max_body {
            return Err(too_large());
        }
        let expected = expected as usize;
        // Body bytes the share covers so far (the first ones are free).
        let mut covered = FREE_BYTES;
        if expected > FREE_BYTES {
            self.wait_for(&mut share, expected, BUDGET_WAIT).await?;
            covered = expected;
        }
        let mut buffer = BytesMut::with_capacity(expected);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ProxyError::InvalidRequest(format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let length = buffer.len() + data.len();
            if length as u64 > max_body {
                return Err(too_large());
            }
            if length > covered {
                // More than declared (or nothing was): take the rest as it comes.
                self.take(&mut share, length - covered)?;
                covered = length;
            }
            buffer.extend_from_slice(&data);
        }
        Ok((buffer.freeze(), share))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_declared_body_waits_for_its_whole_share() {
        let budget = BodyBudget::new(100);
        let mut held = Share(None);
        budget.take(&mut held, 40).unwrap();
        let mut waiting = Share(None);
        let short = std::time::Duration::from_millis(10);
        let refused = budget.wait_for(&mut waiting, 20, short).await.unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(budget.available(), 20, "a wait that ran out holds nothing");
        let more_than_all = budget.wait_for(&mut waiting, 51, short).await;
        assert!(
            more_than_all.is_err(),
            "a share larger than the budget fails at once"
        );
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut share = Share(None);
                budget
                    .wait_for(&mut share, 30, std::time::Duration::from_secs(10))
                    .await
                    .map(|()| share)
            })
        };
        while budget.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The waiter may already be assigned what is free (tokio's
        // semaphore fills a queued acquire as permits come back).
        assert!(budget.held() >= 80, "{}", budget.held());
        drop(held);
        let share = waiter
            .await
            .unwrap()
            .expect("the share came once the budget was free");
        assert_eq!(budget.waiting(), 0);
        assert_eq!(budget.available(), 40);
        drop(share);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn shares_are_taken_whole_and_given_back() {
        let budget = BodyBudget::new(100);
        let mut a = Share(None);
        budget.take(&mut a, 30).unwrap();
        budget.take(&mut a, 10).unwrap();
        assert_eq!(budget.available(), 20, "two bytes of budget per body byte");
        let mut b = Share(None);
        let refused = budget.take(&mut b, 11).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(budget.available(), 20, "a refused share takes nothing");
        drop(a);
        assert_eq!(budget.available(), 100);
        budget.take(&mut b, 50).unwrap();
        assert_eq!(budget.available(), 0);
    }
}
