//! The upstream: a pooled hyper client, its deadlines, and what is known
//! about the upstream's health.
//!
//! A refused or failed connection answers 502 and marks the upstream down;
//! while it is down, requests are answered 503 with `Retry-After` at once
//! (no connect storm), and one probe task reconnects every
//! [`PROBE_INTERVAL`] until the upstream is back.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::body::ProxyBody;
use crate::cli::Config;
use crate::error::ProxyError;

/// How often a down upstream is probed, and the `Retry-After` given meanwhile.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The upstream server and the client that reaches it.
#[derive(Debug)]
pub struct Upstream {
    base: Uri,
    authority: String,
    client: Client<HttpConnector, ProxyBody>,
    response_timeout: Duration,
    connect_timeout: Duration,
    // Set on a failed connect, cleared by the probe task; read on every request.
    down: AtomicBool,
}

impl Upstream {
    /// A client for `config.upstream` with pooling and `TCP_NODELAY`.
    pub fn new(config: &Config) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let authority = config
            .upstream
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        Arc::new(Self {
            base: config.upstream.clone(),
            authority,
            client,
            response_timeout: config.upstream_timeout,
            connect_timeout: config.connect_timeout,
            down: AtomicBool::new(false),
        })
    }

    /// The upstream's `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Uri {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = path_and_query.parse().ok();
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// Fails fast with 503 while the upstream is known to be down.
    pub fn check_up(&self) -> Result<(), ProxyError> {
        if self.down.load(Ordering::Acquire) {
            return Err(ProxyError::UpstreamDown {
                upstream: self.authority.clone(),
                retry_after: PROBE_INTERVAL,
            });
        }
        Ok(())
    }

    /// Sends a request and waits for the response headers, up to `--upstream-timeout`.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout(self.response_timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(self.classify(err)),
        }
    }

    /// The body idle limit (the same as the header deadline).
    pub fn idle_timeout(&self) -> Duration {
        self.response_timeout
    }

    fn classify(self: &Arc<Self>, err: hyper_util::client::legacy::Error) -> ProxyError {
        let chain = error_chain(&err);
        if err.is_connect() {
            self.mark_down();
            return ProxyError::UpstreamUnreachable {
                upstream: self.authority.clone(),
                cause: chain,
            };
        }
        let mut source = err.source();
        while let Some(cause) = source {
            if let Some(limit) = cause.downcast_ref::<crate::proxy::BodyLimitExceeded>() {
                return ProxyError::BodyTooLarge { limit: limit.0 };
            }
            source = cause.source();
        }
        ProxyError::UpstreamBadResponse(chain)
    }

    fn mark_down(self: &Arc<Self>) {
        if self.down.swap(true, Ordering::AcqRel) {
            return; // a probe is already running
        }
        tracing::warn!(upstream = %self.authority, "upstream unreachable; answering 503 until a probe reconnects");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                if this.reachable().await {
                    this.down.store(false, Ordering::Release);
                    tracing::info!(upstream = %this.authority, "upstream reachable again");
                    return;
                }
            }
        });
    }

    /// Whether a TCP connection to the upstream opens within the connect timeout.
    pub async fn reachable(&self) -> bool {
        let connect = tokio::net::TcpStream::connect(self.authority.as_str());
        matches!(
            tokio::time::timeout(self.connect_timeout, connect).await,
            Ok(Ok(_))
        )
    }
}

/// `outer: inner: innermost`, for log lines and error messages.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
