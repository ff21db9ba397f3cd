//! Requests tonic cannot decode are the caller's mistake: INVALID_ARGUMENT, not INTERNAL.
//!
//! tonic answers INTERNAL when a request message is not valid protobuf, when the body
//! ends inside a message, when there is no message at all, or when the compressed flag is
//! wrong (following grpc's statuscodes.md). INTERNAL means "a bug in the server" to
//! clients and to the gateway's breakers, which count it as an upstream failure: one
//! tenant sending garbage through the gateway would open the breaker for every tenant.
//! These refusals happen before any handler runs, and always as a trailers-only answer;
//! [`clarify`] rewrites exactly those into INVALID_ARGUMENT with a `BadRequest`
//! violation on the field `request`, keeping tonic's description.

use http::Response;
use tonic::{Code, Status};

use crate::validation::Violations;

/// How tonic's request-decoding refusals begin (tonic 0.14 `codec/decode.rs`,
/// `server/grpc.rs`, tonic-prost `codec.rs`); the hostile-input tests pin them.
const DECODING_REFUSALS: [&str; 4] = [
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with",
];

/// The field named in the violation.
pub const FIELD: &str = "request";

/// `response`, with a trailers-only INTERNAL refusal of an undecodable request turned
/// into INVALID_ARGUMENT; any other response unchanged.
pub fn clarify<B: Default>(response: Response<B>) -> Response<B> {
    if response.headers().get("grpc-status").map(|v| v.as_bytes()) != Some(b"13") {
        return response;
    }
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::Internal || !is_decoding_refusal(status.message()) {
        return response;
    }
    let mut violations = Violations::new();
    violations.add(
        FIELD,
        format!(
            "is not a well-formed request message: {}",
            status.message().trim_end_matches('.')
        ),
    );
    match violations.into_result() {
        Err(clear) => clear.into_http(),
        Ok(()) => response,
    }
}

fn is_decoding_refusal(message: &str) -> bool {
    DECODING_REFUSALS
        .iter()
        .any(|prefix| message.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &Status) -> Option<Status> {
        let response: Response<tonic::body::Body> = clarify(status.clone().into_http());
        Status::from_header_map(response.headers())
    }

    #[test]
    fn decoding_refusals_become_invalid_argument_with_a_violation() {
        let refused = Status::internal("failed to decode Protobuf message: invalid wire type");
        let clear = answer(&refused);
        assert_eq!(
            clear.as_ref().map(Status::code),
            Some(Code::InvalidArgument)
        );
        assert!(clear.is_some_and(|s| s.message().contains("invalid wire type")));
    }

    #[test]
    fn other_internal_errors_and_other_codes_pass_unchanged() {
        for status in [
            Status::internal("database unavailable"),
            Status::unavailable("failed to decode Protobuf message"),
        ] {
            let unchanged = answer(&status);
            assert_eq!(unchanged.map(|s| s.code()), Some(status.code()));
        }
    }
}
