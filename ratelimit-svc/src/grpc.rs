//! The gRPC edge of ratelimit-svc: the only module that sees protobuf types.

use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use proto::ratelimit::v1::{CheckRequest, CheckResponse, PeekRequest, PeekResponse};
use service_kit::ServiceSet;
use tonic::{Request, Response, Status};

/// Every service ratelimit-svc serves.
pub(crate) fn services() -> ServiceSet {
    ServiceSet::new("ratelimit-svc").add_service(RateLimitServiceServer::new(RateLimitApi))
}

/// `paysuite.ratelimit.v1.RateLimitService`.
#[derive(Debug, Clone, Copy)]
struct RateLimitApi;

/// The answer for RPCs whose behaviour lands with the ratelimit-svc issue.
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not available yet"))
}

#[tonic::async_trait]
impl RateLimitService for RateLimitApi {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Err(not_yet("Check"))
    }

    async fn peek(&self, _request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        Err(not_yet("Peek"))
    }
}
