//! The admission core without the proxy: [`Admission`] and the scheduler
//! task driven by a scripted [`Policy`] on paused tokio time. Every wait is
//! on a condition (the scheduler's own status), never on a sleep.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::*;
use crate::error::ProxyError;

/// What the fake policy saw, in order: ("arrival" | "completion" | "cancel" | "tick", id).
type Seen = Arc<Mutex<Vec<(&'static str, u64)>>>;

/// Answers each event with what `script` returns, and records the event.
struct Scripted<F> {
    name: &'static str,
    seen: Seen,
    script: F,
    sees_replicas: bool,
}

impl<F> std::fmt::Debug for Scripted<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl<F> Policy for Scripted<F>
where
    F: FnMut(Snapshot<'_>, &Event) -> Result<Decision, Fault> + Send,
{
    fn name(&self) -> &str {
        self.name
    }

    fn sees_replicas(&self) -> bool {
        self.sees_replicas
    }

    fn call(&mut self, now: Snapshot<'_>, event: &Event) -> Result<Decision, Fault> {
        let entry = match event {
            Event::Arrival { id, .. } => ("arrival", *id),
            Event::Completion { id, .. } => ("completion", *id),
            Event::Cancel { id } => ("cancel", *id),
            Event::Tick => ("tick", 0),
        };
        self.seen.lock().unwrap().push(entry);
        (self.script)(now, event)
    }
}

fn scripted<F>(name: &'static str, script: F) -> (Box<dyn Policy>, Seen)
where
    F: FnMut(Snapshot<'_>, &Event) -> Result<Decision, Fault> + Send + 'static,
{
    let seen = Seen::default();
    let policy = Scripted {
        name,
        seen: Arc::clone(&seen),
        script,
        sees_replicas: false,
    };
    (Box::new(policy), seen)
}

fn admit(ids: &[u64]) -> Decision {
    Decision {
        admit: ids.iter().copied().map(Admit::id).collect(),
        ..Decision::default()
    }
}

/// Admits every arrival at once.
fn admit_each() -> (Box<dyn Policy>, Seen) {
    scripted("admit-each", |_, event| {
        Ok(match event {
            Event::Arrival { id, .. } => admit(&[*id]),
            _ => Decision::default(),
        })
    })
}

/// Admits nothing.
fn hold_all() -> (Box<dyn Policy>, Seen) {
    scripted("hold-all", |_, _| Ok(Decision::default()))
}

/// Room for every test's queue, a minute to wait, no rate limit.
fn roomy(fallback_limit: u32) -> AdmissionConfig {
    AdmissionConfig {
        fallback_limit,
        max_queue: 1000,
        queue_timeout: Duration::from_secs(60),
        limiter: None,
        replicas: None,
    }
}

fn start(policy: Box<dyn Policy>, fallback_limit: u32) -> Admission {
    Admission::start(policy, roomy(fallback_limit))
}

fn request() -> RequestInfo {
    RequestInfo {
        prompt_tokens: 7,
        ..RequestInfo::default()
    }
}

/// Starts waiting for admission of `id` on its own task.
fn arrive(admission: &Admission, id: u64) -> JoinHandle<Result<Permit, ProxyError>> {
    let admission = admission.clone();
    tokio::spawn(async move { admission.admit(id, request()).await })
}

/// Waits (on the scheduler's own answers, no timers) until `done` holds.
async fn until(admission: &Admission, done: impl Fn(&SchedulerStatus) -> bool) -> SchedulerStatus {
    for _ in 0..10_000 {
        let status = admission.status().await.unwrap();
        if done(&status) {
            return status;
        }
        tokio::task::yield_now().await;
    }
    panic!("the scheduler never reached the expected state");
}

fn seen(seen: &Seen, kind: &str) -> Vec<u64> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, id)| *id)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn each_admitted_request_completes_exactly_once() {
    let (policy, log) = admit_each();
    let admission = start(policy, 10);
    let waits: Vec<_> = (1..=6).map(|id| arrive(&admission, id)).collect();
    let mut permits = Vec::new();
    for wait in waits {
        permits.push(wait.await.unwrap().unwrap());
    }
    until(&admission, |s| s.in_flight == 6).await;
    // Half are completed explicitly, half dropped (an error path): both report.
    for (i, permit) in permits.into_iter().enumerate() {
        if i % 2 == 0 {
            permit.complete(
                true,
                Duration::from_millis(1),
                Duration::from_millis(2),
                None,
            );
        } else {
            drop(permit);
        }
    }
    let status = until(&admission, |s| s.in_flight == 0).await;
    assert_eq!(status.queued, 0);
    let mut completed = seen(&log, "completion");
    completed.sort_unstable();
    assert_eq!(completed, [1, 2, 3, 4, 5, 6]);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_leaves_the_queue_is_cancelled_once() {
    let (policy, log) = hold_all();
    let admission = start(policy, 10);
    let wait = arrive(&admission, 1);
    until(&admission, |s| s.queued == 1).await;
    wait.abort();
    assert!(wait.await.unwrap_err().is_cancelled());
    let status = until(&admission, |s| s.queued == 0).await;
    assert_eq!(status.in_flight, 0);
    assert_eq!(seen(&log, "cancel"), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_times_out_and_is_cancelled() {
    let (policy, log) = hold_all();
    let admission = Admission::start(
        policy,
        AdmissionConfig {
            max_queue: 10,
            queue_timeout: Duration::from_secs(3),
            ..roomy(10)
        },
    );
    // Paused time: the runtime jumps to the deadline once every task is idle.
    let err = admission.admit(1, request()).await.unwrap_err();
    assert!(
        matches!(err, ProxyError::QueueTimeout(d) if d == Duration::from_secs(3)),
        "{err:?}"
    );
    until(&admission, |s| s.queued == 0).await;
    assert_eq!(seen(&log, "cancel"), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_before_the_policy_is_asked() {
    let (policy, log) = hold_all();
    let admission = Admission::start(
        policy,
        AdmissionConfig {
            max_queue: 2,
            ..roomy(10)
        },
    );
    let _waits = [arrive(&admission, 1), arrive(&admission, 2)];
    until(&admission, |s| s.queued == 2).await;
    let err = admission.admit(3, request()).await.unwrap_err();
    assert!(
        matches!(err, ProxyError::QueueFull { max_queue: 2, .. }),
        "{err:?}"
    );
    assert_eq!(seen(&log, "arrival"), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_policy_is_handed_the_queue_oldest_first() {
    let (old, old_log) = hold_all();
    let admission = start(old, 10);
    let waits: Vec<_> = [5, 3, 9]
        .into_iter()
        .map(|id| arrive(&admission, id))
        .collect();
    until(&admission, |s| s.queued == 3).await;
    let (new, new_log) = admit_each();
    assert_eq!(admission.reload(new).await.unwrap(), "admit-each");
    let mut permits = Vec::new();
    for wait in waits {
        permits.push(wait.await.unwrap().unwrap());
    }
    let status = until(&admission, |s| s.in_flight == 3).await;
    assert_eq!((status.queued, status.fallback), (0, false));
    // Ids order the queue (they grow with arrival in the proxy).
    assert_eq!(seen(&new_log, "arrival"), [3, 5, 9]);
    assert!(seen(&old_log, "cancel").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_fault_hands_the_queue_to_the_fallback_cap() {
    // Holds every request, and traps on the fourth arrival.
    let (policy, _) = scripted("trap-on-4", |_, event| match event {
        Event::Arrival { id: 4, .. } => Err(Fault::Trap("unreachable".into())),
        _ => Ok(Decision::default()),
    });
    let admission = start(policy, 2);
    let waits: Vec<_> = (1..=3).map(|id| arrive(&admission, id)).collect();
    until(&admission, |s| s.queued == 3).await;
    let fourth = arrive(&admission, 4);
    let status = until(&admission, |s| s.fallback).await;
    assert_eq!(status.faults, 1);
    assert_eq!(status.policy, "fallback (concurrency cap 2)");
    assert_eq!((status.in_flight, status.queued), (2, 2));
    // The fallback admits the oldest first: 1 and 2; 3 follows a completion.
    let mut waits = waits.into_iter();
    let first = waits.next().unwrap().await.unwrap().unwrap();
    let _second = waits.next().unwrap().await.unwrap().unwrap();
    drop(first);
    let _third = waits.next().unwrap().await.unwrap().unwrap();
    let status = until(&admission, |s| s.in_flight == 2).await;
    assert_eq!(status.queued, 1);
    // A reload ends the fallback and takes the rest of the queue.
    let (new, _) = admit_each();
    admission.reload(new).await.unwrap();
    fourth.await.unwrap().unwrap();
    let status = admission.status().await.unwrap();
    assert_eq!(
        (status.fallback, status.policy.as_str()),
        (false, "plugin admit-each")
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_decision_is_applied_not_at_all() {
    // Rejects the arrival and admits an id that was never queued: the
    // rejection must not take effect (the fallback admits it instead).
    let (policy, _) = scripted("half-wrong", |_, event| match event {
        Event::Arrival { id, .. } => Ok(Decision {
            admit: vec![Admit::id(id + 1000)],
            reject: vec![(*id, "no".into())],
            wake_after_us: None,
        }),
        _ => Ok(Decision::default()),
    });
    let admission = start(policy, 1);
    let permit = arrive(&admission, 1).await.unwrap();
    assert!(permit.is_ok(), "{permit:?}");
    let status = admission.status().await.unwrap();
    assert!(status.fallback);
    assert_eq!((status.faults, status.in_flight), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_rejection_answers_the_reason_and_is_never_admitted() {
    let (policy, log) = scripted("reject-odd", |_, event| match event {
        Event::Arrival { id, .. } if id % 2 == 1 => Ok(Decision {
            reject: vec![(*id, "odd ids are refused".into())],
            ..Decision::default()
        }),
        Event::Arrival { id, .. } => Ok(admit(&[*id])),
        _ => Ok(Decision::default()),
    });
    let admission = start(policy, 10);
    let err = arrive(&admission, 1).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ProxyError::PolicyRejected(r) if r == "odd ids are refused"),
        "{err:?}"
    );
    drop(arrive(&admission, 2).await.unwrap().unwrap());
    until(&admission, |s| s.in_flight == 0).await;
    assert_eq!(seen(&log, "completion"), [2]);
}

#[tokio::test(start_paused = true)]
async fn a_policy_is_woken_when_it_asks() {
    // Holds arrivals and asks for a tick in 50 ms; admits the queue then.
    let (policy, log) = scripted("tick", |now, event| match event {
        Event::Arrival { .. } => Ok(Decision {
            wake_after_us: Some(50_000),
            ..Decision::default()
        }),
        Event::Tick => Ok(if now.queued > 0 {
            admit(&[1])
        } else {
            Decision::default()
        }),
        _ => Ok(Decision::default()),
    });
    let admission = start(policy, 10);
    let started = tokio::time::Instant::now();
    arrive(&admission, 1).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(seen(&log, "tick"), [0]);
}

/// Two replicas: 1 healthy, 2 not. Counts how often it is read.
fn two_replicas(reads: &Arc<Mutex<usize>>) -> ReplicaSource {
    let reads = Arc::clone(reads);
    Arc::new(move || {
        *reads.lock().unwrap() += 1;
        [(1, true), (2, false)]
            .map(|(id, healthy)| ReplicaState {
                id,
                name: format!("replica-{id}"),
                healthy,
                in_flight: id,
                ..ReplicaState::default()
            })
            .to_vec()
    })
}

/// Admits each arrival to `replica`, and records the replica ids it was shown.
fn admit_to(replica: Option<u32>, shown: &Arc<Mutex<Vec<Vec<u32>>>>) -> Box<dyn Policy> {
    let shown = Arc::clone(shown);
    Box::new(Scripted {
        name: "admit-to",
        seen: Seen::default(),
        script: move |now: Snapshot<'_>, event: &Event| {
            shown
                .lock()
                .unwrap()
                .push(now.replicas.iter().map(|r| r.id).collect());
            Ok(match event {
                Event::Arrival { id, .. } => Decision {
                    admit: vec![Admit { id: *id, replica }],
                    ..Decision::default()
                },
                _ => Decision::default(),
            })
        },
        sees_replicas: true,
    })
}

fn with_replicas(source: ReplicaSource) -> AdmissionConfig {
    AdmissionConfig {
        replicas: Some(source),
        ..roomy(1)
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_sees_replicas_names_one_and_the_permit_carries_it() {
    let (reads, shown) = (Arc::default(), Arc::default());
    let admission = Admission::start(
        admit_to(Some(1), &shown),
        with_replicas(two_replicas(&reads)),
    );
    let permit = admission.admit(1, request()).await.unwrap();
    assert_eq!(permit.replica(), Some(1));
    assert_eq!(*shown.lock().unwrap(), [vec![1, 2]]);
    // Its completion is shown the replicas too: read once per call.
    drop(permit);
    until(&admission, |s| s.in_flight == 0).await;
    assert_eq!(shown.lock().unwrap().len(), 2);
    assert_eq!(*reads.lock().unwrap(), 2);
    // None leaves the choice to the router.
    let admission = Admission::start(admit_to(None, &shown), with_replicas(two_replicas(&reads)));
    let permit = admission.admit(2, request()).await.unwrap();
    assert_eq!(permit.replica(), None);
    assert!(!admission.status().await.unwrap().fallback);
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_does_not_see_replicas_never_reads_them() {
    let reads = Arc::default();
    let (policy, _) = admit_each();
    let admission = Admission::start(policy, with_replicas(two_replicas(&reads)));
    let permit = admission.admit(1, request()).await.unwrap();
    assert_eq!(permit.replica(), None);
    drop(permit);
    until(&admission, |s| s.in_flight == 0).await;
    assert_eq!(*reads.lock().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn admitting_to_an_unhealthy_or_unknown_replica_is_an_invalid_decision() {
    for (replica, why) in [(2, "unhealthy"), (9, "not in the snapshot")] {
        let (reads, shown) = (Arc::default(), Arc::default());
        let admission = Admission::start(
            admit_to(Some(replica), &shown),
            with_replicas(two_replicas(&reads)),
        );
        // The fallback (cap 1) admits it instead, and names no replica.
        let permit = admission.admit(1, request()).await.unwrap();
        assert_eq!(permit.replica(), None, "{why}");
        let status = admission.status().await.unwrap();
        assert!(status.fallback && status.faults == 1, "{why}: {status:?}");
        // The fallback does not see replicas: only the faulty call read them.
        assert_eq!(*reads.lock().unwrap(), 1, "{why}");
    }
}
