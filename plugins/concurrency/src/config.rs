//! The `concurrency` policy's configuration: parsed from the host's
//! `--policy-config key=value` pairs, validated once in `init`.

use std::fmt;

/// Keys this policy accepts, in the order the error message lists them.
const KEYS: &[&str] = &["limit", "key"];

/// What the limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `key=global`: one limit shared by every request.
    Global,
    /// `key=tenant`: a limit per tenant (`request.tenant`), like Inngest's
    /// concurrency keys.
    Tenant,
}

impl Key {
    fn as_str(self) -> &'static str {
        match self {
            Key::Global => "global",
            Key::Tenant => "tenant",
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most requests in flight at once, per [`Config::key`] (`limit`, ≥ 1).
    pub limit: u32,
    /// What the limit applies to (`key`: `global` or `tenant`).
    pub key: Key,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limit: 10,
            key: Key::Global,
        }
    }
}

impl Config {
    /// Parses `key=value` pairs over the defaults. Keys and values are
    /// trimmed; a key given twice takes its last value.
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        for (key, value) in pairs {
            let (key, value) = (key.trim(), value.trim());
            match key {
                "limit" => {
                    config.limit = value
                        .parse()
                        .ok()
                        .filter(|&n: &u32| n >= 1)
                        .ok_or_else(|| ConfigError::invalid(key, value, "an integer ≥ 1"))?;
                }
                "key" => {
                    config.key = match value {
                        "global" => Key::Global,
                        "tenant" => Key::Tenant,
                        _ => {
                            return Err(ConfigError::invalid(key, value, "`global` or `tenant`"));
                        }
                    };
                }
                _ => return Err(ConfigError::UnknownKey(key.to_owned())),
            }
        }
        Ok(config)
    }
}

/// One line for the host's log, e.g. `concurrency: limit=10 key=global`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "concurrency: limit={} key={}",
            self.limit,
            self.key.as_str()
        )
    }
}

/// Why a configuration was refused; the message names the bad key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A key this policy does not know.
    UnknownKey(String),
    /// A known key with a value it cannot take.
    InvalidValue {
        /// The key, as given.
        key: String,
        /// The value, as given (trimmed).
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
}

impl ConfigError {
    fn invalid(key: &str, value: &str, expected: &'static str) -> Self {
        ConfigError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            expected,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey(key) => {
                write!(
                    f,
                    "unknown key `{key}` (expected one of: {})",
                    KEYS.join(", ")
                )
            }
            ConfigError::InvalidValue {
                key,
                value,
                expected,
            } => write!(
                f,
                "invalid value {value:?} for key `{key}`: expected {expected}"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Config::parse(&pairs)
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        parse(pairs).unwrap_err().to_string()
    }

    #[test]
    fn empty_config_gives_the_defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.to_string(), "concurrency: limit=10 key=global");
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(&[("limit", "3"), ("key", "tenant")]).unwrap();
        assert_eq!(
            config,
            Config {
                limit: 3,
                key: Key::Tenant
            }
        );
        assert_eq!(config.to_string(), "concurrency: limit=3 key=tenant");
    }

    #[test]
    fn keys_and_values_are_trimmed_and_the_last_value_wins() {
        let config = parse(&[(" limit", "7 "), ("key", "tenant"), ("key", "global")]).unwrap();
        assert_eq!(
            config,
            Config {
                limit: 7,
                key: Key::Global
            }
        );
    }

    #[test]
    fn limit_must_be_a_positive_integer() {
        assert_eq!(
            error(&[("limit", "abc")]),
            "invalid value \"abc\" for key `limit`: expected an integer ≥ 1"
        );
        assert_eq!(
            error(&[("limit", "0")]),
            "invalid value \"0\" for key `limit`: expected an integer ≥ 1"
        );
        assert!(error(&[("limit", "-2")]).contains("`limit`"));
        assert!(error(&[("limit", "99999999999")]).contains("`limit`"));
    }

    #[test]
    fn key_is_global_or_tenant() {
        assert_eq!(
            error(&[("key", "Tenant")]),
            "invalid value \"Tenant\" for key `key`: expected `global` or `tenant`"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            error(&[("max_batch", "50")]),
            "unknown key `max_batch` (expected one of: limit, key)"
        );
    }
}
