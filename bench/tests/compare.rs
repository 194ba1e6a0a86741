//! `bench compare` end to end on the in-process simulator (fast tier): the
//! report's structure and invariants.

use std::process::Command;

use serde_json::Value;

#[test]
fn compare_accounts_for_every_request_and_the_policy_caps_the_upstream() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = std::env::temp_dir().join(format!("sluice-bench-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let requests = 200;
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "compare",
            "--requests",
            &requests.to_string(),
            "--warmup",
            "20",
        ])
        .args(["--proxy-mode", "in-process", "--plugins"])
        .arg(root.join("plugins/dist"))
        .arg("--out-dir")
        .arg(&out_dir)
        .output()
        .expect("run bench compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench compare failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
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

    let files: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("benchmark_") && name.ends_with(".json") && name.len() == 30,
        "{name}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(report["schema"], "sluice-bench/1");
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
    for run in &runs[2..] {
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
