//! Harness for end-to-end tests: starts the real `proxy` binary on
//! 127.0.0.1:0, learns its ports from its startup log line, keeps its log
//! lines for assertions, and offers a small HTTP client.
#![allow(dead_code, unreachable_pub)]

pub mod policies;
pub mod prometheus;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A running proxy process.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// The "sluice proxy listening" line (listen, admin, upstream, workers, policy).
    pub startup: String,
}

impl ProxyProcess {
    /// Starts `proxy --upstream URL --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 ARGS`
    /// (`--admin-listen` only when ARGS has none).
    pub fn start(upstream: &str, args: &[&str]) -> Self {
        Self::start_with_env(upstream, args, &[])
    }

    /// [`Self::start`] with extra environment variables (e.g. `SLUICE_*` settings).
    pub fn start_with_env(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["--upstream", upstream, "--listen", "127.0.0.1:0"])
            // Tests of a listener others can reach pass their own.
            .args(if args.contains(&"--admin-listen") {
                &[][..]
            } else {
                &["--admin-listen", "127.0.0.1:0"][..]
            })
            .args(args)
            // The upstream scrape would add its own requests to what the test
            // upstreams count; tests that want it pass --scrape-interval.
            .args(if args.contains(&"--scrape-interval") {
                &[][..]
            } else {
                &["--scrape-interval", "0"][..]
            })
            .env("SLUICE_LOG", "info")
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR").to_owned() + "/..")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Stored before `start` is told, so that every line up to the
                // startup line is in `logs()` once `start` returns.
                sink.lock().unwrap().push(line.clone());
                if line.contains("sluice proxy listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => panic!(
                "proxy did not start; log:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        let field = |name: &str| -> SocketAddr {
            log_field(&line, name)
                .expect("field in startup line")
                .parse()
                .unwrap()
        };
        Self {
            addr: field("listen"),
            admin: field("admin"),
            child,
            logs,
            startup: line,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits up to `limit` for a log line that satisfies `matches`.
    pub async fn wait_for_log(
        &self,
        limit: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let found = wait_until(limit, || {
            let hit = self.logs().iter().any(|l| matches(l));
            async move { hit }
        })
        .await;
        found
            .then(|| self.logs().into_iter().find(|l| matches(l)))
            .flatten()
    }

    /// The log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Reads the proxy's Prometheus text.
    pub async fn metrics(&self) -> String {
        let r = send(
            Method::GET,
            &format!("http://{}/metrics", self.admin),
            &[],
            Bytes::new(),
        )
        .await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// `GET /stats` on the admin listener, as JSON.
    pub async fn stats(&self) -> serde_json::Value {
        send(
            Method::GET,
            &format!("http://{}/stats", self.admin),
            &[],
            Bytes::new(),
        )
        .await
        .json()
    }

    /// The value of one sample line (`name{labels} value`) in /metrics, or 0.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.metrics().await, name_and_labels)
    }
}

impl ProxyProcess {
    /// The request ledger (`"accounting"` in `/stats`) once nothing is in
    /// progress, read with a blocking client (this runs in `Drop`); `None`
    /// when `/stats` cannot be read (the process exited, a test set an
    /// admin token) or requests stay in progress for 5 s.
    fn settled_balance(&self) -> Result<serde_json::Value, String> {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut stream =
                std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(1))
                    .map_err(|e| format!("connect: {e}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
            stream
                .write_all(b"GET /stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .map_err(|e| format!("write: {e}"))?;
            let mut text = String::new();
            stream
                .read_to_string(&mut text)
                .map_err(|e| format!("read: {e}"))?;
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                return Err(format!("status: {head}"));
            }
            let stats: serde_json::Value =
                serde_json::from_str(body).map_err(|e| format!("json: {e}"))?;
            let balance = stats["accounting"].clone();
            let idle = balance["in_progress"] == 0 && balance["in_flight"] == 0;
            if idle || std::time::Instant::now() >= deadline {
                return Ok(balance);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Opens a connection to `addr` and writes a whole HTTP/1.1 `POST path`
/// with the JSON `body` on it, for tests that hold or drop the socket
/// themselves.
pub async fn raw_post(addr: SocketAddr, path: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Every test that starts a proxy ends by checking its request ledger:
/// with nothing in progress, received = answered + refused + cut and
/// admitted = completed + failed + client_gone, exactly.
impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        if running
            && !std::thread::panicking()
            && let Ok(balance) = self.settled_balance()
        {
            let n = |key: &str| balance[key].as_u64().unwrap_or(u64::MAX);
            let received_ok = n("received") == n("answered") + n("refused") + n("cut");
            let admitted_ok = n("admitted") == n("completed") + n("failed") + n("client_gone");
            if !(received_ok && admitted_ok) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the request ledger does not balance once idle: {balance}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first sample whose series starts with `prefix` (name plus
/// a subset of labels in order), summed over matches; 0 when absent.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    let (name, labels) = match prefix.split_once('{') {
        Some((n, l)) => (
            n,
            l.trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>(),
        ),
        None => (prefix, vec![]),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of `name=VALUE` in a log line.
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()
}

/// A response, collected.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one HTTP/1.1 request on a fresh client and collects the response.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_else(|e| panic!("body from {url} failed: {e:?}"));
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POSTs a JSON body.
pub async fn post_json(url: &str, body: &serde_json::Value) -> Reply {
    send(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await
}

/// Starts `make(0)`, …, `make(n - 1)` at once, each on its own task; the
/// handle yields their results in that order.
pub fn spawn_all<F, Fut, T>(n: usize, mut make: F) -> tokio::task::JoinHandle<Vec<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    tokio::spawn(async move {
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(task.await.expect("request task panicked"));
        }
        results
    })
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
