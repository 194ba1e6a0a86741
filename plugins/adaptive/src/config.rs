//! The `adaptive` policy's configuration: read from the host's
//! `--policy-config key=value` pairs ([`sdk::Config`]), validated once in `init`.

use std::fmt;

use sluice_policy_sdk::{self as sdk, ConfigError, Weights};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The live traffic's latency objective: its p95, queue plus service,
    /// in ms, fractions allowed (`live_p95_ms`; 0: derived from the
    /// unloaded service time).
    pub live_p95_ms: f64,
    /// The derived objective, in unloaded service times (`auto_factor`).
    pub auto_factor: f64,
    /// Requests of this priority or higher are live traffic (`live_priority`).
    pub live_priority: i32,
    /// The least share of its best throughput the batch keeps while live
    /// traffic runs, in percent (`min_batch_share`).
    pub min_batch_share: u32,
    /// Most requests in flight, live and batch together (`max_limit`).
    pub max_limit: u32,
    /// How long after the last live request live traffic still counts as
    /// present, in seconds (`live_window_s`): a batch that starts within it
    /// is held for live traffic from its first request.
    pub live_window_s: u64,
    /// Tenants' shares of the queue (`weights=live:4,batch:1`; 1 each by default).
    pub weights: Weights,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            live_p95_ms: 0.0,
            auto_factor: 2.0,
            live_priority: 1,
            min_batch_share: 60,
            max_limit: 256,
            live_window_s: 30,
            weights: Weights::default(),
        }
    }
}

impl Config {
    /// Reads the keys over the defaults, in the order an unknown key's
    /// error lists them. A bad value is reported by [`sdk::Config::parse`].
    pub fn read(config: &sdk::Config) -> Result<Config, ConfigError> {
        let default = Config::default();
        Ok(Config {
            live_p95_ms: config.f64("live_p95_ms", 0.0, 3_600_000.0, default.live_p95_ms),
            auto_factor: config.f64("auto_factor", 1.0, 100.0, default.auto_factor),
            live_priority: config.i32("live_priority", default.live_priority),
            min_batch_share: config.u32("min_batch_share", ..=100, default.min_batch_share),
            max_limit: config.u32("max_limit", 1..=4096, default.max_limit),
            live_window_s: config.u64("live_window_s", 1..=86_400, default.live_window_s),
            weights: Weights::read(config, "weights"),
        })
    }
}

/// One line for the host's log, e.g.
/// `adaptive: live_p95_ms=auto(2x) live_priority=1 min_batch_share=60 max_limit=256 live_window_s=30`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("adaptive: live_p95_ms=")?;
        if self.live_p95_ms == 0.0 {
            write!(f, "auto({}x)", self.auto_factor)?;
        } else {
            write!(f, "{}", self.live_p95_ms)?;
        }
        write!(
            f,
            " live_priority={} min_batch_share={} max_limit={} live_window_s={}",
            self.live_priority, self.min_batch_share, self.max_limit, self.live_window_s
        )?;
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

    #[test]
    fn defaults_and_every_key() {
        let config = parse(&[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(
            config.to_string(),
            "adaptive: live_p95_ms=auto(2x) live_priority=1 min_batch_share=60 max_limit=256 live_window_s=30"
        );
        let config = parse(&[
            ("live_p95_ms", "40.5"),
            ("live_priority", "5"),
            ("min_batch_share", "0"),
            ("max_limit", "64"),
            ("weights", "a:2"),
            ("auto_factor", "3"),
        ])
        .unwrap();
        assert_eq!(
            config.to_string(),
            "adaptive: live_p95_ms=40.5 live_priority=5 min_batch_share=0 max_limit=64 live_window_s=30 weights=a:2"
        );
        assert_eq!(config.auto_factor, 3.0);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("live_p95_ms", "-1"),
            ("min_batch_share", "101"),
            ("max_limit", "0"),
            ("auto_factor", "0.5"),
            ("live_priority", "high"),
        ] {
            let error = parse(&[(key, value)]).unwrap_err().to_string();
            assert!(error.contains(&format!("`{key}`")), "{error}");
        }
    }
}
