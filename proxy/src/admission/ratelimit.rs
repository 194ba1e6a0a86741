//! Per-tenant rate limits in front of the queue: GCRA via `governor`, keyed
//! by tenant (like Inngest's throttle). Over the limit, the answer is 429 with
//! a `Retry-After` taken from the limiter's next-allowed time.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimit;
use crate::error::ProxyError;

/// A keyed GCRA limiter.
#[derive(Debug)]
pub struct TenantLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl TenantLimiter {
    /// A limiter allowing `limit.requests` per `limit.per` per tenant, with `limit.burst`.
    pub fn new(limit: RateLimit) -> Self {
        let period = limit.per / limit.requests.max(1);
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("period is positive")
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Forgets, every `period`, the tenants whose budget has fully refilled,
    /// so the limiter's memory follows the active tenants only. The task
    /// ends when the limiter is dropped.
    pub fn forget_idle_every(limiter: &Arc<Self>, period: Duration) {
        let limiter = Arc::downgrade(limiter);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(limiter) = limiter.upgrade() else {
                    return;
                };
                limiter.forget_idle();
            }
        });
    }

    /// Lets the request through, or says when the tenant may try again.
    pub fn check(&self, tenant: &str) -> Result<(), ProxyError> {
        match self.limiter.check_key(&tenant.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                metrics::counter!(crate::telemetry::REQUESTS_SHED, "reason" => "rate_limited")
                    .increment(1);
                Err(ProxyError::RateLimited { retry_after })
            }
        }
    }

    /// Forgets tenants whose limit has fully recovered (bounds memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_tenant_separately() {
        let limiter = TenantLimiter::new(RateLimit {
            requests: 1,
            per: Duration::from_secs(60),
            burst: 2,
        });
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        let err = limiter.check("a").unwrap_err();
        let ProxyError::RateLimited { retry_after } = err else {
            panic!("expected RateLimited, got {err:?}");
        };
        assert!(retry_after > Duration::from_secs(50) && retry_after <= Duration::from_secs(60));
        assert!(
            limiter.check("b").is_ok(),
            "another tenant has its own budget"
        );
    }
}
