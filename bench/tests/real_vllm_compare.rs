//! The real-vLLM tier of `bench compare` (`just e2e`): a small comparison
//! against a real vLLM checks the direction of the reference benchmark's
//! findings — waves of 50 give more throughput than a semaphore of 10, and
//! the semaphore of 10 gives the lower p50. Needs `SLUICE_VLLM_URL`.
//!
//! The workload is chosen so that batching, not prefill, decides. The real
//! engine is a tiny model on two CPU cores (`scripts/vllm.sh`): with the
//! reference's 1,200-token prompts and 8 output tokens, prefill dominates,
//! a batch of 50 costs nearly 5× a batch of 10, and the throughput margin
//! was only 7 vs 6 req/s. Here prompts are short (a ~100-token rubric and a
//! ~30-token profile) and each answer is 48 tokens, so most of the work is
//! decode steps, whose cost hardly grows with the batch on this model:
//! a wave of 50 moves five times the sequences per step of a semaphore of
//! 10. 150 requests per configuration keep the whole test well under three
//! minutes while every run still spans several waves.

use std::process::Command;

use serde_json::Value;

#[test]
#[ignore = "needs a real vLLM: run just e2e"]
fn waves_win_throughput_and_a_cap_of_ten_wins_p50_on_real_vllm() {
    let url = std::env::var("SLUICE_VLLM_URL").expect("set SLUICE_VLLM_URL (run `just e2e`)");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = std::env::temp_dir().join(format!("sluice-bench-vllm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let requests = 150;
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["compare", "--upstream", &url])
        .args(["--requests", &requests.to_string(), "--warmup", "50"])
        .args(["--rubric-tokens", "100", "--profile-tokens", "30"])
        .args(["--max-tokens", "48"])
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
    assert!(
        stdout.starts_with("engine: real vLLM at "),
        "not a real vLLM:\n{stdout}"
    );
    let json = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a JSON report");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    for run in runs {
        let c = &run["client"];
        assert_eq!(
            c["ok"].as_u64(),
            Some(requests),
            "every request succeeds: {run}"
        );
        assert!(
            c["output_tokens"].as_u64().unwrap() >= requests * 40,
            "{run}"
        );
    }
    let (batched, inngest) = (&runs[0]["client"], &runs[1]["client"]);
    assert_eq!(runs[0]["label"], "batched clients (50) → vLLM");
    assert_eq!(runs[1]["label"], "inngest clients (10) → vLLM");
    let rps = |c: &Value| c["throughput_rps"].as_f64().unwrap();
    let p50 = |c: &Value| c["latency_ms"]["p50"].as_f64().unwrap();
    eprintln!(
        "batched: {:.1} req/s, p50 {:.1} ms; inngest: {:.1} req/s, p50 {:.1} ms",
        rps(batched),
        p50(batched),
        rps(inngest),
        p50(inngest)
    );
    // The reference's direction, with room for a noisy shared machine.
    assert!(
        rps(batched) > 1.3 * rps(inngest),
        "waves of 50 should clearly out-throughput a cap of 10:\n{stdout}"
    );
    assert!(
        p50(inngest) < 0.8 * p50(batched),
        "a cap of 10 should clearly have the lower p50:\n{stdout}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
