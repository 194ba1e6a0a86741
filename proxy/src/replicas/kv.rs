//! Where a replica publishes its KV-cache events, asked of the replica
//! itself: vLLM serves its `--kv-events-config` at `GET /kv_event_sources`
//! (`{"0": {"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv",
//! ...}}`, one entry per data-parallel rank). The endpoint is the engine's
//! bind address, so a wildcard host (`*`, `0.0.0.0`, `::`) is replaced by
//! the replica's own; rank 0's is followed.
//!
//! With `--kv-events auto` (the default, when `--scrape-interval` is not 0)
//! each replica is asked once it answers: a replica that publishes gets a
//! [`crate::kv_events`] subscriber feeding its prefix tracker; one that
//! answers without events (404, no `zmq` publisher) keeps the tracker fed
//! by what this proxy sent it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Replica;
use crate::upstream::get_once;

/// The ZeroMQ endpoint and topic of `sources` (a `/kv_event_sources` body)
/// for the replica dialled at `authority`; `None` when it publishes none.
pub fn endpoint(sources: &Value, authority: &str) -> Option<(String, String)> {
    let rank = sources
        .get("0")
        .or_else(|| sources.as_object()?.values().next())?;
    if rank.get("enable_kv_cache_events") == Some(&Value::Bool(false))
        || rank.get("publisher").and_then(Value::as_str) != Some("zmq")
    {
        return None;
    }
    let endpoint = rank.get("endpoint")?.as_str()?;
    let topic = rank.get("topic").and_then(Value::as_str).unwrap_or("");
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let host = match host {
        "*" | "0.0.0.0" | "[::]" | "::" => authority.rsplit_once(':')?.0,
        named => named,
    };
    Some((format!("tcp://{host}:{port}"), topic.to_owned()))
}

/// Asks `replica` for its event source every `retry` until it answers,
/// then follows it (or not, if it publishes none). Ends with the replica.
pub fn discover(replica: &Arc<Replica>, retry: Duration) {
    let weak = Arc::downgrade(replica);
    let authority = replica.name.clone();
    let task = tokio::spawn(async move {
        loop {
            let answer =
                tokio::time::timeout(retry.max(Duration::from_secs(1)), sources(&authority))
                    .await
                    .ok()
                    .flatten();
            let Some(replica) = weak.upgrade() else {
                return;
            };
            match answer {
                Some(Some(sources)) => {
                    if let Some((endpoint, topic)) = endpoint(&sources, &authority) {
                        tracing::info!(replica = %replica.name, endpoint = %endpoint, topic = %topic, "following the replica's KV-cache events");
                        let handle = crate::kv_events::spawn(
                            replica.name.clone(),
                            endpoint,
                            topic,
                            Arc::clone(&replica.prefix),
                        );
                        replica.follow_events(handle);
                    } else {
                        tracing::info!(replica = %replica.name, "the replica publishes no KV-cache events; predicting from what this proxy sends it");
                    }
                    return;
                }
                Some(None) => {
                    tracing::info!(replica = %replica.name, "the replica has no /kv_event_sources; predicting from what this proxy sends it");
                    return;
                }
                None => {}
            }
            drop(replica);
            tokio::time::sleep(retry).await;
        }
    });
    replica.own(task.abort_handle());
}

/// `GET /kv_event_sources`: `None` when there was no answer, `Some(None)`
/// for an answer that is not a 200 JSON object.
async fn sources(authority: &str) -> Option<Option<Value>> {
    let (status, body) = get_once(authority, "/kv_event_sources", true).await?;
    Some(
        status
            .is_success()
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .filter(Value::is_object),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_wildcard_endpoint_takes_the_replicas_host() {
        let sources = json!({"0": {"enable_kv_cache_events": true, "publisher": "zmq",
            "endpoint": "tcp://*:5557", "replay_endpoint": null, "topic": "kv"}});
        assert_eq!(
            endpoint(&sources, "10.0.0.5:8000"),
            Some(("tcp://10.0.0.5:5557".into(), "kv".into()))
        );
        let named =
            json!({"0": {"publisher": "zmq", "endpoint": "tcp://events.local:6000", "topic": ""}});
        assert_eq!(
            endpoint(&named, "10.0.0.5:8000"),
            Some(("tcp://events.local:6000".into(), String::new()))
        );
    }

    #[test]
    fn no_events_no_endpoint() {
        let off = json!({"0": {"enable_kv_cache_events": false, "publisher": "zmq", "endpoint": "tcp://*:5557"}});
        assert_eq!(endpoint(&off, "h:1"), None);
        let null = json!({"0": {"enable_kv_cache_events": true, "publisher": "null"}});
        assert_eq!(endpoint(&null, "h:1"), None);
        assert_eq!(endpoint(&json!({}), "h:1"), None);
        assert_eq!(endpoint(&json!({"path": "/kv_event_sources"}), "h:1"), None);
    }
}
