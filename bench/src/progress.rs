//! Progress of a run: an `indicatif` bar when stderr is a terminal, a plain
//! line every [`PLAIN_EVERY`] otherwise (CI logs, pipes), and nothing for
//! warm-ups.
//!
//! Workers count each finished request on a shared [`Tick`] (two relaxed
//! atomic adds); one ticker task reads the counts and draws, so a busy run
//! never waits on the terminal.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

/// The workers' handle: counts finished requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tick(Arc<Counts>);

impl Tick {
    /// One request finished (`ok` or not).
    pub(crate) fn record(&self, ok: bool) {
        self.0.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.0.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) -> (u64, u64) {
        (
            self.0.done.load(Ordering::Relaxed),
            self.0.failed.load(Ordering::Relaxed),
        )
    }
}

/// A run's progress display; [`Progress::finish`] ends it.
#[derive(Debug)]
pub(crate) struct Progress {
    tick: Tick,
    ticker: Option<tokio::task::JoinHandle<()>>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Counts without showing anything.
    pub(crate) fn hidden() -> Self {
        Self {
            tick: Tick::default(),
            ticker: None,
            bar: None,
        }
    }

    /// Shows the progress of `label` towards `total` requests on stderr.
    pub(crate) fn start(label: &str, total: u64) -> Self {
        let tick = Tick::default();
        let start = Instant::now();
        if std::io::stderr().is_terminal() {
            let style =
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            let bar = ProgressBar::new(total)
                .with_style(style)
                .with_prefix(label.to_string());
            let (t, b) = (tick.clone(), bar.clone());
            let ticker = tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                loop {
                    every.tick().await;
                    let (done, failed) = t.read();
                    b.set_position(done);
                    b.set_message(bar_message(done, failed, start.elapsed()));
                }
            });
            return Self {
                tick,
                ticker: Some(ticker),
                bar: Some(bar),
            };
        }
        let (t, label) = (tick.clone(), label.to_string());
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval_at(start + PLAIN_EVERY, PLAIN_EVERY);
            loop {
                every.tick().await;
                let (done, failed) = t.read();
                eprintln!(
                    "{}",
                    plain_line(&label, done, failed, total, start.elapsed())
                );
            }
        });
        Self {
            tick,
            ticker: Some(ticker),
            bar: None,
        }
    }

    /// The workers' counter.
    pub(crate) fn tick(&self) -> &Tick {
        &self.tick
    }

    /// Stops drawing and clears the bar.
    pub(crate) fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `30 req/s, 2 errors` (the errors only when there are some).
fn bar_message(done: u64, failed: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    if failed > 0 {
        format!("{rate:.0} req/s, {failed} errors")
    } else {
        format!("{rate:.0} req/s")
    }
}

/// `label: 300/1000 requests, 10.0 s, 30 req/s, 2 errors`.
fn plain_line(label: &str, done: u64, failed: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    format!("{label}: {done}/{total} requests, {secs:.1} s, {rate:.0} req/s, {failed} errors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_count_done_and_failed() {
        let p = Progress::hidden();
        let t = p.tick().clone();
        t.record(true);
        t.record(false);
        t.record(true);
        assert_eq!(p.tick().read(), (3, 1));
        assert_eq!(
            plain_line("inngest", 3, 1, 10, Duration::from_secs(2)),
            "inngest: 3/10 requests, 2.0 s, 2 req/s, 1 errors"
        );
        assert_eq!(bar_message(30, 0, Duration::from_secs(2)), "15 req/s");
        assert_eq!(
            bar_message(30, 2, Duration::from_secs(2)),
            "15 req/s, 2 errors"
        );
    }
}
