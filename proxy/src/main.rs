//! The `proxy` binary: parse → validate → bind → run → exit code.

use std::process::ExitCode;
use std::sync::Arc;

use sluice::App;
use sluice::server::{self, Listeners};

// Small, short-lived allocations (headers, futures, body frames) dominate a
// proxy's allocation profile; mimalloc serves them from per-thread free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `EX_USAGE`: invalid configuration.
const EXIT_CONFIG: u8 = 64;
/// `EX_UNAVAILABLE`: a listener could not be bound.
const EXIT_BIND: u8 = 69;

fn main() -> ExitCode {
    let config = match sluice::cli::load(std::env::args_os()) {
        Ok(config) => config,
        Err(sluice::cli::CliError::Args(err)) if !err.use_stderr() => {
            // --help / --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("proxy: invalid configuration: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    // The control runtime: acceptor, admin listener, admission scheduler and
    // background tasks, on two threads so that a slow policy call never holds
    // up accepting. Client connections are served by `--workers` threads of
    // their own (see `sluice::server`).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-control")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("proxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a SIGTERM during start-up (the first scrape may take
        // seconds) is then a clean shutdown too.
        let shutdown = shutdown_signal();
        let app = match App::new(config) {
            Ok(app) => app,
            Err(err) => {
                eprintln!("proxy: invalid configuration: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // Learn what the upstream's /metrics says (its KV block size) before
        // the first request; bounded, so a hanging upstream delays start by 2 s at most.
        app.replicas
            .first_scrapes(std::time::Duration::from_secs(2))
            .await;
        let listeners = match bind(&app).await {
            Ok(listeners) => listeners,
            Err(err) => {
                eprintln!("proxy: {err}");
                return ExitCode::from(EXIT_BIND);
            }
        };
        let addr = |l: &tokio::net::TcpListener| {
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        };
        let policy = app.config.admission.policy.as_ref().map(|p| p.display().to_string());
        tracing::info!(
            listen = %addr(&listeners.main), admin = %addr(&listeners.admin),
            upstream = %app.replicas.all().iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","), workers = app.config.server.workers(), policy = policy.as_deref().unwrap_or("none (pass-through)"),
            "sluice proxy listening"
        );
        spawn_reload_on_sighup(Arc::clone(&app));
        match server::run(app, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("proxy: cannot start the serving threads: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn bind(app: &App) -> Result<Listeners, String> {
    let main = tokio::net::TcpListener::bind(app.config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", app.config.server.listen))?;
    let admin = tokio::net::TcpListener::bind(app.config.server.admin_listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (admin): {e}",
                app.config.server.admin_listen
            )
        })?;
    Ok(Listeners { main, admin })
}

/// Installs the SIGTERM/SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

fn spawn_reload_on_sighup(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; reload with PUT /admin/policy");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the policy from its file");
            match app.reload_from_config().await {
                Ok(description) => tracing::info!(description, "policy reloaded from file"),
                Err(err) => {
                    tracing::error!(error = %err, "policy reload failed; the running policy stays")
                }
            }
        }
    });
}
