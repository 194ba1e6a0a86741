//! [`ObservedBody`]: the streaming pass-through that watches an upstream
//! response on its way to the client.
//!
//! `ObservedBody` never buffers: each frame is handed on as it arrives (when
//! the proxy asked for a stream's usage on the client's behalf, only an
//! unfinished SSE event waits for its end; see [`crate::stream_usage`]). On the
//! way it notes the first byte (time to first token), counts bytes, enforces
//! an idle timeout between frames, and turns a failure mid-stream into a final
//! SSE `error` event so a streaming client never mistakes a truncated answer
//! for a complete one. When the body ends — completely, with an error, or
//! because the client went away and hyper dropped it — it finishes the
//! request's [`Exchange`](crate::exchange::Exchange) exactly once.
//!
//! [`cut_streams`] is shutdown's last step: every body still open ends at
//! once, an SSE stream with an error event saying the proxy is shutting
//! down, and its exchange finishes as cut by shutdown.

use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::exchange::{Exchange, Outcome};
use crate::stream_usage::UsageStripper;

/// Idle time between upstream frames exceeded the limit.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {}", crate::units::format_duration(*.0))]
pub struct IdleTimeout(pub Duration);

/// Set by [`cut_streams`]: bodies end at their next poll.
static CUT: AtomicBool = AtomicBool::new(false);
/// Each thread's wake-up for the bodies it polls (one per thread, so bodies
/// on different serving threads never share a lock).
static CUT_WAKERS: Mutex<Vec<&'static Notify>> = Mutex::new(Vec::new());

thread_local! {
    static THREAD_CUT: &'static Notify = {
        let notify: &'static Notify = Box::leak(Box::new(Notify::new()));
        if let Ok(mut wakers) = CUT_WAKERS.lock() {
            wakers.push(notify);
        }
        notify
    };
}

/// Ends every open body now (shutdown, after `--drain-timeout`): an SSE
/// stream with an error event, a plain body aborted; each request counts
/// as cut by shutdown.
pub fn cut_streams() {
    CUT.store(true, Ordering::SeqCst);
    if let Ok(wakers) = CUT_WAKERS.lock() {
        for notify in wakers.iter() {
            notify.notify_waiters();
        }
    }
}

/// The stream was cut by [`cut_streams`].
#[derive(Debug, thiserror::Error)]
#[error("the proxy is shutting down: the response was cut at the drain timeout")]
pub struct CutByShutdown;

pin_project_lite::pin_project! {
    /// An upstream response body on its way to the client (see the module docs).
    pub struct ObservedBody<B: Body> {
        #[pin]
        inner: B,
        // Reset after every frame; fires when the upstream stalls.
        #[pin]
        idle: Sleep,
        idle_limit: Duration,
        // Resolves when shutdown cuts open streams.
        #[pin]
        cut: Notified<'static>,
        // Whether this is a `text/event-stream` response (errors become SSE events).
        sse: bool,
        // The final SSE error event has been sent: the stream is over.
        done: bool,
        // Removes the usage event the client did not ask for.
        stripper: Option<UsageStripper>,
        // A trailers frame that waits while held-back data goes out first.
        stashed: Option<Frame<Bytes>>,
        // Finished (and taken) exactly once: on end, on error, or on drop.
        exchange: Option<Exchange>,
    }

    impl<B: Body> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(exchange) = this.exchange.take() {
                // hyper stops polling once a body says it has ended (Content-Length
                // reached), so an ended inner body here is a complete response.
                let outcome = if this.inner.is_end_stream() {
                    Outcome::Complete
                } else {
                    Outcome::ClientGone
                };
                exchange.finish(outcome);
            }
        }
    }
}

impl<B: Body> ObservedBody<B> {
    /// Wraps `inner`, finishing `exchange` when the body ends.
    pub fn new(inner: B, idle_limit: Duration, sse: bool, exchange: Exchange) -> Self {
        Self {
            inner,
            idle: tokio::time::sleep(idle_limit),
            idle_limit,
            cut: THREAD_CUT.with(|notify| notify.notified()),
            sse,
            done: false,
            stripper: None,
            stashed: None,
            exchange: Some(exchange),
        }
    }

    /// Removes the usage event from this SSE stream (the proxy asked for
    /// it; the client did not). No effect on a body that is not SSE.
    pub fn strip_usage(mut self) -> Self {
        if self.sse {
            self.stripper = Some(UsageStripper::default());
        }
        self
    }
}

/// Runs `step` on the stripper and takes the bytes it removed off the
/// exchange's count, which counts what the client receives.
fn strip(
    stripper: &mut UsageStripper,
    exchange: &mut Option<Exchange>,
    step: impl FnOnce(&mut UsageStripper) -> Bytes,
) -> Bytes {
    let removed = stripper.removed();
    let out = step(stripper);
    if let Some(exchange) = exchange {
        exchange.bytes -= stripper.removed() - removed;
    }
    out
}

fn concat(head: Bytes, tail: Bytes) -> Bytes {
    if tail.is_empty() {
        head
    } else if head.is_empty() {
        tail
    } else {
        [head, tail].concat().into()
    }
}

/// The last event of an SSE stream that failed mid-way (`cut`: by shutdown).
fn sse_error_event(message: &str, cut: bool) -> Bytes {
    let error = if cut {
        crate::error::openai_error(message, "server_error", "shutting_down")
    } else {
        crate::error::openai_error(message, "upstream_error", "upstream_stream_error")
    };
    Bytes::from(format!("data: {error}\n\n"))
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(trailers) = this.stashed.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        if *this.done {
            return Poll::Ready(None);
        }
        let failure: BoxError = loop {
            if CUT.load(Ordering::Relaxed) {
                break Box::new(CutByShutdown);
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(mut frame))) => {
                    if let (Some(data), Some(exchange)) = (frame.data_ref(), this.exchange.as_mut())
                    {
                        exchange.on_data(data);
                    }
                    let ended = this.inner.is_end_stream();
                    if let Some(stripper) = this.stripper.as_mut()
                        && let Some(data) = frame.data_ref()
                    {
                        let out = strip(stripper, this.exchange, |s| {
                            let out = s.filter(data);
                            if ended { concat(out, s.finish()) } else { out }
                        });
                        if out.is_empty() && !ended {
                            // All held back or removed: nothing to send yet.
                            let next = Instant::now() + *this.idle_limit;
                            this.idle.as_mut().reset(next);
                            continue;
                        }
                        frame = Frame::data(out);
                    } else if let Some(stripper) = this.stripper.as_mut()
                        && frame.is_trailers()
                        && stripper.is_holding()
                    {
                        // Nothing may follow trailers: send what was held first.
                        let held = strip(stripper, this.exchange, UsageStripper::finish);
                        *this.stashed = Some(frame);
                        frame = Frame::data(held);
                    }
                    if ended {
                        if let Some(exchange) = this.exchange.take() {
                            exchange.finish(Outcome::Complete);
                        }
                        if frame.data_ref().is_some_and(Bytes::is_empty) {
                            return Poll::Ready(None);
                        }
                    } else {
                        let next = Instant::now() + *this.idle_limit;
                        this.idle.as_mut().reset(next);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    let rest = match this.stripper.as_mut() {
                        Some(stripper) => strip(stripper, this.exchange, UsageStripper::finish),
                        None => Bytes::new(),
                    };
                    if let Some(exchange) = this.exchange.take() {
                        exchange.finish(Outcome::Complete);
                    }
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    *this.done = true;
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(err))) => break err.into(),
                Poll::Pending => {
                    if this.cut.as_mut().poll(cx).is_ready() {
                        break Box::new(CutByShutdown);
                    }
                    ready!(this.idle.as_mut().poll(cx));
                    break Box::new(IdleTimeout(*this.idle_limit));
                }
            }
        };
        let cut = failure.is::<CutByShutdown>();
        let message = if cut {
            failure.to_string()
        } else {
            format!("upstream stream interrupted: {failure}")
        };
        if let Some(exchange) = this.exchange.take() {
            exchange.finish(if cut {
                Outcome::Shutdown
            } else {
                Outcome::UpstreamFailed(message.clone())
            });
        }
        if *this.sse {
            // End the stream with an explicit error event (and no `[DONE]`),
            // after any complete event the usage stripper was holding.
            *this.done = true;
            let held = this
                .stripper
                .as_mut()
                .map(UsageStripper::abandon)
                .unwrap_or_default();
            Poll::Ready(Some(Ok(Frame::data(concat(
                held,
                sse_error_event(&message, cut),
            )))))
        } else {
            // A plain body cannot carry an error: abort the response so the
            // client sees a broken transfer, not a short but "complete" one.
            Poll::Ready(Some(Err(failure)))
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            // An error event may be appended; promise no exact length.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Route;
    use crate::ledger::Ledger;
    use http::{HeaderMap, Method, StatusCode};
    use http_body_util::{BodyExt, StreamBody};

    const CHUNK: &str =
        "data: {\"choices\":[{\"index\":0,\"text\":\"Hi\",\"finish_reason\":null}]}\n\n";
    const LAST: &str =
        "data: {\"choices\":[{\"index\":0,\"text\":\"!\",\"finish_reason\":\"length\"}]";
    const FINGERPRINT: &str = ",\"system_fingerprint\":\"fp\"";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2},\"system_fingerprint\":\"fp\"}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn exchange() -> Exchange {
        Exchange {
            id: 1,
            route: Route::Completions,
            method: Method::POST,
            status: StatusCode::OK,
            arrived: Instant::now(),
            admitted: Instant::now(),
            first_byte: None,
            bytes: 0,
            permit: None,
            lease: None,
            inference: None,
            received: LEDGER.receive(),
            admitted_entry: LEDGER.admit(),
            routed: None,
        }
    }

    static LEDGER: Ledger = Ledger::new(false);

    type Frames = Vec<Result<Frame<Bytes>, BoxError>>;
    type Inner = StreamBody<futures_util::stream::Iter<<Frames as IntoIterator>::IntoIter>>;

    /// An SSE body of `frames`, through an `ObservedBody` that strips usage.
    fn stripped(frames: Frames) -> ObservedBody<Inner> {
        let inner = StreamBody::new(futures_util::stream::iter(frames));
        ObservedBody::new(inner, Duration::from_secs(5), true, exchange()).strip_usage()
    }

    fn data(text: &str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::copy_from_slice(text.as_bytes())))
    }

    #[tokio::test]
    async fn the_client_gets_the_stream_it_would_have_got_without_usage() {
        let last = format!("{LAST}}}\n\n");
        let body = stripped(vec![data(CHUNK), data(&last), data(USAGE), data(DONE)]);
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out, format!("{CHUNK}{LAST}{FINGERPRINT}}}\n\n{DONE}"));
    }

    #[tokio::test]
    async fn a_failure_after_the_last_chunk_still_delivers_it() {
        let last = format!("{LAST}}}\n\n");
        let body = stripped(vec![
            data(CHUNK),
            data(&last),
            data("data: {\"cho"),
            Err("connection reset".into()),
        ]);
        let out = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        let expected_start = format!("{CHUNK}{last}data: {{\"error\"");
        assert!(out.starts_with(&expected_start), "{out}");
        assert!(
            out.contains("connection reset") && !out.contains("[DONE]"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn held_data_goes_out_before_trailers() {
        let last = format!("{LAST}}}\n\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-done", "1".parse().unwrap());
        let body = stripped(vec![data(&last), Ok(Frame::trailers(trailers))]);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-done"], "1");
        assert_eq!(collected.to_bytes(), last);
    }
}
