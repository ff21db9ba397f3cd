//! The caller's deadline, from the `grpc-timeout` request header.

use std::time::Duration;

/// Longest deadline honoured; gRPC allows up to 8 digits of hours, which would overflow timers.
const MAX_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`); `None` when absent or malformed
/// (a malformed header is ignored, as tonic does, rather than failing the call).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    let duration = match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(duration.min(MAX_DEADLINE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_str(value).ok()?);
        grpc_timeout(&headers)
    }

    #[test]
    fn parses_every_unit_and_rejects_malformed_values() {
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse("99999999H"), Some(MAX_DEADLINE));
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
