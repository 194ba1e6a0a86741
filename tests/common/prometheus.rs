//! A real Prometheus for the tests: started on a free loopback port,
//! scraping one target every second (optionally with rule files, evaluated
//! every second), queried over its HTTP API; killed on drop.
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;

use super::Reply;

pub const INSTALL_HINT: &str = "run scripts/install-test-tools.sh (installs Debian's prometheus package, \
     which provides promtool and prometheus)";

/// Panics with the install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{tool}` is not on PATH: {INSTALL_HINT}")
        }
        Err(e) => panic!("`{tool} --version` failed to start ({e}): {INSTALL_HINT}"),
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("sluice-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Prometheus server started by the test; killed on drop (before its
/// temp dir, declared after it, is removed).
pub struct PrometheusServer {
    child: Child,
    url: String,
    log: PathBuf,
    // Dropped after `child` is killed (Drop runs before field drops).
    _dir: TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus on a free loopback port, scraping `target` every second.
    pub fn start(target: SocketAddr) -> Self {
        Self::with_rules(target, &[])
    }

    /// [`PrometheusServer::start`], also evaluating `rule_files` every second.
    pub fn with_rules(target: SocketAddr, rule_files: &[&Path]) -> Self {
        require_tool("prometheus");
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        let rules: String = rule_files
            .iter()
            .map(|f| format!("  - {}\n", f.display()))
            .collect();
        let rules = if rules.is_empty() {
            String::new()
        } else {
            format!("rule_files:\n{rules}")
        };
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 {rules}scrape_configs:\n  - job_name: sluice\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let log_file = File::create(&log).expect("create prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start prometheus ({e}): {INSTALL_HINT}"));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test (with Prometheus's log) if the server has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait prometheus") {
            panic!("prometheus exited ({status}); log:\n{}", self.log());
        }
    }

    /// GET `path`, or None while the server does not answer.
    pub async fn get(&self, path: &str) -> Option<Reply> {
        let url = format!("{}{path}", self.url);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let request = http::Request::get(&url)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = client.request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .ok()?
            .to_bytes();
        Some(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Evaluates an instant PromQL query: the first result's value, or None
    /// while the result is empty (or the server does not answer).
    pub async fn query(&self, promql: &str) -> Option<f64> {
        let reply = self
            .get(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await?;
        let body = reply.json();
        assert_eq!(body["status"], "success", "query {promql} failed: {body}");
        let value = body["data"]["result"].get(0)?["value"][1].as_str()?;
        // Prometheus writes NaN and ±Inf as "NaN", "+Inf", "-Inf"; Rust parses them.
        Some(value.parse().expect("sample value is a float"))
    }
}

impl PrometheusServer {
    /// Evaluates `promql`: how many series it returns, or Prometheus's
    /// error (a query that does not parse, an unknown function, …).
    pub async fn series(&self, promql: &str) -> Result<usize, String> {
        let reply = self
            .get(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await
            .ok_or("prometheus did not answer")?;
        let body: serde_json::Value = serde_json::from_slice(&reply.body)
            .map_err(|_| format!("HTTP {}: {}", reply.status, reply.text()))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
