//! The real-vLLM tier of `bench sim-vs-real` (`just e2e`): one short round
//! fits `vllm-cpu-tiny` to the real engine and predicts the held-out
//! workloads. This checks the command end to end (the fit is written and
//! loads, both tables are complete); how close the prediction comes is a
//! measurement, reported by the full-size run in the README, not asserted.
//! Needs `SLUICE_VLLM_URL`.

use std::process::Command;

use sluice_sim::calibrate::{fit_workloads, held_out_workloads};
use sluice_sim::profile::Profile;

#[test]
#[ignore = "needs a real vLLM: run just e2e"]
fn sim_vs_real_fits_on_the_real_engine_and_predicts_the_held_out_points() {
    let url = std::env::var("SLUICE_VLLM_URL").expect("set SLUICE_VLLM_URL (run `just e2e`)");
    let out_file = std::env::temp_dir().join(format!("sluice-fit-{}.toml", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["sim-vs-real", "--upstream", &url])
        .args(["--scale", "0.2", "--repeats", "1", "--out"])
        .arg(&out_file)
        .output()
        .expect("run bench sim-vs-real");
    let fitted = std::fs::read_to_string(&out_file);
    let _ = std::fs::remove_file(&out_file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench sim-vs-real failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("fitted vllm-cpu-tiny in this run"),
        "{stdout}"
    );
    let rows = |table: &str| {
        stdout
            .split(table)
            .nth(1)
            .unwrap_or_default()
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with("| c="))
            .count()
    };
    assert_eq!(
        rows("| fit workload |"),
        fit_workloads(0.2).len(),
        "{stdout}"
    );
    assert_eq!(
        rows("| held-out workload |"),
        held_out_workloads(0.2).len(),
        "{stdout}"
    );
    let fitted = Profile::from_toml(&fitted.expect("the fitted profile is written"))
        .expect("the fitted profile loads");
    let base = Profile::load("vllm-cpu-tiny").unwrap();
    assert_ne!(fitted.timing, base.timing, "the fit moved the timing");
    assert_eq!(fitted.engine, base.engine, "the engine shape is kept");
}
