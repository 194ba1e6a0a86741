//! Child processes a benchmark measures: the `proxy` binary (the one
//! `SLUICE_PROXY_BIN` names, else the one next to the running `bench`
//! binary, i.e. the same cargo profile), the `hyper-floor` beside it, and
//! nginx.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// A child process killed on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    /// The binary it runs (under the wrapper, if any).
    pub(crate) binary: PathBuf,
    /// Its client-facing address.
    pub(crate) addr: SocketAddr,
    /// Its admin address (the proxy's `/stats`, `/metrics`); `addr` for nginx.
    pub(crate) admin: SocketAddr,
}

/// `utime + stime` of one process, in seconds (Linux `/proc/PID/stat`).
fn cpu_of(pid: u32) -> Option<(f64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(((utime + stime) / 100.0, ppid))
}

impl Proc {
    /// CPU time used so far by the process and its direct children (nginx
    /// workers), in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let me = self.child.id();
        let mut total = cpu_of(me).map(|(cpu, _)| cpu).unwrap_or(0.0);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((cpu, ppid)) = cpu_of(pid)
                    && ppid == me
                {
                    total += cpu;
                }
            }
        }
        total
    }

    /// Resident set size in bytes (Linux `/proc`).
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

impl Proc {
    /// Asks the process to stop (SIGTERM, through `kill(1)`: this crate has
    /// no unsafe code for `libc::kill`) and waits for it to exit.
    pub(crate) fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("run kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    /// SIGTERM first, SIGKILL after two seconds: a SIGKILLed nginx master
    /// leaves its worker processes running (and listening).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SLUICE_PROXY_BIN`, when set and not empty.
pub(crate) fn proxy_binary_override() -> Option<std::ffi::OsString> {
    std::env::var_os("SLUICE_PROXY_BIN").filter(|path| !path.is_empty())
}

/// The `proxy` binary the benchmarks start: `SLUICE_PROXY_BIN` when set
/// (`just bench-overhead` points it at the `dist` build), else the one
/// beside this binary.
pub(crate) fn proxy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = proxy_binary_override() {
        // Absolute, so that a bare name is not looked up on PATH.
        let path = std::path::absolute(PathBuf::from(path))?;
        if !path.is_file() {
            bail!(
                "SLUICE_PROXY_BIN={} is not a file: build it (`cargo build --profile dist -p sluice-proxy` gives target/dist/proxy) or unset it",
                path.display()
            );
        }
        return Ok(path);
    }
    let path = std::env::current_exe()?.with_file_name("proxy");
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// Starts the proxy in front of `upstream` with extra flags; waits for its listening line.
pub(crate) fn start_proxy(upstream: SocketAddr, extra: &[String]) -> anyhow::Result<Proc> {
    start_proxy_with_env(upstream, extra, &[])
}

/// [`start_proxy`] with extra environment variables for the proxy.
pub(crate) fn start_proxy_with_env(
    upstream: SocketAddr,
    extra: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    start_proxy_wrapped(&[], &[upstream], extra, env)
}

/// Starts the proxy in front of several replicas (`--upstream` once each)
/// with extra flags, e.g. [`route_flags`]'s.
pub(crate) fn start_proxy_over(upstreams: &[SocketAddr], extra: &[String]) -> anyhow::Result<Proc> {
    start_proxy_wrapped(&[], upstreams, extra, &[])
}

/// The flags every proxy the bench starts gets: `--upstream` once per
/// engine, listeners on port 0, and `--trust-tenant-header` (the bench
/// plays the gateway: its requests name their tenant, `X-Tenant:
/// live`/`batch`, the memory sessions' `user`). Child and in-process
/// proxies alike take them from here.
pub(crate) fn base_flags(upstreams: &[SocketAddr]) -> Vec<String> {
    let mut flags = Vec::with_capacity(2 * upstreams.len() + 5);
    for upstream in upstreams {
        flags.push("--upstream".to_string());
        flags.push(format!("http://{upstream}"));
    }
    flags.extend(
        [
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--trust-tenant-header",
        ]
        .map(String::from),
    );
    flags
}

/// How a proxy over several replicas picks one for each request
/// (`--route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Route {
    /// The replica predicted to hold most of the prompt's prefix, balanced
    /// against load (the proxy's default).
    Prefix,
    /// The replica with the fewest requests in flight.
    LeastLoaded,
    /// Each replica in turn.
    RoundRobin,
}

impl Route {
    /// The value of `--route`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Route::Prefix => "prefix",
            Route::LeastLoaded => "least-loaded",
            Route::RoundRobin => "round-robin",
        }
    }
}

/// `--route NAME` for a proxy over `replicas` engines; nothing for one
/// (there is nothing to choose, and a proxy without replica support
/// takes no `--route`).
pub(crate) fn route_flags(route: Route, replicas: usize) -> Vec<String> {
    if replicas > 1 {
        vec!["--route".to_string(), route.name().to_string()]
    } else {
        Vec::new()
    }
}

/// [`start_proxy_with_env`] run by a wrapper command (`valgrind
/// --tool=callgrind ...`, say) that execs the proxy in its own process.
pub(crate) fn start_proxy_wrapped(
    wrapper: &[String],
    upstreams: &[SocketAddr],
    extra: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let proxy = proxy_binary()?;
    let mut command = match wrapper.split_first() {
        None => Command::new(&proxy),
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(&proxy);
            command
        }
    };
    let mut child = command
        .args(base_flags(upstreams))
        .args(extra)
        .env(
            "SLUICE_LOG",
            match std::env::var_os("SLUICE_BENCH_CHILD_LOG") {
                Some(_) => "info",
                None => "warn,proxy=info",
            },
        )
        .envs(env.iter().copied())
        .envs(std::env::var("SLUICE_PROXY_WORKERS").map(|w| ("SLUICE_WORKERS", w)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start proxy")?;
    let stdout = child.stdout.take().context("proxy stdout")?;
    let line = listening_line(stdout, "sluice proxy listening")
        .context("the proxy did not report its listening address")?;
    let addr = address_field(&line, "listen=")?;
    let admin = address_field(&line, "admin=")?;
    Ok(Proc {
        child,
        binary: proxy,
        addr,
        admin,
    })
}

/// Reads `stdout` on a thread of its own until a line contains `marker`,
/// and returns that line (within 30 s); the thread then keeps draining, so
/// the child never blocks on a full pipe.
fn listening_line(
    stdout: std::process::ChildStdout,
    marker: &'static str,
) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SLUICE_BENCH_CHILD_LOG=1 shows the child's log lines on stderr.
        let echo = std::env::var_os("SLUICE_BENCH_CHILD_LOG").is_some();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            if line.contains(marker) {
                let _ = tx.send(line);
            }
        }
    });
    Ok(rx.recv_timeout(Duration::from_secs(30))?)
}

/// The address in a listening line's `name` field (`listen=`, `admin=`).
fn address_field(line: &str, name: &str) -> anyhow::Result<SocketAddr> {
    let value = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .with_context(|| format!("no {name} field in {line:?}"))?;
    Ok(value.parse()?)
}

/// Starts `hyper-floor` (the least a hyper proxy does, `bench/floor`) in
/// front of `upstream`, from the directory the proxy binary is in, so both
/// are built alike; `None` when it is not built there.
pub(crate) fn start_hyper_floor(upstream: SocketAddr) -> anyhow::Result<Option<Proc>> {
    let floor = proxy_binary()?.with_file_name("hyper-floor");
    if !floor.is_file() {
        return Ok(None);
    }
    let mut command = Command::new(&floor);
    command.args(["--upstream", &upstream.to_string()]);
    if let Some(workers) = std::env::var_os("SLUICE_PROXY_WORKERS").filter(|w| !w.is_empty()) {
        command.arg("--workers").arg(workers);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start hyper-floor")?;
    let stdout = child.stdout.take().context("hyper-floor stdout")?;
    // Killed on drop from here on, whatever fails next.
    let mut floor = Proc {
        child,
        binary: floor,
        addr: upstream,
        admin: upstream,
    };
    let line = listening_line(stdout, "hyper-floor listening")
        .context("hyper-floor did not report its listening address")?;
    floor.addr = address_field(&line, "listen=")?;
    floor.admin = floor.addr;
    Ok(Some(floor))
}

/// Starts nginx as a plain `proxy_pass` to `upstream` (keep-alive upstream
/// pool, no buffering), if nginx is installed.
pub(crate) fn start_nginx(upstream: SocketAddr) -> anyhow::Result<Option<Proc>> {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let dir = std::env::temp_dir().join(format!("sluice-bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "worker_processes auto;\ndaemon off;\nerror_log {dir}/logs/error.log warn;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         upstream up {{ server {upstream}; keepalive 256; }}\n\
         keepalive_requests 100000000;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://up;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      tcp_nodelay on;\n    }}\n  }}\n}}\n",
        dir = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(&nginx)
        .args([
            "-c",
            &conf_path.to_string_lossy(),
            "-p",
            &dir.to_string_lossy(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start nginx")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("nginx did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(Proc {
        child,
        binary: nginx,
        addr,
        admin: addr,
    }))
}
