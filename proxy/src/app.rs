//! One proxy process's services, built from a [`Config`]: the policy
//! runtime and admission, the prefix tracker, the client-facing proxy and the
//! background samplers; and policy reloads (admin upload or SIGHUP).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use crate::admission::ratelimit::TenantLimiter;
use crate::admission::wasm::{LoadError, PolicyRuntime};
use crate::admission::{Admission, AdmissionConfig, Policy};
use crate::config::Config;
use crate::error::ProxyError;
use crate::gpu::{self, GpuSnapshot};
use crate::headers::Tenants;
use crate::intake::BodyBudget;
use crate::prefix::{BlockUnit, PrefixTracker};
use crate::proxy::Proxy;
use crate::scrape::{self, UpstreamMetrics};
use crate::tokens::{HfTokenizer, TokenizerError};
use crate::upstream::Upstream;
use crate::{stats, telemetry};

/// Everything one proxy process serves with.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The client-facing service.
    pub proxy: Arc<Proxy>,
    /// Admission, when a policy is configured.
    pub admission: Option<Admission>,
    /// The wasm runtime, when a policy is configured.
    pub runtime: Option<PolicyRuntime>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// Process start.
    pub started: Instant,
    /// Latest GPU readings, when NVML is present.
    pub gpus: Option<GpuSnapshot>,
    /// The upstream's own metrics, scraped.
    pub upstream_metrics: Arc<UpstreamMetrics>,
    /// The shared-prompt prefix tracker.
    pub prefix: Arc<PrefixTracker>,
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
    Tokenizer(#[from] TokenizerError),
    /// No random secret for the API key digests (see [`Tenants`]).
    #[error("cannot draw a secret for API key digests: {0}")]
    Entropy(#[from] getrandom::Error),
}

impl App {
    /// Loads the policy (if any) and builds the services; binds nothing.
    /// Must run inside a tokio runtime (it spawns the scheduler task).
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = telemetry::install();
        let upstream = Upstream::new(&config.upstream, config.server.workers());
        let (admission, runtime) = match &config.admission.policy {
            None => (None, None),
            Some(path) => {
                let policy_error = |source| StartError::Policy {
                    path: path.display().to_string(),
                    source,
                };
                let runtime = PolicyRuntime::new(
                    config.admission.policy_deadline,
                    config.admission.policy_memory,
                )
                .map_err(policy_error)?;
                let policy = runtime
                    .load_file(path, &config.admission.policy_config)
                    .map_err(policy_error)?;
                tracing::info!(policy = %path.display(), description = policy.description(), "admission policy loaded");
                stats::set_policy_label(policy.name());
                let limiter = config.admission.rate_limit().map(|limit| {
                    let limiter = Arc::new(TenantLimiter::new(limit));
                    TenantLimiter::forget_idle_every(&limiter, Duration::from_secs(60));
                    limiter
                });
                let admission = Admission::start(
                    Box::new(policy),
                    AdmissionConfig {
                        fallback_limit: config.admission.fallback_limit,
                        max_queue: config.admission.max_queue,
                        queue_timeout: config.admission.queue_timeout,
                        limiter,
                    },
                );
                (Some(admission), Some(runtime))
            }
        };
        if config.admission.rate_limit().is_some() && admission.is_none() {
            tracing::warn!(
                "--rate-limit applies to admitted routes and needs --policy; it is ignored in pass-through mode"
            );
        }
        let (config_upstream, scrape_interval) = (
            config.upstream.url.clone(),
            config.telemetry.scrape_interval(),
        );
        let unit = match &config.prefix.tokenizer {
            None => BlockUnit::Bytes,
            Some(path) => {
                let tokenizer = HfTokenizer::from_file(path)?;
                tracing::info!(tokenizer = %path.display(), vocab = tokenizer.vocab_size(), "prefix tracking in exact token blocks");
                BlockUnit::Tokenizer(Arc::new(tokenizer))
            }
        };
        let prefix = Arc::new(PrefixTracker::with_unit(
            config.prefix.cache_blocks,
            config.prefix.block_size,
            unit,
        ));
        let trust = config.admission.trust_tenant_header;
        let tenants = match &config.admission.tenant_hash_key_file {
            Some(secret) => Tenants::new(trust, secret.bytes()),
            None => Tenants::with_random_secret(trust)?,
        };
        if trust {
            tracing::info!(
                "--trust-tenant-header: X-Tenant names the tenant; clients must reach this proxy only through a gateway that sets it"
            );
        }
        let proxy = Arc::new(Proxy::new(
            upstream,
            admission.clone(),
            Arc::clone(&prefix),
            tenants,
            config.server.max_body,
            BodyBudget::new(config.server.body_memory),
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
        let config = config.unwrap_or_else(|| self.config.admission.policy_config.clone());
        let name = name.to_owned();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&name, &bytes, &config))
            .await
            .map_err(|e| ProxyError::Internal(e.to_string()))?;
        match loaded {
            Ok(policy) => {
                let description = policy.description().to_owned();
                let label = policy.name().to_owned();
                admission.reload(Box::new(policy)).await?;
                stats::set_policy_label(&label);
                telemetry::count_reload("ok");
                tracing::info!(description, "policy reload complete");
                Ok(description)
            }
            Err(err) => {
                telemetry::count_reload("rejected");
                tracing::warn!(error = %err, "policy reload rejected; the running policy stays");
                Err(ProxyError::InvalidRequest(format!(
                    "policy rejected: {err}"
                )))
            }
        }
    }

    /// Reloads the configured `--policy` file (SIGHUP).
    pub async fn reload_from_config(&self) -> Result<String, ProxyError> {
        let Some(path) = &self.config.admission.policy else {
            return Err(ProxyError::InvalidRequest("no --policy configured".into()));
        };
        let bytes = tokio::fs::read(path).await.map_err(|e| {
            telemetry::count_reload("rejected");
            ProxyError::InvalidRequest(format!("cannot read {}: {e}", path.display()))
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.reload(&name, Bytes::from(bytes), None).await
    }
}
