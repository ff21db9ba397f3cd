//! The gateway's own gRPC API (`paysuite.gateway.v1`), and the reflection of every
//! paysuite service: the only module that sees protobuf types.

use proto::gateway::v1::gateway_admin_service_server::{
    GatewayAdminService, GatewayAdminServiceServer,
};
use proto::gateway::v1::{
    ListUpstreamsRequest, ListUpstreamsResponse, SetBreakerStateRequest, SetBreakerStateResponse,
};
use service_kit::ServiceSet;
use service_kit::server::FallbackService;
use tonic::server::NamedService as _;
use tonic::{Request, Response, Status};

use crate::proxy::GrpcService;

/// The full name of the gateway's admin service.
pub(crate) const ADMIN_SERVICE: &str = GatewayAdminServiceServer::<AdminApi>::NAME;

/// Health and reflection of the whole paysuite API (the gateway fronts it all); every
/// other call goes to `gateway`, which answers for `served` (health tracks each).
pub(crate) fn services(gateway: FallbackService, served: Vec<String>) -> ServiceSet {
    ServiceSet::new("gateway-svc")
        .reflect(proto::policy::paysuite_service_names())
        .fallback(gateway, served)
}

/// The admin API as a stage of the gateway's stack (behind API-key authentication).
pub(crate) fn admin_service() -> GrpcService {
    GrpcService::new(GatewayAdminServiceServer::new(AdminApi))
}

/// `paysuite.gateway.v1.GatewayAdminService`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminApi;

/// The answer for RPCs whose behaviour lands with the circuit breakers.
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not available yet"))
}

#[tonic::async_trait]
impl GatewayAdminService for AdminApi {
    async fn list_upstreams(
        &self,
        _request: Request<ListUpstreamsRequest>,
    ) -> Result<Response<ListUpstreamsResponse>, Status> {
        Err(not_yet("ListUpstreams"))
    }

    async fn set_breaker_state(
        &self,
        _request: Request<SetBreakerStateRequest>,
    ) -> Result<Response<SetBreakerStateResponse>, Status> {
        Err(not_yet("SetBreakerState"))
    }
}
