//! The host's `--policy-config key=value` pairs, read through typed getters.
//!
//! A policy reads each key it accepts with one getter ([`Config::u32`],
//! [`Config::millis`], [`Config::choice`], …), giving the default to use
//! when the key is absent. The keys asked for are the keys accepted, so
//! read every key on every path, not only under some condition.
//!
//! Getters do not fail: a value of the wrong form is noted and the default
//! returned, so that the policy's `init` reads on. [`Config::parse`] then
//! reports the first bad pair in the order given, a bad value or a key no
//! getter asked for (its error lists the accepted keys in the order they
//! were asked for), and only when every pair is good, `init`'s own result.
//!
//! Keys and values are trimmed. A key given twice takes its last value, and
//! every value given is checked.

use std::cell::RefCell;
use std::fmt;
use std::ops::{Bound, RangeBounds};

/// The configuration pairs a policy is created with.
#[derive(Debug)]
pub struct Config {
    /// `(key, value)`, trimmed, in the order given.
    pairs: Vec<(String, String)>,
    /// Every key a getter asked for, in the order first asked: the keys
    /// this policy accepts. Getters take `&self`, hence the cells.
    asked: RefCell<Vec<String>>,
    /// The first pair (by position in `pairs`) whose value a getter refused.
    refused: RefCell<Option<(usize, ConfigError)>>,
}

impl Config {
    /// Reads `pairs` with `read` (usually a policy's `init`). The error, if
    /// any, is that of the first bad pair given (see the module docs).
    ///
    /// ```
    /// use sluice_policy_sdk::Config;
    ///
    /// let limit = |config: &Config| Ok(config.u32("limit", 1.., 10));
    /// assert_eq!(Config::parse([(" limit ", "4")], limit), Ok(4));
    /// assert_eq!(Config::parse([("limit", "4"), ("limit", "5")], limit), Ok(5));
    /// assert_eq!(
    ///     Config::parse([("limit", "0")], limit).unwrap_err().to_string(),
    ///     "invalid value \"0\" for key `limit`: expected an integer ≥ 1",
    /// );
    /// assert_eq!(
    ///     Config::parse([("limt", "4")], limit).unwrap_err().to_string(),
    ///     "unknown key `limt` (expected one of: limit)",
    /// );
    /// ```
    pub fn parse<K, V, T>(
        pairs: impl IntoIterator<Item = (K, V)>,
        read: impl FnOnce(&Config) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let config = Config {
            pairs: pairs
                .into_iter()
                .map(|(k, v)| (k.as_ref().trim().to_owned(), v.as_ref().trim().to_owned()))
                .collect(),
            asked: RefCell::new(Vec::new()),
            refused: RefCell::new(None),
        };
        let read = read(&config);
        match config.first_bad_pair() {
            Some(error) => Err(error),
            None => read,
        }
    }

    /// The general getter: `parse` turns a value into a `T`, or `None` when
    /// the value is not of the accepted form that `expected` describes (it
    /// completes "expected …" in the error). `None` when the key is absent
    /// or a value is refused.
    pub fn value<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        {
            let mut asked = self.asked.borrow_mut();
            if !asked.iter().any(|k| k == key) {
                asked.push(key.to_owned());
            }
        }
        let mut last = None;
        for (at, (_, value)) in self.pairs.iter().enumerate().filter(|(_, (k, _))| k == key) {
            match parse(value) {
                Some(parsed) => last = Some(parsed),
                None => {
                    self.refuse(at, ConfigError::invalid(key, value, expected));
                    return None;
                }
            }
        }
        last
    }

    /// A `u32` in `range`, e.g. `config.u32("limit", 1.., 10)`.
    pub fn u32(&self, key: &str, range: impl RangeBounds<u32>, default: u32) -> u32 {
        let bound = |b: Bound<&u32>| b.map(|&n| u64::from(n));
        let (lo, hi) = inclusive(
            (bound(range.start_bound()), bound(range.end_bound())),
            u32::MAX.into(),
        );
        let expected = describe_range(lo, hi, u32::MAX.into());
        let n = self.integer(key, lo, hi, &expected, default.into());
        // In range, so it fits; the fallback is never taken.
        u32::try_from(n).unwrap_or(default)
    }

    /// A `u64` in `range`, e.g. `config.u64("max_tokens", .., 0)`.
    pub fn u64(&self, key: &str, range: impl RangeBounds<u64>, default: u64) -> u64 {
        let (lo, hi) = inclusive(
            (range.start_bound().cloned(), range.end_bound().cloned()),
            u64::MAX,
        );
        self.integer(key, lo, hi, &describe_range(lo, hi, u64::MAX), default)
    }

    /// Any `i32`, e.g. a priority: `config.i32("reserve_priority", 1)`.
    pub fn i32(&self, key: &str, default: i32) -> i32 {
        self.value(key, "an integer", |v| v.parse().ok())
            .unwrap_or(default)
    }

    /// A number (fractions allowed) in `lo..=hi`, e.g.
    /// `config.f64("live_p95_ms", 0.0, 3.6e6, 0.0)`.
    pub fn f64(&self, key: &str, lo: f64, hi: f64, default: f64) -> f64 {
        let expected = format!("a number from {lo} to {hi}");
        let in_range = |v: &str| v.parse().ok().filter(|n: &f64| (lo..=hi).contains(n));
        self.value(key, &expected, in_range).unwrap_or(default)
    }

    /// A duration in whole milliseconds (`window_ms=10`), as a number of
    /// milliseconds: the host clock counts whole µs, so there is nothing
    /// finer to keep.
    pub fn millis(&self, key: &str, default: u64) -> u64 {
        let expected = "a whole number of milliseconds ≥ 0";
        self.integer(key, 0, u64::MAX, expected, default)
    }

    /// A switch written `1` (true) or `0` (false).
    pub fn bool(&self, key: &str, default: bool) -> bool {
        let flag = |v: &str| match v {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        };
        self.value(key, "0 or 1", flag).unwrap_or(default)
    }

    /// One of a fixed set of words, e.g.
    /// `config.choice("key", &[("global", Key::Global), ("tenant", Key::Tenant)], Key::Global)`;
    /// the error lists them (`` expected `global` or `tenant` ``). Case matters.
    pub fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)], default: T) -> T {
        let names: Vec<String> = choices
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.concat(),
        };
        let pick = |v: &str| choices.iter().find(|(name, _)| *name == v).map(|&(_, t)| t);
        self.value(key, &expected, pick).unwrap_or(default)
    }

    /// An integer in `lo..=hi` (the getters above share this one `value`).
    fn integer(&self, key: &str, lo: u64, hi: u64, expected: &str, default: u64) -> u64 {
        let in_range = |v: &str| v.parse().ok().filter(|n| (lo..=hi).contains(n));
        self.value(key, expected, in_range).unwrap_or(default)
    }

    /// Notes that the pair at `at` was refused, keeping the earliest.
    fn refuse(&self, at: usize, error: ConfigError) {
        let mut refused = self.refused.borrow_mut();
        if refused.as_ref().is_none_or(|(first, _)| at < *first) {
            *refused = Some((at, error));
        }
    }

    /// The error of the first pair given that is bad: a refused value, or a
    /// key that no getter asked for.
    fn first_bad_pair(self) -> Option<ConfigError> {
        let accepted = self.asked.into_inner();
        let unknown = self
            .pairs
            .into_iter()
            .enumerate()
            .find(|(_, (k, _))| !accepted.contains(k));
        match (self.refused.into_inner(), unknown) {
            (Some((refused_at, error)), Some((unknown_at, _))) if refused_at < unknown_at => {
                Some(error)
            }
            (_, Some((_, (key, _)))) => Some(ConfigError::UnknownKey { key, accepted }),
            (refused, None) => refused.map(|(_, error)| error),
        }
    }
}

/// What an integer in `lo..=hi` is, leaving out `hi` when it is the
/// type's largest value (`max`).
fn describe_range(lo: u64, hi: u64, max: u64) -> String {
    if hi == max {
        format!("an integer ≥ {lo}")
    } else {
        format!("an integer from {lo} to {hi}")
    }
}

/// `bounds` as `lo..=hi` within `0..=max` (an empty range stays empty: `lo > hi`).
fn inclusive(bounds: (Bound<u64>, Bound<u64>), max: u64) -> (u64, u64) {
    let lo = match bounds.0 {
        Bound::Included(n) => n,
        Bound::Excluded(n) => n.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let hi = match bounds.1 {
        Bound::Included(n) => n,
        Bound::Excluded(0) => return (1, 0),
        Bound::Excluded(n) => n - 1,
        Bound::Unbounded => max,
    };
    (lo, hi)
}

/// Why a configuration was refused; the message names the bad key and
/// what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A key this policy does not know.
    UnknownKey {
        /// The key, as given (trimmed).
        key: String,
        /// The keys the policy accepts, in the order it reads them.
        accepted: Vec<String>,
    },
    /// A known key with a value it cannot take.
    InvalidValue {
        /// The key, as given (trimmed).
        key: String,
        /// The value, as given (trimmed).
        value: String,
        /// What the key accepts; completes "expected …".
        expected: String,
    },
}

impl ConfigError {
    /// `value` is not what `key` accepts; `expected` completes "expected …".
    /// For checks the getters cannot make, such as one key bounded by another.
    pub fn invalid(key: &str, value: &str, expected: &str) -> Self {
        ConfigError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            expected: expected.to_owned(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey { key, accepted } if accepted.is_empty() => {
                write!(f, "unknown key `{key}` (this policy takes no keys)")
            }
            ConfigError::UnknownKey { key, accepted } => {
                write!(
                    f,
                    "unknown key `{key}` (expected one of: {})",
                    accepted.join(", ")
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

    /// Reads `pairs` with `read`, giving the error's message.
    fn error<T: fmt::Debug>(
        pairs: &[(&str, &str)],
        read: impl FnOnce(&Config) -> Result<T, ConfigError>,
    ) -> String {
        Config::parse(pairs.iter().copied(), read)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_absent_key_gives_the_default() {
        let read = |c: &Config| Ok((c.u32("a", .., 7), c.bool("b", true), c.millis("c", 9)));
        assert_eq!(Config::parse([("", ""); 0], read), Ok((7, true, 9)));
    }

    #[test]
    fn signed_integers_and_fractions() {
        let read = |c: &Config| Ok((c.i32("p", 1), c.f64("ms", 0.0, 10.0, 0.0)));
        assert_eq!(
            Config::parse([("p", "-10"), ("ms", "2.5")], read),
            Ok((-10, 2.5))
        );
        assert_eq!(
            error(&[("ms", "11")], read),
            "invalid value \"11\" for key `ms`: expected a number from 0 to 10"
        );
        assert_eq!(
            error(&[("p", "high")], read),
            "invalid value \"high\" for key `p`: expected an integer"
        );
    }

    #[test]
    fn keys_and_values_are_trimmed_and_the_last_value_wins() {
        let read = |c: &Config| Ok(c.u64("n", .., 0));
        assert_eq!(Config::parse([(" n", "3 "), ("n ", " 4")], read), Ok(4));
    }

    #[test]
    fn every_value_given_is_checked_not_only_the_last() {
        let read = |c: &Config| Ok(c.u32("n", .., 0));
        assert_eq!(
            error(&[("n", "x"), ("n", "4")], read),
            "invalid value \"x\" for key `n`: expected an integer ≥ 0"
        );
    }

    #[test]
    fn integer_ranges_are_enforced_and_described() {
        let read = |c: &Config| Ok(c.u32("n", 2..=5, 3));
        assert_eq!(Config::parse([("n", "5")], read), Ok(5));
        assert_eq!(
            error(&[("n", "6")], read),
            "invalid value \"6\" for key `n`: expected an integer from 2 to 5"
        );
        assert_eq!(
            error(&[("n", "1")], |c| Ok(c.u32("n", 2..6, 3))),
            "invalid value \"1\" for key `n`: expected an integer from 2 to 5"
        );
        assert_eq!(
            error(&[("n", "0")], |c| Ok(c.u64("n", 1.., 1))),
            "invalid value \"0\" for key `n`: expected an integer ≥ 1"
        );
        assert!(error(&[("n", "4294967296")], |c| Ok(c.u32("n", .., 0))).contains("`n`"));
        assert_eq!(
            Config::parse([("n", "18446744073709551615")], |c| Ok(c.u64("n", .., 0))),
            Ok(u64::MAX)
        );
        assert!(error(&[("n", "-1")], |c| Ok(c.u64("n", .., 0))).contains("an integer ≥ 0"));
    }

    #[test]
    fn millis_are_whole() {
        assert_eq!(
            error(&[("t", "1.5")], |c| Ok(c.millis("t", 0))),
            "invalid value \"1.5\" for key `t`: expected a whole number of milliseconds ≥ 0"
        );
    }

    #[test]
    fn bool_is_zero_or_one() {
        assert_eq!(
            Config::parse([("b", "0")], |c| Ok(c.bool("b", true))),
            Ok(false)
        );
        assert_eq!(
            error(&[("b", "true")], |c| Ok(c.bool("b", false))),
            "invalid value \"true\" for key `b`: expected 0 or 1"
        );
    }

    #[test]
    fn choices_are_listed_in_the_error() {
        let two = |c: &Config| Ok(c.choice("k", &[("a", 1), ("b", 2)], 0));
        assert_eq!(Config::parse([("k", "b")], two), Ok(2));
        assert_eq!(
            error(&[("k", "A")], two),
            "invalid value \"A\" for key `k`: expected `a` or `b`"
        );
        let three = |c: &Config| Ok(c.choice("k", &[("a", 1), ("b", 2), ("c", 3)], 0));
        assert!(error(&[("k", "")], three).ends_with("expected `a`, `b` or `c`"));
        let one = |c: &Config| Ok(c.choice("k", &[("a", 1)], 0));
        assert!(error(&[("k", "")], one).ends_with("expected `a`"));
    }

    #[test]
    fn unknown_keys_are_named_with_the_accepted_ones_in_read_order() {
        let read = |c: &Config| Ok((c.u32("z", .., 0), c.bool("a", false), c.u32("z", .., 0)));
        assert_eq!(
            error(&[("a", "1"), ("limit", "5")], read),
            "unknown key `limit` (expected one of: z, a)"
        );
        assert_eq!(
            error(&[("x", "1")], |_| Ok(())),
            "unknown key `x` (this policy takes no keys)"
        );
    }

    #[test]
    fn the_first_bad_pair_given_is_reported() {
        let read = |c: &Config| Ok((c.u32("n", 1.., 1), c.bool("b", false)));
        assert!(error(&[("other", "1"), ("n", "0")], read).starts_with("unknown key `other`"));
        assert!(error(&[("n", "0"), ("other", "1")], read).starts_with("invalid value \"0\""));
        // Between two bad values, the earlier pair, whatever the read order.
        assert!(error(&[("b", "2"), ("n", "0")], read).starts_with("invalid value \"2\""));
        assert!(error(&[("n", "0"), ("b", "2")], read).starts_with("invalid value \"0\""));
    }

    #[test]
    fn the_reads_own_error_comes_after_the_bad_pairs() {
        let read = |c: &Config| {
            let (lo, hi) = (c.u32("lo", .., 0), c.u32("hi", .., 10));
            if lo > hi {
                return Err(ConfigError::invalid("lo", &lo.to_string(), "at most `hi`"));
            }
            Ok((lo, hi))
        };
        assert_eq!(
            error(&[("lo", "11")], read),
            "invalid value \"11\" for key `lo`: expected at most `hi`"
        );
        assert!(error(&[("lo", "11"), ("hi", "x")], read).contains("`hi`: expected an integer"));
    }
}
