//! The `batched` policy's configuration: read from the host's
//! `--policy-config key=value` pairs ([`sdk::Config`]), validated once in `init`.

use std::fmt;

use sluice_policy_sdk::{self as sdk, ConfigError, Reserve, Weights};

/// Whether admitted waves may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waves {
    /// `waves=1`: a wave is released only once every request of the previous
    /// wave has completed (the seed client's gather semantics).
    Gather,
    /// `waves=0`: a wave is released as soon as it is full or due, however
    /// many earlier waves are still in flight.
    Overlap,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most requests admitted together in one wave (`max_batch`, ≥ 1).
    pub max_batch: u32,
    /// How long the oldest queued request may wait for its wave to fill (`window_ms`).
    pub window_ms: u64,
    /// Whether waves overlap (`waves`: 1 = [`Waves::Gather`], 0 = [`Waves::Overlap`]).
    pub waves: Waves,
    /// Slots kept for urgent requests (`reserve`, `reserve_priority`).
    pub reserve: Reserve,
    /// Tenants' shares of each wave (`weights=live:4,batch:1`; 1 each by default).
    pub weights: Weights,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_batch: 50,
            window_ms: 10,
            waves: Waves::Gather,
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
        Ok(Config {
            max_batch: config.u32("max_batch", 1.., default.max_batch),
            window_ms: config.millis("window_ms", default.window_ms),
            waves: match config.bool("waves", default.waves == Waves::Gather) {
                true => Waves::Gather,
                false => Waves::Overlap,
            },
            reserve: Reserve::read(config),
            weights: Weights::read(config, "weights"),
        })
    }

    /// The window in microseconds, the unit of the host clock.
    pub fn window_us(&self) -> u64 {
        self.window_ms.saturating_mul(1_000)
    }
}

/// One line for the host's log, e.g. `batched: max_batch=50 window_ms=10 waves=1`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waves = match self.waves {
            Waves::Gather => 1,
            Waves::Overlap => 0,
        };
        write!(
            f,
            "batched: max_batch={} window_ms={} waves={}",
            self.max_batch, self.window_ms, waves
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
        assert_eq!(
            config.to_string(),
            "batched: max_batch=50 window_ms=10 waves=1"
        );
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(&[("max_batch", "8"), ("window_ms", "0"), ("waves", "0")]).unwrap();
        assert_eq!(
            config,
            Config {
                max_batch: 8,
                window_ms: 0,
                waves: Waves::Overlap,
                ..Config::default()
            }
        );
        assert_eq!(
            config.to_string(),
            "batched: max_batch=8 window_ms=0 waves=0"
        );
        let config = parse(&[("reserve", "4"), ("weights", "live:2")]).unwrap();
        assert_eq!(
            config.to_string(),
            "batched: max_batch=50 window_ms=10 waves=1 reserve=4 reserve_priority=1 weights=live:2"
        );
    }

    #[test]
    fn keys_and_values_are_trimmed_and_the_last_value_wins() {
        let config = parse(&[(" max_batch ", " 3 "), ("max_batch", "4")]).unwrap();
        assert_eq!(config.max_batch, 4);
    }

    #[test]
    fn max_batch_must_be_a_positive_integer() {
        assert_eq!(
            error(&[("max_batch", "0")]),
            "invalid value \"0\" for key `max_batch`: expected an integer ≥ 1"
        );
        assert_eq!(
            error(&[("max_batch", "abc")]),
            "invalid value \"abc\" for key `max_batch`: expected an integer ≥ 1"
        );
        assert!(error(&[("max_batch", "-1")]).contains("`max_batch`"));
        assert!(error(&[("max_batch", "")]).contains("invalid value \"\""));
    }

    #[test]
    fn window_ms_must_be_a_whole_number() {
        assert_eq!(
            error(&[("window_ms", "1.5")]),
            "invalid value \"1.5\" for key `window_ms`: expected a whole number of milliseconds ≥ 0"
        );
        assert!(error(&[("window_ms", "-3")]).contains("`window_ms`"));
    }

    #[test]
    fn huge_windows_saturate_instead_of_overflowing() {
        let config = parse(&[("window_ms", &u64::MAX.to_string())]).unwrap();
        assert_eq!(config.window_us(), u64::MAX);
    }

    #[test]
    fn waves_is_zero_or_one() {
        assert_eq!(parse(&[("waves", "1")]).unwrap().waves, Waves::Gather);
        assert_eq!(
            error(&[("waves", "2")]),
            "invalid value \"2\" for key `waves`: expected 0 or 1"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            error(&[("max_batch", "5"), ("limit", "5")]),
            "unknown key `limit` (expected one of: max_batch, window_ms, waves, reserve, reserve_priority, weights)"
        );
    }
}
