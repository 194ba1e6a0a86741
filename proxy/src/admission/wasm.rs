//! The wasm host: policies as sandboxed components of the `admission`
//! world, in either version of the contract: `sluice:policy@0.2.0`
//! (`wit/policy.wit`, with replicas) or `sluice:policy@0.1.0`
//! (`wit/v0.1/policy.wit`).
//!
//! - One [`PolicyRuntime`] per process: a wasmtime `Engine` with epoch
//!   interruption, a `Linker` with the world's imports (`log`, and
//!   `gauge`, which sets `sluice_policy_value{name}`; the same in both
//!   versions, so one linker serves both), and a ticker thread that
//!   advances the epoch every [`EPOCH_TICK`] while the engine lives (it
//!   holds a weak reference).
//! - One [`WasmPolicy`] per loaded plugin: a long-lived instance in its own
//!   `Store`, with a memory limit (growth beyond it traps) and a deadline set
//!   before every call. No WASI is linked: a policy cannot reach a clock,
//!   files or the network.
//!
//! Which version a component speaks is read from its exports before it is
//! instantiated ([`Contract::of`]): `sluice:policy/policy@0.2.0` first, else
//! `@0.1.0`. A 0.1 plugin is told nothing of replicas (the scheduler does
//! not even read them for it) and what it admits goes where the router
//! chooses.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

use super::policy::{Admit, CompletionReport, Decision, Event, Fault, Policy, Snapshot};
use crate::telemetry;

mod bindings {
    /// `sluice:policy@0.2.0`, the current contract.
    pub(super) mod v0_2 {
        wasmtime::component::bindgen!({ path: "../wit", world: "admission" });
    }
    /// `sluice:policy@0.1.0`, still loaded.
    pub(super) mod v0_1 {
        wasmtime::component::bindgen!({ path: "../wit/v0.1", world: "admission" });
    }
}

use bindings::v0_1::exports::sluice::policy::policy as guest_v0_1;
use bindings::v0_2::exports::sluice::policy::policy as guest_v0_2;

/// The newest contract, the one `wit/policy.wit` defines and the bundled
/// plugins implement.
pub const CONTRACT: &str = Contract::V0_2.package();

/// How often the epoch advances; policy deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// A version of the policy contract the host loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `sluice:policy@0.1.0`: no replicas.
    V0_1,
    /// `sluice:policy@0.2.0`: replicas in the snapshot, per-replica cache
    /// hits in the request, admissions that may name a replica.
    V0_2,
}

impl Contract {
    /// Newest first: the order in which a component's exports are tried.
    pub const ALL: [Contract; 2] = [Contract::V0_2, Contract::V0_1];

    /// The WIT package, e.g. `sluice:policy@0.2.0`.
    pub const fn package(self) -> &'static str {
        match self {
            Self::V0_1 => "sluice:policy@0.1.0",
            Self::V0_2 => "sluice:policy@0.2.0",
        }
    }

    /// The name of the interface a component of this version exports.
    const fn export(self) -> &'static str {
        match self {
            Self::V0_1 => "sluice:policy/policy@0.1.0",
            Self::V0_2 => "sluice:policy/policy@0.2.0",
        }
    }

    /// The newest version whose `policy` interface `component` exports.
    pub fn of(component: &Component) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| component.get_export_index(None, c.export()).is_some())
    }
}

impl fmt::Display for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.package())
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a component of the `admission` world, in any version.
    #[error("not a valid {v2} or {v1} component: {0}", v2 = Contract::V0_2, v1 = Contract::V0_1)]
    Invalid(String),
    /// `init` refused the configuration.
    #[error("policy rejected its configuration: {0}")]
    Config(String),
    /// `init` trapped or overran.
    #[error("policy failed during init: {0}")]
    Init(Fault),
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Most distinct names one plugin instance may publish through `gauge`
/// (a bound on the metric's label values).
pub const MAX_GAUGES: usize = 16;

/// Per-store host state.
struct HostState {
    limits: StoreLimits,
    name: Arc<str>,
    /// Names published through `gauge`, at most [`MAX_GAUGES`].
    gauges: Vec<String>,
}

// The imports are world-level functions of the same names and types in both
// versions, so implementing (and linking) the 0.2 ones serves 0.1 plugins too.
impl bindings::v0_2::AdmissionImports for HostState {
    fn log(&mut self, level: u8, message: String) {
        let policy = &*self.name;
        match level {
            0 => tracing::error!(policy, "{message}"),
            1 => tracing::warn!(policy, "{message}"),
            2 => tracing::info!(policy, "{message}"),
            3 => tracing::debug!(policy, "{message}"),
            _ => tracing::trace!(policy, "{message}"),
        }
    }

    fn gauge(&mut self, name: String, value: f64) {
        if !value.is_finite() {
            return;
        }
        if !self.gauges.contains(&name) {
            if self.gauges.len() >= MAX_GAUGES {
                return;
            }
            self.gauges.push(name.clone());
        }
        metrics::gauge!(telemetry::POLICY_VALUE, "name" => name).set(value);
    }
}

/// The process-wide engine and linker (cheap to clone).
#[derive(Clone)]
pub struct PolicyRuntime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    deadline: Duration,
    memory_limit: usize,
}

impl fmt::Debug for PolicyRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyRuntime")
            .field("deadline", &self.deadline)
            .field("memory_limit", &self.memory_limit)
            .finish_non_exhaustive()
    }
}

impl PolicyRuntime {
    /// An engine with epoch interruption and a ticker thread.
    pub fn new(deadline: Duration, memory_limit: usize) -> Result<Self, LoadError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| LoadError::Invalid(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        bindings::v0_2::Admission::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| LoadError::Invalid(e.to_string()))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| LoadError::Invalid(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            deadline,
            memory_limit,
        })
    }

    /// Reads, compiles, instantiates and initialises a policy file.
    pub fn load_file(
        &self,
        path: &Path,
        config: &[(String, String)],
    ) -> Result<WasmPolicy, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "policy".into());
        self.load(&name, &bytes, config)
    }

    /// Compiles (binary or WAT), instantiates and initialises a policy of
    /// either contract version.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        config: &[(String, String)],
    ) -> Result<WasmPolicy, LoadError> {
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let contract = Contract::of(&component).ok_or_else(|| {
            LoadError::Invalid(format!(
                "it exports neither `{}` nor `{}`",
                Contract::V0_2.export(),
                Contract::V0_1.export()
            ))
        })?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_limit)
            .instances(16)
            .memories(4)
            .tables(16)
            .trap_on_grow_failure(true)
            .build();
        let name: Arc<str> = Arc::from(name);
        let mut store = Store::new(
            &self.engine,
            HostState {
                limits,
                name: Arc::clone(&name),
                gauges: Vec::new(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let invalid = |e: wasmtime::Error| LoadError::Invalid(format!("{e:#}"));
        let instance = match contract {
            Contract::V0_1 => Guest::V0_1 {
                instance: bindings::v0_1::Admission::instantiate(
                    &mut store,
                    &component,
                    &self.linker,
                )
                .map_err(invalid)?,
                scratch: guest_v0_1::Request {
                    id: 0,
                    tenant: String::new(),
                    model: String::new(),
                    prompt_tokens: 0,
                    max_tokens: 0,
                    cached_tokens: 0,
                    prefix_group: 0,
                    priority: 0,
                    arrived_us: 0,
                },
            },
            Contract::V0_2 => Guest::V0_2 {
                instance: bindings::v0_2::Admission::instantiate(
                    &mut store,
                    &component,
                    &self.linker,
                )
                .map_err(invalid)?,
                scratch: guest_v0_2::Request {
                    id: 0,
                    tenant: String::new(),
                    model: String::new(),
                    prompt_tokens: 0,
                    max_tokens: 0,
                    cached_tokens: 0,
                    prefix_group: 0,
                    priority: 0,
                    arrived_us: 0,
                    cached_by_replica: Vec::new(),
                },
                replicas: Vec::new(),
            },
        };
        let mut policy = WasmPolicy {
            guest: instance,
            calls: ["arrival", "completion", "cancel", "tick"]
                .map(|event| metrics::counter!(telemetry::POLICY_CALLS, "event" => event)),
            name,
            description: String::new(),
            store,
            deadline: self.deadline,
            ticks: self.deadline_ticks(),
        };
        policy.store.set_epoch_deadline(policy.ticks);
        let described = match &policy.guest {
            Guest::V0_1 { instance, .. } => instance
                .sluice_policy_policy()
                .call_init(&mut policy.store, config),
            Guest::V0_2 { instance, .. } => instance
                .sluice_policy_policy()
                .call_init(&mut policy.store, config),
        }
        .map_err(|e| LoadError::Init(classify_trap(e, policy.deadline)))?;
        policy.description = described.map_err(LoadError::Config)?;
        Ok(policy)
    }

    fn deadline_ticks(&self) -> u64 {
        (self.deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }
}

/// The instance, in the version of the contract it speaks, with buffers
/// reused for every call so that their allocations are not repeated.
enum Guest {
    V0_1 {
        instance: bindings::v0_1::Admission,
        scratch: guest_v0_1::Request,
    },
    V0_2 {
        instance: bindings::v0_2::Admission,
        scratch: guest_v0_2::Request,
        replicas: Vec<guest_v0_2::Replica>,
    },
}

/// A loaded, initialised policy instance.
pub struct WasmPolicy {
    guest: Guest,
    // One counter handle per event kind, resolved once (no registry lookup per call).
    calls: [metrics::Counter; 4],
    name: Arc<str>,
    description: String,
    store: Store<HostState>,
    deadline: Duration,
    ticks: u64,
}

impl fmt::Debug for WasmPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmPolicy")
            .field("name", &self.name)
            .field("contract", &self.contract())
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

fn classify_trap(err: wasmtime::Error, deadline: Duration) -> Fault {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Fault::Deadline(deadline),
        _ => Fault::Trap(format!("{err:#}")),
    }
}

impl WasmPolicy {
    /// What `init` said about itself.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The version of the contract the plugin implements.
    pub fn contract(&self) -> Contract {
        match self.guest {
            Guest::V0_1 { .. } => Contract::V0_1,
            Guest::V0_2 { .. } => Contract::V0_2,
        }
    }
}

/// Copies the request fields both versions share into a reused `request`.
macro_rules! fill_request {
    ($request:expr, $id:expr, $info:expr, $arrived_us:expr) => {{
        let (request, info) = (&mut *$request, $info);
        request.id = $id;
        request.tenant.clear();
        request.tenant.push_str(&info.tenant);
        request.model.clear();
        request.model.push_str(&info.model);
        request.prompt_tokens = info.prompt_tokens;
        request.max_tokens = info.max_tokens;
        request.cached_tokens = info.cached_tokens;
        request.prefix_group = info.prefix_group;
        request.priority = info.priority;
        request.arrived_us = $arrived_us;
        request
    }};
}

/// The WIT `completion` of either version (the record is the same).
macro_rules! completion {
    ($module:ident, $id:expr, $report:expr) => {{
        let report: &CompletionReport = $report;
        $module::Completion {
            id: $id,
            ok: report.ok,
            queue_us: report.queue.as_micros() as u64,
            ttft_us: report.ttft.as_micros() as u64,
            e2e_us: report.e2e.as_micros() as u64,
            prompt_tokens: report.prompt_tokens,
            output_tokens: report.output_tokens,
        }
    }};
}

impl Policy for WasmPolicy {
    /// The plugin's name (its file stem).
    fn name(&self) -> &str {
        &self.name
    }

    /// Delivers one event under the deadline.
    fn call(&mut self, now: Snapshot<'_>, event: &Event) -> Result<Decision, Fault> {
        self.calls[event.index()].increment(1);
        self.store.set_epoch_deadline(self.ticks);
        let store = &mut self.store;
        let decision = match &mut self.guest {
            Guest::V0_1 { instance, scratch } => call_v0_1(instance, scratch, store, now, event)
                .map(|d| Decision {
                    admit: d.admit.into_iter().map(Admit::id).collect(),
                    reject: d.reject,
                    wake_after_us: d.wake_after_us,
                }),
            Guest::V0_2 {
                instance,
                scratch,
                replicas,
            } => call_v0_2(instance, scratch, replicas, store, now, event).map(|d| Decision {
                admit: d
                    .admit
                    .into_iter()
                    .map(|a| Admit {
                        id: a.id,
                        replica: a.replica,
                    })
                    .collect(),
                reject: d.reject,
                wake_after_us: d.wake_after_us,
            }),
        };
        decision.map_err(|e| classify_trap(e, self.deadline))
    }

    /// True for a 0.2 plugin.
    fn sees_replicas(&self) -> bool {
        matches!(self.guest, Guest::V0_2 { .. })
    }
}

/// One event to a 0.1 instance: the snapshot and request without replicas.
fn call_v0_1(
    instance: &bindings::v0_1::Admission,
    scratch: &mut guest_v0_1::Request,
    store: &mut Store<HostState>,
    now: Snapshot<'_>,
    event: &Event,
) -> wasmtime::Result<guest_v0_1::Decision> {
    let snapshot = guest_v0_1::Snapshot {
        now_us: now.now_us,
        in_flight: now.in_flight,
        queued: now.queued,
    };
    let api = instance.sluice_policy_policy();
    match event {
        Event::Arrival {
            id,
            info,
            arrived_us,
        } => {
            let request = fill_request!(scratch, *id, info, *arrived_us);
            api.call_on_arrival(store, snapshot, request)
        }
        Event::Completion { id, report } => {
            api.call_on_completion(store, snapshot, completion!(guest_v0_1, *id, report))
        }
        Event::Cancel { id } => api.call_on_cancel(store, snapshot, *id),
        Event::Tick => api.call_on_tick(store, snapshot),
    }
}

/// One event to a 0.2 instance.
fn call_v0_2(
    instance: &bindings::v0_2::Admission,
    scratch: &mut guest_v0_2::Request,
    replicas: &mut Vec<guest_v0_2::Replica>,
    store: &mut Store<HostState>,
    now: Snapshot<'_>,
    event: &Event,
) -> wasmtime::Result<guest_v0_2::Decision> {
    // The generated record owns its list: lend it the reused buffer and
    // take it back after the call.
    replicas.clear();
    replicas.extend(now.replicas.iter().map(|r| guest_v0_2::Replica {
        id: r.id,
        name: r.name.clone(),
        healthy: r.healthy,
        in_flight: r.in_flight,
        engine_running: r.engine_running,
        engine_waiting: r.engine_waiting,
        kv_usage: r.kv_usage,
    }));
    let snapshot = guest_v0_2::Snapshot {
        now_us: now.now_us,
        in_flight: now.in_flight,
        queued: now.queued,
        replicas: std::mem::take(replicas),
    };
    let api = instance.sluice_policy_policy();
    let (result, snapshot) = match event {
        Event::Arrival {
            id,
            info,
            arrived_us,
        } => {
            let request = fill_request!(scratch, *id, info, *arrived_us);
            request.cached_by_replica.clear();
            request
                .cached_by_replica
                .extend_from_slice(&info.cached_by_replica);
            (
                api.call_on_arrival(&mut *store, &snapshot, request),
                snapshot,
            )
        }
        Event::Completion { id, report } => (
            api.call_on_completion(&mut *store, &snapshot, completion!(guest_v0_2, *id, report)),
            snapshot,
        ),
        Event::Cancel { id } => (api.call_on_cancel(&mut *store, &snapshot, *id), snapshot),
        Event::Tick => (api.call_on_tick(&mut *store, &snapshot), snapshot),
    };
    *replicas = snapshot.replicas;
    result
}

/// The inline WAT policies the end-to-end tests use too.
#[cfg(test)]
#[path = "../../../tests/common/policies.rs"]
mod test_policies;

#[cfg(test)]
mod tests {
    //! The host against inline WAT components (`tests/common/policies.rs`),
    //! without the proxy: each failure a plugin can have becomes the right
    //! [`Fault`] or [`LoadError`], and the scheduler contains it.
    use std::time::Duration;

    use super::*;
    use crate::admission::{Admission, AdmissionConfig, RequestInfo};

    use super::test_policies as policies;

    const ROOMY: Duration = Duration::from_secs(10);

    fn load(wat: &str, deadline: Duration, memory: usize) -> WasmPolicy {
        let runtime = PolicyRuntime::new(deadline, memory).unwrap();
        runtime.load("test", wat.as_bytes(), &[]).unwrap()
    }

    fn arrival(id: u64) -> Event {
        Event::Arrival {
            id,
            info: RequestInfo::default(),
            arrived_us: 0,
        }
    }

    const NOW: Snapshot<'static> = Snapshot {
        now_us: 0,
        in_flight: 0,
        queued: 1,
        replicas: &[],
    };

    #[test]
    fn a_well_behaved_policy_answers() {
        let mut policy = load(&policies::admit_each(), ROOMY, 1 << 20);
        assert_eq!(policy.name(), "test");
        // The inline components are of the 0.1 world: no replicas for them.
        assert_eq!(policy.contract(), Contract::V0_1);
        assert!(!policy.sees_replicas());
        assert_eq!(
            policy.call(NOW, &arrival(42)).unwrap().admit,
            [Admit::id(42)]
        );
        assert_eq!(policy.call(NOW, &Event::Tick).unwrap(), Decision::default());
    }

    #[test]
    fn a_trap_is_a_trap_fault() {
        let mut policy = load(&policies::traps(), ROOMY, 1 << 20);
        let fault = policy.call(NOW, &arrival(1)).unwrap_err();
        assert_eq!(fault.kind(), "trap", "{fault}");
    }

    #[test]
    fn an_endless_loop_misses_its_deadline() {
        let deadline = Duration::from_millis(100);
        let mut policy = load(&policies::loops_forever(), deadline, 1 << 20);
        let fault = policy.call(NOW, &arrival(1)).unwrap_err();
        assert!(
            matches!(fault, Fault::Deadline(d) if d == deadline),
            "{fault}"
        );
    }

    #[test]
    fn growing_past_the_memory_limit_traps() {
        let mut policy = load(&policies::grows_memory(), ROOMY, 1 << 20);
        let fault = policy.call(NOW, &arrival(1)).unwrap_err();
        assert_eq!(fault.kind(), "trap", "{fault}");
    }

    #[test]
    fn load_errors_say_what_is_wrong() {
        let runtime = PolicyRuntime::new(ROOMY, 1 << 20).unwrap();
        let refused = runtime.load("x", policies::rejects_config().as_bytes(), &[]);
        assert!(
            matches!(&refused, Err(LoadError::Config(m)) if m == "unknown key `x`"),
            "{refused:?}"
        );
        let garbage = runtime.load("x", b"not a component", &[]);
        assert!(matches!(garbage, Err(LoadError::Invalid(_))), "{garbage:?}");
        let neither = runtime.load("x", b"(component)", &[]);
        assert!(
            matches!(&neither, Err(LoadError::Invalid(m)) if m.contains("exports neither")),
            "{neither:?}"
        );
    }

    /// Bad ids are the scheduler's to catch: it never applies such an answer
    /// and the fallback takes over.
    #[tokio::test]
    async fn bad_ids_switch_the_scheduler_to_the_fallback() {
        for wat in [policies::admits_unknown_id(), policies::admits_twice()] {
            let policy = load(&wat, ROOMY, 1 << 20);
            let admission = Admission::start(
                Box::new(policy),
                AdmissionConfig {
                    fallback_limit: 1,
                    max_queue: 10,
                    queue_timeout: ROOMY,
                    limiter: None,
                    replicas: None,
                },
            );
            let permit = admission.admit(1, RequestInfo::default()).await;
            assert!(permit.is_ok(), "{permit:?}");
            let status = admission.status().await.unwrap();
            assert!(status.fallback && status.faults == 1, "{status:?}");
        }
    }
}
