//! The proxy's own resources as metrics: resident memory, CPU time and
//! open connections, sampled when `/metrics` is scraped (so an unscraped
//! proxy does no work for them).
//!
//! - [`watch_listener`]: the server registers each listener's count of
//!   open connections.
//! - [`watch_body_budget`]: the app registers its `--body-memory` budget.
//! - [`sample`]: sets [`telemetry::PROCESS_RESIDENT_MEMORY`],
//!   [`telemetry::PROCESS_CPU`] (from `/proc/self`, Linux only) and
//!   [`telemetry::OPEN_CONNECTIONS`], [`telemetry::BODY_MEMORY_HELD`] and
//!   [`telemetry::BODY_MEMORY_WAITING`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use metrics::gauge;

use crate::intake::BodyBudget;
use crate::telemetry;

/// Clock ticks per second of `/proc/<pid>/stat`'s CPU times: `USER_HZ`,
/// 100 on every Linux architecture the proxy builds for.
const USER_HZ: f64 = 100.0;

/// A listener: its name and its open connections.
type Watched = (&'static str, Weak<AtomicUsize>);

static LISTENERS: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

static BODY_BUDGET: Mutex<Option<BodyBudget>> = Mutex::new(None);

/// Reports `budget`'s use from now on (in place of any earlier one).
pub fn watch_body_budget(budget: &BodyBudget) {
    if let Ok(mut watched) = BODY_BUDGET.lock() {
        *watched = Some(budget.clone());
    }
}

/// Reports `open` as `listener`'s open connections from now on.
pub fn watch_listener(listener: &'static str, open: &Arc<AtomicUsize>) {
    if let Ok(mut listeners) = LISTENERS.lock() {
        listeners.retain(|(name, weak)| *name != listener && weak.strong_count() > 0);
        listeners.push((listener, Arc::downgrade(open)));
    }
}

/// Samples the process and the listeners into their gauges.
pub fn sample() {
    if let Some(rss) = resident_bytes() {
        gauge!(telemetry::PROCESS_RESIDENT_MEMORY).set(rss);
    }
    if let Some(cpu) = cpu_seconds() {
        gauge!(telemetry::PROCESS_CPU).set(cpu);
    }
    if let Ok(watched) = BODY_BUDGET.lock()
        && let Some(budget) = watched.as_ref()
    {
        gauge!(telemetry::BODY_MEMORY_HELD).set(budget.held() as f64);
        gauge!(telemetry::BODY_MEMORY_WAITING).set(budget.waiting() as f64);
    }
    let Ok(listeners) = LISTENERS.lock() else {
        return;
    };
    for (listener, weak) in listeners.iter() {
        if let Some(open) = weak.upgrade() {
            gauge!(telemetry::OPEN_CONNECTIONS, "listener" => *listener)
                .set(open.load(Ordering::Relaxed) as f64);
        }
    }
}

/// Resident memory from `/proc/self/status` (`VmRSS`, in kB).
fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// User plus system CPU time from `/proc/self/stat` (fields 14 and 15,
/// counted after the parenthesised command name, which may hold spaces).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `after_name` starts at field 3 (state): utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_process_reads_itself() {
        let rss = resident_bytes().expect("VmRSS on Linux");
        assert!(rss > 1e6, "a test binary holds more than a megabyte: {rss}");
        // Burn some CPU, then the counter has moved.
        let before = cpu_seconds().expect("utime on Linux");
        let mut x = 0u64;
        while cpu_seconds().unwrap() < before + 0.02 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
    }

    #[test]
    fn open_connections_are_the_listeners_count() {
        let open = Arc::new(AtomicUsize::new(3));
        watch_listener("test", &open);
        let handle = crate::telemetry::install();
        sample();
        let metrics = handle.render();
        let line = metrics
            .lines()
            .find(|l| l.starts_with("sluice_open_connections{listener=\"test\"}"))
            .unwrap_or_else(|| panic!("no test listener in:\n{metrics}"));
        assert!(line.ends_with(" 3"), "{line}");
    }
}
