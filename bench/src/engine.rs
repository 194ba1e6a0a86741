//! The engine a benchmark drives, and what it says about itself.
//!
//! [`EngineArgs`] (`--upstream`, `--profile`) gives an [`Upstream`]: a
//! running engine found at its URL, or the simulated vLLM started
//! in-process on 127.0.0.1:0, which also counts the requests in flight in
//! it exactly ([`InFlight`]). [`SimFleet`] starts several simulated
//! engines, each with a cache of its own, and stops them together
//! (`bench compare --replicas`). [`engine_name`], [`model_of`] and
//! [`max_model_len`] ask any engine what it is and what it serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::client;

/// Which engine a benchmark drives (`bench compare`, `bench suite`).
#[derive(Debug, clap::Args)]
pub(crate) struct EngineArgs {
    /// A running engine (http://HOST:PORT) instead of the in-process
    /// simulator; `bench compare --replicas` takes it once per replica.
    #[arg(long)]
    pub(crate) upstream: Vec<String>,
    /// Simulator profile (built-in name or TOML path) when no `--upstream`
    /// (default rtx4080; vllm-cpu-tiny for `bench compare --replicas`).
    #[arg(long)]
    pub(crate) profile: Option<String>,
}

/// The simulator profile when `--profile` is not given.
pub(crate) const DEFAULT_PROFILE: &str = "rtx4080";

/// The engine a benchmark drives, started or resolved.
pub(crate) struct Upstream {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Its URL as given (or the simulator's).
    pub(crate) url: String,
    /// The simulator's profile name; `None` for an external engine.
    pub(crate) profile: Option<String>,
    /// The simulator's exact in-flight count; `None` for an external engine.
    pub(crate) in_flight: Option<Arc<InFlight>>,
}

impl EngineArgs {
    /// Resolves `--upstream`, or starts the simulator in-process on 127.0.0.1:0.
    pub(crate) async fn start(&self) -> anyhow::Result<Upstream> {
        match self.upstream.as_slice() {
            [] => {
                let profile =
                    sluice_sim::Profile::load(self.profile.as_deref().unwrap_or(DEFAULT_PROFILE))?;
                let name = profile.name.clone();
                let gauge = Arc::new(InFlight::default());
                let addr = start_sim(profile, Arc::clone(&gauge), std::future::pending()).await?;
                Ok(Upstream {
                    addr,
                    url: format!("http://{addr}"),
                    profile: Some(name),
                    in_flight: Some(gauge),
                })
            }
            [url] => external(url).await,
            many => anyhow::bail!(
                "--upstream given {} times: only `bench compare --replicas` drives several engines",
                many.len()
            ),
        }
    }
}

/// An engine already running at `url`.
pub(crate) async fn external(url: &str) -> anyhow::Result<Upstream> {
    Ok(Upstream {
        addr: client::resolve(url).await?,
        url: url.to_string(),
        profile: None,
        in_flight: None,
    })
}

/// Simulated engines started in-process, each on 127.0.0.1:0 with a KV
/// pool and prefix cache of its own; all stop when this is dropped.
pub(crate) struct SimFleet {
    /// One per engine, in start order.
    pub(crate) engines: Vec<Upstream>,
    /// Set to `true` (or dropped) to stop every engine.
    _stop: tokio::sync::watch::Sender<bool>,
}

impl SimFleet {
    /// `n` engines of `profile`.
    pub(crate) async fn start(profile: &sluice_sim::Profile, n: usize) -> anyhow::Result<Self> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut engines = Vec::with_capacity(n);
        for _ in 0..n {
            let gauge = Arc::new(InFlight::default());
            let mut stopped = stop.subscribe();
            let shutdown = async move {
                // An error means the sender is gone: stop then too.
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let addr = start_sim(profile.clone(), Arc::clone(&gauge), shutdown).await?;
            engines.push(Upstream {
                addr,
                url: format!("http://{addr}"),
                profile: Some(profile.name.clone()),
                in_flight: Some(gauge),
            });
        }
        Ok(Self {
            engines,
            _stop: stop,
        })
    }
}

/// An exact in-flight gauge with its peak (the in-process simulator's view).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    now: AtomicU64,
    max: AtomicU64,
}

impl InFlight {
    /// One more request in flight.
    pub(crate) fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }

    /// One fewer.
    pub(crate) fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    /// The peak since the last reset, then a reset to the current level.
    pub(crate) fn take_max(&self) -> u64 {
        self.max
            .swap(self.now.load(Ordering::SeqCst), Ordering::SeqCst)
    }
}

/// The in-process simulator, counting requests in flight exactly, until
/// `shutdown` completes (its engine stops and it accepts no more
/// connections).
async fn start_sim(
    profile: sluice_sim::Profile,
    gauge: Arc<InFlight>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    use sluice_sim::api::App;
    use sluice_sim::driver::Sim;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(profile);
    let (stopped, engine_stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim.clone().run(async {
        let _ = engine_stop.await;
    }));
    let app = App::new(sim);
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => {
                    let _ = stopped.send(());
                    return;
                }
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (app, gauge) = (app.clone(), Arc::clone(&gauge));
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let (app, gauge) = (app.clone(), Arc::clone(&gauge));
                async move {
                    let leave = (req.method() == hyper::Method::POST).then(|| {
                        gauge.enter();
                        Leave(gauge)
                    });
                    let response = app.handle(req).await;
                    // A whole answer is done when `handle` returns; a stream
                    // stays in flight until its body ends or is dropped
                    // (client gone), which can be an instant after the
                    // client has read its last event.
                    let streamed = response
                        .headers()
                        .get(hyper::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                    let leave = if streamed { leave } else { None };
                    Ok::<_, Infallible>(response.map(|body| Counted { body, leave }))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Leaves the in-flight gauge when dropped.
struct Leave(Arc<InFlight>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A simulator answer that holds its request in flight until it is dropped.
struct Counted {
    body: sluice_sim::api::SimBody,
    leave: Option<Leave>,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Infallible>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None)) {
            self.leave = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// "simulated vLLM (profile P)", "simulated vLLM at URL" or "real vLLM at URL".
pub(crate) async fn engine_name(engine: SocketAddr, url: &str, profile: Option<&str>) -> String {
    if let Some(p) = profile {
        return format!("simulated vLLM (profile {p})");
    }
    match client::metrics(engine).await {
        Some(m) if m.contains("simulated=\"True\"") => format!("simulated vLLM at {url}"),
        Some(m) if m.contains("vllm:") => format!("real vLLM at {url}"),
        _ => format!("unknown engine at {url}"),
    }
}

/// The model an engine serves (its first `/v1/models` entry).
pub(crate) async fn model_of(addr: SocketAddr) -> Option<String> {
    let (status, body) = client::get(addr, "/v1/models").await.ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"][0]["id"].as_str().map(str::to_string)
}

/// The engine's `max_model_len` from `/v1/models` (vLLM and the simulator
/// both report it).
pub(crate) async fn max_model_len(addr: SocketAddr) -> Option<u64> {
    let (status, body) = client::get(addr, "/v1/models").await.ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"][0]["max_model_len"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_peak() {
        let g = InFlight::default();
        g.enter();
        g.enter();
        g.leave();
        assert_eq!(g.take_max(), 2);
        assert_eq!(g.take_max(), 1);
    }
}
