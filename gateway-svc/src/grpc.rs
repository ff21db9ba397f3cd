//! The gateway's own gRPC API (`paysuite.gateway.v1`), and the reflection of every
//! paysuite service: the only module that sees protobuf types.

use proto::gateway::v1::gateway_admin_service_server::{
    GatewayAdminService, GatewayAdminServiceServer,
};
use proto::gateway::v1::{
    ListUpstreamsRequest, ListUpstreamsResponse, SetBreakerStateRequest, SetBreakerStateResponse,
};
use service_kit::ServiceSet;
use tonic::{Request, Response, Status};

/// The admin API plus reflection of the whole paysuite API (the gateway fronts it all).
pub(crate) fn services() -> ServiceSet {
    ServiceSet::new("gateway-svc")
        .add_service(GatewayAdminServiceServer::new(AdminApi))
        .reflect(proto::policy::paysuite_service_names())
}

/// `paysuite.gateway.v1.GatewayAdminService`.
#[derive(Debug, Clone, Copy)]
struct AdminApi;

/// The answer for RPCs whose behaviour lands with the gateway issue.
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
