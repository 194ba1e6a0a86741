//! `bench compare --replicas N` end to end on in-process simulated
//! replicas (fast tier, tiny sizes): the report's structure, and that the
//! requests each replica's own counters saw add up to those sent.
//! Nothing here judges speed: the PASS/FAIL targets are printed, not
//! asserted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Requests per configuration.
const REQUESTS: u64 = 48;

fn bench_replicas(out_dir: &Path, replicas: usize) -> Output {
    let _ = std::fs::remove_dir_all(out_dir);
    Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["compare", "--replicas", &replicas.to_string()])
        .args(["--requests", &REQUESTS.to_string(), "--warmup", "8"])
        .args(["--rubrics", "4", "--clients-per-replica", "2"])
        .args(["--rubric-tokens", "200", "--candidate-offset", "11"])
        .args(["--proxy-mode", "in-process", "--out-dir"])
        .arg(out_dir)
        .output()
        .expect("run bench compare --replicas")
}

/// The one `replicas_*.json` in `dir`, with its `.md` beside it.
fn only_report(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("replicas_") && name.ends_with(".json"),
        "{name}"
    );
    assert_eq!(files[1], files[0].with_extension("md"));
    files[0].clone()
}

/// Checks a successful run's output and report; returns the report.
fn check(out: &Output, out_dir: &Path, replicas: usize) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench compare --replicas failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "engine: simulated vLLM (profile vllm-cpu-tiny)",
        "| configuration | replicas | rubrics | clients | req/s | p50 ms | p95 ms |",
        "prefix vs round-robin throughput:",
        "prefix vs one replica throughput:",
        "prefix hit rate vs the one-rubric ceiling:",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    let verdicts = stdout
        .lines()
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
        .count();
    assert_eq!(verdicts, 4, "{stdout}");

    let json = only_report(out_dir);
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(out_dir);
    assert_eq!(report["schema"], "sluice-replicas/1");
    assert_eq!(report["profile"], "vllm-cpu-tiny");
    assert_eq!(report["settings"]["replicas"], replicas);
    assert_eq!(report["settings"]["rubrics"], 4);
    assert_eq!(report["settings"]["clients"], 2 * replicas);
    assert!(report["cache"]["num_blocks"].as_u64().unwrap() > 0);
    assert_eq!(report["targets"].as_array().unwrap().len(), 4);
    let passed = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["passed"] == true);
    assert_eq!(report["passed"], passed);

    let runs = report["runs"].as_array().unwrap();
    let kinds: Vec<&str> = runs.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "one-replica",
            "round-robin",
            "least-loaded",
            "prefix",
            "ceiling"
        ]
    );
    for run in runs {
        let kind = run["kind"].as_str().unwrap();
        let client = &run["client"];
        let sent = client["sent"].as_u64().unwrap();
        let expected = if kind == "ceiling" {
            REQUESTS.div_ceil(replicas as u64)
        } else {
            REQUESTS
        };
        assert_eq!(sent, expected, "{kind}: {run}");
        assert_eq!(client["ok"], sent, "{kind}: every request answered: {run}");
        let per = run["per_replica"].as_array().unwrap();
        let own = if matches!(kind, "one-replica" | "ceiling") {
            1
        } else {
            replicas
        };
        assert_eq!(per.len(), own, "{kind}: {run}");
        // Each replica's own counters: together, exactly the requests sent.
        let served: u64 = per.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
        assert_eq!(served, sent, "{kind}: {run}");
        let cache = &run["prefix_cache"];
        let queries = cache["query_tokens"].as_f64().unwrap();
        assert!(queries > 0.0, "{kind}: {run}");
        let summed: f64 = per
            .iter()
            .map(|p| p["prefix_cache"]["query_tokens"].as_f64().unwrap())
            .sum();
        assert_eq!(summed, queries, "{kind}: the replicas' sum: {run}");
        let hit = cache["hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hit), "{kind}: {run}");
        // Unset when a replica served none (an unbounded ratio).
        if let Some(balance) = run["balance"].as_f64() {
            assert!(balance >= 1.0, "{kind}: {run}");
        }
    }
    report
}

#[test]
fn one_replica_runs_every_configuration_and_counts_add_up() {
    let out_dir = std::env::temp_dir().join(format!("sluice-replicas-1-{}", std::process::id()));
    let out = bench_replicas(&out_dir, 1);
    check(&out, &out_dir, 1);
}

#[test]
fn two_simulated_replicas_split_the_requests_between_them() {
    let out_dir = std::env::temp_dir().join(format!("sluice-replicas-2-{}", std::process::id()));
    let out = bench_replicas(&out_dir, 2);
    // The proxy takes several `--upstream`s and `--route` once replicas
    // land in it; before that the bench must say what it needs.
    let proxy_has_replicas = sluice::cli::load([
        "proxy",
        "--upstream",
        "http://127.0.0.1:1",
        "--upstream",
        "http://127.0.0.1:2",
        "--route",
        "round-robin",
    ])
    .is_ok();
    if !proxy_has_replicas {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("needs a proxy that takes --upstream once per replica and --route"),
            "{stderr}"
        );
        let _ = std::fs::remove_dir_all(&out_dir);
        return;
    }
    let report = check(&out, &out_dir, 2);
    // Round-robin gives each replica its turn.
    let runs = report["runs"].as_array().unwrap();
    let round_robin = runs.iter().find(|r| r["kind"] == "round-robin").unwrap();
    for p in round_robin["per_replica"].as_array().unwrap() {
        assert!(p["requests"].as_u64().unwrap() > 0, "{round_robin}");
    }
}
