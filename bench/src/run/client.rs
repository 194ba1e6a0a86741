//! A minimal HTTP/1.1 client for the benchmark: one keep-alive connection
//! per [`Conn`], reconnecting after a failure, reading `usage` from each
//! answer and naming each failure's kind.
//!
//! A `text/event-stream` answer is read event by event ([`SseScan`]): the
//! moment the first event carrying text arrives is the request's first
//! token, the last `usage` event gives its output tokens (or, without one,
//! the count of text-bearing events), and a stream that ends without
//! `data: [DONE]` or with an `error` event is a failure.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use tokio::time::Instant;

use crate::workload::Item;

/// How long one request may take before it counts as a `timeout` error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

type Sender = http1::SendRequest<Full<Bytes>>;

/// One keep-alive connection to the target (opened lazily).
#[derive(Debug)]
pub(crate) struct Conn {
    addr: SocketAddr,
    sender: Option<Sender>,
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

impl Conn {
    /// A connection to `addr`, opened on first use.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// Sends one request; `Ok(output tokens)` on a 2xx answer, or the
    /// error's kind (see [`Conn::send_timed`]).
    pub(crate) async fn send(&mut self, item: &Item) -> Result<u64, String> {
        self.send_timed(item).await.map(|a| a.output_tokens)
    }

    /// Sends one request; its [`Answer`] on a 2xx answer, or the error's
    /// kind (`http_429`, `http_503`, `connect`, `transport`, `timeout`,
    /// `bad_body`, `stream_error`, `stream_truncated`).
    pub(crate) async fn send_timed(&mut self, item: &Item) -> Result<Answer, String> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send_inner(item)).await {
            Ok(result) => {
                if result.is_err() {
                    self.sender = None;
                }
                result
            }
            Err(_) => {
                self.sender = None;
                Err("timeout".into())
            }
        }
    }

    async fn send_inner(&mut self, item: &Item) -> Result<Answer, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(
                connect(self.addr)
                    .await
                    .map_err(|_| "connect".to_string())?,
            );
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await.map_err(|_| "transport".to_string())?;
        let request = http::Request::post(item.path)
            .header(http::header::HOST, "bench")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(item.body.clone()))
            .expect("valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| "transport".to_string())?;
        let status = response.status();
        let streamed = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut body = response.into_body();
        if !status.is_success() {
            // Drain it so the connection can be reused.
            body.collect().await.map_err(|_| "transport".to_string())?;
            return Err(format!("http_{}", status.as_u16()));
        }
        if !streamed {
            let body = body
                .collect()
                .await
                .map_err(|_| "transport".to_string())?
                .to_bytes();
            let output_tokens = output_tokens(&body).ok_or_else(|| "bad_body".to_string())?;
            return Ok(Answer {
                output_tokens,
                first_token: None,
            });
        }
        let mut scan = SseScan::default();
        let mut first_token = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "transport".to_string())?;
            if let Some(data) = frame.data_ref()
                && scan.push(data)
                && first_token.is_none()
            {
                first_token = Some(Instant::now());
            }
        }
        scan.finish().map(|output_tokens| Answer {
            output_tokens,
            first_token,
        })
    }
}

/// A successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// `usage.completion_tokens` (streams without usage: text-bearing events).
    pub(crate) output_tokens: u64,
    /// When the first text-bearing SSE event arrived (streams only).
    pub(crate) first_token: Option<Instant>,
}

/// An OpenAI SSE stream, read incrementally: completions carry text in
/// `choices[].text`, chat in `choices[].delta.content`; vLLM's first chat
/// event (the role, with empty content) and its usage event carry none.
#[derive(Debug, Default)]
pub(crate) struct SseScan {
    /// Bytes of an event not yet terminated by a blank line.
    pending: Vec<u8>,
    /// Events with text so far.
    pub(crate) content_events: u64,
    /// `usage.completion_tokens` of the last event that had it.
    pub(crate) usage_tokens: Option<u64>,
    /// `data: [DONE]` seen.
    pub(crate) done: bool,
    /// An event with an `error` field (or unparsable JSON) seen.
    pub(crate) failed: bool,
}

impl SseScan {
    /// Feeds a chunk; true when it completed the stream's first text-bearing event.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> bool {
        let before = self.content_events;
        self.pending.extend_from_slice(chunk);
        while let Some((end, sep)) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end + sep).take(end).collect();
            self.on_event(&event);
        }
        before == 0 && self.content_events > 0
    }

    fn on_event(&mut self, event: &[u8]) {
        let text = String::from_utf8_lossy(event);
        // One event's data lines, joined with newlines (the SSE rule).
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return;
        }
        let data = data.join("\n");
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
            self.failed = true;
            return;
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.failed = true;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            self.usage_tokens = Some(n);
        }
        let has_text = v["choices"].as_array().is_some_and(|choices| {
            choices.iter().any(|c| {
                [&c["text"], &c["delta"]["content"]]
                    .iter()
                    .any(|t| t.as_str().is_some_and(|t| !t.is_empty()))
            })
        });
        if has_text {
            self.content_events += 1;
        }
    }

    /// The stream's output tokens once it has ended, or why it failed.
    pub(crate) fn finish(&self) -> Result<u64, String> {
        if self.failed {
            Err("stream_error".into())
        } else if !self.done {
            Err("stream_truncated".into())
        } else {
            Ok(self.usage_tokens.unwrap_or(self.content_events))
        }
    }
}

/// The end of the first complete event in `buf` and its separator's length.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\n\n") {
            Some((i, 2))
        } else if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })
}

/// `usage.completion_tokens` of an OpenAI answer.
pub(crate) fn output_tokens(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Usage {
        completion_tokens: u64,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Usage>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    Some(answer.usage.map(|u| u.completion_tokens).unwrap_or(0))
}

/// `http://host:port[/...]` → the socket address.
pub(crate) async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    tokio::net::lookup_host(&hostport)
        .await?
        .next()
        .with_context(|| format!("{url}: no address"))
}

/// `GET path` on `addr` over a fresh connection: the status and body.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, "bench")
        .body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .context("GET timed out")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_the_answer() {
        assert_eq!(
            output_tokens(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":7}}"#),
            Some(7)
        );
        assert_eq!(output_tokens(br#"{"id":"x"}"#), Some(0));
        assert_eq!(output_tokens(b"not json"), None);
    }

    const COMPLETION: &str = "data: {\"choices\":[{\"index\":0,\"text\":\"He\"}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"text\":\"llo\",\"finish_reason\":\"length\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn the_first_token_is_the_first_event_with_text() {
        // Split at every byte boundary: the first token is reported once,
        // by the chunk that completes the first text-bearing event.
        let bytes = COMPLETION.as_bytes();
        let first_end = COMPLETION.find("\n\n").unwrap() + 2;
        for cut in 1..bytes.len() {
            let mut scan = SseScan::default();
            let a = scan.push(&bytes[..cut]);
            let b = scan.push(&bytes[cut..]);
            assert_eq!((a, b), (cut >= first_end, cut < first_end), "cut {cut}");
            assert_eq!(scan.content_events, 2);
            assert_eq!(scan.finish(), Ok(2));
        }
    }

    #[test]
    fn chat_role_and_usage_events_carry_no_text() {
        let mut scan = SseScan::default();
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n";
        assert!(!scan.push(role.as_bytes()));
        assert!(!scan.push(b": a comment\n\n"));
        assert!(scan.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"));
        assert!(!scan.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\n"));
        assert_eq!(scan.finish(), Err("stream_truncated".into()));
        assert!(!scan.push(b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":5}}\n\n"));
        scan.push(b"data: [DONE]\n\n");
        // The engine's usage, not the event count.
        assert_eq!(scan.finish(), Ok(5));
    }

    #[test]
    fn streams_without_usage_count_text_events_and_errors_fail() {
        let mut scan = SseScan::default();
        scan.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\ndata: [DONE]\n\n");
        assert_eq!(scan.finish(), Ok(2));
        let mut scan = SseScan::default();
        scan.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"error\":{\"message\":\"upstream died\"}}\n\n");
        assert_eq!(scan.finish(), Err("stream_error".into()));
    }
}
