//! The engine a benchmark drives, and what it says about itself.
//!
//! [`EngineArgs`] (`--upstream`, `--profile`) gives an [`Upstream`]: a
//! running engine found at its URL, or the simulated vLLM started
//! in-process on 127.0.0.1:0, which also counts the requests in flight in
//! it exactly ([`InFlight`]). [`engine_name`], [`model_of`] and
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
    /// A running engine (http://HOST:PORT) instead of the in-process simulator.
    #[arg(long)]
    pub(crate) upstream: Option<String>,
    /// Simulator profile (built-in name or TOML path) when no `--upstream`.
    #[arg(long, default_value = "rtx4080")]
    pub(crate) profile: String,
}

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
        match &self.upstream {
            Some(url) => Ok(Upstream {
                addr: client::resolve(url).await?,
                url: url.clone(),
                profile: None,
                in_flight: None,
            }),
            None => {
                let profile = sluice_sim::Profile::load(&self.profile)?;
                let name = profile.name.clone();
                let gauge = Arc::new(InFlight::default());
                let addr = start_sim(profile, Arc::clone(&gauge)).await?;
                Ok(Upstream {
                    addr,
                    url: format!("http://{addr}"),
                    profile: Some(name),
                    in_flight: Some(gauge),
                })
            }
        }
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

/// The in-process simulator, counting requests in flight exactly.
async fn start_sim(
    profile: sluice_sim::Profile,
    gauge: Arc<InFlight>,
) -> anyhow::Result<SocketAddr> {
    use sluice_sim::api::App;
    use sluice_sim::driver::Sim;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(profile);
    tokio::spawn(sim.clone().run(std::future::pending::<()>()));
    let app = App::new(sim);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
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
