//! A minimal upstream that answers every request at once with a small
//! OpenAI-shaped completion: the baseline against which proxy overhead is
//! measured. It runs on its own runtime thread so it does not share the load
//! generator's scheduler.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const REPLY: &str = r#"{"id":"cmpl-fast","object":"text_completion","created":0,"model":"fast","choices":[{"index":0,"text":"ok","finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;

/// Starts the upstream on 127.0.0.1:0 in a background thread; returns its address.
pub(crate) fn start() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("fast-upstream".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service =
                            service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                                // Drain the body so the connection can be reused.
                                let _ = req.into_body().collect().await;
                                let mut response =
                                    Response::new(Full::new(Bytes::from_static(REPLY.as_bytes())));
                                response.headers_mut().insert(
                                    header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, Infallible>(response)
                            });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })?;
    Ok(addr)
}
