//! Bad input → INVALID_ARGUMENT with a `google.rpc.BadRequest` listing one
//! `FieldViolation` per bad field, named by its path (`amount.currency`, `card.number`).
//!
//! The gRPC edge collects every violation of a request before answering, so a caller
//! fixes all of them in one round trip.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

/// The violations found in one request.
#[derive(Debug, Default)]
pub struct Violations {
    violations: Vec<FieldViolation>,
}

impl Violations {
    /// No violation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `amount.amount_minor`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field, description));
    }

    /// Keeps `result`'s value, or records its error against `field`.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.add(field, err.to_string());
                None
            }
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok(())` when the request is valid, else the INVALID_ARGUMENT status.
    pub fn into_result(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let summary = self
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        details.set_bad_request(self.violations);
        Err(Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            details,
        ))
    }
}

/// A protobuf `Duration` as a non-negative [`std::time::Duration`], or `None` when it is
/// negative or not normalized (nanos outside `0..1_000_000_000`). prost-types' own
/// conversion normalizes first and overflows on extreme values (`seconds: i64::MIN`
/// panics in debug builds), so a caller's duration is checked here instead.
pub fn non_negative_duration(value: prost_types::Duration) -> Option<std::time::Duration> {
    let seconds = u64::try_from(value.seconds).ok()?;
    let nanos = u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)?;
    Some(std::time::Duration::new(seconds, nanos))
}

/// The field paths of a status's `BadRequest` violations (for tests and clients).
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violation_is_reported_with_its_path() {
        let mut violations = Violations::new();
        assert!(violations.check::<u8, String>("ok", Ok(1)).is_some());
        violations.add("amount.amount_minor", "must be greater than zero");
        let _ = violations.check::<u8, _>("amount.currency", Err("unknown currency code"));
        let status = violations.into_result().err();
        assert_eq!(
            status.as_ref().map(Status::code),
            Some(Code::InvalidArgument)
        );
        let fields = status.as_ref().map(violated_fields).unwrap_or_default();
        assert_eq!(fields, ["amount.amount_minor", "amount.currency"]);
        assert!(status.is_some_and(|s| {
            s.message()
                .contains("amount.currency: unknown currency code")
        }));
        assert!(Violations::new().into_result().is_ok());
    }

    #[test]
    fn durations_are_taken_only_non_negative_and_normalized() {
        let duration =
            |seconds, nanos| non_negative_duration(prost_types::Duration { seconds, nanos });
        assert_eq!(duration(1, 500), Some(std::time::Duration::new(1, 500)));
        assert_eq!(duration(0, 0), Some(std::time::Duration::ZERO));
        assert_eq!(
            duration(i64::MAX, 999_999_999),
            Some(std::time::Duration::new(u64::MAX >> 1, 999_999_999))
        );
        for (seconds, nanos) in [
            (i64::MIN, 0),
            (i64::MIN, i32::MIN),
            (-1, 0),
            (0, -1),
            (0, 1_000_000_000),
            (1, i32::MAX),
        ] {
            assert_eq!(duration(seconds, nanos), None, "{seconds}s {nanos}ns");
        }
    }
}
