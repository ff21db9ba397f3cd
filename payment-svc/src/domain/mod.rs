//! Domain types: valid by construction, free of protobuf and of IO. The gRPC edge parses
//! requests into these (reporting every invalid field), and business code works only
//! with them.

pub mod card;
pub mod idempotency;
pub mod money;

pub use idempotency::IdempotencyKey;
pub use money::{Currency, Money, MoneyError};
