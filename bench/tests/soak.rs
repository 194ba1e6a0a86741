//! `bench soak` end to end (fast tier): a short soak against the in-process
//! simulator runs, prints RSS at the start, at each report and at the end,
//! and writes its JSON report.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_soak_reports_rss_and_passes_on_a_healthy_proxy() {
    let json = std::env::temp_dir().join(format!("sluice-soak-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "soak",
            "--duration",
            "12s",
            "--report-every",
            "4s",
            "--warmup",
            "4s",
            "--rate",
            "100",
            "--scrape-interval",
            "3s",
            // A short run on a shared machine: the growth judged here is
            // only a smoke check of the verdict (the command's own default
            // is 10%, over an hour).
            "--max-growth",
            "0.5",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports = stdout.lines().filter(|l| l.contains(" s  RSS ")).count();
    assert!(reports >= 4, "start, every 4 s and the end:\n{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(report["passed"], true, "{report}");
    assert!(report["sent"].as_u64().unwrap() >= 600, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["scrapes"].as_u64().unwrap() >= 3, "{report}");
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.len() >= 4, "{report}");
    assert!(
        samples.iter().all(|s| s[1].as_u64().unwrap() > 1 << 20),
        "RSS read from the proxy process: {report}"
    );
}
