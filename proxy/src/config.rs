//! Every setting of the proxy, grouped by concern ([`ServerConfig`],
//! [`AdminConfig`], [`UpstreamConfig`], [`AdmissionSettings`],
//! [`PrefixConfig`], [`TelemetryConfig`]), each defined once: its flag, its `SLUICE_*`
//! variable, its default and its help text are the attributes of one field,
//! and the `--config` TOML keys are the flag names ([`crate::cli`] merges
//! them). A field holds the parsed, validated value: a malformed one is
//! refused by its parser with a message that names the flag.
//!
//! A leaf: the modules that use a group take it by reference.

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use clap::builder::{BoolishValueParser, RangedU64ValueParser};
use http::Uri;
use sha2::{Digest, Sha256};

/// Folder where bare policy names are looked up (relative to the working directory).
pub const PLUGIN_DIR: &str = "plugins/dist";

/// Validated settings for one proxy process.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Listeners and client connections.
    #[command(flatten)]
    pub server: ServerConfig,
    /// Who may use the admin listener.
    #[command(flatten)]
    pub admin: AdminConfig,
    /// The inference servers behind the proxy, and routing among them.
    #[command(flatten)]
    pub upstream: UpstreamConfig,
    /// The admission policy, its queue and limits.
    #[command(flatten)]
    pub admission: AdmissionSettings,
    /// Shared-prompt prefix tracking.
    #[command(flatten)]
    pub prefix: PrefixConfig,
    /// What the proxy reads from elsewhere to measure.
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

/// Listeners and client connections.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerConfig {
    /// Address for client traffic (HTTP/1.1 keep-alive and h2c)
    #[arg(long, env = "SLUICE_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080", value_parser = parse_addr)]
    pub listen: SocketAddr,

    /// Address for /metrics, /stats and /admin/policy; keep it private
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:9464", value_parser = parse_addr)]
    pub admin_listen: SocketAddr,

    /// Largest request body accepted; bigger ones get 413
    #[arg(long, env = "SLUICE_MAX_BODY", value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_body: u64,

    /// Memory that completion and chat bodies being read and parsed may hold
    /// in total (each body counts twice its size: the bytes and what parsing
    /// builds; the first 64 KiB of each are free). A larger body waits up to
    /// 5 s for room, then gets 503 with Retry-After. At least twice --max-body
    #[arg(long, env = "SLUICE_BODY_MEMORY", value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub body_memory: u64,

    /// Most client connections served at once; at the limit a new one takes
    /// the place of the longest-idle connection, or gets 503 at once when
    /// every connection has a request in progress
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N", default_value = "4096", value_parser = at_least_one_usize())]
    pub max_connections: usize,

    /// Close a client connection with no request in progress for this long:
    /// before its first request, between keep-alive requests, an HTTP/2
    /// connection with no open stream; also the time allowed for a
    /// request's headers
    #[arg(long, env = "SLUICE_CLIENT_IDLE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub client_idle_timeout: Duration,

    /// Threads that serve client connections, each with its own event loop
    /// and its own upstream connections; a request never changes threads
    /// [default: the number of CPUs]
    #[arg(long, env = "SLUICE_WORKERS", value_name = "N", value_parser = parse_workers)]
    workers: Option<usize>,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// Serving threads: `--workers`, else one per CPU.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// Who may use the admin listener (`--admin-listen`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admin")]
pub struct AdminConfig {
    /// Bearer token for the admin listener. With it, every admin route needs
    /// `Authorization: Bearer TOKEN` (but see --admin-open-metrics); without
    /// it, reads are open and changes (PUT /admin/policy, POST /stats/reset)
    /// are taken only when --admin-listen is a loopback address
    #[arg(long = "admin-token", env = "SLUICE_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true, value_parser = AdminToken::parse, conflicts_with = "token_file")]
    pub token: Option<AdminToken>,

    /// File that holds the admin token, read at start (a trailing newline is
    /// ignored); keeps the token out of the process list
    #[arg(
        long = "admin-token-file",
        env = "SLUICE_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,

    /// With an admin token, serve /metrics and /healthz without it (for
    /// scrapers and probes that cannot send one)
    #[arg(long = "admin-open-metrics", env = "SLUICE_ADMIN_OPEN_METRICS")]
    pub open_metrics: bool,

    /// A host name the admin listener answers to (repeatable, or a comma
    /// list). IP addresses and localhost always work; any other `Host` gets
    /// 403, so a web page cannot reach the listener by DNS rebinding
    #[arg(long = "admin-allowed-host", env = "SLUICE_ADMIN_ALLOWED_HOST", value_name = "NAME", value_delimiter = ',', value_parser = parse_host_name)]
    pub allowed_hosts: Vec<String>,
}

/// The admin bearer token. Only its SHA-256 digest is kept: the token never
/// appears in `Debug` output or logs, and [`AdminToken::matches`] takes the
/// same time however much of a guess is right.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// A token: one or more visible ASCII characters (it travels in an HTTP
    /// header), with no spaces.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the token is empty".into());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be visible ASCII characters without spaces".into());
        }
        Ok(Self {
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token, in constant time: both sides are
    /// hashed to 32 bytes and every byte is compared.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented).into();
        let difference = self
            .digest
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The inference server behind the proxy.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Upstream")]
pub struct UpstreamConfig {
    /// An inference server to forward to. Repeat it for several replicas
    /// (or separate URLs with commas); a host name stands for every address
    /// it resolves to (a Kubernetes headless Service, say), each a replica
    #[arg(long = "upstream", env = "SLUICE_UPSTREAM", value_name = "URL", default_value = "http://127.0.0.1:8000", value_delimiter = ',', value_parser = parse_upstream)]
    pub urls: Vec<Uri>,

    /// How often host names given to --upstream are resolved again, so
    /// replicas that come and go are followed; 0 resolves them once
    #[arg(long = "resolve-interval", env = "SLUICE_RESOLVE_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub resolve_interval: Duration,

    /// Which replica an admitted request goes to: `prefix` (the replica
    /// predicted to hold most of its prompt, unless it is much busier than
    /// the others; a new prefix to the replica serving the fewest),
    /// `least-loaded` or `round-robin`
    #[arg(
        long = "route",
        env = "SLUICE_ROUTE",
        value_name = "MODE",
        default_value = "prefix"
    )]
    pub route: RouteMode,

    /// `auto`: ask each replica where it publishes vLLM's KV-cache events
    /// (`/kv_event_sources`; start vLLM with `--kv-events-config`) and
    /// follow them, so predictions track what the engine really holds;
    /// `off`: predict from what this proxy sent each replica. Needs
    /// --scrape-interval above 0
    #[arg(
        long = "kv-events",
        env = "SLUICE_KV_EVENTS",
        value_name = "MODE",
        default_value = "auto"
    )]
    pub kv_events: KvEvents,

    /// Longest wait for the upstream's response headers, and longest silence
    /// between body chunks, before answering 504 / ending the stream
    #[arg(long = "upstream-timeout", env = "SLUICE_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "300s", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// Longest wait for a TCP connection to the upstream
    #[arg(long, env = "SLUICE_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "3s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// Reuse an idle upstream connection only within this long of its last
    /// response; keep it below the upstream's own keep-alive timeout (vLLM's
    /// server closes idle connections after 5s), or a request can go out on
    /// a connection the upstream is closing and get a 502
    #[arg(long = "upstream-keepalive", env = "SLUICE_UPSTREAM_KEEPALIVE", value_name = "DURATION", default_value = "4s", value_parser = parse_positive_duration)]
    pub keepalive: Duration,
}

/// Whether replicas' KV-cache events are followed (`--kv-events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvEvents {
    /// Follow them where a replica publishes them.
    Auto,
    /// Never.
    Off,
}

/// How admitted requests are spread over the replicas (`--route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteMode {
    /// Most predicted cached tokens within a load band; a new prefix to
    /// the replica serving the fewest prefixes.
    Prefix,
    /// Fewest requests in flight and waiting.
    LeastLoaded,
    /// Each healthy replica in turn.
    RoundRobin,
}

/// The admission policy, its queue and limits.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admission")]
pub struct AdmissionSettings {
    /// Admission policy: a wasm component path, or a bare name looked up in
    /// plugins/dist (e.g. batched.wasm). Without it requests pass straight through
    #[arg(long, env = "SLUICE_POLICY", value_name = "WASM", value_parser = resolve_policy)]
    pub policy: Option<PathBuf>,

    /// Policy setting passed to the policy's init (repeatable), e.g. limit=10;
    /// in the --config file, a [policy-config] table
    #[arg(long = "policy-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub policy_config: Vec<(String, String)>,

    /// Most requests waiting for admission; more get 429 with Retry-After
    #[arg(long, env = "SLUICE_MAX_QUEUE", value_name = "N", default_value = "1024", value_parser = at_least_one_usize())]
    pub max_queue: usize,

    /// Longest wait for admission before answering 503
    #[arg(long, env = "SLUICE_QUEUE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_positive_duration)]
    pub queue_timeout: Duration,

    /// Per-tenant rate limit (GCRA), e.g. 100/s or 6000/m; over it: 429 with Retry-After
    #[arg(long, env = "SLUICE_RATE_LIMIT", value_name = "N/UNIT", value_parser = parse_rate)]
    rate_limit: Option<Rate>,

    /// Burst allowed above --rate-limit [default: the per-second rate, at least 1]
    #[arg(long, env = "SLUICE_RATE_BURST", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: Option<u32>,

    /// Name the tenant by the X-Tenant header (then the API key, then the
    /// body's `user`). Only behind a gateway that sets X-Tenant itself and
    /// drops the client's own: without this flag the tenant is the API key
    /// (by a keyed digest), and requests without a key share one tenant
    #[arg(long, env = "SLUICE_TRUST_TENANT_HEADER", value_parser = BoolishValueParser::new())]
    pub trust_tenant_header: bool,

    /// Secret for the API key digests that name tenants (at least 16 bytes;
    /// a trailing newline is ignored): proxies given the same file name a
    /// key's tenant alike [default: a random secret for each process]
    #[arg(long, env = "SLUICE_TENANT_HASH_KEY_FILE", value_name = "FILE", value_parser = read_hash_key)]
    pub tenant_hash_key_file: Option<HashKey>,

    /// Deadline for one policy call; a policy that overruns is replaced by the fallback
    #[arg(long, env = "SLUICE_POLICY_DEADLINE", value_name = "DURATION", default_value = "50ms", value_parser = parse_positive_duration)]
    pub policy_deadline: Duration,

    /// Memory limit of the policy instance
    #[arg(long, env = "SLUICE_POLICY_MEMORY", value_name = "SIZE", default_value = "64MiB", value_parser = parse_size_usize)]
    pub policy_memory: usize,

    /// Concurrency cap of the built-in fallback used while a faulty policy awaits reload
    #[arg(long, env = "SLUICE_FALLBACK_LIMIT", value_name = "N", default_value = "10", value_parser = clap::value_parser!(u32).range(1..))]
    pub fallback_limit: u32,
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

/// The secret of `--tenant-hash-key-file`, read when the flag is parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey(Vec<u8>);

impl HashKey {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HashKey({} bytes)", self.0.len())
    }
}

/// `--rate-limit` as given: `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    requests: u32,
    per: Duration,
}

impl AdmissionSettings {
    /// The per-tenant rate limit with its burst, when `--rate-limit` is set.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.rate_limit.map(|rate| {
            let per_second = (f64::from(rate.requests) / rate.per.as_secs_f64()).ceil() as u32;
            RateLimit {
                requests: rate.requests,
                per: rate.per,
                burst: self.rate_burst.unwrap_or(per_second.max(1)),
            }
        })
    }
}

/// Shared-prompt prefix tracking.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Prefix tracking")]
pub struct PrefixConfig {
    /// KV block size in tokens for prefix tracking, until the upstream reports its own
    #[arg(long, env = "SLUICE_BLOCK_SIZE", value_name = "TOKENS", default_value = "16", value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: u32,

    /// Blocks the prefix tracker remembers, until the upstream reports its cache size
    #[arg(long = "prefix-cache-blocks", env = "SLUICE_PREFIX_CACHE_BLOCKS", value_name = "N", default_value = "65536", value_parser = at_least_one_usize())]
    pub cache_blocks: usize,

    /// The model's HF tokenizer.json: text prompts are cut into the engine's
    /// exact token blocks [default: 4 bytes per token]
    #[arg(long, env = "SLUICE_TOKENIZER", value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// What the proxy reads from elsewhere to measure.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Telemetry")]
pub struct TelemetryConfig {
    /// How often the upstream's /metrics is scraped and mirrored; 0 turns it off
    #[arg(long = "scrape-interval", env = "SLUICE_SCRAPE_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    scrape_interval: Duration,
}

impl TelemetryConfig {
    /// The upstream `/metrics` scrape interval; `None` when off.
    pub fn scrape_interval(&self) -> Option<Duration> {
        Some(self.scrape_interval).filter(|d| !d.is_zero())
    }
}

fn at_least_one_usize() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(1..)
}

fn parse_workers(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| "must be between 1 and 1024".into())
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:8080".into())
}

/// A host name as `Host` carries it, without a port: lower case, no trailing dot.
fn parse_host_name(text: &str) -> Result<String, String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if valid {
        Ok(name)
    } else {
        Err("expected a host name such as sluice.internal (no port; IP addresses and localhost are always allowed)".into())
    }
}

fn parse_key_value(pair: &str) -> Result<(String, String), String> {
    pair.split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".into())
}

fn parse_upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err("expected http://HOST:PORT (TLS to the upstream is not supported)".into());
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err("missing host".into());
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(
            "give only scheme, host and port; client paths are forwarded as they are".into(),
        );
    }
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|e| e.to_string())
}

/// Resolves `--policy`: an existing path as given, else a bare name in [`PLUGIN_DIR`].
fn resolve_policy(text: &str) -> Result<PathBuf, String> {
    let given = PathBuf::from(text);
    if given.is_file() {
        return Ok(given);
    }
    if given.components().count() != 1 {
        return Err("no such file".into());
    }
    let mut name = given;
    if name.extension().is_none() {
        name.set_extension("wasm");
    }
    let in_dist = Path::new(PLUGIN_DIR).join(name);
    if in_dist.is_file() {
        return Ok(in_dist);
    }
    Err(format!(
        "no such file, nor {} (build the bundled plugins with `just plugins`)",
        in_dist.display()
    ))
}

/// Reads `--tenant-hash-key-file`: 16 bytes to 4 KiB, less trailing whitespace.
fn read_hash_key(text: &str) -> Result<HashKey, String> {
    const MAX: u64 = 4096;
    let file = std::fs::File::open(text).map_err(|e| e.to_string())?;
    let mut secret = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut secret)
        .map_err(|e| e.to_string())?;
    if secret.len() as u64 > MAX {
        return Err(format!("the secret is longer than {MAX} bytes"));
    }
    let len = secret.trim_ascii_end().len();
    if len < 16 {
        return Err(format!(
            "the secret is {len} bytes; give at least 16 (e.g. `head -c 32 /dev/urandom > FILE`)"
        ));
    }
    secret.truncate(len);
    Ok(HashKey(secret))
}

/// Parses `100/s`, `6000/m`, `10/100ms`.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let (count, unit) = text.split_once('/').ok_or("expected N/UNIT, e.g. 100/s")?;
    let requests: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or("the count must be an integer ≥ 1")?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other)?,
    };
    if per.is_zero() {
        return Err("the period must be positive".into());
    }
    Ok(Rate { requests, per })
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| "expected a duration such as 250ms, 30s or 5m")?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err("unknown unit (use ms, s, m or h)".into()),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| "out of range".into())
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Parses `512`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| "expected a size such as 512KiB or 16MiB")?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err("unknown unit (use KiB, MiB or GiB)".into()),
    };
    let bytes = value.checked_mul(scale).ok_or("out of range")?;
    if bytes == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(bytes)
}

fn parse_size_usize(text: &str) -> Result<usize, String> {
    usize::try_from(parse_size(text)?).map_err(|_| "too large".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_rates_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("7 fortnights").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        let limit = |rate: &str, burst: Option<u32>| {
            let settings = AdmissionSettings {
                policy: None,
                policy_config: Vec::new(),
                max_queue: 1,
                queue_timeout: Duration::from_secs(1),
                rate_limit: Some(parse_rate(rate).unwrap()),
                rate_burst: burst,
                trust_tenant_header: false,
                tenant_hash_key_file: None,
                policy_deadline: Duration::from_secs(1),
                policy_memory: 1,
                fallback_limit: 1,
            };
            let r = settings.rate_limit().unwrap();
            (r.requests, r.per, r.burst)
        };
        assert_eq!(limit("100/s", None), (100, Duration::from_secs(1), 100));
        assert_eq!(limit("60/m", Some(5)), (60, Duration::from_secs(60), 5));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("100").is_err());
    }
}
