//! `bench compare` end to end on the in-process simulator (fast tier): the
//! report's structure and invariants.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The one `benchmark_*.json` in `dir`, after checking that its Markdown
/// summary and SVG plot were written beside it.
fn only_report(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    let json = files[0].clone();
    let name = json.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("benchmark_") && name.ends_with(".json") && name.len() == 30,
        "{name}"
    );
    assert_eq!(files[1], json.with_extension("md"));
    assert_eq!(files[2], json.with_extension("svg"));
    let md = std::fs::read_to_string(&files[1]).unwrap();
    assert!(md.contains("| throughput (req/s) |"), "{md}");
    let svg = std::fs::read_to_string(&files[2]).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("latency CDF"),
        "{svg:.200}"
    );
    json
}

fn bench_compare(out_dir: &Path, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let _ = std::fs::remove_dir_all(out_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("compare")
        .args(args)
        .args(["--proxy-mode", "in-process", "--plugins"])
        .arg(root.join("plugins/dist"))
        .arg("--out-dir")
        .arg(out_dir)
        .output()
        .expect("run bench compare");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench compare failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn streamed_chat_compare_measures_time_to_first_token() {
    let out_dir = std::env::temp_dir().join(format!("sluice-bench-stream-{}", std::process::id()));
    let requests = 60;
    let stdout = bench_compare(
        &out_dir,
        &[
            "--requests",
            &requests.to_string(),
            "--warmup",
            "10",
            "--stream",
            "--api",
            "chat",
            "--max-tokens",
            "16",
            "--candidate-offset",
            "7",
        ],
    );
    for row in [
        "| TTFT p50 (ms) |",
        "| TTFT p95 (ms) |",
        "| TTFT p99 (ms) |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in\n{stdout}");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(only_report(&out_dir)).unwrap()).unwrap();
    assert_eq!(report["stream"], true);
    assert_eq!(report["candidate_offset"], 7);
    for run in report["runs"].as_array().unwrap() {
        let c = &run["client"];
        assert_eq!(c["ok"].as_u64(), Some(requests), "{run}");
        // Usage came from the stream's last event: 16 tokens each.
        assert_eq!(c["output_tokens"].as_u64(), Some(16 * requests), "{run}");
        let ttft = &c["ttft_ms"];
        assert_eq!(ttft["count"].as_u64(), Some(requests), "{run}");
        // The first token comes before the whole answer, request by request,
        // so every quantile of TTFT is at most the same quantile of latency.
        for q in ["p50", "p95", "p99"] {
            let (t, l) = (
                ttft[q].as_f64().unwrap(),
                c["latency_ms"][q].as_f64().unwrap(),
            );
            assert!(0.0 < t && t <= l, "{q}: ttft {t} > latency {l}: {run}");
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn compare_accounts_for_every_request_and_the_policy_caps_the_upstream() {
    let out_dir = std::env::temp_dir().join(format!("sluice-bench-compare-{}", std::process::id()));
    let requests = 200;
    let stdout = bench_compare(
        &out_dir,
        &["--requests", &requests.to_string(), "--warmup", "20"],
    );
    assert_eq!(
        stdout.lines().next(),
        Some("engine: simulated vLLM (profile rtx4080)"),
        "{stdout}"
    );
    for row in [
        "| throughput (req/s) |",
        "| p50 latency (ms) |",
        "| p95 latency (ms) |",
        "| total time (s) |",
        "| GPU memory |",
        "| success rate |",
        "| cache benefit (hit rate) |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in\n{stdout}");
    }

    let json = only_report(&out_dir);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["schema"], "sluice-bench/2");
    assert!(report["candidate_offset"].as_u64().is_some(), "recorded");
    assert_eq!(report["stream"], false);
    assert_eq!(report["profile"], "rtx4080");
    let runs = report["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "batched clients (50) → vLLM",
            "inngest clients (10) → vLLM",
            "sluice (no policy)",
            "sluice + batched.wasm",
            "sluice + concurrency.wasm",
        ]
    );
    for run in runs {
        let c = &run["client"];
        let (sent, ok, failed) = (
            c["sent"].as_u64().unwrap(),
            c["ok"].as_u64().unwrap(),
            c["failed"].as_u64().unwrap(),
        );
        let by_kind: u64 = c["errors"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(sent, requests, "{run}");
        assert_eq!(ok + failed, sent, "{run}");
        assert_eq!(by_kind, failed, "{run}");
        assert_eq!(ok, sent, "the simulator refuses nothing here: {run}");
        assert_eq!(c["latency_ms"]["count"].as_u64(), Some(ok));
        let (p50, p95, p99) = (
            c["latency_ms"]["p50"].as_f64().unwrap(),
            c["latency_ms"]["p95"].as_f64().unwrap(),
            c["latency_ms"]["p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{run}");
        assert!(c["throughput_rps"].as_f64().unwrap() > 0.0);
        assert!(c["output_tokens"].as_u64().unwrap() >= ok, "{run}");
        // Only the rubric is shared: a high but not total hit rate.
        let hit = run["prefix_cache"]["hit_rate"].as_f64().unwrap();
        assert!((0.5..0.95).contains(&hit), "hit rate {hit}: {run}");
        assert!(run["gpu"].as_str().is_some());
        assert!(c["ttft_ms"].is_null(), "not streamed: {run}");
        let cdf = c["latency_cdf_ms"].as_array().unwrap();
        assert_eq!(cdf.last().unwrap()[0].as_f64(), Some(1.0));
    }
    let peak = |i: usize| runs[i]["upstream_max_in_flight"].as_u64().unwrap();
    assert!(peak(0) <= 50, "batched waves of 50");
    assert!(peak(1) <= 10, "inngest semaphore of 10");
    // The concurrency policy (limit 10) held 100 naive clients to 10 at the engine …
    assert!(peak(4) <= 10, "concurrency.wasm let {} through", peak(4));
    assert!(peak(4) >= 2, "concurrency.wasm admitted in parallel");
    // … while without a policy they all reached it.
    assert!(peak(2) > 10, "no policy: peak {}", peak(2));
    // The proxy saw every request, and queued them under the policy.
    for run in &runs[..2] {
        assert!(run["predicted_prefix_cache"].is_null(), "direct: {run}");
    }
    for run in &runs[2..] {
        // The proxy's tracker predicts the shared rubric as cached too.
        let predicted = run["predicted_prefix_cache"]["hit_rate"].as_f64().unwrap();
        assert!(
            (0.3..1.0).contains(&predicted),
            "predicted {predicted}: {run}"
        );
        let proxy = &run["proxy"];
        assert_eq!(proxy["outcomes"]["ok"].as_u64(), Some(requests), "{run}");
        assert!(
            proxy["service_ms"]["p50_ms"].as_f64().unwrap() > 0.0,
            "{run}"
        );
    }
    assert!(
        runs[4]["proxy"]["queue_wait_ms"]["p50_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let winners = report["winners"].as_object().unwrap();
    assert!(winners.contains_key("throughput (req/s)"), "{winners:?}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// The `compare_*.json` in `dir`, after checking that its Markdown and SVG
/// were written beside it.
fn only_scorecard(dir: &Path) -> Value {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    let json = &files[0];
    assert!(json.to_string_lossy().ends_with(".json"), "{files:?}");
    assert_eq!(files[1], json.with_extension("md"));
    assert_eq!(files[2], json.with_extension("svg"));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn the_scenarios_run_every_configuration_against_the_same_load() {
    let out_dir =
        std::env::temp_dir().join(format!("sluice-bench-scenarios-{}", std::process::id()));
    let batch = 120;
    let stdout = bench_compare(
        &out_dir,
        &[
            "--batch",
            &batch.to_string(),
            "--batch-clients",
            "10",
            "--live-seconds",
            "0.3",
            "--live-load",
            "0.5",
            "--frontier",
            "4",
            "--unloaded",
            "5",
            "--warmup",
            "10",
        ],
    );
    for heading in [
        "## Summary",
        "## 1. Batch job",
        "## 2. Live traffic",
        "## 3. Mixed",
        "## 4. Frontier",
        "SLO mode:",
    ] {
        assert!(stdout.contains(heading), "{heading} missing:\n{stdout}");
    }
    let card = only_scorecard(&out_dir);
    assert_eq!(card["schema"], "sluice-compare/1");
    let labels: Vec<&str> = card["batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "waves of 50 → vLLM",
            "semaphore of 10 → vLLM",
            "naive → vLLM",
            "naive → sluice (no policy)",
            "naive → sluice + batched.wasm",
            "naive → sluice + concurrency.wasm",
            "naive → sluice + adaptive.wasm",
        ]
    );
    // The same batch for every configuration, every request answered.
    for run in card["batch"].as_array().unwrap() {
        assert_eq!(run["client"]["sent"], batch, "{run}");
        assert_eq!(run["client"]["ok"], batch, "{run}");
    }
    for run in card["mixed"].as_array().unwrap() {
        assert_eq!(run["batch"]["ok"], batch, "{run}");
        assert!(run["live"]["ok"].as_u64().unwrap() > 0, "{run}");
    }
    // Every live step offers the same load to each configuration.
    let offered: Vec<u64> = card["live"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["steps"][0]["client"]["sent"].as_u64().unwrap())
        .collect();
    assert!(offered.windows(2).all(|w| w[0] == w[1]), "{offered:?}");
    let frontier = card["frontier"].as_array().unwrap();
    assert_eq!(frontier.len(), 2, "limit=4 and adaptive's SLO mode");
    assert!(card["slo_mode"]["objective_ms"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&out_dir);
}
