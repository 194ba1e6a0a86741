//! One proxy process's services, built from a [`Config`]: the policy
//! runtime and admission, the prefix tracker, the client-facing proxy and the
//! background samplers; and policy reloads (admin upload or SIGHUP), with a
//! record of the running plugin ([`LoadedPolicy`]).

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::admission::ratelimit::TenantLimiter;
use crate::admission::wasm::{Contract, LoadError, PolicyRuntime, WasmPolicy};
use crate::admission::{Admission, AdmissionConfig, Policy, ReplicaSource, ReplicaState};
use crate::config::Config;
use crate::error::ProxyError;
use crate::gpu::{self, GpuSnapshot};
use crate::headers::Tenants;
use crate::intake::BodyBudget;
use crate::prefix::{BlockUnit, PrefixTracker};
use crate::proxy::Proxy;
use crate::replicas::{ReplicaSet, discovery};
use crate::tokens::{HfTokenizer, TokenizerError};
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
    /// The replicas: their health, load, scraped metrics and routing.
    pub replicas: Arc<ReplicaSet>,
    /// The shared-prompt prefix tracker.
    pub prefix: Arc<PrefixTracker>,
    /// The running plugin, when a policy is configured: recorded at start
    /// and by each successful reload while it holds `reloading`.
    policy: Mutex<Option<LoadedPolicy>>,
    /// Reloads since start: accepted, rejected.
    reloads: [AtomicU64; 2],
    // Held from loading a new policy until it is recorded, so that reloads
    // that overlap apply (and are recorded) one after the other.
    reloading: tokio::sync::Mutex<()>,
}

/// Where a policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The `--policy` file, at start.
    File(PathBuf),
    /// The body of `PUT /admin/policy`.
    Upload,
    /// The `--policy` file, read again on SIGHUP.
    Sighup(PathBuf),
}

impl PolicySource {
    /// The plugin's name: its file stem, or `uploaded`.
    pub fn name(&self) -> String {
        match self {
            Self::File(path) | Self::Sighup(path) => path
                .file_stem()
                .map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned()),
            Self::Upload => "uploaded".into(),
        }
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Upload => f.write_str("uploaded"),
            Self::Sighup(path) => write!(f, "SIGHUP {}", path.display()),
        }
    }
}

/// The plugin that decides admission, as it was loaded.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    /// Where it came from.
    pub source: PolicySource,
    /// Its name (the label of its metrics and `/stats` series).
    pub name: String,
    /// SHA-256 of the component's bytes, in hex.
    pub sha256: String,
    /// The component's size in bytes.
    pub size: usize,
    /// What its `init` said about itself.
    pub description: String,
    /// The contract version it implements.
    pub contract: Contract,
    /// The configuration its `init` was given.
    pub config: Vec<(String, String)>,
    /// When it took over (wall clock).
    pub loaded_at: SystemTime,
    /// When it took over (monotonic, for its age).
    pub loaded: Instant,
}

impl LoadedPolicy {
    fn new(
        source: PolicySource,
        bytes: &[u8],
        policy: &WasmPolicy,
        config: Vec<(String, String)>,
    ) -> Self {
        Self {
            name: source.name(),
            source,
            sha256: Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            size: bytes.len(),
            description: policy.description().to_owned(),
            contract: policy.contract(),
            config,
            loaded_at: SystemTime::now(),
            loaded: Instant::now(),
        }
    }
}

/// Reload results counted by [`App::reload_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadCounts {
    /// Policies that replaced the running one.
    pub ok: u64,
    /// Policies refused (invalid, refused their config, unreadable file).
    pub rejected: u64,
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
        let replicas = start_replicas(&config, Arc::clone(&prefix));
        let (admission, runtime, loaded) = match &config.admission.policy {
            None => (None, None, None),
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
                // Read once: the digest is of the bytes that were loaded.
                let bytes = std::fs::read(path).map_err(|e| {
                    policy_error(LoadError::Read {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })
                })?;
                let source = PolicySource::File(path.clone());
                let policy = runtime
                    .load(&source.name(), &bytes, &config.admission.policy_config)
                    .map_err(policy_error)?;
                let loaded = LoadedPolicy::new(
                    source,
                    &bytes,
                    &policy,
                    config.admission.policy_config.clone(),
                );
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
                        replicas: Some(replica_source(&replicas)),
                    },
                );
                (Some(admission), Some(runtime), Some(loaded))
            }
        };
        if config.admission.rate_limit().is_some() && admission.is_none() {
            tracing::warn!(
                "--rate-limit applies to admitted routes and needs --policy; it is ignored in pass-through mode"
            );
        }
        let admin_listen = config.server.admin_listen;
        if config.admin.token.is_none() && !is_loopback(admin_listen.ip()) {
            tracing::warn!(
                admin = %admin_listen,
                "the admin listener is not on a loopback address and has no --admin-token: anyone who reaches it can read /metrics and /stats, and it refuses changes (PUT /admin/policy, POST /stats/reset) until a token is set"
            );
        }
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
        let body_budget = BodyBudget::new(config.server.body_memory);
        crate::resources::watch_body_budget(&body_budget);
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&replicas),
            admission.clone(),
            Arc::clone(&prefix),
            tenants,
            config.server.max_body,
            body_budget,
        ));
        Ok(Arc::new(Self {
            config,
            proxy,
            admission,
            runtime,
            metrics,
            started: Instant::now(),
            gpus: gpu::start(),
            replicas,
            prefix,
            policy: Mutex::new(loaded),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            reloading: tokio::sync::Mutex::new(()),
        }))
    }

    /// The running plugin as it was loaded; `None` in pass-through.
    pub fn loaded_policy(&self) -> Option<LoadedPolicy> {
        self.policy.lock().ok().and_then(|p| p.clone())
    }

    /// Reloads accepted and rejected since start.
    pub fn reload_counts(&self) -> ReloadCounts {
        ReloadCounts {
            ok: self.reloads[0].load(Ordering::Relaxed),
            rejected: self.reloads[1].load(Ordering::Relaxed),
        }
    }

    /// Whether the admin listener is bound to a loopback address, where
    /// only this machine can reach it.
    pub fn admin_is_loopback(&self) -> bool {
        is_loopback(self.config.server.admin_listen.ip())
    }

    fn count_reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        telemetry::count_reload(if ok { "ok" } else { "rejected" });
    }

    /// Validates `bytes` as a policy (instantiate + init), hands the queue to
    /// it and records it. `config` replaces `--policy-config` for this plugin
    /// when given.
    pub async fn reload(
        &self,
        source: PolicySource,
        bytes: Bytes,
        config: Option<Vec<(String, String)>>,
    ) -> Result<LoadedPolicy, ProxyError> {
        let (Some(admission), Some(runtime)) = (&self.admission, &self.runtime) else {
            return Err(ProxyError::InvalidRequest(
                "the proxy was started without --policy (pass-through); restart it with one to use policies".into(),
            ));
        };
        let _turn = self.reloading.lock().await;
        let runtime = runtime.clone();
        let config = config.unwrap_or_else(|| self.config.admission.policy_config.clone());
        let name = source.name();
        let (loaded, bytes, config) = tokio::task::spawn_blocking(move || {
            let loaded = runtime.load(&name, &bytes, &config);
            (loaded, bytes, config)
        })
        .await
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
        match loaded {
            Ok(policy) => {
                let record = LoadedPolicy::new(source, &bytes, &policy, config);
                admission.reload(Box::new(policy)).await?;
                stats::set_policy_label(&record.name);
                self.count_reload(true);
                tracing::info!(
                    source = %record.source,
                    sha256 = record.sha256,
                    description = record.description,
                    "policy reload complete"
                );
                if let Ok(mut running) = self.policy.lock() {
                    *running = Some(record.clone());
                }
                Ok(record)
            }
            Err(err) => {
                self.count_reload(false);
                tracing::warn!(error = %err, "policy reload rejected; the running policy stays");
                Err(ProxyError::InvalidRequest(format!(
                    "policy rejected: {err}"
                )))
            }
        }
    }

    /// Reloads the configured `--policy` file (SIGHUP); answers with the
    /// new policy's description.
    pub async fn reload_from_config(&self) -> Result<String, ProxyError> {
        let Some(path) = &self.config.admission.policy else {
            return Err(ProxyError::InvalidRequest("no --policy configured".into()));
        };
        let bytes = tokio::fs::read(path).await.map_err(|e| {
            self.count_reload(false);
            ProxyError::InvalidRequest(format!("cannot read {}: {e}", path.display()))
        })?;
        let source = PolicySource::Sighup(path.clone());
        let loaded = self.reload(source, Bytes::from(bytes), None).await?;
        Ok(loaded.description)
    }
}

/// Loopback, IPv4-mapped IPv6 included.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The replicas of `--upstream`, resolved now and followed every
/// `--resolve-interval` when a URL names a host.
fn start_replicas(config: &Config, hasher: Arc<PrefixTracker>) -> Arc<ReplicaSet> {
    let urls = &config.upstream.urls;
    let addresses = discovery::addresses(urls, discovery::resolve_now);
    let replicas = ReplicaSet::new(
        addresses,
        &config.upstream,
        config.server.workers(),
        config.telemetry.scrape_interval(),
        hasher,
    );
    let interval = config.upstream.resolve_interval;
    if discovery::has_names(urls) && !interval.is_zero() {
        discovery::follow(&replicas, urls.clone(), interval);
    }
    if replicas.all().len() > 1 {
        let names: Vec<String> = replicas.all().iter().map(|r| r.name.clone()).collect();
        tracing::info!(replicas = ?names, route = ?config.upstream.route, "several replicas");
    }
    replicas
}

/// The replicas as a 0.2 policy sees them; none with a single upstream
/// (there is no choice of where to make).
fn replica_source(replicas: &Arc<ReplicaSet>) -> ReplicaSource {
    let replicas = Arc::clone(replicas);
    Arc::new(move || {
        let all = replicas.all();
        if all.len() < 2 {
            return Vec::new();
        }
        all.iter()
            .map(|r| {
                let engine = r.engine.load();
                ReplicaState {
                    id: r.id,
                    name: r.name.clone(),
                    healthy: r.healthy(),
                    in_flight: r.in_flight(),
                    engine_running: engine.running,
                    engine_waiting: engine.waiting,
                    kv_usage: engine.kv_usage,
                }
            })
            .collect()
    })
}
