//! The upstream: its connections (HTTP/1.1, `TCP_NODELAY`, reused through
//! [`crate::pool`]), its deadlines, and what is known about its health.
//!
//! A refused or failed connection answers 502 and marks the upstream down;
//! while it is down, requests are answered 503 with `Retry-After` at once
//! (no connect storm), and one probe task reconnects every
//! [`PROBE_INTERVAL`] until the upstream is back.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::pool::{Lease, Pools, Sender};

/// How often a down upstream is probed, and the `Retry-After` given meanwhile.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Idle upstream connections kept for reuse, per serving thread.
const MAX_IDLE_CONNECTIONS: usize = 1024;

/// A request that did not get a response from an upstream.
#[derive(Debug)]
pub struct SendError {
    /// What went wrong, as the client would be told.
    pub error: ProxyError,
    /// The request, when none of it can have reached the upstream.
    pub unsent: Option<Request<ProxyBody>>,
}

/// The upstream server and the connections that reach it.
#[derive(Debug)]
pub struct Upstream {
    // `host:port` (port 80 when the URI gives none): what is dialled.
    authority: String,
    // The `Host` header of every forwarded request.
    host: HeaderValue,
    pools: Pools,
    response_timeout: Duration,
    connect_timeout: Duration,
    // Set on a failed connect, cleared by the probe task; read on every request.
    down: AtomicBool,
}

impl Upstream {
    /// The upstream at `config.url` (an `http://host[:port]` URI), with a
    /// connection pool for each of `workers` serving threads; no connection
    /// is opened yet.
    pub fn new(config: &UpstreamConfig, workers: usize) -> Arc<Self> {
        let uri = config.urls.first().cloned().unwrap_or_default();
        let (authority, host) = dial_and_host(&uri);
        Self::at(authority, host, config, workers)
    }

    /// The upstream dialled at `authority` (`host:port` or `ip:port`), sent
    /// `host` as its `Host` header (the name the replica was configured by).
    pub fn at(
        authority: String,
        host: HeaderValue,
        config: &UpstreamConfig,
        workers: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            authority,
            host,
            pools: Pools::new(workers, MAX_IDLE_CONNECTIONS, config.keepalive),
            response_timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            down: AtomicBool::new(false),
        })
    }

    /// The upstream's `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
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

    /// Sends a request (its URI in origin-form; the `Host` header is set
    /// here) and waits for the response headers, up to `--upstream-timeout`.
    /// The lease gives the connection back once the response has been passed
    /// on whole.
    ///
    /// A failure comes with the request when none of it can have reached
    /// the upstream (the connect failed, or the connection closed before a
    /// byte was written), so that it may go to another replica.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        let pool = self.pools.local();
        let exchange = async {
            loop {
                let (mut sender, reused) = match pool.take() {
                    Some(sender) => (sender, true),
                    None => match self.connect().await {
                        Ok(sender) => (sender, false),
                        Err(error) => {
                            return Err(SendError {
                                error,
                                unsent: Some(request),
                            });
                        }
                    },
                };
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        return Ok((response, Lease::new(sender, Arc::clone(pool))));
                    }
                    Err(mut failed) => match failed.take_message() {
                        // An idle connection the upstream closed as it was
                        // taken: the request never left, so it goes out on another.
                        Some(unsent) if reused => request = unsent,
                        // A new connection that closed before the request
                        // was written: another replica may take it.
                        Some(unsent) => {
                            return Err(SendError {
                                error: classify(failed.error()),
                                unsent: Some(unsent),
                            });
                        }
                        None => {
                            return Err(SendError {
                                error: classify(failed.error()),
                                unsent: None,
                            });
                        }
                    },
                }
            }
        };
        match tokio::time::timeout(self.response_timeout, exchange).await {
            Err(_elapsed) => Err(SendError {
                error: ProxyError::UpstreamTimeout(self.response_timeout),
                unsent: None,
            }),
            Ok(result) => result,
        }
    }

    /// The body idle limit (the same as the header deadline).
    pub fn idle_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Opens a connection within the connect timeout and starts its task.
    async fn connect(self: &Arc<Self>) -> Result<Sender, ProxyError> {
        let connect = TcpStream::connect(self.authority.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(self.unreachable(format!("connect: {err}"))),
            Err(_elapsed) => {
                return Err(self.unreachable(format!(
                    "connect: no answer within {}",
                    crate::units::format_duration(self.connect_timeout)
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| classify(&err))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %error_chain(&err), "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn unreachable(self: &Arc<Self>, cause: String) -> ProxyError {
        self.mark_down();
        ProxyError::UpstreamUnreachable {
            upstream: self.authority.clone(),
            cause,
        }
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
        let connect = TcpStream::connect(self.authority.as_str());
        matches!(
            tokio::time::timeout(self.connect_timeout, connect).await,
            Ok(Ok(_))
        )
    }
}

/// `GET path` from the server at `authority` on a connection of its own
/// (a probe, not client traffic): the status, and the body when `read_body`
/// and the status is 2xx; `None` when no answer came. The caller bounds
/// the wait.
pub async fn get_once(
    authority: &str,
    path: &str,
    read_body: bool,
) -> Option<(http::StatusCode, bytes::Bytes)> {
    use http_body_util::{BodyExt, Empty};
    let stream = TcpStream::connect(authority).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
    let connection = tokio::spawn(connection);
    let answer = async {
        let request = Request::get(path)
            .header(header::HOST, authority)
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status();
        let body = if read_body && status.is_success() {
            response.into_body().collect().await.ok()?.to_bytes()
        } else {
            bytes::Bytes::new()
        };
        Some((status, body))
    }
    .await;
    connection.abort();
    answer
}

/// What a URI dials (`host:port`, port 80 when the URI gives none) and the
/// `Host` header a client would write for it (no user info, no default port).
pub fn dial_and_host(uri: &http::Uri) -> (String, HeaderValue) {
    let name = uri.host().unwrap_or_default();
    let authority = format!("{name}:{}", uri.port_u16().unwrap_or(80));
    let host = match uri.port_u16() {
        Some(port) if port != 80 => format!("{name}:{port}"),
        _ => name.to_owned(),
    };
    let host =
        HeaderValue::try_from(host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
    (authority, host)
}

/// A failed exchange on an open connection: a request body over `--max-body`
/// is a 413, anything else a bad or missing response (502).
fn classify(err: &hyper::Error) -> ProxyError {
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(limit) = cause.downcast_ref::<crate::body::BodyLimitExceeded>() {
            return ProxyError::BodyTooLarge { limit: limit.0 };
        }
        source = cause.source();
    }
    ProxyError::UpstreamBadResponse(error_chain(err))
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
