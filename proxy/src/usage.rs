//! Token counts from the engine's own answer: `usage` in a JSON response,
//! or in the last SSE event that carries it (vLLM sends it when the client
//! asked for `stream_options.include_usage`). The tap keeps a bounded copy
//! of what passes — the whole body up to [`MAX_JSON_BYTES`] for JSON, the
//! last [`SSE_TAIL_BYTES`] for streams — and parses it once, at the end.

use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::FinderRev;
use serde::Deserialize;

/// Largest JSON response parsed for `usage`.
pub const MAX_JSON_BYTES: usize = 256 * 1024;
/// How much of a stream's end is kept to find its usage event.
pub const SSE_TAIL_BYTES: usize = 8 * 1024;

/// The engine's token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u32,
    /// `usage.completion_tokens`.
    pub completion_tokens: u32,
    /// `usage.prompt_tokens_details.cached_tokens` (vLLM with
    /// `--enable-prompt-tokens-details`); `None` when absent or null.
    pub cached_tokens: Option<u32>,
}

/// A bounded copy of a response body, for [`Usage`].
#[derive(Debug)]
pub struct UsageTap {
    sse: bool,
    buf: Vec<u8>,
    // JSON larger than MAX_JSON_BYTES: not parsed.
    overflow: bool,
}

impl UsageTap {
    /// A tap for a JSON (`sse == false`) or SSE body.
    pub fn new(sse: bool) -> Self {
        Self {
            sse,
            buf: Vec::new(),
            overflow: false,
        }
    }

    /// Notes a body chunk.
    pub fn push(&mut self, data: &Bytes) {
        if self.sse {
            self.buf.extend_from_slice(data);
            if self.buf.len() > 2 * SSE_TAIL_BYTES {
                let cut = self.buf.len() - SSE_TAIL_BYTES;
                self.buf.drain(..cut);
            }
        } else if !self.overflow {
            if self.buf.len() + data.len() > MAX_JSON_BYTES {
                self.overflow = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(data);
            }
        }
    }

    /// The usage the body carried, if any.
    pub fn usage(&self) -> Option<Usage> {
        if self.sse {
            let text = String::from_utf8_lossy(&self.buf);
            text.rsplit("\n\n")
                .filter_map(|event| event.trim().strip_prefix("data:"))
                .map(str::trim)
                .filter(|data| data.contains("\"usage\""))
                .find_map(|data| parse(data.as_bytes()))
        } else if self.overflow {
            None
        } else {
            parse(&self.buf)
        }
    }
}

/// `usage` as the engine writes it.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: Option<u32>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// The `usage` object of a response (or of one SSE event's JSON).
///
/// Only that object is parsed: the key is found from the end (vLLM and
/// OpenAI write it last) and one value is read after it. Parsing the whole
/// response into a `serde_json::Value` cost about 17,000 instructions per
/// small request (callgrind), and grows with the generated text. The search
/// cannot be fooled by text: inside a JSON string the quotes of `"usage":`
/// would be escaped (`\"usage\":`), so the unescaped byte pattern is
/// always a key.
fn parse(json: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    // Built once: building the searcher cost more than a search of a small body.
    static FINDER: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(KEY));
    // The last `"usage"` followed by a colon: a later string value that is
    // just "usage" (a decoded token, say) is skipped.
    let value = FINDER
        .rfind_iter(json)
        .find_map(|at| json[at + KEY.len()..].trim_ascii_start().strip_prefix(b":"))?;
    let usage: RawUsage = serde_json::Deserializer::from_slice(value)
        .into_iter::<Option<RawUsage>>()
        .next()?
        .ok()??;
    Some(Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens.unwrap_or(0),
        cached_tokens: usage.prompt_tokens_details.and_then(|d| d.cached_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_with_cached_tokens() {
        let mut tap = UsageTap::new(false);
        tap.push(&Bytes::from_static(
            br#"{"choices":[],"usage":{"prompt_tokens":240,"#,
        ));
        tap.push(&Bytes::from_static(
            br#""completion_tokens":8,"prompt_tokens_details":{"cached_tokens":224}}}"#,
        ));
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 240,
                completion_tokens: 8,
                cached_tokens: Some(224)
            })
        );
        let mut tap = UsageTap::new(false);
        tap.push(&Bytes::from_static(
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":null}}"#,
        ));
        assert_eq!(tap.usage().unwrap().cached_tokens, None);
    }

    #[test]
    fn sse_usage_is_the_last_event_that_has_it() {
        let mut tap = UsageTap::new(true);
        for i in 0..2000 {
            tap.push(&Bytes::from(format!(
                "data: {{\"choices\":[{{\"text\":\"t{i}\"}}]}}\n\n"
            )));
        }
        tap.push(&Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n",
        ));
        assert!(tap.buf.len() <= 2 * SSE_TAIL_BYTES);
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                cached_tokens: Some(0)
            })
        );
        let mut tap = UsageTap::new(true);
        tap.push(&Bytes::from_static(
            b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(tap.usage(), None);
    }

    #[test]
    fn generated_text_that_quotes_usage_does_not_fool_the_search() {
        let mut tap = UsageTap::new(false);
        tap.push(&Bytes::from_static(
            br#"{"usage":{"prompt_tokens":7,"completion_tokens":2},"choices":[{"text":"say \"usage\": {\"prompt_tokens\": 99}"}]}"#,
        ));
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                cached_tokens: None
            })
        );
        // A later string value "usage" is not the key.
        let mut tap = UsageTap::new(false);
        tap.push(&Bytes::from_static(
            br#"{"usage":{"prompt_tokens":5},"prompt_logprobs":[{"1":{"decoded_token":"usage"}}]}"#,
        ));
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(5));
        for no_usage in [
            &br#"{"usage":null}"#[..],
            br#"{"usage":{"completion_tokens":2}}"#,
            br#"{"usage":"#,
            br#"{"choices":[{"text":"\"usage\":{\"prompt_tokens\":1}"}]}"#,
        ] {
            let mut tap = UsageTap::new(false);
            tap.push(&Bytes::copy_from_slice(no_usage));
            assert_eq!(tap.usage(), None, "{}", String::from_utf8_lossy(no_usage));
        }
    }

    #[test]
    fn oversized_json_is_not_parsed() {
        let mut tap = UsageTap::new(false);
        tap.push(&Bytes::from(vec![b' '; MAX_JSON_BYTES]));
        tap.push(&Bytes::from_static(br#"{"usage":{"prompt_tokens":1}}"#));
        assert_eq!(tap.usage(), None);
    }
}
