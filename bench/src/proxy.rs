//! The proxy a benchmark configuration sends through: the `proxy` binary
//! as a child process ([`procs`]), or the proxy library in this process;
//! its addresses and the CPU time it has used.

use std::net::SocketAddr;
use std::path::Path;

use crate::procs;

/// Where the proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProxyMode {
    /// The `proxy` binary (`SLUICE_PROXY_BIN`, else the one beside `bench`)
    /// if present, else in-process.
    Auto,
    /// The `proxy` binary (`SLUICE_PROXY_BIN`, else the one beside `bench`),
    /// as a child process.
    Process,
    /// The proxy library inside this process.
    InProcess,
}

/// A running proxy, stopped on drop.
pub(crate) enum Proxy {
    Child(procs::Proc),
    InProcess {
        addr: SocketAddr,
        admin: SocketAddr,
        /// Stops the server when sent or dropped.
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

impl Proxy {
    /// Its client and admin addresses.
    pub(crate) fn addrs(&self) -> (SocketAddr, SocketAddr) {
        match self {
            Proxy::Child(p) => (p.addr, p.admin),
            Proxy::InProcess { addr, admin, .. } => (*addr, *admin),
        }
    }

    /// CPU time (user + system) the proxy process has used so far, in
    /// seconds; `None` in-process, where it cannot be told from the bench's.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Proxy::Child(p) => Some(p.cpu_seconds()),
            Proxy::InProcess { .. } => None,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Proxy::InProcess { stop, .. } = self
            && let Some(tx) = stop.take()
        {
            let _ = tx.send(());
        }
    }
}

/// Starts a proxy in front of `upstream` with extra flags, as `mode` says.
pub(crate) async fn start(
    mode: ProxyMode,
    upstream: SocketAddr,
    extra: &[String],
) -> anyhow::Result<Proxy> {
    start_over(mode, &[upstream], extra).await
}

/// Starts a proxy in front of every engine of `upstreams` (`--upstream`
/// once each) with extra flags, as `mode` says.
pub(crate) async fn start_over(
    mode: ProxyMode,
    upstreams: &[SocketAddr],
    extra: &[String],
) -> anyhow::Result<Proxy> {
    let use_child = match mode {
        ProxyMode::Process => true,
        ProxyMode::InProcess => false,
        // A SLUICE_PROXY_BIN that names nothing is an error, not a fallback.
        ProxyMode::Auto => {
            procs::proxy_binary_override().is_some() || procs::proxy_binary().is_ok()
        }
    };
    if use_child {
        let (upstreams, extra) = (upstreams.to_vec(), extra.to_vec());
        let proc = tokio::task::spawn_blocking(move || procs::start_proxy_over(&upstreams, &extra))
            .await??;
        return Ok(Proxy::Child(proc));
    }
    let mut argv = vec!["proxy".to_string()];
    argv.extend(procs::base_flags(upstreams));
    argv.extend(extra.iter().cloned());
    let config = sluice::cli::load(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = sluice::App::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    app.replicas
        .first_scrapes(std::time::Duration::from_secs(2))
        .await;
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr, admin_addr) = (main.local_addr()?, admin.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sluice::server::run(
        app,
        sluice::server::Listeners { main, admin },
        async move {
            let _ = rx.await;
        },
    ));
    Ok(Proxy::InProcess {
        addr,
        admin: admin_addr,
        stop: Some(tx),
    })
}

/// A policy as proxy flags and a label: `PATH` or `PATH,key=value,...`.
pub(crate) fn policy_flags(spec: &str) -> (Vec<String>, String) {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default().to_string();
    let name = Path::new(&path)
        .file_name()
        .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
    let mut flags = vec!["--policy".to_string(), path];
    let mut config = Vec::new();
    for kv in parts.filter(|p| !p.is_empty()) {
        flags.push("--policy-config".into());
        flags.push(kv.to_string());
        config.push(kv);
    }
    let label = if config.is_empty() {
        format!("sluice + {name}")
    } else {
        format!("sluice + {name} ({})", config.join(" "))
    };
    (flags, label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_specs() {
        let (flags, label) = policy_flags("p/dist/x.wasm,limit=4,key=tenant");
        assert_eq!(
            flags,
            [
                "--policy",
                "p/dist/x.wasm",
                "--policy-config",
                "limit=4",
                "--policy-config",
                "key=tenant"
            ]
        );
        assert_eq!(label, "sluice + x.wasm (limit=4 key=tenant)");
        assert_eq!(policy_flags("y.wasm").1, "sluice + y.wasm");
    }
}
