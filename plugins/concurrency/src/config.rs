//! The `concurrency` policy's configuration: read from the host's
//! `--policy-config key=value` pairs ([`sdk::Config`]), validated once in `init`.

use std::fmt;

use sluice_policy_sdk::{self as sdk, ConfigError, Reserve, Weights};

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
    /// Every key, as written in the configuration.
    const ALL: [(&'static str, Key); 2] = [("global", Key::Global), ("tenant", Key::Tenant)];

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
    /// Slots kept for urgent requests (`reserve`, `reserve_priority`).
    pub reserve: Reserve,
    /// Tenants' shares of the queue (`weights=live:4,batch:1`; 1 each by default).
    pub weights: Weights,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limit: 10,
            key: Key::Global,
            reserve: Reserve::default(),
            weights: Weights::default(),
        }
    }
}

impl Config {
    /// Reads the keys over the defaults, in the order an unknown key's
    /// error lists them. A bad value is reported by [`sdk::Config::parse`].
    pub fn read(config: &sdk::Config) -> Result<Config, ConfigError> {
        let default = Config::default();
        let read = Config {
            limit: config.u32("limit", 1.., default.limit),
            key: config.choice("key", &Key::ALL, default.key),
            reserve: Reserve::read(config),
            weights: Weights::read(config, "weights"),
        };
        if read.reserve.slots >= read.limit {
            return Err(ConfigError::invalid(
                "reserve",
                &read.reserve.slots.to_string(),
                &format!("fewer slots than limit ({})", read.limit),
            ));
        }
        Ok(read)
    }

    /// The slots a request of `priority` may fill: all of `limit`, or
    /// `limit - reserve` below the reserved priority.
    pub fn slots_for(&self, priority: i32) -> u32 {
        if self.reserve.admits(priority) {
            self.limit
        } else {
            self.limit - self.reserve.slots
        }
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
        )?;
        write!(f, "{}", self.reserve)?;
        if !self.weights.is_empty() {
            write!(f, " weights={}", self.weights)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        sdk::Config::parse(pairs.iter().copied(), Config::read)
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
        let config = parse(&[
            ("limit", "3"),
            ("key", "tenant"),
            ("reserve", "1"),
            ("reserve_priority", "5"),
            ("weights", "live:4"),
        ])
        .unwrap();
        assert_eq!(
            config,
            Config {
                limit: 3,
                key: Key::Tenant,
                reserve: Reserve {
                    slots: 1,
                    priority: 5
                },
                weights: Weights::parse("live:4").unwrap(),
            }
        );
        assert_eq!(
            config.to_string(),
            "concurrency: limit=3 key=tenant reserve=1 reserve_priority=5 weights=live:4"
        );
        assert_eq!((config.slots_for(5), config.slots_for(4)), (3, 2));
    }

    #[test]
    fn keys_and_values_are_trimmed_and_the_last_value_wins() {
        let config = parse(&[(" limit", "7 "), ("key", "tenant"), ("key", "global")]).unwrap();
        assert_eq!(
            config,
            Config {
                limit: 7,
                ..Config::default()
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
    fn the_reserve_must_leave_a_slot() {
        assert_eq!(
            error(&[("limit", "4"), ("reserve", "4")]),
            "invalid value \"4\" for key `reserve`: expected fewer slots than limit (4)"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            error(&[("max_batch", "50")]),
            "unknown key `max_batch` (expected one of: limit, key, reserve, reserve_priority, weights)"
        );
    }
}
