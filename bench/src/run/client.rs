//! A minimal HTTP/1.1 client for the benchmark: one keep-alive connection
//! per [`Conn`], reconnecting after a failure, reading `usage` from each
//! answer and naming each failure's kind.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

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
    /// error's kind (`http_429`, `http_503`, `connect`, `transport`,
    /// `timeout`, `bad_body`).
    pub(crate) async fn send(&mut self, item: &Item) -> Result<u64, String> {
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

    async fn send_inner(&mut self, item: &Item) -> Result<u64, String> {
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
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| "transport".to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("http_{}", status.as_u16()));
        }
        output_tokens(&body).ok_or_else(|| "bad_body".to_string())
    }
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
}
