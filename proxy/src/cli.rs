//! Command-line flags, `SLUICE_*` environment fallbacks and the optional TOML
//! file, merged and validated into a clap-free [`Config`].
//!
//! Precedence, highest first: a flag, its `SLUICE_*` variable, the `--config`
//! file, the built-in default. Anything invalid is a [`ConfigError`]; the
//! binary prints it and exits with code 64 before any port is opened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use http::Uri;
use serde::Deserialize;

/// Sluice: an admission proxy for OpenAI-compatible inference servers (vLLM).
///
/// Point clients at --listen instead of the engine: every route is forwarded
/// to --upstream unchanged. With --policy, a WebAssembly admission policy
/// decides when each completion/chat request may enter the engine.
/// Durations take a unit (250ms, 30s, 5m); sizes take one too (512KiB, 16MiB).
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about, long_about)]
pub struct Cli {
    /// The inference server to forward to [default: http://127.0.0.1:8000]
    #[arg(long, env = "SLUICE_UPSTREAM", value_name = "URL")]
    upstream: Option<String>,

    /// Address for client traffic (HTTP/1.1 keep-alive and h2c) [default: 0.0.0.0:8080]
    #[arg(long, env = "SLUICE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,

    /// Address for /metrics, /stats and /admin/policy; keep it private [default: 127.0.0.1:9464]
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,

    /// TOML file with any of these settings (keys are the flag names, e.g. `max-body = "8MiB"`)
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Largest request body accepted; bigger ones get 413 [default: 16MiB]
    #[arg(long, env = "SLUICE_MAX_BODY", value_name = "SIZE")]
    max_body: Option<String>,

    /// Longest wait for the upstream's response headers, and longest silence
    /// between body chunks, before answering 504 / ending the stream [default: 300s]
    #[arg(long, env = "SLUICE_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    upstream_timeout: Option<String>,

    /// Longest wait for a TCP connection to the upstream [default: 3s]
    #[arg(long, env = "SLUICE_CONNECT_TIMEOUT", value_name = "DURATION")]
    connect_timeout: Option<String>,

    /// Reuse an idle upstream connection only within this long of its last
    /// response; keep it below the upstream's own keep-alive timeout (vLLM's
    /// server closes idle connections after 5s), or a request can go out on
    /// a connection the upstream is closing and get a 502 [default: 4s]
    #[arg(long, env = "SLUICE_UPSTREAM_KEEPALIVE", value_name = "DURATION")]
    upstream_keepalive: Option<String>,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish [default: 30s]
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", value_name = "DURATION")]
    drain_timeout: Option<String>,

    /// Most client connections served at once; more wait to be accepted [default: 4096]
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,

    /// Threads that serve client connections, each with its own event loop
    /// and its own upstream connections; a request never changes threads
    /// [default: the number of CPUs]
    #[arg(long, env = "SLUICE_WORKERS", value_name = "N")]
    workers: Option<usize>,

    /// Admission policy: a wasm component path, or a bare name looked up in
    /// plugins/dist (e.g. batched.wasm). Without it requests pass straight through
    #[arg(long, env = "SLUICE_POLICY", value_name = "WASM")]
    policy: Option<String>,

    /// Policy setting passed to the policy's init (repeatable), e.g. limit=10
    #[arg(long = "policy-config", value_name = "KEY=VALUE")]
    policy_config: Vec<String>,

    /// Most requests waiting for admission; more get 429 with Retry-After [default: 1024]
    #[arg(long, env = "SLUICE_MAX_QUEUE", value_name = "N")]
    max_queue: Option<usize>,

    /// Longest wait for admission before answering 503 [default: 60s]
    #[arg(long, env = "SLUICE_QUEUE_TIMEOUT", value_name = "DURATION")]
    queue_timeout: Option<String>,

    /// Per-tenant rate limit (GCRA), e.g. 100/s or 6000/m; over it: 429 with Retry-After
    #[arg(long, env = "SLUICE_RATE_LIMIT", value_name = "N/UNIT")]
    rate_limit: Option<String>,

    /// Burst allowed above --rate-limit [default: the per-second rate, at least 1]
    #[arg(long, env = "SLUICE_RATE_BURST", value_name = "N")]
    rate_burst: Option<u32>,

    /// Deadline for one policy call; a policy that overruns is replaced by the fallback [default: 50ms]
    #[arg(long, env = "SLUICE_POLICY_DEADLINE", value_name = "DURATION")]
    policy_deadline: Option<String>,

    /// Memory limit of the policy instance [default: 64MiB]
    #[arg(long, env = "SLUICE_POLICY_MEMORY", value_name = "SIZE")]
    policy_memory: Option<String>,

    /// How often the upstream's /metrics is scraped and mirrored; 0 turns it off [default: 5s]
    #[arg(long, env = "SLUICE_SCRAPE_INTERVAL", value_name = "DURATION")]
    scrape_interval: Option<String>,

    /// KV block size in tokens for prefix tracking, until the upstream reports its own [default: 16]
    #[arg(long, env = "SLUICE_BLOCK_SIZE", value_name = "TOKENS")]
    block_size: Option<u32>,

    /// Blocks the prefix tracker remembers, until the upstream reports its cache size [default: 65536]
    #[arg(long, env = "SLUICE_PREFIX_CACHE_BLOCKS", value_name = "N")]
    prefix_cache_blocks: Option<usize>,

    /// Concurrency cap of the built-in fallback used while a faulty policy awaits reload [default: 10]
    #[arg(long, env = "SLUICE_FALLBACK_LIMIT", value_name = "N")]
    fallback_limit: Option<u32>,

    /// The model's HF tokenizer.json: text prompts are cut into the engine's exact token blocks (default: 4 bytes per token)
    #[arg(long, env = "SLUICE_TOKENIZER", value_name = "FILE")]
    tokenizer: Option<PathBuf>,
}

/// The `--config` TOML file: every key optional, names as the flags'.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    upstream: Option<String>,
    listen: Option<String>,
    admin_listen: Option<String>,
    max_body: Option<toml::Value>,
    upstream_timeout: Option<String>,
    connect_timeout: Option<String>,
    upstream_keepalive: Option<String>,
    drain_timeout: Option<String>,
    max_connections: Option<usize>,
    workers: Option<usize>,
    policy: Option<String>,
    policy_config: Option<BTreeMap<String, toml::Value>>,
    max_queue: Option<usize>,
    queue_timeout: Option<String>,
    rate_limit: Option<String>,
    rate_burst: Option<u32>,
    policy_deadline: Option<String>,
    policy_memory: Option<toml::Value>,
    fallback_limit: Option<u32>,
    scrape_interval: Option<String>,
    block_size: Option<u32>,
    prefix_cache_blocks: Option<usize>,
    tokenizer: Option<PathBuf>,
}

/// A per-tenant rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period `requests` applies to.
    pub per: Duration,
    /// Requests allowed at once above the steady rate.
    pub burst: u32,
}

/// Validated settings for one proxy process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Upstream base URI (scheme and authority, no path).
    pub upstream: Uri,
    /// Client listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Request body limit in bytes.
    pub max_body: u64,
    /// Upstream response-header deadline and body idle limit.
    pub upstream_timeout: Duration,
    /// Upstream TCP connect deadline.
    pub connect_timeout: Duration,
    /// How long an idle upstream connection may still be reused.
    pub upstream_keepalive: Duration,
    /// Grace period for in-flight requests on shutdown.
    pub drain_timeout: Duration,
    /// Concurrent client connections.
    pub max_connections: usize,
    /// Serving threads (each a single-threaded runtime).
    pub workers: usize,
    /// Resolved path of the policy component, if any.
    pub policy: Option<PathBuf>,
    /// `--policy-config` pairs, in key order.
    pub policy_config: Vec<(String, String)>,
    /// Admission queue bound.
    pub max_queue: usize,
    /// Admission wait limit.
    pub queue_timeout: Duration,
    /// Per-tenant rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Per-call policy deadline.
    pub policy_deadline: Duration,
    /// Policy linear-memory limit in bytes.
    pub policy_memory: usize,
    /// In-flight cap of the fallback policy.
    pub fallback_limit: u32,
    /// Upstream `/metrics` scrape interval; `None` when off.
    pub scrape_interval: Option<Duration>,
    /// Prefix-tracking block size (tokens).
    pub block_size: u32,
    /// Prefix-tracker capacity (blocks).
    pub prefix_cache_blocks: usize,
    /// HF `tokenizer.json` for exact text blocks.
    pub tokenizer: Option<PathBuf>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that cannot be used.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        /// The setting's flag name.
        key: &'static str,
        /// The value given.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// The `--config` file could not be read or parsed.
    #[error("cannot use config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Folder where bare policy names are looked up (relative to the working directory).
pub const PLUGIN_DIR: &str = "plugins/dist";

impl Cli {
    /// Merges flags, environment and the config file into a validated [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let upstream = pick(self.upstream, file.upstream, "http://127.0.0.1:8000");
        let listen = pick(self.listen, file.listen, "0.0.0.0:8080");
        let admin_listen = pick(self.admin_listen, file.admin_listen, "127.0.0.1:9464");
        let max_body = pick(self.max_body, file.max_body.map(toml_scalar), "16MiB");
        let upstream_timeout = pick(self.upstream_timeout, file.upstream_timeout, "300s");
        let connect_timeout = pick(self.connect_timeout, file.connect_timeout, "3s");
        let upstream_keepalive = pick(self.upstream_keepalive, file.upstream_keepalive, "4s");
        let drain_timeout = pick(self.drain_timeout, file.drain_timeout, "30s");
        let queue_timeout = pick(self.queue_timeout, file.queue_timeout, "60s");
        let policy_deadline = pick(self.policy_deadline, file.policy_deadline, "50ms");
        let scrape_interval = pick(self.scrape_interval, file.scrape_interval, "5s");
        let policy_memory = pick(
            self.policy_memory,
            file.policy_memory.map(toml_scalar),
            "64MiB",
        );

        let mut policy_config: BTreeMap<String, String> = file
            .policy_config
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, toml_scalar(v)))
            .collect();
        for pair in &self.policy_config {
            let (key, value) = pair
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| invalid("--policy-config", pair, "expected KEY=VALUE"))?;
            policy_config.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        let policy = self.policy.or(file.policy);
        if policy.is_none() && !policy_config.is_empty() {
            return Err(invalid(
                "--policy-config",
                &self.policy_config.join(" "),
                "given without --policy",
            ));
        }

        let rate_burst = self.rate_burst.or(file.rate_burst);
        let rate_limit = match self.rate_limit.or(file.rate_limit) {
            Some(text) => Some(parse_rate_limit(&text, rate_burst)?),
            None => None,
        };

        let max_connections = self
            .max_connections
            .or(file.max_connections)
            .unwrap_or(4096);
        let max_queue = self.max_queue.or(file.max_queue).unwrap_or(1024);
        let fallback_limit = self.fallback_limit.or(file.fallback_limit).unwrap_or(10);
        if max_connections == 0 {
            return Err(invalid("--max-connections", "0", "must be at least 1"));
        }
        let workers = self.workers.or(file.workers).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        if !(1..=1024).contains(&workers) {
            return Err(invalid(
                "--workers",
                &workers.to_string(),
                "must be between 1 and 1024",
            ));
        }
        if max_queue == 0 {
            return Err(invalid("--max-queue", "0", "must be at least 1"));
        }
        let block_size = self.block_size.or(file.block_size).unwrap_or(16);
        let prefix_cache_blocks = self
            .prefix_cache_blocks
            .or(file.prefix_cache_blocks)
            .unwrap_or(65536);
        if block_size == 0 {
            return Err(invalid("--block-size", "0", "must be at least 1"));
        }
        if prefix_cache_blocks == 0 {
            return Err(invalid("--prefix-cache-blocks", "0", "must be at least 1"));
        }
        if fallback_limit == 0 {
            return Err(invalid("--fallback-limit", "0", "must be at least 1"));
        }

        Ok(Config {
            upstream: parse_upstream(&upstream)?,
            listen: parse_addr("--listen", &listen)?,
            admin_listen: parse_addr("--admin-listen", &admin_listen)?,
            max_body: parse_size("--max-body", &max_body)?,
            upstream_timeout: parse_positive_duration("--upstream-timeout", &upstream_timeout)?,
            connect_timeout: parse_positive_duration("--connect-timeout", &connect_timeout)?,
            upstream_keepalive: parse_positive_duration(
                "--upstream-keepalive",
                &upstream_keepalive,
            )?,
            drain_timeout: parse_duration("--drain-timeout", &drain_timeout)?,
            max_connections,
            workers,
            policy: policy.map(|p| resolve_policy(&p)).transpose()?,
            policy_config: policy_config.into_iter().collect(),
            max_queue,
            queue_timeout: parse_positive_duration("--queue-timeout", &queue_timeout)?,
            rate_limit,
            policy_deadline: parse_positive_duration("--policy-deadline", &policy_deadline)?,
            policy_memory: usize::try_from(parse_size("--policy-memory", &policy_memory)?)
                .map_err(|_| invalid("--policy-memory", &policy_memory, "too large"))?,
            fallback_limit,
            scrape_interval: Some(parse_duration("--scrape-interval", &scrape_interval)?)
                .filter(|d| !d.is_zero()),
            block_size,
            prefix_cache_blocks,
            tokenizer: self.tokenizer.or(file.tokenizer),
        })
    }
}

fn pick(flag: Option<String>, file: Option<String>, default: &str) -> String {
    flag.or(file).unwrap_or_else(|| default.to_owned())
}

fn toml_scalar(value: toml::Value) -> String {
    match value {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_upstream(text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = text
        .parse()
        .map_err(|e| invalid("--upstream", text, format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            "--upstream",
            text,
            "expected http://HOST:PORT (TLS to the upstream is not supported)",
        ));
    }
    if uri.authority().is_none() {
        return Err(invalid("--upstream", text, "missing host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(
            "--upstream",
            text,
            "give only scheme, host and port; client paths are forwarded as they are",
        ));
    }
    Uri::builder()
        .scheme("http")
        .authority(uri.authority().cloned().expect("checked above"))
        .path_and_query("/")
        .build()
        .map_err(|e| invalid("--upstream", text, e.to_string()))
}

fn parse_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, text, "expected IP:PORT, e.g. 127.0.0.1:8080"))
}

/// Resolves `--policy`: an existing path as given, else a bare name in [`PLUGIN_DIR`].
fn resolve_policy(text: &str) -> Result<PathBuf, ConfigError> {
    let given = PathBuf::from(text);
    if given.is_file() {
        return Ok(given);
    }
    let is_bare = given.components().count() == 1;
    if is_bare {
        let mut name = given.clone();
        if name.extension().is_none() {
            name.set_extension("wasm");
        }
        let in_dist = Path::new(PLUGIN_DIR).join(name);
        if in_dist.is_file() {
            return Ok(in_dist);
        }
        return Err(invalid(
            "--policy",
            text,
            format!(
                "no such file, nor {} (build the bundled plugins with `just plugins`)",
                in_dist.display()
            ),
        ));
    }
    Err(invalid("--policy", text, "no such file"))
}

/// Parses `100/s`, `6000/m`, `10/100ms`.
fn parse_rate_limit(text: &str, burst: Option<u32>) -> Result<RateLimit, ConfigError> {
    let (count, unit) = text
        .split_once('/')
        .ok_or_else(|| invalid("--rate-limit", text, "expected N/UNIT, e.g. 100/s"))?;
    let requests: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid("--rate-limit", text, "the count must be an integer ≥ 1"))?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration("--rate-limit", other)?,
    };
    if per.is_zero() {
        return Err(invalid("--rate-limit", text, "the period must be positive"));
    }
    let per_second = (f64::from(requests) / per.as_secs_f64()).ceil() as u32;
    let burst = burst.unwrap_or(per_second.max(1));
    if burst == 0 {
        return Err(invalid("--rate-burst", "0", "must be at least 1"));
    }
    Ok(RateLimit {
        requests,
        per,
        burst,
    })
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| invalid(key, text, "expected a duration such as 250ms, 30s or 5m"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid(key, text, "unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| invalid(key, text, "out of range"))
}

fn parse_positive_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(key, text)?;
    if d.is_zero() {
        return Err(invalid(key, text, "must be greater than zero"));
    }
    Ok(d)
}

/// Parses `512`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_size(key: &'static str, text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| invalid(key, text, "expected a size such as 512KiB or 16MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(invalid(key, text, "unknown unit (use KiB, MiB or GiB)")),
    };
    let bytes = value
        .checked_mul(scale)
        .ok_or_else(|| invalid(key, text, "out of range"))?;
    if bytes == 0 {
        return Err(invalid(key, text, "must be greater than zero"));
    }
    Ok(bytes)
}

/// Formats a duration the way the flags are written (`250ms`, `30s`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["proxy"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn workers_default_to_the_cpus_and_must_be_positive() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config(&[]).unwrap().workers, cpus);
        assert_eq!(config(&["--workers", "3"]).unwrap().workers, 3);
        let err = config(&["--workers", "0"]).unwrap_err().to_string();
        assert!(
            err.contains("--workers") && err.contains("between 1 and 1024"),
            "{err}"
        );
    }

    #[test]
    fn defaults_work() {
        let c = config(&[]).unwrap();
        assert_eq!(c.upstream, "http://127.0.0.1:8000/");
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.max_body, 16 << 20);
        assert!(c.policy.is_none());
        assert!(c.rate_limit.is_none());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = config(&["--upstream", "https://x:1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--upstream"), "{err}");
        let err = config(&["--max-body", "lots"]).unwrap_err().to_string();
        assert!(err.contains("--max-body"), "{err}");
        let err = config(&["--upstream-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--upstream-timeout"), "{err}");
        let err = config(&["--listen", "nope"]).unwrap_err().to_string();
        assert!(err.contains("--listen"), "{err}");
        let err = config(&["--policy", "/no/such.wasm"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--policy"), "{err}");
    }

    #[test]
    fn durations_sizes_and_rates_parse() {
        assert_eq!(
            parse_duration("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("k", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("k", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("k", "7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("k", "7 fortnights").is_err());
        assert_eq!(parse_size("k", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("k", "1MB").unwrap(), 1_000_000);
        let r = parse_rate_limit("100/s", None).unwrap();
        assert_eq!(
            (r.requests, r.per, r.burst),
            (100, Duration::from_secs(1), 100)
        );
        let r = parse_rate_limit("60/m", Some(5)).unwrap();
        assert_eq!(
            (r.requests, r.per, r.burst),
            (60, Duration::from_secs(60), 5)
        );
        assert!(parse_rate_limit("0/s", None).is_err());
        assert!(parse_rate_limit("100", None).is_err());
    }

    #[test]
    fn file_is_below_flags() {
        let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sluice.toml");
        std::fs::write(
            &path,
            "upstream = \"http://10.0.0.1:9000\"\nmax-body = \"1MiB\"\nmax-queue = 7\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = config(&["--config", p, "--max-body", "2MiB"]).unwrap();
        assert_eq!(c.upstream, "http://10.0.0.1:9000/");
        assert_eq!(c.max_body, 2 << 20);
        assert_eq!(c.max_queue, 7);
        std::fs::write(&path, "upstrem = \"typo\"\n").unwrap();
        let err = config(&["--config", p]).unwrap_err().to_string();
        assert!(err.contains("upstrem"), "{err}");
    }

    #[test]
    fn policy_config_needs_key_value_and_a_policy() {
        let err = config(&["--policy-config", "limit=10"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("without --policy"), "{err}");
    }
}
