//! Where each setting comes from, end to end: a flag beats its `SLUICE_*`
//! variable, which beats the `--config` file, which beats the default; the
//! file's `[policy-config]` table reaches the policy under the flags; a
//! bare `--policy NAME.wasm` is found in plugins/dist. Read back from the
//! proxy's own startup line and policy log line.

mod common;

use std::time::Duration;

use common::upstream::EchoUpstream;
use common::{ProxyProcess, log_field};

fn config_file(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn workers(proxy: &ProxyProcess) -> usize {
    log_field(&proxy.startup, "workers")
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no workers field in {:?}", proxy.startup))
}

/// The "admission policy loaded" line (it carries the policy's description).
async fn policy_loaded(proxy: &ProxyProcess) -> String {
    proxy
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("admission policy loaded")
        })
        .await
        .expect("policy log line")
}

#[tokio::test]
async fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    let upstream = EchoUpstream::start().await;
    let url = upstream.url();
    let file = config_file("workers.toml", "workers = 2\n");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let default = ProxyProcess::start(&url, &[]);
    assert_eq!(workers(&default), cpus);
    let from_file = ProxyProcess::start(&url, &["--config", &file]);
    assert_eq!(workers(&from_file), 2);
    let from_env =
        ProxyProcess::start_with_env(&url, &["--config", &file], &[("SLUICE_WORKERS", "3")]);
    assert_eq!(workers(&from_env), 3);
    let from_flag = ProxyProcess::start_with_env(
        &url,
        &["--config", &file, "--workers", "4"],
        &[("SLUICE_WORKERS", "3")],
    );
    assert_eq!(workers(&from_flag), 4);
    // The config file itself may come from the environment.
    let file_from_env = ProxyProcess::start_with_env(&url, &[], &[("SLUICE_CONFIG", &file)]);
    assert_eq!(workers(&file_from_env), 2);
}

#[tokio::test]
async fn the_files_policy_config_table_reaches_the_policy_under_the_flags() {
    let upstream = EchoUpstream::start().await;
    let file = config_file(
        "policy.toml",
        "policy = \"concurrency.wasm\"\n[policy-config]\nlimit = 3\nkey = \"tenant\"\n",
    );
    let proxy = ProxyProcess::start(&upstream.url(), &["--config", &file]);
    // A bare name is looked up in plugins/dist.
    assert!(
        proxy.startup.contains("plugins/dist/concurrency.wasm"),
        "{}",
        proxy.startup
    );
    let loaded = policy_loaded(&proxy).await;
    assert!(loaded.contains("limit=3 key=tenant"), "{loaded}");

    let flagged = ProxyProcess::start(
        &upstream.url(),
        &["--config", &file, "--policy-config", "limit=7"],
    );
    let loaded = policy_loaded(&flagged).await;
    assert!(loaded.contains("limit=7 key=tenant"), "{loaded}");
}

#[tokio::test]
async fn a_bad_value_in_the_file_names_the_file_and_the_key() {
    let file = config_file("bad.toml", "max-queue = \"many\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["--config", &file])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&file) && err.contains("--max-queue"), "{err}");
}

#[tokio::test]
async fn a_bare_policy_flag_is_found_in_plugins_dist_and_the_files_table_applies() {
    let upstream = EchoUpstream::start().await;
    // The flag names the policy, the file's table configures it.
    let file = config_file("limit-one.toml", "[policy-config]\nlimit = 1\n");
    let proxy = ProxyProcess::start(
        &upstream.url(),
        &["--policy", "concurrency.wasm", "--config", &file],
    );
    assert!(
        proxy.startup.contains("plugins/dist/concurrency.wasm"),
        "{}",
        proxy.startup
    );
    let loaded = policy_loaded(&proxy).await;
    assert!(loaded.contains("limit=1"), "{loaded}");
    // And it decides: six requests at once reach the upstream one at a time.
    let url = format!("{}/v1/completions", proxy.url());
    let replies = common::spawn_all(6, |_| {
        let url = url.clone();
        async move {
            common::send(
                http::Method::POST,
                &url,
                &[("x-test-delay-ms", "20")],
                bytes::Bytes::from_static(br#"{"model":"m","prompt":"hi","max_tokens":1}"#),
            )
            .await
        }
    })
    .await
    .unwrap();
    assert!(replies.iter().all(|r| r.status == 200));
    let seen = &upstream.seen;
    assert_eq!(seen.total.load(std::sync::atomic::Ordering::SeqCst), 6);
    assert_eq!(
        seen.max_in_flight.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // As the README's quick start runs it.
    let batched = ProxyProcess::start(&upstream.url(), &["--policy", "batched.wasm"]);
    assert!(
        batched.startup.contains("plugins/dist/batched.wasm"),
        "{}",
        batched.startup
    );
    let loaded = policy_loaded(&batched).await;
    assert!(loaded.contains("plugins/dist/batched.wasm"), "{loaded}");
}
