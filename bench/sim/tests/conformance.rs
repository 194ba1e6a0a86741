//! API conformance: the same requests to the simulator and to a real vLLM,
//! comparing shapes (field names, SSE framing, error bodies, usage), never
//! values. Needs a real vLLM: `just e2e` sets `SLUICE_VLLM_URL`.

use std::collections::BTreeSet;

use serde_json::Value;
use sluice_sim::{Profile, serve};

/// Field paths of a JSON value (`a.b[].c`), values ignored.
fn shape(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{prefix}.{k}");
                out.insert(p.clone());
                shape(v, &p, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                shape(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn shape_of(v: &Value) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    shape(v, "", &mut s);
    s
}

async fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let (url, body) = (format!("{base}{path}"), body.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-sN",
                "-w",
                "\n%{http_code}",
                "-H",
                "content-type: application/json",
            ])
            .args(["-d", &body, &url])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_string())
}

/// SSE events' JSON shapes, in order, with `[DONE]` as a marker.
fn sse_shapes(body: &str) -> Vec<BTreeSet<String>> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream ends with [DONE]: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .expect("every event is one data line");
            if data == "[DONE]" {
                BTreeSet::from(["[DONE]".to_string()])
            } else {
                shape_of(&serde_json::from_str(data).expect("JSON event"))
            }
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs a real vLLM: run just e2e"]
async fn simulator_matches_real_vllm_shapes() {
    let real = std::env::var("SLUICE_VLLM_URL").expect("SLUICE_VLLM_URL must point at a real vLLM");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = format!("http://{}", listener.local_addr().unwrap());
    let profile = Profile::load("vllm-cpu-tiny").unwrap();
    tokio::spawn(serve(listener, profile, std::future::pending()));

    let cases: &[(&str, &str)] = &[
        (
            "/v1/completions",
            r#"{"model":"tiny-llama","prompt":"hello world","max_tokens":3}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"nope","prompt":"x","max_tokens":3}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"tiny-llama","prompt":"x","max_tokens":9001}"#,
        ),
        ("/v1/completions", r#"{"model":"tiny-llama","prompt":"x","#),
        (
            "/v1/chat/completions",
            r#"{"model":"tiny-llama","max_tokens":3}"#,
        ),
    ];
    for (path, body) in cases {
        let (rs, rb) = post(&real, path, body).await;
        let (ss, sb) = post(&sim, path, body).await;
        assert_eq!(rs, ss, "status for {path} {body}");
        let (rv, sv): (Value, Value) = (
            serde_json::from_str(&rb).unwrap(),
            serde_json::from_str(&sb).unwrap(),
        );
        assert_eq!(
            shape_of(&rv),
            shape_of(&sv),
            "shape for {path} {body}\nreal {rb}\nsim  {sb}"
        );
        if rs == 200 {
            assert_eq!(
                rv["usage"]["completion_tokens"],
                sv["usage"]["completion_tokens"]
            );
        } else {
            assert_eq!(rv["error"]["param"], sv["error"]["param"], "{rb} vs {sb}");
        }
    }
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"model":"tiny-llama","prompt":"hello world","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    ] {
        let (_, rb) = post(&real, path, body).await;
        let (_, sb) = post(&sim, path, body).await;
        assert_eq!(
            sse_shapes(&rb),
            sse_shapes(&sb),
            "stream for {path}\nreal {rb}\nsim  {sb}"
        );
    }
}
