//! Token counts for streams whose client did not ask for them.
//!
//! A streamed completion carries `usage` only in a last, extra SSE event,
//! sent when the request says `"stream_options": {"include_usage": true}`.
//! So that every stream is measured, the proxy asks for it on the client's
//! behalf ([`ask_for_usage`]) and removes that event again on the way back
//! ([`UsageStripper`]): the client receives exactly the stream it asked for,
//! while the usage tap (which reads the upstream's bytes before stripping)
//! still sees the counts. Requests that asked for usage themselves pass
//! through untouched. vLLM also moves `system_fingerprint` from the last
//! content chunk to the usage event when usage is asked for; the stripper
//! puts it back, so the stream is byte for byte the one vLLM sends a client
//! that did not ask (checked against real vLLM in `tests/real_vllm.rs`).
//!
//! The usage event is recognised by its shape, as vLLM and OpenAI send it:
//! a `data:` event whose JSON has an empty `choices` array and a non-null
//! `usage` object. Ordinary chunks (vLLM's carry `"usage":null`) are never
//! parsed: only an event that mentions a non-null `usage` is.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// What is appended to a request body that has no `stream_options`.
const INCLUDE_USAGE: &[u8] = br#","stream_options":{"include_usage":true}"#;

/// The request body with `stream_options.include_usage` set, or `None` when
/// it cannot be rewritten (not a JSON object). The common case — no
/// `stream_options` at all — splices the option in before the closing brace
/// and leaves every other byte as the client sent it; a body that has
/// `stream_options` (without `include_usage: true`) is re-serialised with
/// the one field changed.
pub fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    if memchr::memmem::find(body, b"\"stream_options\"").is_none() {
        let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
        if body[end] != b'}' {
            return None;
        }
        let before = body[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
        let mut out = BytesMut::with_capacity(body.len() + INCLUDE_USAGE.len());
        out.extend_from_slice(&body[..end]);
        if body[before] == b'{' {
            // An empty object: no leading comma.
            out.extend_from_slice(&INCLUDE_USAGE[1..]);
        } else {
            out.extend_from_slice(INCLUDE_USAGE);
        }
        out.extend_from_slice(&body[end..]);
        return Some(out.freeze());
    }
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    match object.get_mut("stream_options") {
        Some(Value::Object(options)) => {
            options.insert("include_usage".into(), Value::Bool(true));
            // vLLM honours it only with include_usage: it was off for this
            // client, and must stay off or every chunk would carry usage.
            if options.contains_key("continuous_usage_stats") {
                options.insert("continuous_usage_stats".into(), Value::Bool(false));
            }
        }
        _ => {
            object.insert(
                "stream_options".into(),
                serde_json::json!({ "include_usage": true }),
            );
        }
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Removes the usage event from an SSE stream (see the module docs).
///
/// Complete events pass on as soon as their blank line arrives; only an
/// unfinished event at the end of a chunk is held back until the rest of it
/// comes (or the stream ends: [`finish`](Self::finish)). One more thing is
/// undone: asked for usage, vLLM moves `system_fingerprint` from the last
/// content chunk (the one with a `finish_reason`) to the usage event. So a
/// chunk with a `finish_reason` waits for the next event; if that is the
/// usage event, its fingerprint goes back where the client would have seen
/// it.
#[derive(Debug, Default)]
pub struct UsageStripper {
    /// The start of an event whose end has not arrived yet.
    pending: BytesMut,
    /// `pending` outgrew [`MAX_PENDING`] without an event end: this is not
    /// SSE framing the stripper understands, so everything passes as is.
    gave_up: bool,
    /// A complete event with a `finish_reason`, waiting for the next one.
    held: Option<Bytes>,
    /// Bytes removed so far, net of what was put back.
    removed: u64,
}

impl UsageStripper {
    /// The part of `chunk` (with what was held back) to send on now.
    pub fn filter(&mut self, chunk: &Bytes) -> Bytes {
        if self.gave_up {
            return chunk.clone();
        }
        if self.pending.is_empty()
            && self.held.is_none()
            && !mentions_non_null(chunk, USAGE)
            && !mentions_non_null(chunk, FINISH_REASON)
            && ends_with_blank_line(chunk)
        {
            // The usual case: whole ordinary events, passed on without a copy.
            return chunk.clone();
        }
        self.pending.extend_from_slice(chunk);
        let Some(end) = last_event_end(&self.pending) else {
            if self.pending.len() > MAX_PENDING {
                // No event boundary in sight: stop holding anything back.
                self.gave_up = true;
                let mut out = BytesMut::from(&self.held.take().unwrap_or_default()[..]);
                out.extend_from_slice(&std::mem::take(&mut self.pending));
                return out.freeze();
            }
            return Bytes::new();
        };
        let complete = self.pending.split_to(end).freeze();
        let mut out = BytesMut::with_capacity(complete.len());
        let mut rest = &complete[..];
        while !rest.is_empty() {
            let end = first_event_end(rest).unwrap_or(rest.len());
            let (event, tail) = rest.split_at(end);
            self.event(event, &mut out);
            rest = tail;
        }
        out.freeze()
    }

    /// What was held back when the stream ends: sent as is, unless it is
    /// itself the usage event missing its final blank line.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending).freeze();
        let mut out = BytesMut::new();
        if rest.is_empty() {
            out.extend_from_slice(&self.held.take().unwrap_or_default());
        } else {
            self.event(&rest, &mut out);
            out.extend_from_slice(&self.held.take().unwrap_or_default());
        }
        out.freeze()
    }

    /// What can still be delivered when the upstream fails mid-stream: the
    /// held complete event, if any. A half-received event is dropped (it
    /// would corrupt the error event that follows).
    pub fn abandon(&mut self) -> Bytes {
        self.pending.clear();
        self.held.take().unwrap_or_default()
    }

    /// Whether anything is held back.
    pub fn is_holding(&self) -> bool {
        self.held.is_some() || !self.pending.is_empty()
    }

    /// Bytes removed from the stream so far (net of a fingerprint put back).
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// Passes one complete event on to `out`, holds it, or removes it.
    fn event(&mut self, event: &[u8], out: &mut BytesMut) {
        if let Some(usage) = usage_event(event) {
            let held = self.held.take().unwrap_or_default();
            let restored = match usage.get("system_fingerprint") {
                Some(Value::String(fingerprint)) if !held.is_empty() => {
                    with_fingerprint(&held, fingerprint)
                }
                _ => held.clone(),
            };
            self.removed += (event.len() + held.len()) as u64;
            self.removed -= restored.len() as u64;
            out.extend_from_slice(&restored);
            return;
        }
        if let Some(held) = self.held.take() {
            out.extend_from_slice(&held);
        }
        if mentions_non_null(event, FINISH_REASON) {
            self.held = Some(Bytes::copy_from_slice(event));
        } else {
            out.extend_from_slice(event);
        }
    }
}

/// The longest unfinished event held back before the stripper gives up.
const MAX_PENDING: usize = 64 * 1024;

const USAGE: &[u8] = b"\"usage\"";
const FINISH_REASON: &[u8] = b"\"finish_reason\"";

/// Whether `bytes` may hold a non-null value under `key` (cheap; no parsing).
fn mentions_non_null(bytes: &[u8], key: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&bytes[from..], key) {
        let after = &bytes[from + at + key.len()..];
        let value = after
            .iter()
            .position(|b| !matches!(b, b' ' | b':' | b'\t'))
            .map(|i| &after[i..]);
        if !value.is_some_and(|v| v.starts_with(b"null")) {
            return true;
        }
        from += at + 1;
    }
    false
}

/// `event` with `"system_fingerprint":...` added as its JSON's last field.
fn with_fingerprint(event: &[u8], fingerprint: &str) -> Bytes {
    let Some(close) = event.iter().rposition(|&b| b == b'}') else {
        return Bytes::copy_from_slice(event);
    };
    if memchr::memmem::find(event, b"\"system_fingerprint\"").is_some() {
        return Bytes::copy_from_slice(event);
    }
    let field = format!(
        ",\"system_fingerprint\":{}",
        serde_json::Value::from(fingerprint)
    );
    let mut out = BytesMut::with_capacity(event.len() + field.len());
    out.extend_from_slice(&event[..close]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(&event[close..]);
    out.freeze()
}

/// The parsed event if it is the usage event: `data: {...}` with empty
/// `choices` and an object `usage`.
fn usage_event(event: &[u8]) -> Option<Value> {
    if !mentions_non_null(event, USAGE) {
        return None;
    }
    let text = std::str::from_utf8(event).ok()?;
    let data = text.trim().strip_prefix("data:")?;
    let value = serde_json::from_str::<Value>(data.trim()).ok()?;
    let is_usage = value.get("usage").is_some_and(Value::is_object)
        && value
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
    is_usage.then_some(value)
}

/// The end (just past its blank line) of the first event in `bytes`.
fn first_event_end(bytes: &[u8]) -> Option<usize> {
    blank_line_ends(bytes).next()
}

/// The end (just past its blank line) of the last complete event in `bytes`.
fn last_event_end(bytes: &[u8]) -> Option<usize> {
    blank_line_ends(bytes).last()
}

fn ends_with_blank_line(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\n\n") || bytes.ends_with(b"\n\r\n")
}

/// Positions just past each blank line (`\n\n` or `\n\r\n`): event ends.
fn blank_line_ends(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .filter_map(move |(i, _)| match bytes.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
    const CHUNK_A: &str =
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\"Hi\"}],\"usage\":null}\n\n";
    const CHUNK_B: &str =
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\" there\"}],\"usage\":null}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn as_json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn splices_the_option_into_a_body_without_stream_options() {
        let body = br#"{"model":"m","prompt":"hi","stream":true}"#;
        let out = ask_for_usage(body).unwrap();
        assert!(out.starts_with(br#"{"model":"m","prompt":"hi","stream":true,"#));
        assert_eq!(
            as_json(&out)["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        // Trailing whitespace and an empty object are handled.
        let out = ask_for_usage(b"{ }\n").unwrap();
        assert_eq!(
            as_json(&out),
            serde_json::json!({"stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn keeps_the_clients_other_stream_options() {
        let body = br#"{"prompt":"hi","stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":false}}"#;
        let out = as_json(&ask_for_usage(body).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["stream_options"]["continuous_usage_stats"], false);
        // Without include_usage vLLM ignored it; with it, it must stay ignored.
        let body =
            br#"{"prompt":"hi","stream":true,"stream_options":{"continuous_usage_stats":true}}"#;
        let out = as_json(&ask_for_usage(body).unwrap());
        assert_eq!(out["stream_options"]["continuous_usage_stats"], false);
        assert_eq!(out["prompt"], "hi");
        let null_options = br#"{"prompt":"hi","stream_options":null}"#;
        assert_eq!(
            as_json(&ask_for_usage(null_options).unwrap())["stream_options"]["include_usage"],
            true
        );
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        assert!(ask_for_usage(b"[1,2]").is_none());
        assert!(ask_for_usage(b"").is_none());
        assert!(ask_for_usage(br#"["stream_options"]"#).is_none());
    }

    #[test]
    fn removes_only_the_usage_event() {
        let mut stripper = UsageStripper::default();
        let mut out = Vec::new();
        for chunk in [CHUNK_A, CHUNK_B, USAGE, DONE] {
            out.extend_from_slice(&stripper.filter(&Bytes::from(chunk)));
        }
        out.extend_from_slice(&stripper.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{CHUNK_A}{CHUNK_B}{DONE}")
        );
        assert_eq!(stripper.removed(), USAGE.len() as u64);
    }

    #[test]
    fn events_split_across_chunks_at_every_offset() {
        let stream = format!("{CHUNK_A}{USAGE}{DONE}");
        for cut in 1..stream.len() {
            let mut stripper = UsageStripper::default();
            let mut out = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                out.extend_from_slice(&stripper.filter(&Bytes::copy_from_slice(part.as_bytes())));
            }
            out.extend_from_slice(&stripper.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{CHUNK_A}{DONE}"),
                "cut at {cut}"
            );
        }
    }

    /// Both streams as vLLM 0.32 sent them for the same request, without and
    /// with `include_usage`.
    const LAST: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\" Over\",\"finish_reason\":\"length\",\"stop_reason\":null}]";
    const FINGERPRINT: &str = ",\"system_fingerprint\":\"vllm-0.32.0-11af4c02\"";

    #[test]
    fn the_fingerprint_goes_back_to_the_last_chunk() {
        let without = format!("{CHUNK_A}{LAST}{FINGERPRINT}}}\n\n{DONE}");
        let usage = format!(
            "data: {{\"id\":\"c1\",\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":3}}{FINGERPRINT}}}\n\n"
        );
        let with = format!("{CHUNK_A}{LAST}}}\n\n{usage}{DONE}");
        for cut in 1..with.len() {
            let mut stripper = UsageStripper::default();
            let mut out = Vec::new();
            for part in [&with[..cut], &with[cut..]] {
                out.extend_from_slice(&stripper.filter(&Bytes::copy_from_slice(part.as_bytes())));
            }
            out.extend_from_slice(&stripper.finish());
            assert_eq!(String::from_utf8(out).unwrap(), without, "cut at {cut}");
            assert_eq!(stripper.removed(), (with.len() - without.len()) as u64);
        }
    }

    #[test]
    fn a_finished_chunk_waits_only_for_the_next_event() {
        let last = format!("{LAST}}}\n\n");
        let mut stripper = UsageStripper::default();
        assert!(stripper.filter(&Bytes::from(last.clone())).is_empty());
        // Not the usage event: both go on, unchanged.
        assert_eq!(stripper.filter(&Bytes::from(DONE)), format!("{last}{DONE}"));
        // A stream that ends right after it still delivers it.
        let mut stripper = UsageStripper::default();
        assert!(stripper.filter(&Bytes::from(last.clone())).is_empty());
        assert_eq!(stripper.finish(), last);
    }

    #[test]
    fn a_stream_without_event_ends_is_passed_on_once_it_outgrows_the_hold() {
        let mut stripper = UsageStripper::default();
        let line = Bytes::from(vec![b'x'; 1000]);
        let mut out = 0;
        for _ in 0..100 {
            out += stripper.filter(&line).len();
        }
        // Held until past 64 KiB, then everything so far and after goes out.
        assert_eq!(out, 100 * 1000);
        assert!(!stripper.is_holding());
    }

    #[test]
    fn abandoning_keeps_the_held_event_and_drops_a_half_one() {
        let last = format!("{LAST}}}\n\n");
        let mut stripper = UsageStripper::default();
        assert!(
            stripper
                .filter(&Bytes::from(format!("{last}data: {{\"cho")))
                .is_empty()
        );
        assert!(stripper.is_holding());
        assert_eq!(stripper.abandon(), last);
        assert!(!stripper.is_holding());
    }

    #[test]
    fn complete_ordinary_events_are_not_held_back() {
        let mut stripper = UsageStripper::default();
        let chunk = Bytes::from(CHUNK_A);
        let out = stripper.filter(&chunk);
        assert_eq!(out, chunk);
        // A half event waits for its end, then goes out whole.
        let (head, tail) = CHUNK_B.split_at(10);
        assert!(stripper.filter(&Bytes::from(head)).is_empty());
        assert_eq!(stripper.filter(&Bytes::from(tail)), CHUNK_B);
    }

    #[test]
    fn crlf_framing_and_spaced_json_are_recognised() {
        let usage = "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 1}}\r\n\r\n";
        let chunk = "data: {\"choices\": [{\"text\": \"x\"}], \"usage\": null}\r\n\r\n";
        let mut stripper = UsageStripper::default();
        let out = stripper.filter(&Bytes::from(format!("{chunk}{usage}data: [DONE]\r\n\r\n")));
        assert_eq!(out, format!("{chunk}data: [DONE]\r\n\r\n"));
    }

    #[test]
    fn a_chunk_that_reports_usage_alongside_text_is_kept() {
        // continuous_usage_stats: usage on every chunk, with choices. Not ours to remove.
        let chunk = "data: {\"choices\":[{\"text\":\"x\"}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let mut stripper = UsageStripper::default();
        assert_eq!(stripper.filter(&Bytes::from(chunk)), chunk);
        assert_eq!(stripper.removed(), 0);
    }

    #[test]
    fn a_usage_event_cut_off_at_the_end_is_still_removed() {
        let mut stripper = UsageStripper::default();
        let usage = USAGE.trim_end();
        assert!(stripper.filter(&Bytes::from(usage)).is_empty());
        assert!(stripper.finish().is_empty());
        // Whatever else was held back goes out at the end.
        let mut stripper = UsageStripper::default();
        assert!(stripper.filter(&Bytes::from("data: partial")).is_empty());
        assert_eq!(stripper.finish(), "data: partial");
    }
}
