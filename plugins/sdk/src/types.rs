//! Plain Rust twins of the WIT records (`wit/policy.wit`): what a policy
//! is told ([`Request`], [`Completion`], [`Snapshot`]) and what it answers
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
}

impl Request {
    /// Request `id`, every other field empty or zero.
    pub fn new(id: u64) -> Self {
        Request {
            id,
            ..Request::default()
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

/// The host's state when an event is delivered (the WIT `snapshot`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Host monotonic clock (µs).
    pub now_us: u64,
    /// Requests admitted and not yet completed.
    pub in_flight: u32,
    /// Requests waiting for admission, including the one just arriving.
    pub queued: u32,
}

impl Snapshot {
    /// The host at `now_us`, nothing in flight and nothing queued.
    pub fn at(now_us: u64) -> Self {
        Snapshot {
            now_us,
            ..Snapshot::default()
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
/// let d = Decision::default().admit_all([1, 2]).reject(3, "over quota").wake_after_us(500);
/// assert_eq!(d.admit, [1, 2]);
/// assert_eq!(d.reject, [(3, "over quota".to_owned())]);
/// assert_eq!(d.wake_after_us, Some(500));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Queued requests to release now, in this order.
    pub admit: Vec<u64>,
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
