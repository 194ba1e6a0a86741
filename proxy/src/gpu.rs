//! GPU metrics from NVML, loaded at run time (`nvml-wrapper` opens
//! `libnvidia-ml.so` when the sampler starts). Every [`SAMPLE_INTERVAL`] a
//! background thread reads memory used/total and utilisation per GPU into
//! gauges and into the snapshot `/stats` shows. Without a driver: one info
//! log line, no GPU series, no error and no retry loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::gauge;
use nvml_wrapper::Nvml;
use serde::Serialize;

use crate::telemetry;

/// How often the GPUs are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// One GPU's last reading.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// Device name.
    pub name: String,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Total memory, bytes.
    pub memory_total_bytes: u64,
    /// GPU utilisation over the last sample period, 0–1.
    pub utilization: f64,
}

/// The latest readings, shared with `/stats`.
pub type GpuSnapshot = Arc<Mutex<Vec<GpuReading>>>;

/// Starts the sampler if NVML and at least one GPU are present.
/// Returns `None` (after one info log line) otherwise.
pub fn start() -> Option<GpuSnapshot> {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(err) => {
            tracing::info!(reason = %err, "no NVIDIA driver (NVML) found: GPU metrics are off");
            return None;
        }
    };
    let count = match nvml.device_count() {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            tracing::info!("NVML found no GPU: GPU metrics are off");
            return None;
        }
        Err(err) => {
            tracing::info!(reason = %err, "NVML cannot count GPUs: GPU metrics are off");
            return None;
        }
    };
    let snapshot: GpuSnapshot = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&snapshot);
    let first = read_all(&nvml, count);
    tracing::info!(gpus = count, first = ?first, "GPU metrics from NVML");
    publish(&shared, first);
    let spawned = std::thread::Builder::new()
        .name("sluice-nvml".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SAMPLE_INTERVAL);
                publish(&shared, read_all(&nvml, count));
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the NVML sampler thread: GPU metrics are off");
        return None;
    }
    Some(snapshot)
}

fn read_all(nvml: &Nvml, count: u32) -> Vec<GpuReading> {
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok()?;
            let utilization = device
                .utilization_rates()
                .map(|u| f64::from(u.gpu) / 100.0)
                .unwrap_or(0.0);
            Some(GpuReading {
                index,
                name: device.name().unwrap_or_default(),
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
                utilization,
            })
        })
        .collect()
}

fn publish(shared: &GpuSnapshot, readings: Vec<GpuReading>) {
    for r in &readings {
        let gpu = r.index.to_string();
        gauge!(telemetry::GPU_MEMORY_USED, "gpu" => gpu.clone()).set(r.memory_used_bytes as f64);
        gauge!(telemetry::GPU_MEMORY_TOTAL, "gpu" => gpu.clone()).set(r.memory_total_bytes as f64);
        gauge!(telemetry::GPU_UTILIZATION, "gpu" => gpu).set(r.utilization);
    }
    if let Ok(mut s) = shared.lock() {
        *s = readings;
    }
}

#[cfg(test)]
mod tests {
    use nvml_wrapper::Nvml;

    #[test]
    fn the_sampler_runs_exactly_when_nvml_sees_a_gpu() {
        // Asked of NVML directly: no driver (CI, developer machines) or no
        // GPU is 0, and start() must then say so quietly and return None
        // instead of failing or retrying; on a GPU host it must sample.
        let gpus = Nvml::init()
            .and_then(|nvml| nvml.device_count())
            .unwrap_or(0);
        match super::start() {
            None => assert_eq!(gpus, 0, "NVML sees {gpus} GPUs, but no sampler started"),
            Some(snapshot) => {
                assert!(gpus > 0, "a sampler started without a GPU");
                // The first reading is published before start() returns.
                let readings = snapshot.lock().unwrap().clone();
                assert!(
                    !readings.is_empty() && readings.len() <= gpus as usize,
                    "{readings:?}"
                );
                for r in &readings {
                    assert!(r.index < gpus, "{r:?}");
                    assert!(r.memory_total_bytes > 0, "{r:?}");
                    assert!(r.memory_used_bytes <= r.memory_total_bytes, "{r:?}");
                    assert!((0.0..=1.0).contains(&r.utilization), "{r:?}");
                }
            }
        }
    }
}
