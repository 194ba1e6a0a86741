//! Reading a request body that Sluice must parse (completions and chat),
//! within two bounds: `--max-body` per request, and `--body-memory` for all
//! the bodies being read and parsed at once.
//!
//! A body takes its share of the shared budget as its bytes arrive — twice
//! its length, for the buffer and what parsing builds from it (a token-id
//! prompt becomes 4 bytes per id) — and gives it back once it is parsed.
//! When the budget is spent, the request gets `503` with `Retry-After`
//! at once rather than waiting (a body that waited while holding part of
//! the budget could keep others waiting in turn). The bytes go straight into
//! one buffer, sized by `Content-Length` when given.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// How much of the budget one body byte takes: the byte, and what parsing
/// builds from it.
const BUDGET_PER_BYTE: usize = 2;

/// The shared budget of memory for bodies being read and parsed.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: usize,
    permits: Arc<Semaphore>,
}

/// A body's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share(Option<OwnedSemaphorePermit>);

impl BodyBudget {
    /// A budget of `bytes` in total.
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            bytes,
            permits: Arc::new(Semaphore::new(bytes)),
        }
    }

    /// The bytes not taken now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Takes `bytes` body bytes' worth more for `share`, or fails at once.
    fn take(&self, share: &mut Share, bytes: usize) -> Result<(), ProxyError> {
        let cost = bytes.saturating_mul(BUDGET_PER_BYTE);
        let taken = u32::try_from(cost)
            .ok()
            .and_then(|cost| Arc::clone(&self.permits).try_acquire_many_owned(cost).ok())
            .ok_or(ProxyError::BodyMemoryFull {
                budget: self.bytes as u64,
            })?;
        match &mut share.0 {
            Some(held) => held.merge(taken),
            none => *none = Some(taken),
        }
        Ok(())
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
        self.take(&mut share, expected)?;
        // Body bytes the share covers so far.
        let mut covered = expected;
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
