//! Server hardening from `ServerLimits`, on a small service whose handlers count their
//! calls and can be held open: each limit is shown to act, and a counter proves which
//! path ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use proto::ratelimit::v1::{CheckRequest, CheckResponse, PeekRequest, PeekResponse};
use service_kit::{ServerLimits, ServerStats, ServiceSet};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// The key that makes a handler wait until the test releases it.
const HOLD: &str = "hold";

/// A service whose handlers count how often they ran; calls for [`HOLD`] wait for a permit.
#[derive(Debug, Clone)]
struct CountingService {
    calls: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
}

#[tonic::async_trait]
impl RateLimitService for CountingService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if request.get_ref().key == HOLD {
            let permit = self
                .release
                .acquire()
                .await
                .map_err(|_| Status::aborted("closed"))?;
            permit.forget();
        }
        Ok(Response::new(CheckResponse::default()))
    }

    async fn peek(&self, _request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(PeekResponse::default()))
    }
}

/// The counting service served under `limits`, stopped when dropped.
struct TestServer {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    stats: Arc<ServerStats>,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    async fn start(limits: ServerLimits) -> anyhow::Result<Self> {
        let service = CountingService {
            calls: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        };
        let (calls, release) = (Arc::clone(&service.calls), Arc::clone(&service.release));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let services =
            ServiceSet::new("limits-test").add_service(RateLimitServiceServer::new(service));
        let stats = services.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            service_kit::serve(listener, services, &limits, async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Self {
            addr,
            calls,
            release,
            stats,
            stop: Some(stop),
        })
    }

    async fn client(&self) -> anyhow::Result<RateLimitServiceClient<Channel>> {
        Ok(RateLimitServiceClient::connect(format!("http://{}", self.addr)).await?)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.release.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn check(key: &str) -> CheckRequest {
    CheckRequest {
        key: key.to_owned(),
        ..CheckRequest::default()
    }
}

/// Waits (bounded by the liveness bound) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(tests::LIVENESS, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("{what}: not true after {:?}", tests::LIVENESS))
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[tokio::test]
async fn oversize_message_is_refused_with_resource_exhausted_before_the_handler_runs()
-> anyhow::Result<()> {
    let server = TestServer::start(ServerLimits {
        max_message_bytes: 1024,
        ..ServerLimits::default()
    })
    .await?;
    let mut client = server.client().await?;

    let refused = client
        .check(check(&"k".repeat(4096)))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused, Some(Code::ResourceExhausted));
    assert_eq!(
        server.calls(),
        0,
        "the handler must not run for an oversize message"
    );
    assert_eq!(count(&server.stats.messages_refused_oversize), 1);

    // The same connection still serves calls within the limit, which reach the handler.
    client.check(check(&"k".repeat(900))).await?;
    assert_eq!(server.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn unary_calls_beyond_the_per_connection_limit_are_shed_with_unavailable()
-> anyhow::Result<()> {
    let server = TestServer::start(ServerLimits {
        max_unary_per_connection: 1,
        ..ServerLimits::default()
    })
    .await?;
    let client = server.client().await?;
    let mut held_client = client.clone();
    let held = tokio::spawn(async move { held_client.check(check(HOLD)).await });
    eventually("the held call reached its handler", || server.calls() == 1).await?;

    // Same channel, same connection: the second unary call is refused at once, not queued.
    let shed = client
        .clone()
        .check(check("second"))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(shed, Some(Code::Unavailable));
    assert_eq!(count(&server.stats.unary_calls_shed), 1);
    assert_eq!(server.calls(), 1, "a shed call never reaches its handler");

    server.release.add_permits(1);
    held.await??;
    client.clone().check(check("after")).await?;
    assert_eq!(server.calls(), 2);
    Ok(())
}

#[tokio::test]
async fn the_callers_deadline_ends_the_call_with_deadline_exceeded() -> anyhow::Result<()> {
    let server = TestServer::start(ServerLimits::default()).await?;
    // A raw HTTP/2 client that sends `grpc-timeout` but keeps no timer of its own (tonic's
    // client would cancel the stream first): only the server can end this call.
    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let (mut h2, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{}/paysuite.ratelimit.v1.RateLimitService/Check",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "200m")
    .body(())?;
    let (response, mut body) = h2.send_request(request, false)?;
    body.send_data(grpc_frame(&check(HOLD)), true)?;

    let response = tokio::time::timeout(tests::LIVENESS, response).await??;
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().map(str::to_owned));
    assert_eq!(
        grpc_status.transpose()?.as_deref(),
        Some("4"),
        "trailers-only DEADLINE_EXCEEDED: {response:?}"
    );
    assert_eq!(count(&server.stats.deadlines_exceeded), 1);
    assert_eq!(server.calls(), 1, "the handler ran and was abandoned");
    Ok(())
}

/// One length-prefixed gRPC message.
fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(encoded.len() + 5);
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(encoded.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&encoded);
    frame.into()
}

#[tokio::test]
async fn a_connection_that_never_sends_the_preface_is_dropped() -> anyhow::Result<()> {
    let server = TestServer::start(ServerLimits {
        handshake_timeout: Duration::from_millis(200),
        ..ServerLimits::default()
    })
    .await?;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await?;
    // The server sends its SETTINGS, then closes the socket: reading ends with EOF (or a
    // reset) well within the liveness bound.
    let mut received = Vec::new();
    let read = tokio::time::timeout(tests::LIVENESS, silent.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert_eq!(count(&server.stats.handshake_timeouts), 1);

    // Well-behaved clients are unaffected.
    server.client().await?.check(check("ok")).await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_connection_gets_goaway_and_clients_reconnect() -> anyhow::Result<()> {
    let server = TestServer::start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await?;
    let mut client = server.client().await?;
    client.check(check("first")).await?;
    eventually("the idle connection was closed", || {
        count(&server.stats.idle_connections_closed) >= 1
    })
    .await?;
    // The channel reconnects after the GOAWAY. The counter moves as the server decides to
    // close, so the next call may still cross the GOAWAY on the old connection and fail
    // the way any call on a closing connection does (CANCELLED/UNAVAILABLE, never
    // reaching the handler); a client retries it, and the retry goes over a new
    // connection.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.check(check("second")).await {
            Ok(_) => break,
            Err(status)
                if attempts < 3 && matches!(status.code(), Code::Cancelled | Code::Unavailable) => {
            }
            Err(status) => return Err(status.into()),
        }
    }
    assert_eq!(server.calls(), 2);
    assert!(count(&server.stats.connections_accepted) >= 2);
    Ok(())
}
