//! How durations are written for people: in flag syntax for messages
//! (`250ms`, `30s`) and as fractional milliseconds for log fields. A leaf:
//! every layer above may use it.

use std::time::Duration;

/// Formats a duration the way the flags are written (`250ms`, `30s`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Milliseconds with microsecond precision, for log fields.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_flags() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(ms(Duration::from_micros(1234)), 1.234);
    }
}
