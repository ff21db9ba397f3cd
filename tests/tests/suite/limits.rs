//! Server hardening from `ServerLimits`: an oversize message is refused with
//! RESOURCE_EXHAUSTED before any handler runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use proto::ratelimit::v1::{CheckRequest, CheckResponse, PeekRequest, PeekResponse};
use service_kit::{ServerLimits, ServiceSet};
use tonic::{Code, Request, Response, Status};

/// A service whose handlers only count how often they ran.
#[derive(Debug, Clone, Default)]
struct CountingService {
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl RateLimitService for CountingService {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(CheckResponse::default()))
    }

    async fn peek(&self, _request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(PeekResponse::default()))
    }
}

#[tokio::test]
async fn oversize_message_is_refused_with_resource_exhausted_before_the_handler_runs()
-> anyhow::Result<()> {
    let counting = CountingService::default();
    let calls = Arc::clone(&counting.calls);
    let limits = ServerLimits {
        max_message_bytes: 1024,
        ..ServerLimits::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let services =
        ServiceSet::new("limits-test").add_service(RateLimitServiceServer::new(counting));
    let server = tokio::spawn(async move {
        service_kit::serve(listener, services, &limits, async {
            let _ = stopped.await;
        })
        .await
    });

    let mut client = RateLimitServiceClient::connect(format!("http://{addr}")).await?;
    let oversize = CheckRequest {
        key: "k".repeat(4096),
        ..CheckRequest::default()
    };
    let refused = client
        .check(oversize)
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(refused, Some(Code::ResourceExhausted));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the handler must not run for an oversize message"
    );

    // The same connection still serves calls within the limit, which do reach the handler.
    let small = CheckRequest {
        key: "small".to_owned(),
        ..CheckRequest::default()
    };
    client.check(small).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let _ = stop.send(());
    server.await??;
    Ok(())
}
