//! Idempotency keys: what makes a retried write recognisable as the same request.

use std::fmt;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyKeyError {
    /// Empty.
    #[error("is required")]
    Empty,
    /// Longer than [`MAX_KEY_LEN`].
    #[error("must be at most 255 characters")]
    TooLong,
    /// Contains something other than printable ASCII (space to tilde).
    #[error("must contain only printable ASCII characters")]
    NotPrintable,
}

/// A client-chosen key: 1–255 printable ASCII characters. Scoped by principal and RPC.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates `key`.
    pub fn parse(key: &str) -> Result<Self, IdempotencyKeyError> {
        if key.is_empty() {
            return Err(IdempotencyKeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(IdempotencyKeyError::TooLong);
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(IdempotencyKeyError::NotPrintable);
        }
        Ok(Self(key.to_owned()))
    }

    /// The key as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        assert!(IdempotencyKey::parse("order-42/attempt 1~").is_ok());
        assert_eq!(IdempotencyKey::parse(""), Err(IdempotencyKeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(&"k".repeat(256)),
            Err(IdempotencyKeyError::TooLong)
        );
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["tab\there", "new\nline", "é", "nul\0", "del\x7f"] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(IdempotencyKeyError::NotPrintable),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_accepts_exactly_the_valid_keys(key in "\\PC{0,300}") {
            let valid = !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| (0x20..=0x7e).contains(&b));
            prop_assert_eq!(IdempotencyKey::parse(&key).is_ok(), valid);
        }
    }
}
