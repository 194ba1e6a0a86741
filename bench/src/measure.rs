//! One measured run: the plan driven against its target (the client's
//! view), with what the proxy (`/stats`, `/metrics`), the engine
//! (`/metrics`: its prefix cache) and the GPUs said around it, as a
//! [`RunResult`].

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::client;
use crate::engine::InFlight;
use crate::load::{Plan, drive_with};
use crate::progress::Progress;
use crate::stats::{PrefixCache, Summary, predicted_prefix_counters, prefix_counters};
use crate::workload::Workload;

/// The proxy's view of a run (from its admin `/stats`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProxyView {
    pub(crate) policy: Value,
    pub(crate) outcomes: Value,
    pub(crate) total_ms: Value,
    pub(crate) queue_wait_ms: Value,
    pub(crate) service_ms: Value,
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunResult {
    pub(crate) label: String,
    pub(crate) target: String,
    pub(crate) plan: Plan,
    pub(crate) client: Summary,
    pub(crate) proxy: Option<ProxyView>,
    pub(crate) prefix_cache: Option<PrefixCache>,
    /// The proxy's prefix tracker over the run (proxied runs only).
    pub(crate) predicted_prefix_cache: Option<PrefixCache>,
    pub(crate) upstream_max_in_flight: Option<u64>,
    pub(crate) gpu: String,
    pub(crate) gpu_memory_mib: Option<f64>,
}

/// GPU memory and utilisation from `nvidia-smi`, or "n/a"; and the memory
/// used, in MiB, summed over GPUs.
async fn gpu_reading() -> (String, Option<f64>) {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used,memory.total,utilization.gpu",
                "--format=csv,noheader,nounits",
            ])
            .output()
    })
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => gpu_lines(&String::from_utf8_lossy(&o.stdout)),
        _ => ("n/a (no NVIDIA driver)".into(), None),
    }
}

/// The proxy's predicted prefix-cache counters, when a proxy runs.
async fn predicted(admin: Option<SocketAddr>) -> Option<(f64, f64)> {
    client::metrics(admin?)
        .await
        .as_deref()
        .and_then(predicted_prefix_counters)
}

/// The proxy's `/stats` `gpus`: its NVML readings, or a string saying why there are none.
fn gpus_from_stats(gpus: &Value) -> (String, Option<f64>) {
    let Some(list) = gpus.as_array() else {
        return (gpus.as_str().unwrap_or("n/a").to_owned(), None);
    };
    if list.is_empty() {
        return ("n/a (no GPU)".into(), None);
    }
    let mib = |v: &Value| v.as_f64().map(|b| b / (1024.0 * 1024.0));
    let reading = list
        .iter()
        .map(|g| {
            format!(
                "{:.0} / {:.0} MiB, {:.0}% util",
                mib(&g["memory_used_bytes"]).unwrap_or(f64::NAN),
                mib(&g["memory_total_bytes"]).unwrap_or(f64::NAN),
                g["utilization"].as_f64().unwrap_or(f64::NAN) * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let used = list.iter().map(|g| mib(&g["memory_used_bytes"])).sum();
    (reading, used)
}

/// `nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu` lines.
fn gpu_lines(text: &str) -> (String, Option<f64>) {
    let gpus: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split(',').map(str::trim).collect::<Vec<_>>())
        .filter(|f| f.len() == 3)
        .collect();
    if gpus.is_empty() {
        return ("n/a (no GPU)".into(), None);
    }
    let reading = gpus
        .iter()
        .map(|f| format!("{} / {} MiB, {}% util", f[0], f[1], f[2]))
        .collect::<Vec<_>>()
        .join("; ");
    let used: Option<f64> = gpus.iter().map(|f| f[0].parse::<f64>().ok()).sum();
    (reading, used)
}

/// The proxy's `/stats`; with `reset`, those from before a reset (`POST /stats/reset`).
async fn proxy_stats(admin: SocketAddr, reset: bool) -> Option<Value> {
    let answer = if reset {
        client::post(admin, "/stats/reset").await
    } else {
        client::get(admin, "/stats").await
    };
    let (status, body) = answer.ok()?;
    (status == 200).then(|| serde_json::from_slice(&body).ok())?
}

/// Runs `plan` against `target` and gathers every view of it: the client's,
/// the proxy's (`admin`), the engine's prefix cache (`engine`) and the
/// exact upstream in-flight peak (`in_flight`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn measure(
    label: &str,
    url: &str,
    target: SocketAddr,
    admin: Option<SocketAddr>,
    engine: Option<SocketAddr>,
    in_flight: Option<&Arc<InFlight>>,
    workload: &Arc<Workload>,
    plan: &Plan,
) -> RunResult {
    if let Some(admin) = admin {
        proxy_stats(admin, true).await;
    }
    let predicted_before = predicted(admin).await;
    let before = match engine {
        Some(e) => client::metrics(e)
            .await
            .as_deref()
            .and_then(prefix_counters),
        None => None,
    };
    if let Some(g) = in_flight {
        g.take_max();
    }
    let progress = Progress::start(label, plan.requests as u64);
    let outcomes = drive_with(target, workload, plan, progress.tick()).await;
    progress.finish();
    let upstream_max_in_flight = in_flight.map(|g| g.take_max());
    let after = match engine {
        Some(e) => client::metrics(e)
            .await
            .as_deref()
            .and_then(prefix_counters),
        None => None,
    };
    let predicted_after = predicted(admin).await;
    let stats = match admin {
        Some(admin) => proxy_stats(admin, false).await,
        None => None,
    };
    let proxy = stats.as_ref().map(|s| {
        let series = s["series"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| x["outcomes"].as_object().is_some_and(|o| !o.is_empty()))
            })
            .cloned()
            .unwrap_or(Value::Null);
        ProxyView {
            policy: series["policy"].clone(),
            outcomes: series["outcomes"].clone(),
            total_ms: series["latency"]["total"].clone(),
            queue_wait_ms: series["latency"]["queue_wait"].clone(),
            service_ms: series["latency"]["service"].clone(),
        }
    });
    // The proxy's own NVML readings when it ran; nvidia-smi for the direct baselines.
    let (gpu, gpu_memory_mib) = match stats.as_ref().map(|s| &s["gpus"]) {
        Some(gpus) if !gpus.is_null() => gpus_from_stats(gpus),
        _ => gpu_reading().await,
    };
    RunResult {
        label: label.to_string(),
        target: url.to_string(),
        plan: plan.clone(),
        client: outcomes.summary(),
        proxy,
        prefix_cache: before.zip(after).map(|(b, a)| PrefixCache::between(b, a)),
        predicted_prefix_cache: predicted_before
            .zip(predicted_after)
            .map(|(b, a)| PrefixCache::between(b, a)),
        upstream_max_in_flight,
        gpu,
        gpu_memory_mib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_readings_sum_memory() {
        let (text, mib) = gpu_lines("1024, 16376, 37\n2048, 16376, 5\n");
        assert_eq!(
            text,
            "1024 / 16376 MiB, 37% util; 2048 / 16376 MiB, 5% util"
        );
        assert_eq!(mib, Some(3072.0));
        assert_eq!(gpu_lines("").1, None);
    }

    #[test]
    fn gpu_readings_from_the_proxys_stats() {
        let gpus = serde_json::json!([
            {"index": 0, "name": "H100", "memory_used_bytes": 1073741824u64,
             "memory_total_bytes": 85899345920u64, "utilization": 0.37},
            {"index": 1, "name": "H100", "memory_used_bytes": 2147483648u64,
             "memory_total_bytes": 85899345920u64, "utilization": 0.05},
        ]);
        let (text, mib) = gpus_from_stats(&gpus);
        assert_eq!(
            text,
            "1024 / 81920 MiB, 37% util; 2048 / 81920 MiB, 5% util"
        );
        assert_eq!(mib, Some(3072.0));
        let none = serde_json::json!("n/a (no NVIDIA driver)");
        assert_eq!(
            gpus_from_stats(&none),
            ("n/a (no NVIDIA driver)".into(), None)
        );
    }
}
