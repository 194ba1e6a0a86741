//! Plain Rust twins of the WIT records (`wit/policy.wit`,
//! `sluice:policy@0.2.0`): what a policy is told ([`Request`],
//! [`Completion`], [`Snapshot`] with its [`Replica`]s) and what it answers
//! ([`Decision`]). They carry no bindings, so policy logic that uses them
//! builds and tests natively.

/// A request waiting for admission (the WIT `request`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Unique for the life of the proxy process.
    pub id: u64,
    /// A digest of the API key (`key:` and 16 hex digits), else "" (no key);
    /// with the proxy's `--trust-tenant-header`, the `X-Tenant` header, else
    /// the key's digest, else the body's `user`, else "".
    pub tenant: String,
    /// The body's `model` ("" when the route has no JSON body).
    pub model: String,
    /// Prompt length in tokens (exact with a tokenizer, estimated otherwise).
    pub prompt_tokens: u32,
    /// The body's `max_tokens` (or `max_completion_tokens`); 0 when absent.
    pub max_tokens: u32,
    /// Tokens of the prompt the proxy predicts are already in the engine's prefix cache.
    pub cached_tokens: u32,
    /// Hash of the request's shared prefix (e.g. its system prompt); 0 when unknown.
    pub prefix_group: u64,
    /// `X-Priority` header; higher is more urgent; 0 by default.
    pub priority: i32,
    /// When the request arrived, on the host clock (µs).
    pub arrived_us: u64,
    /// (replica id, predicted cached prompt tokens on that replica) for the
    /// replicas where the proxy predicts a hit; empty with one upstream.
    pub cached_by_replica: Vec<(u32, u32)>,
}

impl Request {
    /// Request `id`, every other field empty or zero.
    pub fn new(id: u64) -> Self {
        Request {
            id,
            ..Request::default()
        }
    }

    /// Predicted cached prompt tokens on `replica` (0 when not listed).
    pub fn cached_on(&self, replica: u32) -> u32 {
        cached_on(&self.cached_by_replica, replica)
    }
}

/// The tokens listed for `replica` in a `cached-by-replica` list, else 0.
pub(crate) fn cached_on(cached_by_replica: &[(u32, u32)], replica: u32) -> u32 {
    cached_by_replica
        .iter()
        .find(|&&(id, _)| id == replica)
        .map_or(0, |&(_, tokens)| tokens)
}

/// One upstream engine as the router sees it (the WIT `replica`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replica {
    /// Stable for the life of the replica; what [`Decision::admit_to`] names.
    pub id: u32,
    /// For logs: the replica's address or name.
    pub name: String,
    /// False while the router sends it nothing; admitting to an unhealthy
    /// replica is an invalid decision (the host drops the plugin).
    pub healthy: bool,
    /// Requests the proxy has forwarded to it and not yet finished.
    pub in_flight: u32,
    /// The engine's running requests, as last scraped (0 when unknown).
    pub engine_running: u32,
    /// The engine's waiting requests, as last scraped (0 when unknown).
    pub engine_waiting: u32,
    /// The engine's KV-cache usage, 0.0 to 1.0, as last scraped (0.0 when unknown).
    pub kv_usage: f32,
}

impl Replica {
    /// A healthy, idle replica `id`.
    pub fn new(id: u32) -> Self {
        Replica {
            id,
            healthy: true,
            ..Replica::default()
        }
    }

    /// The same replica with `in_flight` requests.
    pub fn with_in_flight(self, in_flight: u32) -> Self {
        Replica { in_flight, ..self }
    }

    /// The same replica, marked unhealthy.
    pub fn unhealthy(self) -> Self {
        Replica {
            healthy: false,
            ..self
        }
    }
}

/// How an admitted request ended (the WIT `completion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub id: u64,
    /// True when the upstream answered 2xx and the response was delivered whole.
    pub ok: bool,
    /// Time spent queued before admission (µs).
    pub queue_us: u64,
    /// Admission to first response byte (µs); 0 when none arrived.
    pub ttft_us: u64,
    /// Admission to the end of the response (µs).
    pub e2e_us: u64,
    /// Prompt length in tokens, as in the [`Request`].
    pub prompt_tokens: u32,
    /// Tokens the upstream generated.
    pub output_tokens: u32,
}

impl Completion {
    /// The completion of request `id`, `ok` false and every count zero.
    pub fn new(id: u64) -> Self {
        Completion {
            id,
            ..Completion::default()
        }
    }
}

/// The host's state when an event is delivered (the WIT `snapshot`). It
/// borrows the replicas, which live for the call, so that it stays `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot<'a> {
    /// Host monotonic clock (µs).
    pub now_us: u64,
    /// Requests admitted and not yet completed (on all replicas).
    pub in_flight: u32,
    /// Requests waiting for admission, including the one just arriving.
    pub queued: u32,
    /// The upstream replicas; empty when the proxy has one upstream.
    pub replicas: &'a [Replica],
}

impl Snapshot<'static> {
    /// The host at `now_us`, nothing in flight, nothing queued, no replicas.
    pub fn at(now_us: u64) -> Self {
        Snapshot {
            now_us,
            ..Snapshot::default()
        }
    }
}

impl<'a> Snapshot<'a> {
    /// The same snapshot with `replicas`.
    pub fn with_replicas<'b>(self, replicas: &'b [Replica]) -> Snapshot<'b> {
        Snapshot {
            now_us: self.now_us,
            in_flight: self.in_flight,
            queued: self.queued,
            replicas,
        }
    }

    /// The same snapshot with `in_flight` requests running.
    pub fn with_in_flight(self, in_flight: u32) -> Self {
        Snapshot { in_flight, ..self }
    }

    /// The same snapshot with `queued` requests waiting.
    pub fn with_queued(self, queued: u32) -> Self {
        Snapshot { queued, ..self }
    }
}

/// The answer to one event (the WIT `decision`). The default admits and
/// rejects nothing and asks for no tick.
///
/// ```
/// use sluice_policy_sdk::Decision;
///
/// let d = Decision::default()
///     .admit_all([1, 2])
///     .admit_to(4, 7)
///     .reject(3, "over quota")
///     .wake_after_us(500);
/// assert_eq!(d.admit, [1, 2, 4]);
/// assert_eq!((d.replica_of(1), d.replica_of(4)), (None, Some(7)));
/// assert_eq!(d.reject, [(3, "over quota".to_owned())]);
/// assert_eq!(d.wake_after_us, Some(500));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Queued requests to release now, in this order.
    pub admit: Vec<u64>,
    /// (id, replica) for the admitted requests that go to a replica of the
    /// policy's choosing; one not listed goes where the router chooses. A
    /// replica must be a healthy one of the event's snapshot. Entries whose
    /// id is not in [`Decision::admit`] are ignored.
    pub placements: Vec<(u64, u32)>,
    /// Queued requests to refuse, with the reason (the client gets HTTP 429).
    pub reject: Vec<(u64, String)>,
    /// Ask for a tick after this many µs (replacing any earlier wake-up);
    /// `None`: no tick.
    pub wake_after_us: Option<u64>,
}

impl Decision {
    /// Also admits `id`, after those already admitted.
    pub fn admit(mut self, id: u64) -> Self {
        self.admit.push(id);
        self
    }

    /// Also admits `id`, after those already admitted, to `replica` (a
    /// healthy one of the event's snapshot).
    pub fn admit_to(mut self, id: u64, replica: u32) -> Self {
        self.admit.push(id);
        self.placements.push((id, replica));
        self
    }

    /// The replica admitted request `id` goes to, when the decision names one.
    pub fn replica_of(&self, id: u64) -> Option<u32> {
        self.placements
            .iter()
            .find(|&&(placed, _)| placed == id)
            .map(|&(_, replica)| replica)
    }

    /// Also admits `ids`, in order, after those already admitted.
    pub fn admit_all(mut self, ids: impl IntoIterator<Item = u64>) -> Self {
        self.admit.extend(ids);
        self
    }

    /// Also rejects `id`, telling the client `reason`.
    pub fn reject(mut self, id: u64, reason: impl Into<String>) -> Self {
        self.reject.push((id, reason.into()));
        self
    }

    /// Asks for a tick after `us` µs.
    pub fn wake_after_us(mut self, us: u64) -> Self {
        self.wake_after_us = Some(us);
        self
    }

    /// True when the decision admits nothing, rejects nothing and asks for no tick.
    pub fn is_empty(&self) -> bool {
        self.admit.is_empty() && self.reject.is_empty() && self.wake_after_us.is_none()
    }
}
