//! The gateway's own gRPC API (`paysuite.gateway.v1`), and the reflection of every
//! paysuite service: the only module that sees protobuf types.

use proto::gateway::v1::gateway_admin_service_server::{
    GatewayAdminService, GatewayAdminServiceServer,
};
use proto::gateway::v1::{
    ListUpstreamsRequest, ListUpstreamsResponse, SetBreakerStateRequest, SetBreakerStateResponse,
};
use std::sync::Arc;

use proto::gateway::v1 as pb;
use service_kit::ServiceSet;
use service_kit::breaker::{BreakerState, Override};
use service_kit::server::FallbackService;
use tonic::server::NamedService as _;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::balance::{EndpointView, Upstream};

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
pub(crate) fn admin_service(upstreams: Arc<[Arc<Upstream>]>) -> GrpcService {
    GrpcService::new(GatewayAdminServiceServer::new(AdminApi { upstreams }))
}

/// `paysuite.gateway.v1.GatewayAdminService`.
#[derive(Debug, Clone)]
pub(crate) struct AdminApi {
    upstreams: Arc<[Arc<Upstream>]>,
}

fn endpoint_message(view: &EndpointView) -> pb::Endpoint {
    let breaker = &view.breaker;
    pb::Endpoint {
        address: view.address.clone(),
        state: match breaker.state {
            BreakerState::Closed => pb::BreakerState::Closed,
            BreakerState::Open => pb::BreakerState::Open,
            BreakerState::HalfOpen => pb::BreakerState::HalfOpen,
        } as i32,
        r#override: override_message(breaker.forced) as i32,
        consecutive_failures: breaker.consecutive_failures,
        window_calls: u64::from(breaker.window_calls),
        window_failures: u64::from(breaker.window_failures),
        retry_after: breaker
            .retry_after
            .and_then(|after| prost_types::Duration::try_from(after).ok()),
        in_flight: u32::try_from(view.in_flight).unwrap_or(u32::MAX),
    }
}

fn override_message(forced: Override) -> pb::BreakerOverride {
    match forced {
        Override::Automatic => pb::BreakerOverride::Automatic,
        Override::ForcedOpen => pb::BreakerOverride::ForcedOpen,
        Override::ForcedClosed => pb::BreakerOverride::ForcedClosed,
    }
}

fn bad_field(field: &str, description: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(field, description);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        details,
    )
}

#[tonic::async_trait]
impl GatewayAdminService for AdminApi {
    async fn list_upstreams(
        &self,
        _request: Request<ListUpstreamsRequest>,
    ) -> Result<Response<ListUpstreamsResponse>, Status> {
        let upstreams = self
            .upstreams
            .iter()
            .map(|upstream| pb::Upstream {
                name: upstream.name().to_owned(),
                services: upstream.services().to_vec(),
                endpoints: upstream
                    .endpoints()
                    .iter()
                    .map(|endpoint| endpoint_message(&EndpointView::from(endpoint.as_ref())))
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListUpstreamsResponse { upstreams }))
    }

    async fn set_breaker_state(
        &self,
        request: Request<SetBreakerStateRequest>,
    ) -> Result<Response<SetBreakerStateResponse>, Status> {
        let request = request.into_inner();
        let forced = match pb::BreakerOverride::try_from(request.r#override) {
            Ok(pb::BreakerOverride::Automatic) => Override::Automatic,
            Ok(pb::BreakerOverride::ForcedOpen) => Override::ForcedOpen,
            Ok(pb::BreakerOverride::ForcedClosed) => Override::ForcedClosed,
            Ok(pb::BreakerOverride::Unspecified) | Err(_) => {
                return Err(bad_field(
                    "override",
                    "must be AUTOMATIC, FORCED_OPEN or FORCED_CLOSED",
                ));
            }
        };
        if request.upstream.is_empty() {
            return Err(bad_field("upstream", "is required"));
        }
        if request.address.is_empty() {
            return Err(bad_field("address", "is required"));
        }
        let upstream = self
            .upstreams
            .iter()
            .find(|upstream| upstream.name() == request.upstream)
            .ok_or_else(|| Status::not_found(format!("no upstream {}", request.upstream)))?;
        let endpoint = upstream
            .set_override(&request.address, forced)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "upstream {} has no endpoint {}",
                    request.upstream, request.address
                ))
            })?;
        Ok(Response::new(SetBreakerStateResponse {
            endpoint: Some(endpoint_message(&EndpointView::from(endpoint.as_ref()))),
        }))
    }
}
