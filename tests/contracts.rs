//! Both versions of the policy contract through the library's host, with
//! real components: the `concurrency` plugin as built for
//! `sluice:policy@0.1.0` (checked in, `tests/fixtures/concurrency-0.1.wasm`)
//! and as built today for `sluice:policy@0.2.0` (`just plugins`). No proxy
//! process: the admission handle, the scheduler and the wasm host.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice::admission::wasm::{Contract, PolicyRuntime, WasmPolicy};
use sluice::admission::{
    Admission, AdmissionConfig, Permit, Policy, ReplicaSource, ReplicaState, RequestInfo,
};

const ROOMY: Duration = Duration::from_secs(10);

fn load(path: PathBuf, limit: &str) -> WasmPolicy {
    assert!(
        path.is_file(),
        "{} is missing: run `just plugins`",
        path.display()
    );
    let runtime = PolicyRuntime::new(ROOMY, 64 << 20).unwrap();
    runtime
        .load_file(&path, &[("limit".into(), limit.into())])
        .unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `concurrency` as built for 0.1.0.
fn concurrency_0_1(limit: &str) -> WasmPolicy {
    load(root().join("tests/fixtures/concurrency-0.1.wasm"), limit)
}

/// `concurrency` as built from plugins/concurrency today (0.2.0).
fn concurrency_0_2(limit: &str) -> WasmPolicy {
    load(root().join("plugins/dist/concurrency.wasm"), limit)
}

/// Replicas 1 (unhealthy), 2 and 3; counts how often they are read.
fn replicas(reads: &Arc<AtomicUsize>) -> ReplicaSource {
    let reads = Arc::clone(reads);
    Arc::new(move || {
        reads.fetch_add(1, Ordering::Relaxed);
        [(1, false), (2, true), (3, true)]
            .map(|(id, healthy)| ReplicaState {
                id,
                name: format!("10.0.0.{id}:8000"),
                healthy,
                ..ReplicaState::default()
            })
            .to_vec()
    })
}

fn start(policy: WasmPolicy, replicas: Option<ReplicaSource>) -> Admission {
    Admission::start(
        Box::new(policy),
        AdmissionConfig {
            fallback_limit: 1,
            max_queue: 100,
            queue_timeout: ROOMY,
            limiter: None,
            replicas,
        },
    )
}

/// A request whose prompt is predicted cached on `cached` (replica, tokens).
fn request(cached: &[(u32, u32)]) -> RequestInfo {
    RequestInfo {
        prompt_tokens: 100,
        cached_by_replica: cached.to_vec(),
        ..RequestInfo::default()
    }
}

/// Waits for request `id` while others hold every slot: it must still be
/// queued, then admitted once `release` is dropped.
async fn waits_for(admission: &Admission, id: u64, release: Permit) -> Permit {
    let waiting = {
        let admission = admission.clone();
        tokio::spawn(async move { admission.admit(id, request(&[])).await })
    };
    for _ in 0..1000 {
        if admission.status().await.unwrap().queued == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(admission.status().await.unwrap().queued, 1, "{id} waits");
    drop(release);
    waiting.await.unwrap().unwrap()
}

#[tokio::test]
async fn a_0_1_plugin_loads_and_admits_and_is_never_shown_replicas() {
    let policy = concurrency_0_1("1");
    assert_eq!(policy.contract(), Contract::V0_1);
    assert!(!policy.sees_replicas());
    assert_eq!(policy.description(), "concurrency: limit=1 key=global");
    let reads = Arc::default();
    let admission = start(policy, Some(replicas(&reads)));
    let first = admission.admit(1, request(&[(3, 100)])).await.unwrap();
    assert_eq!(first.replica(), None, "the router places it");
    let second = waits_for(&admission, 2, first).await;
    assert_eq!(second.replica(), None);
    let status = admission.status().await.unwrap();
    assert!(!status.fallback, "{status:?}");
    assert_eq!(
        reads.load(Ordering::Relaxed),
        0,
        "never read for a 0.1 plugin"
    );
}

#[tokio::test]
async fn a_0_2_plugin_with_one_upstream_admits_as_before() {
    let policy = concurrency_0_2("1");
    assert_eq!(policy.contract(), Contract::V0_2);
    assert!(policy.sees_replicas());
    let admission = start(policy, None);
    let first = admission.admit(1, request(&[])).await.unwrap();
    assert_eq!(first.replica(), None);
    let second = waits_for(&admission, 2, first).await;
    assert_eq!(second.replica(), None);
    assert!(!admission.status().await.unwrap().fallback);
}

#[tokio::test]
async fn a_0_2_plugin_sees_the_replicas_and_the_permit_carries_its_choice() {
    let reads = Arc::default();
    let admission = start(concurrency_0_2("1"), Some(replicas(&reads)));
    // Replica 1 holds most of the prompt but is unhealthy; 3 holds some.
    let first = admission
        .admit(1, request(&[(1, 500), (3, 100)]))
        .await
        .unwrap();
    assert_eq!(first.replica(), Some(3));
    // Replica 3 is full (limit 1 per replica): the other healthy one.
    let second = admission.admit(2, request(&[(3, 100)])).await.unwrap();
    assert_eq!(second.replica(), Some(2));
    // Both healthy replicas are full: the third waits for a slot, on 3.
    let third = waits_for(&admission, 3, first).await;
    assert_eq!(third.replica(), Some(3));
    let status = admission.status().await.unwrap();
    assert!(!status.fallback && status.faults == 0, "{status:?}");
    assert!(reads.load(Ordering::Relaxed) >= 4, "read on every call");
    drop((second, third));
}

#[tokio::test]
async fn a_0_1_plugin_hands_its_queue_to_a_reloaded_0_2_plugin() {
    let admission = start(concurrency_0_1("1"), None);
    let first = admission.admit(1, request(&[])).await.unwrap();
    let waiting = {
        let admission = admission.clone();
        tokio::spawn(async move { admission.admit(2, request(&[])).await })
    };
    for _ in 0..1000 {
        if admission.status().await.unwrap().queued == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    // The new instance counts the inherited request against its limit of 2.
    let name = admission
        .reload(Box::new(concurrency_0_2("2")))
        .await
        .unwrap();
    assert_eq!(name, "concurrency");
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(second.replica(), None);
    drop((first, second));
    assert!(!admission.status().await.unwrap().fallback);
}
