//! The command line: flags, `SLUICE_*` environment fallbacks and the
//! optional `--config` TOML file, merged into a validated [`Config`].
//!
//! Precedence, highest first: a flag, its `SLUICE_*` variable, the `--config`
//! file, the built-in default. Each setting is defined once, in
//! [`crate::config`]; the file's keys are the flag names (`max-body =
//! "8MiB"`), and its `[policy-config]` table holds the policy's settings
//! (`--policy-config` pairs override its keys). Anything invalid is a
//! [`CliError`]; the binary prints it and exits with code 64 before any port
//! is opened.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::config::AdminToken;
pub use crate::config::Config;

/// Sluice: an admission proxy for OpenAI-compatible inference servers (vLLM).
///
/// Point clients at --listen instead of the engine: every route is forwarded
/// to --upstream unchanged. With --policy, a WebAssembly admission policy
/// decides when each completion/chat request may enter the engine.
/// Durations take a unit (250ms, 30s, 5m); sizes take one too (512KiB, 16MiB).
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about, long_about)]
pub struct Cli {
    /// TOML file with any of these settings (keys are the flag names, e.g. `max-body = "8MiB"`)
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Config,
}

/// Why a command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag, variable or file value clap refused (or `--help`/`--version`,
    /// which are "errors" to print on stdout with exit code 0).
    #[error("{0}")]
    Args(#[from] clap::Error),
    /// The `--config` file could not be read or used.
    #[error("cannot use config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Settings that are valid alone but not together.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        /// The setting's flag name.
        key: &'static str,
        /// The value given.
        value: String,
        /// What was expected.
        reason: String,
    },
}

/// Parses `args` (the program name first), the environment and the
/// `--config` file into a validated [`Config`].
pub fn load<I, T>(args: I) -> Result<Config, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let Some(path) = &cli.config else {
        return validate(cli.settings, BTreeMap::new());
    };
    let file = read_file(path)?;
    // The file's values join the command line only where neither a flag nor
    // a variable set them; clap then parses them as it parses flags. They go
    // right after the program name, as `--key=value` (a value may start with
    // `-`, and the user's own arguments may end with `--`).
    let mut from_file: Vec<OsString> = Vec::new();
    let mut file_policy_config = BTreeMap::new();
    for (key, value) in file {
        if key == "policy-config" {
            let toml::Value::Table(table) = value else {
                return Err(file_error(
                    path,
                    "policy-config must be a table of key = value",
                ));
            };
            file_policy_config = table.into_iter().map(|(k, v)| (k, scalar(v))).collect();
            continue;
        }
        let arg = setting(&command, &key).ok_or_else(|| {
            file_error(
                path,
                format!("unknown key `{key}` (keys are the flag names, see --help)"),
            )
        })?;
        if set_by_user(&matches, arg.get_id().as_str()) {
            continue;
        }
        if !arg.get_action().takes_values() {
            // A switch: `trust-tenant-header = true` is the bare flag.
            match value {
                toml::Value::Boolean(true) => from_file.push(format!("--{key}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(file_error(path, format!("`{key}` must be true or false"))),
            }
        } else if let toml::Value::Array(items) = value {
            // A repeatable flag: `admin-allowed-host = ["a", "b"]`.
            from_file.extend(
                items
                    .into_iter()
                    .map(|item| format!("--{key}={}", scalar(item)).into()),
            );
        } else {
            from_file.push(format!("--{key}={}", scalar(value)).into());
        }
    }
    let mut merged = args;
    merged.splice(1.min(merged.len())..1.min(merged.len()), from_file);
    let cli = Cli::try_parse_from(merged).map_err(|e| file_error(path, e.to_string()))?;
    validate(cli.settings, file_policy_config)
}

/// Cross-setting checks, and the file's `[policy-config]` under the flags'.
fn validate(
    mut config: Config,
    mut policy_config: BTreeMap<String, String>,
) -> Result<Config, CliError> {
    let flags = std::mem::take(&mut config.admission.policy_config);
    if config.admission.policy.is_none() && !(flags.is_empty() && policy_config.is_empty()) {
        let given: Vec<String> = flags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(CliError::Invalid {
            key: "--policy-config",
            value: given.join(" "),
            reason: "given without --policy".into(),
        });
    }
    policy_config.extend(flags);
    config.admission.policy_config = policy_config.into_iter().collect();
    if config.server.body_memory < config.server.max_body.saturating_mul(2) {
        return Err(CliError::Invalid {
            key: "--body-memory",
            value: config.server.body_memory.to_string(),
            reason: format!(
                "must be at least twice --max-body ({} bytes), or a body of the largest size could never be read",
                config.server.max_body
            ),
        });
    }
    if let Some(path) = &config.admin.token_file {
        config.admin.token = Some(read_token_file(path)?);
    }
    Ok(config)
}

/// The token in `--admin-token-file`, without its trailing newline.
fn read_token_file(path: &Path) -> Result<AdminToken, CliError> {
    let invalid = |reason: String| CliError::Invalid {
        key: "--admin-token-file",
        value: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let token = text.strip_suffix('\n').unwrap_or(&text);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.is_empty() {
        return Err(invalid("the file is empty".into()));
    }
    AdminToken::parse(token).map_err(invalid)
}

/// The setting whose flag is `--{key}` (not `--config` itself).
fn setting<'a>(command: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(key) && key != "config")
}

fn set_by_user(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

fn scalar(value: toml::Value) -> String {
    match value {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn file_error(path: &Path, reason: impl Into<String>) -> CliError {
    CliError::File {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_file(path: &Path) -> Result<toml::Table, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    text.parse::<toml::Table>()
        .map_err(|e| file_error(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, CliError> {
        let mut argv = vec!["proxy"];
        argv.extend_from_slice(args);
        load(argv)
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn workers_default_to_the_cpus_and_must_be_positive() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config(&[]).unwrap().server.workers(), cpus);
        assert_eq!(config(&["--workers", "3"]).unwrap().server.workers(), 3);
        let err = config(&["--workers", "0"]).unwrap_err().to_string();
        assert!(
            err.contains("--workers") && err.contains("between 1 and 1024"),
            "{err}"
        );
    }

    #[test]
    fn defaults_work() {
        let c = config(&[]).unwrap();
        assert_eq!(c.upstream.urls, ["http://127.0.0.1:8000/"]);
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.server.max_body, 16 << 20);
        assert!(c.admission.policy.is_none());
        assert!(c.admission.rate_limit().is_none());
        assert_eq!(c.telemetry.scrape_interval(), Some(Duration::from_secs(5)));
        assert_eq!(c.prefix.block_size, 16);
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
        for zero in [
            "--max-queue",
            "--max-connections",
            "--block-size",
            "--fallback-limit",
        ] {
            let err = config(&[zero, "0"]).unwrap_err().to_string();
            assert!(err.contains(zero), "{err}");
        }
    }

    #[test]
    fn file_is_below_flags() {
        let path = temp_file(
            "sluice.toml",
            "upstream = \"http://10.0.0.1:9000\"\nmax-body = \"1MiB\"\nmax-queue = 7\n",
        );
        let p = path.to_str().unwrap();
        let c = config(&["--config", p, "--max-body", "2MiB"]).unwrap();
        assert_eq!(c.upstream.urls, ["http://10.0.0.1:9000/"]);
        assert_eq!(c.server.max_body, 2 << 20);
        assert_eq!(c.admission.max_queue, 7);
        std::fs::write(&path, "upstrem = \"typo\"\n").unwrap();
        let err = config(&["--config", p]).unwrap_err().to_string();
        assert!(err.contains("upstrem"), "{err}");
        std::fs::write(&path, "tokenizer = \"-t.json\"\n").unwrap();
        let c = config(&["--config", p]).unwrap();
        assert_eq!(c.prefix.tokenizer.as_deref(), Some(Path::new("-t.json")));
        std::fs::write(&path, "max-queue = \"many\"\n").unwrap();
        let err = config(&["--config", p]).unwrap_err().to_string();
        assert!(err.contains(p) && err.contains("--max-queue"), "{err}");
    }

    #[test]
    fn tenant_settings_come_from_flags_variables_and_the_file() {
        let c = config(&[]).unwrap();
        assert!(!c.admission.trust_tenant_header);
        assert!(c.admission.tenant_hash_key_file.is_none());
        assert!(
            config(&["--trust-tenant-header"])
                .unwrap()
                .admission
                .trust_tenant_header
        );
        let secret = temp_file("tenant.key", "0123456789abcdef0123\n");
        let path = temp_file(
            "tenants.toml",
            &format!(
                "trust-tenant-header = true\ntenant-hash-key-file = {:?}\n",
                secret.to_str().unwrap()
            ),
        );
        let c = config(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(c.admission.trust_tenant_header);
        let key = c.admission.tenant_hash_key_file.unwrap();
        assert_eq!(key.bytes(), b"0123456789abcdef0123");
        assert_eq!(format!("{key:?}"), "HashKey(20 bytes)");
        std::fs::write(&path, "trust-tenant-header = false\n").unwrap();
        let c = config(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(!c.admission.trust_tenant_header);
        std::fs::write(&path, "trust-tenant-header = \"yes\"\n").unwrap();
        let err = config(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("true or false"), "{err}");
        std::fs::write(&secret, "too short\n").unwrap();
        let err = config(&["--tenant-hash-key-file", secret.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--tenant-hash-key-file") && err.contains("9 bytes"),
            "{err}"
        );
        let err = config(&["--tenant-hash-key-file", "/no/such/key"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tenant-hash-key-file"), "{err}");
    }

    #[test]
    fn policy_config_needs_key_value_and_a_policy() {
        let err = config(&["--policy-config", "limit=10"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("without --policy"), "{err}");
        let err = config(&["--policy-config", "limit"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn the_admin_token_comes_from_a_flag_or_a_file_not_both() {
        assert!(config(&[]).unwrap().admin.token.is_none());
        let c = config(&["--admin-token", "s3cret"]).unwrap();
        assert!(c.admin.token.as_ref().unwrap().matches(b"s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"), "the token is printed");
        let file = temp_file("token", "from-file\n");
        let c = config(&["--admin-token-file", file.to_str().unwrap()]).unwrap();
        assert!(c.admin.token.as_ref().unwrap().matches(b"from-file"));
        let err = config(&[
            "--admin-token",
            "s3cret",
            "--admin-token-file",
            file.to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
        let empty = temp_file("empty-token", "\n");
        let err = config(&["--admin-token-file", empty.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--admin-token-file") && err.contains("empty"),
            "{err}"
        );
        let err = config(&["--admin-token", "two words"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--admin-token"), "{err}");
    }

    #[test]
    fn admin_switches_and_lists_read_from_the_file() {
        let path = temp_file(
            "admin.toml",
            "admin-open-metrics = true\nadmin-allowed-host = [\"Sluice.Internal.\", \"b.example\"]\n",
        );
        let c = config(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(c.admin.open_metrics);
        assert_eq!(c.admin.allowed_hosts, ["sluice.internal", "b.example"]);
        let c = config(&["--admin-allowed-host", "a.example,b.example"]).unwrap();
        assert_eq!(c.admin.allowed_hosts, ["a.example", "b.example"]);
        let err = config(&["--admin-allowed-host", "a.example:9464"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no port"), "{err}");
    }

    #[test]
    fn the_files_policy_config_table_is_below_the_flags() {
        let policy = temp_file("p.wasm", "");
        let path = temp_file(
            "policy.toml",
            &format!(
                "policy = {:?}\n[policy-config]\nlimit = 4\nkey = \"tenant\"\n",
                policy.to_str().unwrap()
            ),
        );
        let c = config(&[
            "--config",
            path.to_str().unwrap(),
            "--policy-config",
            "limit=9",
        ])
        .unwrap();
        assert_eq!(c.admission.policy.as_deref(), Some(policy.as_path()));
        assert_eq!(
            c.admission.policy_config,
            [
                ("key".into(), "tenant".into()),
                ("limit".into(), "9".into())
            ]
        );
    }
}
