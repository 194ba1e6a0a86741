//! `hyper-floor`: the least a reverse proxy built on hyper and tokio can do,
//! as a floor under Sluice's overhead in `bench overhead`.
//!
//! It shares Sluice's transport: hyper's HTTP/1.1 and h2c server with the
//! same settings (keep-alive, hyper's timers on tokio's clock, a one-second
//! interval that keeps the timer driver armed), hyper's HTTP/1.1 client,
//! `TCP_NODELAY` both ways, mimalloc. It shares its threading too: one
//! single-threaded runtime per core, each polling its client connections
//! and their upstream connections, so no wakeup crosses threads. It does
//! nothing else: no parsing, header rewriting, error mapping, admission,
//! metrics or logs.
//!
//! Two differences, both in how connections are shared out rather than in
//! a request's path: every serving thread accepts from the one listener
//! (Sluice's acceptor hands connections out in turn), and each client
//! connection gets one upstream connection of its own, opened on its first
//! request (Sluice keeps a pool per thread). h2c requests are forwarded as
//! HTTP/1.1, one at a time per client connection. `bench overhead` sends
//! HTTP/1.1.
//!
//! What `bench overhead` measures through it is therefore what the stack
//! costs before Sluice does anything; the difference to Sluice is Sluice's
//! own work.
//!
//! ```text
//! hyper-floor --upstream 127.0.0.1:8000 [--listen 127.0.0.1:0] [--workers N]
//! ```
//!
//! It prints `hyper-floor listening listen=ADDR` once it accepts.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line.
struct Args {
    upstream: SocketAddr,
    listen: SocketAddr,
    workers: usize,
}

const USAGE: &str = "usage: hyper-floor --upstream HOST:PORT [--listen HOST:PORT (127.0.0.1:0)] [--workers N (the CPUs)]";

impl Args {
    /// The flags, or `None` for `--help`.
    fn parse() -> Result<Option<Self>, String> {
        let mut upstream = None;
        let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut workers = std::thread::available_parallelism().map_or(1, usize::from);
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--upstream" => upstream = Some(parse(&flag, &value()?)?),
                "--listen" => listen = parse(&flag, &value()?)?,
                "--workers" => workers = parse(&flag, &value()?)?,
                "--help" | "-h" => return Ok(None),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(Some(Self {
            upstream: upstream.ok_or("--upstream is required")?,
            listen,
            workers: workers.max(1),
        }))
    }
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|err| format!("{flag} {value}: {err}"))
}

fn main() -> std::process::ExitCode {
    let args = match Args::parse() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("hyper-floor: {err}\n{USAGE}");
            return std::process::ExitCode::from(64);
        }
    };
    match serve(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hyper-floor: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds, then serves on `workers` threads that all accept from the one
/// listener; runs until killed, or until a serving thread fails.
fn serve(args: &Args) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(args.listen)?;
    listener.set_nonblocking(true)?;
    println!("hyper-floor listening listen={}", listener.local_addr()?);
    let threads: Vec<_> = (0..args.workers)
        .map(|_| {
            let listener = listener.try_clone()?;
            let upstream = args.upstream;
            std::thread::Builder::new()
                .name("hyper-floor".into())
                .spawn(move || worker(listener, upstream))
        })
        .collect::<std::io::Result<_>>()?;
    // A serving thread only returns on failure: the first one ends the process.
    let (failed, failure) = std::sync::mpsc::channel();
    for thread in threads {
        let failed = failed.clone();
        std::thread::spawn(move || {
            let err = match thread.join() {
                Ok(Err(err)) => err,
                Ok(Ok(())) => std::io::Error::other("a serving thread stopped"),
                Err(_) => std::io::Error::other("a serving thread panicked"),
            };
            let _ = failed.send(err);
        });
    }
    drop(failed);
    Err(failure
        .recv()
        .unwrap_or_else(|_| std::io::Error::other("no serving thread")))
}

/// One serving thread: accepts and serves on a single-threaded runtime.
fn worker(listener: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        tokio::spawn(keep_timer_armed());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, upstream));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("hyper-floor: accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// As Sluice's serving threads have it: a timer that never lets tokio's
/// timer wheel go empty, so arming hyper's timers does not wake the driver.
async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Serves one client connection, forwarding over its own upstream connection.
async fn connection(stream: TcpStream, upstream: SocketAddr) {
    let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
    let service = service_fn(move |mut request: http::Request<Incoming>| {
        let sender = Arc::clone(&sender);
        if request.version() == http::Version::HTTP_2 {
            // h2c in, HTTP/1.1 out: origin-form target, host from :authority.
            if let Some(authority) = request.uri().authority().cloned()
                && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
            {
                request.headers_mut().insert(http::header::HOST, host);
            }
            let target = request.uri().path_and_query().cloned();
            *request.uri_mut() = target.map_or_else(http::Uri::default, http::Uri::from);
            *request.version_mut() = http::Version::HTTP_11;
        }
        async move {
            let mut slot = sender.lock().await;
            let open = match slot.take() {
                Some(open) if !open.is_closed() => open,
                _ => connect(upstream).await?,
            };
            let open = slot.insert(open);
            // A failure fails the request: hyper closes an HTTP/1.1
            // connection, or resets the h2c stream.
            open.ready().await.map_err(std::io::Error::other)?;
            let response = open.send_request(request);
            drop(slot);
            response.await.map_err(std::io::Error::other)
        }
    });
    // Sluice's settings (`sluice::server`'s `http_builder`).
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Opens an upstream connection and spawns its task on this thread.
async fn connect(upstream: SocketAddr) -> std::io::Result<SendRequest<Incoming>> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
