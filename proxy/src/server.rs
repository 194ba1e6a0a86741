//! Listeners, serving threads, connections and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future (tests bind
//! port 0 and stop the server cleanly). Each listener's [`Tracker`] bounds
//! its connections (`--max-connections`), closes idle ones and answers
//! `503` at once when every slot is busy (see [`crate::connections`]); each
//! connection speaks HTTP/1.1 with keep-alive or h2c (prior knowledge) with
//! `TCP_NODELAY`.
//!
//! Client connections are served by `--workers` threads, each running a
//! single-threaded tokio runtime (thread per core, as nginx runs a worker
//! process per core). The acceptor hands each new connection to the next
//! thread in turn; from then on the connection, every request on it and the
//! upstream connections those requests use (one pool per thread, see
//! [`crate::pool`]) are polled by that one thread, so a request costs no
//! cross-thread wakeups. The admin listener, the admission scheduler and
//! the background tasks stay on the runtime that called [`run`].
//!
//! Shutdown runs in four steps: stop accepting, ask every connection to
//! finish its in-flight requests, wait up to `--drain-timeout`, then cut
//! what is still streaming: each such stream ends with an SSE error event
//! (a plain body is aborted) and counts as cut by shutdown, and the
//! connections get [`CUT_GRACE`] to send that before the threads stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::app::App;
use crate::body::ProxyBody;
use crate::connections::{Slot, TrackedBody, Tracker};
use crate::headers::Peer;
use crate::pool;
use crate::proxy::Proxy;

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Client traffic.
    pub main: TcpListener,
    /// Metrics, stats and policy administration.
    pub admin: TcpListener,
}

/// Connections handed to one serving thread and not yet picked up.
const HANDOFF_QUEUE: usize = 256;

/// Serves both listeners until `shutdown` resolves, then drains. Fails only
/// when the serving threads cannot be started.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let idle_limit = app.config.server.client_idle_timeout;
    let workers = Workers::start(app.config.server.workers(), &app.proxy, idle_limit)?;
    let main_connections = Tracker::new("main", app.config.server.max_connections);
    let admin_connections = Tracker::new("admin", ADMIN_CONNECTIONS);
    let main = accept_loop(
        listeners.main,
        Arc::clone(&main_connections),
        stop_rx.clone(),
        |accepted| workers.hand_off(accepted),
    );
    let admin_app = Arc::clone(&app);
    let admin_builder = http_builder(idle_limit);
    let admin = accept_loop(
        listeners.admin,
        Arc::clone(&admin_connections),
        stop_rx,
        move |accepted: Accepted| {
            let app = Arc::clone(&admin_app);
            serve(
                &admin_builder,
                accepted,
                idle_limit,
                move |req, _: &Peer| crate::admin::handle(Arc::clone(&app), req),
            );
            async {}
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
    let drain = app.config.server.drain_timeout;
    tracing::info!(
        drain_timeout_s = drain.as_secs_f64(),
        open_connections = main_connections.open(),
        "shutting down: draining in-flight requests"
    );
    main_connections.close_all();
    admin_connections.close_all();
    let all_closed = async {
        main_connections.closed().await;
        admin_connections.closed().await;
    };
    match tokio::time::timeout(drain, all_closed).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => {
            // 4. end what still streams with an error event, then stop.
            tracing::warn!(
                open_connections = main_connections.open(),
                "drain timeout reached; cutting the streams still open"
            );
            crate::observed::cut_streams();
            let _ = tokio::time::timeout(CUT_GRACE, main_connections.closed()).await;
        }
    }
    // Dropping `workers` closes the hand-off queues: each serving thread's
    // runtime then stops, ending any connection still open.
    drop(workers);
    Ok(())
}

/// After the drain timeout, how long cut streams have to send their error
/// event before the serving threads stop.
pub const CUT_GRACE: Duration = Duration::from_secs(1);

/// How long an evicted or idle connection has to close after it was asked
/// (an HTTP/2 GOAWAY that the client does not read): then it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// HTTP/2 pings on open connections, so a client that vanished (no FIN) is
/// noticed while its streams are still open.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// A connection just accepted, with what serving it needs; `S` is the
/// socket: tokio's while on a runtime, std's while handed between threads
/// (a tokio socket belongs to the runtime that registered it).
struct Connection<S> {
    stream: S,
    peer: SocketAddr,
    // Its place in the listener's count, and what it is doing; given up
    // when the connection ends.
    slot: Slot,
}

impl<S> Connection<S> {
    /// The same connection over another form of its socket.
    fn map_stream<T>(
        self,
        f: impl FnOnce(S) -> std::io::Result<T>,
    ) -> std::io::Result<Connection<T>> {
        let Self { stream, peer, slot } = self;
        Ok(Connection {
            stream: f(stream)?,
            peer,
            slot,
        })
    }
}

/// A connection accepted on this runtime.
type Accepted = Connection<TcpStream>;

/// A connection on its way to a serving thread.
type Handoff = Connection<std::net::TcpStream>;

/// The serving threads and the queues that hand them connections.
struct Workers {
    queues: Vec<mpsc::Sender<Handoff>>,
    // Round-robin position.
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` threads, each serving `proxy` on its own runtime.
    fn start(count: usize, proxy: &Arc<Proxy>, idle_limit: Duration) -> std::io::Result<Self> {
        let mut queues = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, mut rx) = mpsc::channel::<Handoff>(HANDOFF_QUEUE);
            let proxy = Arc::clone(proxy);
            // The runtime is built on its own thread (a runtime must not be
            // dropped inside another's async context, as a failed spawn
            // would); the build's result comes back here.
            let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            let _ = started_tx.send(Ok(()));
                            runtime
                        }
                        Err(err) => {
                            let _ = started_tx.send(Err(err));
                            return;
                        }
                    };
                    pool::enter_worker(index);
                    runtime.block_on(async move {
                        tokio::spawn(keep_timer_armed());
                        let builder = http_builder(idle_limit);
                        while let Some(handoff) = rx.recv().await {
                            let Some(accepted) = handoff.register() else {
                                continue;
                            };
                            let proxy = Arc::clone(&proxy);
                            serve(&builder, accepted, idle_limit, move |req, client: &Peer| {
                                let proxy = Arc::clone(&proxy);
                                let client = client.clone();
                                async move { proxy.handle(req, &client).await }
                            });
                        }
                    });
                })?;
            // Blocks for as long as building a runtime takes, once per worker at start.
            started_rx.recv().map_err(|_| {
                std::io::Error::other(format!("serving thread {index} exited while starting"))
            })??;
            queues.push(tx);
        }
        Ok(Self {
            queues,
            next: AtomicUsize::new(0),
        })
    }

    /// Gives a connection to the next serving thread (waiting while that
    /// thread's queue is full: backpressure on accepting).
    async fn hand_off(&self, accepted: Accepted) {
        let peer = accepted.peer;
        let handoff = match accepted.map_stream(TcpStream::into_std) {
            Ok(handoff) => handoff,
            Err(err) => {
                tracing::warn!(peer = %peer, error = %err, "cannot hand a connection to a serving thread");
                return;
            }
        };
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        if self.queues[index].send(handoff).await.is_err() {
            tracing::error!(worker = index, "serving thread is gone; connection dropped");
        }
    }
}

/// Keeps a timer due within a second on this thread's runtime, forever.
///
/// tokio's time driver wakes its own thread (an eventfd write, and an
/// early return from `epoll_wait`) whenever a timer is registered that is due
/// sooner than every pending one, or when none is pending. Each request
/// registers timers (hyper's header-read timeout, the upstream deadline, the
/// body idle limit), and at low concurrency none is pending in between, so
/// every request paid that wakeup (strace: one `write` per request). With a
/// one-second tick always pending, requests' timers (30 s and more) are
/// never the soonest.
async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Handoff {
    /// The connection registered with the calling thread's runtime.
    fn register(self) -> Option<Accepted> {
        let peer = self.peer;
        match self.map_stream(TcpStream::from_std) {
            Ok(accepted) => Some(accepted),
            Err(err) => {
                tracing::warn!(peer = %peer, error = %err, "cannot serve a connection");
                None
            }
        }
    }
}

/// HTTP/1.1 with keep-alive, or h2c with prior knowledge. A connection is
/// idle until a request's head has arrived, so the idle timeout in
/// [`serve`] also bounds a slow head; hyper's own header timeout is set
/// past it, as a backstop that never fires first (the idle closes are then
/// all counted).
fn http_builder(idle_limit: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(idle_limit * 2 + CLOSE_GRACE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// Serves one connection on the current runtime with `handler`, closing it
/// when it has been idle for `idle_limit` or is asked to (eviction,
/// shutdown).
fn serve<H, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    accepted: Accepted,
    idle_limit: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>, &Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let Connection { stream, peer, slot } = accepted;
    let client = Peer::new(peer);
    let activity = Arc::clone(slot.activity());
    let service = service_fn(move |req| {
        // In progress from its head until its body is sent or dropped.
        let busy = activity.busy();
        let response = handler(req, &client);
        async move { Ok::<_, Infallible>(response.await.map(|body| TrackedBody::new(body, busy))) }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    tokio::spawn(async move {
        let activity = Arc::clone(slot.activity());
        let mut connection = std::pin::pin!(connection);
        let timer = tokio::time::sleep(idle_limit);
        let mut timer = std::pin::pin!(timer);
        // Set once the connection was asked to close: by then the timer
        // bounds how long closing may take (none for shutdown, which the
        // drain timeout bounds).
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
                    }
                    break;
                }
                () = activity.close_requested(), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                    let grace = if activity.was_evicted() {
                        CLOSE_GRACE
                    } else {
                        Duration::from_secs(u32::MAX.into())
                    };
                    timer.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                () = timer.as_mut() => {
                    if closing {
                        tracing::debug!(peer = %peer, "connection did not close in time; dropped");
                        break;
                    }
                    match activity.idle_deadline(idle_limit) {
                        Some(at) if at <= tokio::time::Instant::now() => {
                            tracing::debug!(peer = %peer, idle_s = idle_limit.as_secs_f64(), "closing an idle connection");
                            slot.count_idle_close();
                            closing = true;
                            connection.as_mut().graceful_shutdown();
                            timer.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                        }
                        Some(at) => timer.as_mut().reset(at),
                        None => timer.as_mut().reset(tokio::time::Instant::now() + idle_limit),
                    }
                }
            }
        }
        drop(slot);
    });
}

/// Accepts until `stop`: each connection takes a slot from `connections`,
/// or is refused at once when every slot is busy.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    connections: Arc<Tracker>,
    mut stop: watch::Receiver<bool>,
    mut on_accept: F,
) where
    F: FnMut(Accepted) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
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
        let Some(slot) = connections.admit() else {
            connections.refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        on_accept(Accepted { stream, peer, slot }).await;
    }
}
