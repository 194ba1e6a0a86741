//! `bench suite` end to end on the in-process simulator (fast tier), with
//! small parameters: every category present, figures finite and positive,
//! each pass/fail exactly what its figures say. Performance verdicts are
//! the report's business, not asserted here.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The `proxy` binary the suite starts lives beside `bench`: build it (a
/// no-op when fresh) with the same profile.
fn build_proxy(bench: &Path) {
    let dir = bench.parent().expect("bench's directory");
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => "dev".to_string(),
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "sluice-proxy", "--bin", "proxy", "--profile"])
        .arg(&profile)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of the proxy failed");
    assert!(dir.join("proxy").is_file(), "no proxy beside {bench:?}");
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = num(v);
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

/// Every check in `v` (objects with name/value/op/threshold/pass): its
/// `pass` must be exactly `value op threshold`.
fn checks(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            if ["name", "value", "op", "threshold", "pass"]
                .iter()
                .all(|k| map.contains_key(*k))
            {
                let threshold = num(&map["threshold"]);
                let holds = map["value"]
                    .as_f64()
                    .is_some_and(|x| match map["op"].as_str() {
                        Some(">") => x > threshold,
                        Some(">=") => x >= threshold,
                        Some("<=") => x <= threshold,
                        op => panic!("unknown op {op:?}"),
                    });
                assert_eq!(map["pass"].as_bool(), Some(holds), "inconsistent check {v}");
                out.push(v.clone());
            } else {
                map.values().for_each(|x| checks(x, out));
            }
        }
        Value::Array(items) => items.iter().for_each(|x| checks(x, out)),
        _ => {}
    }
}

fn check_named<'a>(all: &'a [Value], name: &str) -> &'a Value {
    all.iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {all:?}"))
}

#[test]
fn suite_reports_every_category_with_consistent_verdicts() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    build_proxy(&bench);
    let out_dir = std::env::temp_dir().join(format!("sluice-bench-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let (agent_tokens, repeats) = (64u64, 2usize);
    let out = Command::new(&bench)
        .args(["suite", "--agents", "1,3", "--agent-tokens"])
        .arg(agent_tokens.to_string())
        .arg("--batching-repeats")
        .arg(repeats.to_string())
        // rtx4080's max_model_len is 4096: 4096 is capped, 8192 skipped.
        .args(["--contexts", "512,4096,8192", "--cache-repeats"])
        .arg(repeats.to_string())
        .args([
            "--sessions",
            "1,5,10,1000,20000",
            "--memory-concurrency",
            "8",
        ])
        .args(["--soak", "2s", "--soak-rate", "100", "--out-dir"])
        .arg(&out_dir)
        .output()
        .expect("run bench suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench suite failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().next(),
        Some("bench suite: simulated vLLM (profile rtx4080)"),
        "{stdout}"
    );
    for heading in ["## batching", "## cache resume", "## memory", "checks: "] {
        assert!(stdout.contains(heading), "no {heading:?} in\n{stdout}");
    }

    let files: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("suite_") && name.ends_with(".json"),
        "{name}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(report["schema"], "sluice-bench-suite/1");
    assert_eq!(report["engine"], "simulated vLLM (profile rtx4080)");
    assert_eq!(report["profile"], "rtx4080");
    let max_model_len = report["max_model_len"].as_u64().expect("max_model_len");

    // Batching: every agent answered with every token; speedup is the ratio.
    let batching = &report["batching"];
    let rows = batching["rows"].as_array().expect("batching rows");
    assert_eq!(
        rows.iter()
            .map(|r| r["agents"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    for row in rows {
        let agents = row["agents"].as_u64().unwrap();
        let mut tps = [0.0; 2];
        for (i, side) in ["concurrent", "sequential"].into_iter().enumerate() {
            let t = &row[side];
            assert_eq!(t["ok"].as_u64(), Some(agents * repeats as u64), "{row}");
            let runs = t["elapsed_s_runs"].as_array().unwrap();
            assert_eq!(runs.len(), repeats, "{row}");
            assert_eq!(t["failed"].as_u64(), Some(0), "{row}");
            assert_eq!(
                t["output_tokens"].as_u64(),
                Some(agents * agent_tokens),
                "{row}"
            );
            let elapsed = positive(&t["elapsed_s"], "elapsed_s");
            tps[i] = positive(&t["tokens_per_s"], "tokens_per_s");
            let expected = (agents * agent_tokens) as f64 / elapsed;
            assert!((tps[i] - expected).abs() <= 1e-6 * expected, "{row}");
        }
        let speedup = positive(&row["speedup"], "speedup");
        assert!((speedup - tps[0] / tps[1]).abs() <= 1e-6 * speedup, "{row}");
        match agents {
            3 => {
                assert_eq!(row["check"]["threshold"], 1.5, "{row}");
                assert_eq!(num(&row["check"]["value"]), speedup, "{row}");
            }
            _ => assert!(row["check"].is_null(), "no target at {agents} agents"),
        }
    }

    // Cache resume: 512 measured, 4096 capped to what fits, 8192 skipped.
    let cache = &report["cache_resume"];
    let rows = cache["rows"].as_array().expect("cache rows");
    assert_eq!(rows.len(), 3);
    for row in &rows[..2] {
        assert!(row["skipped"].is_null(), "{row}");
        let sent = row["sent_tokens"].as_u64().unwrap();
        assert!(sent + 1 < max_model_len, "{row}");
        assert!(
            row["prompt_tokens"].as_u64().unwrap() > sent,
            "the engine saw the context and the new turn: {row}"
        );
        for key in ["cold_ttft_ms", "resumed_ttft_ms"] {
            let samples = row[key].as_array().unwrap();
            assert_eq!(samples.len(), repeats, "{row}");
            samples.iter().for_each(|s| {
                positive(s, key);
            });
        }
        let cold = positive(&row["cold_ttft_ms_median"], "cold median");
        let resumed = positive(&row["resumed_ttft_ms_median"], "resumed median");
        let speedup = positive(&row["speedup"], "speedup");
        assert!((speedup - cold / resumed).abs() <= 1e-9 * speedup, "{row}");
        assert_eq!(row["check"]["threshold"], 3.0, "{row}");
        assert_eq!(num(&row["check"]["value"]), speedup, "{row}");
    }
    assert_eq!(rows[0]["sent_tokens"], 512);
    assert!(rows[0]["capped"].is_null());
    let capped = rows[1]["sent_tokens"].as_u64().unwrap();
    assert!((3687..4096).contains(&capped), "capped to {capped}");
    assert!(
        rows[1]["capped"]
            .as_str()
            .unwrap()
            .contains("max_model_len"),
        "{}",
        rows[1]
    );
    assert!(
        rows[2]["skipped"]
            .as_str()
            .unwrap()
            .contains("max_model_len"),
        "{}",
        rows[2]
    );
    assert!(rows[2]["check"].is_null() && rows[2]["sent_tokens"].is_null());

    // Memory: RSS at every level, sessions still tracked, a soak.
    let memory = &report["memory"];
    assert_eq!(memory["engine"], "built-in fast upstream (no model)");
    let blocks = memory["blocks_per_session"].as_u64().unwrap();
    assert!(blocks > 0);
    assert!(memory["prefix_cache_blocks"].as_u64().unwrap() >= 20001 * blocks);
    positive(&memory["baseline_rss_bytes"], "baseline RSS");
    let levels = memory["levels"].as_array().unwrap();
    assert_eq!(
        levels
            .iter()
            .map(|l| l["sessions"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 5, 10, 1000, 20000]
    );
    for level in levels {
        positive(&level["rss_bytes"], "rss");
        assert_eq!(level["failed"], 0, "{level}");
        let growth = num(&level["growth_bytes"]);
        assert_eq!(
            growth,
            num(&level["rss_bytes"]) - num(&memory["baseline_rss_bytes"]),
            "{level}"
        );
        let per = num(&level["bytes_per_session"]);
        assert!(
            (per - growth / num(&level["sessions"])).abs() < 1e-6,
            "{level}"
        );
    }
    positive(&memory["bytes_per_session"], "bytes per session");
    let per_block = num(&memory["bytes_per_session"]) / blocks as f64;
    assert!((num(&memory["bytes_per_block"]) - per_block).abs() < 1e-6 * per_block);
    let linearity = &memory["linearity"];
    let linear_check = "linear growth (largest residual / total growth)";
    match linearity["max_residual_share"].as_f64() {
        Some(share) => assert_eq!(
            num(&memory["checks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == linear_check)
                .expect("linearity check")["value"]),
            share
        ),
        None => {
            assert!(
                linearity["note"]
                    .as_str()
                    .unwrap()
                    .starts_with("not determined")
            );
            assert!(
                memory["checks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["name"] != linear_check)
            );
        }
    }
    let retained = &memory["retained"];
    assert_eq!(retained["sampled"], 100);
    positive(&retained["expected_hit_tokens"], "expected hits");
    // Capacity was sized for every session: the tracker still held them all.
    assert!(num(&retained["fraction"]) >= 0.99, "{retained}");
    let soak = &memory["soak"];
    let sent = soak["sent"].as_u64().unwrap();
    assert!(sent > 0 && soak["ok"].as_u64() == Some(sent), "{soak}");
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{soak}");
    let times: Vec<f64> = samples.iter().map(|s| num(&s[0])).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{soak}");
    assert!(num(&soak["growth_bytes"]).is_finite());
    positive(&soak["tolerance_bytes"], "soak tolerance");

    // Every check consistent with its figures, and the tally adds up.
    let mut all = Vec::new();
    checks(&report, &mut all);
    check_named(&all, "speedup at 3 agents");
    check_named(&all, "resume speedup at 512 tokens");
    check_named(&all, "sessions still tracked (fraction of predicted hits)");
    check_named(&all, "soak: RSS trend after warm-up (bytes)");
    let passed = all.iter().filter(|c| c["pass"] == true).count() as u64;
    let tally = &report["checks"];
    assert_eq!(tally["total"].as_u64(), Some(all.len() as u64), "{tally}");
    assert_eq!(tally["passed"].as_u64(), Some(passed), "{tally}");
    assert_eq!(
        tally["failed"].as_u64(),
        Some(all.len() as u64 - passed),
        "{tally}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
