//! Sluice: an admission proxy for OpenAI-compatible inference servers.
//!
//! A hyper reverse proxy in front of vLLM that forwards every route, and
//! decides *when* each completion/chat request may enter the engine with an
//! admission policy loaded as a wasm component.
//!
//! # Layout
//!
//! - [`cli`]: flags, `SLUICE_*` environment and TOML file → a validated [`cli::Config`].
//! - [`server`]: listeners, connection limits, HTTP/1.1 + h2c, graceful drain.
//! - [`proxy`]: the client-facing request path: classify, admit, forward, stream back.
//! - [`classify`]: route labels and the typed view of completion/chat bodies.
//! - [`headers`]: hop-by-hop stripping, `X-Forwarded-For`, tenant keys.
//! - [`upstream`]: upstream connections, deadlines, upstream health (502/503/504).
//! - [`pool`]: idle upstream connections, lent for one request at a time.
//! - [`body`]: streaming pass-through with TTFT, idle timeout and SSE error events.
//! - [`exchange`]: one request's timings; the single place it is logged and measured.
//! - [`admission`]: the queue, the scheduler task, the wasm host, the fallback, rate limits.
//! - [`admin`]: the admin listener (`/metrics`, `/stats`, `/admin/policy`).
//! - [`telemetry`]: every metric, described once.
//! - [`gpu`]: the NVML sampler (GPU memory and utilisation), off without a driver.
//! - [`scrape`]: the upstream's own `/metrics`, mirrored as `sluice_upstream_...`.
//! - [`stats`]: exact percentiles (HDR) per route and policy for `/stats`.
//! - [`prefix`]: shared-prompt prefix tracking: chained block hashes in an LRU → predicted cached tokens.
//! - [`stream_usage`]: asks the upstream for a stream's `usage` and strips that event before the client sees it.
//! - [`tokens`]: prompt-length estimates and the HF tokenizer for exact blocks (`--tokenizer`).
//! - [`usage`]: the engine's token counts, read from the response as it passes.
//! - [`error`]: the one mapping from failure to status code and OpenAI error body.
#![deny(missing_docs)]

pub mod admin;
pub mod admission;
pub mod body;
pub mod classify;
pub mod cli;
pub mod error;
pub mod exchange;
pub mod gpu;
pub mod headers;
pub mod pool;
pub mod prefix;
pub mod proxy;
pub mod scrape;
pub mod server;
pub mod stats;
pub mod stream_usage;
pub mod telemetry;
pub mod tokens;
pub mod upstream;
pub mod usage;

use std::sync::Arc;

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use admission::wasm::{LoadError, PolicyRuntime};
use admission::{Admission, ratelimit::TenantLimiter, scheduler};
use cli::Config;
use error::ProxyError;

/// Everything one proxy process serves with.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The client-facing service.
    pub proxy: Arc<proxy::Proxy>,
    /// Admission, when a policy is configured.
    pub admission: Option<Admission>,
    /// The wasm runtime, when a policy is configured.
    pub runtime: Option<PolicyRuntime>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// Process start.
    pub started: Instant,
    /// Latest GPU readings, when NVML is present.
    pub gpus: Option<gpu::GpuSnapshot>,
    /// The upstream's own metrics, scraped.
    pub upstream_metrics: Arc<scrape::UpstreamMetrics>,
    /// The shared-prompt prefix tracker.
    pub prefix: Arc<prefix::PrefixTracker>,
}

/// Why the proxy cannot start with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy could not be loaded or refused its configuration.
    #[error("--policy {path}: {source}")]
    Policy {
        /// The policy file.
        path: String,
        /// Why.
        source: LoadError,
    },
    /// `--tokenizer` could not be loaded.
    #[error("--tokenizer: {0}")]
    Tokenizer(#[from] tokens::TokenizerError),
}

impl App {
    /// Loads the policy (if any) and builds the services; binds nothing.
    /// Must run inside a tokio runtime (it spawns the scheduler task).
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = telemetry::install();
        let upstream = upstream::Upstream::new(&config);
        let (admission, runtime) = match &config.policy {
            None => (None, None),
            Some(path) => {
                let policy_error = |source| StartError::Policy {
                    path: path.display().to_string(),
                    source,
                };
                let runtime = PolicyRuntime::new(config.policy_deadline, config.policy_memory)
                    .map_err(policy_error)?;
                let policy = runtime
                    .load_file(path, &config.policy_config)
                    .map_err(policy_error)?;
                tracing::info!(policy = %path.display(), description = policy.description(), "admission policy loaded");
                stats::set_policy_label(policy.name());
                let limiter = config
                    .rate_limit
                    .map(|limit| Arc::new(TenantLimiter::new(limit)));
                if let Some(limiter) = &limiter {
                    // Tenants whose budget has fully refilled are forgotten, so
                    // the limiter's memory follows the active tenants only.
                    let limiter = Arc::downgrade(limiter);
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
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
                let admission = scheduler::spawn(scheduler::SchedulerConfig {
                    policy: Box::new(policy),
                    fallback_limit: config.fallback_limit,
                    max_queue: config.max_queue,
                    queue_timeout: config.queue_timeout,
                    limiter,
                });
                (Some(admission), Some(runtime))
            }
        };
        if config.rate_limit.is_some() && admission.is_none() {
            tracing::warn!(
                "--rate-limit applies to admitted routes and needs --policy; it is ignored in pass-through mode"
            );
        }
        let (config_upstream, scrape_interval) = (config.upstream.clone(), config.scrape_interval);
        let unit = match &config.tokenizer {
            None => prefix::BlockUnit::Bytes,
            Some(path) => {
                let tokenizer = tokens::HfTokenizer::from_file(path)?;
                tracing::info!(tokenizer = %path.display(), vocab = tokenizer.vocab_size(), "prefix tracking in exact token blocks");
                prefix::BlockUnit::Tokenizer(Arc::new(tokenizer))
            }
        };
        let prefix = Arc::new(prefix::PrefixTracker::with_unit(
            config.prefix_cache_blocks,
            config.block_size,
            unit,
        ));
        let proxy = Arc::new(proxy::Proxy::new(
            upstream,
            admission.clone(),
            Arc::clone(&prefix),
            config.max_body,
        ));
        Ok(Arc::new(Self {
            config,
            proxy,
            admission,
            runtime,
            metrics,
            started: Instant::now(),
            gpus: gpu::start(),
            upstream_metrics: scrape::start(config_upstream, scrape_interval, Arc::clone(&prefix)),
            prefix,
        }))
    }

    /// Validates `bytes` as a policy (instantiate + init) and hands the queue to it.
    /// `config` replaces `--policy-config` for this plugin when given.
    pub async fn reload(
        &self,
        name: &str,
        bytes: Bytes,
        config: Option<Vec<(String, String)>>,
    ) -> Result<String, ProxyError> {
        let (Some(admission), Some(runtime)) = (&self.admission, &self.runtime) else {
            return Err(ProxyError::InvalidRequest(
                "the proxy was started without --policy (pass-through); restart it with one to use policies".into(),
            ));
        };
        let runtime = runtime.clone();
        let config = config.unwrap_or_else(|| self.config.policy_config.clone());
        let name = name.to_owned();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&name, &bytes, &config))
            .await
            .map_err(|e| ProxyError::Internal(e.to_string()))?;
        match loaded {
            Ok(policy) => {
                let description = policy.description().to_owned();
                let label = policy.name().to_owned();
                admission.reload(policy).await?;
                stats::set_policy_label(&label);
                admin::count_reload("ok");
                tracing::info!(description, "policy reload complete");
                Ok(description)
            }
            Err(err) => {
                admin::count_reload("rejected");
                tracing::warn!(error = %err, "policy reload rejected; the running policy stays");
                Err(ProxyError::InvalidRequest(format!(
                    "policy rejected: {err}"
                )))
            }
        }
    }

    /// Reloads the configured `--policy` file (SIGHUP).
    pub async fn reload_from_config(&self) -> Result<String, ProxyError> {
        let Some(path) = &self.config.policy else {
            return Err(ProxyError::InvalidRequest("no --policy configured".into()));
        };
        let bytes = tokio::fs::read(path).await.map_err(|e| {
            ProxyError::InvalidRequest(format!("cannot read {}: {e}", path.display()))
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.reload(&name, Bytes::from(bytes), None).await
    }
}
