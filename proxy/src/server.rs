//! Listeners, connections and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future (tests bind
//! port 0 and stop the server cleanly). Each listener takes a permit before
//! `accept`, so at most `--max-connections` clients are served at once; each
//! connection speaks HTTP/1.1 with keep-alive or h2c (prior knowledge) with
//! `TCP_NODELAY`. Shutdown runs in three steps: stop accepting, ask every
//! connection to finish its in-flight requests, wait up to `--drain-timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::App;
use crate::body::ProxyBody;

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Client traffic.
    pub main: TcpListener,
    /// Metrics, stats and policy administration.
    pub admin: TcpListener,
}

/// Serves both listeners until `shutdown` resolves, then drains.
pub async fn run(app: Arc<App>, listeners: Listeners, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(app.config.max_connections));

    let proxy = Arc::clone(&app.proxy);
    let main = accept_loop(
        listeners.main,
        Arc::clone(&limit),
        stop_rx.clone(),
        &graceful,
        move |req: Request<Incoming>, peer: SocketAddr| {
            let proxy = Arc::clone(&proxy);
            async move { proxy.handle(req, peer).await }
        },
    );
    let admin_app = Arc::clone(&app);
    let admin = accept_loop(
        listeners.admin,
        Arc::new(Semaphore::new(64)),
        stop_rx,
        &graceful,
        move |req: Request<Incoming>, _peer: SocketAddr| {
            let app = Arc::clone(&admin_app);
            async move { crate::admin::handle(app, req).await }
        },
    );

    tokio::select! {
        () = main => {},
        () = admin => {},
        () = shutdown => {},
    }
    // 1. stop accepting (the loops return and drop their listeners).
    let _ = stop_tx.send(true);
    // 2 + 3. ask connections to finish, wait up to the drain timeout.
    let drain = app.config.drain_timeout;
    tracing::info!(
        drain_timeout_s = drain.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    graceful: &GracefulShutdown,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req, peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
}
