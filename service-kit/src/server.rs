//! The gRPC server every service runs: routes plus health and reflection, served over
//! an accept loop that applies [`ServerLimits`] and shuts down gracefully.
//!
//! We drive hyper's HTTP/2 connections ourselves instead of using `tonic::transport::Server`
//! because several limits need per-connection control tonic does not give: a bound on
//! open connections, a handshake deadline, closing idle connections with GOAWAY, socket
//! options under a custom listener, and a shed-instead-of-queue limit on unary calls that
//! leaves long-lived streams alone.
//!
//! Per connection, a request passes through, top-down:
//! 0. telemetry — the call's server span (continuing the caller's trace) and its RED
//!    metrics, around everything below so refusals are seen too
//!    ([`crate::rpc_telemetry`]);
//! 1. in-flight tracking — the idle timeout only counts time with no call in flight;
//! 2. identity (when required) — a paysuite RPC needs a valid token holding its
//!    `required_scope`; health and reflection never do;
//! 3. unary load shedding — beyond the per-connection limit a unary call is refused with
//!    UNAVAILABLE at once (clients retry elsewhere) instead of queueing; streams are exempt;
//! 4. the caller's `grpc-timeout` — the handler is abandoned when the deadline passes;
//! 5. the message size limit — oversize messages are refused from their length prefix;
//! 6. tonic's routes (the services, health, reflection; unknown paths → UNIMPLEMENTED;
//!    undecodable requests → INVALID_ARGUMENT, see [`crate::malformed`]), or the set's
//!    fallback for every service not served here (the gateway's proxy).
//!
//! With [`ServiceSet::tls`] each connection first completes a TLS handshake (ALPN `h2`)
//! within the handshake timeout; the limits then apply to the decrypted stream.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tower::util::BoxCloneSyncService;
use tower_layer::Layer as _;
use tower_service::Service;

use crate::health::Health;
use crate::identity::Verifier;
use crate::limits::ServerLimits;
use crate::message_size::MessageSizeLimit;
use crate::rpc_telemetry::RpcTelemetryLayer;

/// Bytes of the HTTP/2 client connection preface; a connection that has not sent them
/// within the handshake timeout is dropped.
const HTTP2_PREFACE_LEN: u64 = 24;

/// A service answering every call whose service this server does not serve itself.
pub type FallbackService =
    BoxCloneSyncService<Request<tonic::body::Body>, GrpcResponse, Infallible>;

/// The services one server exposes, plus the health and reflection services added to all.
pub struct ServiceSet {
    server_name: &'static str,
    routes: RoutesBuilder,
    /// Services answered by `routes`; anything else goes to `fallback` when there is one.
    served: BTreeSet<String>,
    reflected: BTreeSet<String>,
    health: Health,
    stats: Arc<ServerStats>,
    verifier: Option<Arc<Verifier>>,
    fallback: Option<FallbackService>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for ServiceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSet")
            .field("server_name", &self.server_name)
            .field("reflected", &self.reflected)
            .finish_non_exhaustive()
    }
}

type GrpcResponse = Response<tonic::body::Body>;

impl ServiceSet {
    /// An empty set for the server `server_name` (used in logs), with health already in it.
    pub fn new(server_name: &'static str) -> Self {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            server_name,
            routes,
            served: [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            reflected: BTreeSet::new(),
            health: Health::new(reporter),
            stats: Arc::default(),
            verifier: None,
            fallback: None,
            tls: None,
        }
    }

    /// Adds a service; it is listed by reflection and gets its own health status.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<Request<tonic::body::Body>, Response = GrpcResponse, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.track(S::NAME);
        self.served.insert(S::NAME.to_owned());
        self.reflected.insert(S::NAME.to_owned());
        self.routes.add_service(service);
        self
    }

    /// Adds a service that reflection does not list (its descriptors are not ours, e.g.
    /// Envoy's rate limit service); it still gets a health status.
    pub fn add_unreflected_service<S>(mut self, service: S) -> Self
    where
        S: Service<Request<tonic::body::Body>, Response = GrpcResponse, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.track(S::NAME);
        self.served.insert(S::NAME.to_owned());
        self.routes.add_service(service);
        self
    }

    /// Lists extra service names in reflection without serving them here (the gateway
    /// proxies them).
    pub fn reflect(mut self, service_names: impl IntoIterator<Item = String>) -> Self {
        self.reflected.extend(service_names);
        self
    }

    /// Sends every call whose service is not served here to `fallback` (the gateway's
    /// proxy), under the same limits. `service_names` are the services it answers for:
    /// each is listed by reflection and gets a health status. The fallback answers
    /// unknown paths itself (UNIMPLEMENTED over HTTP 200).
    pub fn fallback(
        mut self,
        fallback: FallbackService,
        service_names: impl IntoIterator<Item = String>,
    ) -> Self {
        for name in service_names {
            self.health.track(&name);
            self.reflected.insert(name);
        }
        self.fallback = Some(fallback);
        self
    }

    /// Serves over TLS with `config` (its ALPN protocols are set to `h2`).
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        self.tls = Some(TlsAcceptor::from(Arc::new(config)));
        self
    }

    /// The handle to this server's health statuses.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Requires a valid identity token holding the RPC's `required_scope` on every
    /// paysuite RPC (health and reflection stay open); handlers find the caller's
    /// [`Identity`] in the request extensions.
    pub fn require_identity(mut self, verifier: Verifier) -> Self {
        self.verifier = Some(Arc::new(verifier));
        self
    }

    /// The handle to this server's counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    fn into_parts(self) -> Result<ServerParts, ServeError> {
        let ServiceSet {
            mut routes,
            served,
            reflected,
            health,
            stats,
            verifier,
            fallback,
            tls,
            ..
        } = self;
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let always = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ];
        for name in reflected.iter().map(String::as_str).chain(always) {
            v1 = v1.with_service_name(name);
            v1alpha = v1alpha.with_service_name(name);
        }
        routes
            .add_service(v1.build_v1().map_err(ServeError::Reflection)?)
            .add_service(v1alpha.build_v1alpha().map_err(ServeError::Reflection)?);
        Ok(ServerParts {
            routes: routes.routes().prepare(),
            health,
            stats,
            verifier,
            fallback: fallback.map(|fallback| Fallback {
                served: Arc::new(served),
                service: fallback,
            }),
            tls,
        })
    }
}

struct ServerParts {
    routes: Routes,
    health: Health,
    stats: Arc<ServerStats>,
    verifier: Option<Arc<Verifier>>,
    fallback: Option<Fallback>,
    tls: Option<TlsAcceptor>,
}

/// The fallback service and the services it does not answer for.
#[derive(Clone)]
struct Fallback {
    served: Arc<BTreeSet<String>>,
    service: FallbackService,
}

impl Fallback {
    /// Whether `path` (`/package.Service/Method`) belongs to the fallback.
    fn takes(&self, path: &str) -> bool {
        let service = path
            .strip_prefix('/')
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        !self.served.contains(service)
    }
}

/// Counters of what a server's limits did, for metrics and for tests that must prove
/// which path ran.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections dropped for not sending the HTTP/2 preface in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections sent GOAWAY after the idle timeout.
    pub idle_connections_closed: AtomicU64,
    /// Connections sent GOAWAY at their maximum age.
    pub aged_connections_closed: AtomicU64,
    /// Unary calls refused because their connection had too many in flight.
    pub unary_calls_shed: AtomicU64,
    /// Calls abandoned when the caller's `grpc-timeout` passed.
    pub deadlines_exceeded: AtomicU64,
    /// Request messages refused for their size.
    pub messages_refused_oversize: Arc<AtomicU64>,
}

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The descriptor sets could not be loaded into the reflection service.
    #[error("building the reflection service: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The listener failed in a way that is not a per-connection error.
    #[error("listener failed: {0}")]
    Listener(#[source] std::io::Error),
}

/// Serves `services` on `listener` until `shutdown` completes, then shuts down gracefully:
/// every health status turns NOT_SERVING, no new connection is accepted, open connections
/// get GOAWAY, and calls in flight have `limits.drain_timeout` to finish.
pub async fn serve<F>(
    listener: TcpListener,
    services: ServiceSet,
    limits: &ServerLimits,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let server_name = services.server_name;
    let local_addr = listener.local_addr().map_err(ServeError::Listener)?;
    let ServerParts {
        routes,
        health,
        stats,
        verifier,
        fallback,
        tls,
    } = services.into_parts()?;
    let connection = Arc::new(ConnectionConfig {
        fallback,
        tls,
        ..ConnectionConfig::new(routes, limits, Arc::clone(&stats), verifier)
    });
    let open_connections = Arc::new(Semaphore::new(limits.max_connections));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();

    health.set_serving().await;
    tracing::info!(server = server_name, address = %local_addr, "serving gRPC");

    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&open_connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                configure_socket(&stream, limits);
                let connection = Arc::clone(&connection);
                let stop = stop.clone();
                connections.spawn(async move {
                    connection.serve(stream, peer, stop).await;
                    drop(permit);
                });
            }
            Err(err) => {
                // EMFILE/ENFILE and friends: the process is out of resources. Back off
                // briefly instead of spinning; established connections keep working.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    health.set_not_serving().await;
    drop(listener);
    tracing::info!(
        server = server_name,
        open_connections = connections.len(),
        drain_timeout = ?limits.drain_timeout,
        "shutting down: draining connections"
    );
    stop.cancel();
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            server = server_name,
            open_connections = connections.len(),
            "drain timeout passed: closing remaining connections"
        );
        connections.shutdown().await;
    }
    tracing::info!(server = server_name, "stopped");
    Ok(())
}

/// Socket options must be set on each accepted socket: builder settings do not reach
/// sockets accepted from our own listener.
fn configure_socket(stream: &TcpStream, limits: &ServerLimits) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(limits.tcp_keepalive)
        .with_interval(limits.tcp_keepalive / 4);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %err, "cannot set TCP keepalive");
    }
}

/// What every connection of one server shares.
struct ConnectionConfig {
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    routes: Routes,
    message_size: MessageSizeLimit,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_connection_age: Duration,
    max_connection_age_grace: Duration,
    max_unary_per_connection: usize,
    telemetry: RpcTelemetryLayer,
    stats: Arc<ServerStats>,
    verifier: Option<Arc<Verifier>>,
    fallback: Option<Fallback>,
    tls: Option<TlsAcceptor>,
}

impl ConnectionConfig {
    fn new(
        routes: Routes,
        limits: &ServerLimits,
        stats: Arc<ServerStats>,
        verifier: Option<Arc<Verifier>>,
    ) -> Self {
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_list_bytes)
            .max_local_error_reset_streams(limits.max_local_error_resets)
            .max_pending_accept_reset_streams(limits.max_pending_accept_resets)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout);
        Self {
            http2,
            routes,
            message_size: MessageSizeLimit::with_counter(
                limits.max_message_bytes,
                Arc::clone(&stats.messages_refused_oversize),
            ),
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            max_connection_age: limits.max_connection_age,
            max_connection_age_grace: limits.max_connection_age_grace,
            max_unary_per_connection: limits.max_unary_per_connection,
            telemetry: RpcTelemetryLayer::new(),
            stats,
            verifier,
            fallback: None,
            tls: None,
        }
    }

    /// Serves one connection until it closes: the TLS handshake first when configured
    /// (bounded by the handshake timeout), then HTTP/2.
    async fn serve(&self, stream: TcpStream, peer: SocketAddr, stop: CancellationToken) {
        let Some(acceptor) = &self.tls else {
            return self.serve_http2(stream, peer, stop).await;
        };
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_http2(stream, peer, stop).await,
            Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
            Err(_) => {
                self.stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "no TLS handshake before the handshake timeout");
            }
        }
    }

    /// Serves HTTP/2 on one connection until it closes, enforcing the handshake, idle and
    /// age limits.
    async fn serve_http2<I>(&self, stream: I, peer: SocketAddr, stop: CancellationToken)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = Arc::new(ConnectionState::new());
        let service = ConnectionService {
            fallback: self.fallback.clone(),
            routes: self.routes.clone(),
            state: Arc::clone(&state),
            unary_permits: Arc::new(Semaphore::new(self.max_unary_per_connection)),
            message_size: self.message_size.clone(),
            stats: Arc::clone(&self.stats),
            verifier: self.verifier.clone(),
        };
        let io = TokioIo::new(CountingIo {
            inner: stream,
            state: Arc::clone(&state),
        });
        let service = self.telemetry.layer(service);
        let connection = self
            .http2
            .serve_connection(io, TowerToHyperService::new(service));
        tokio::pin!(connection);

        let handshake = tokio::time::sleep(self.handshake_timeout);
        let idle = tokio::time::sleep(self.idle_timeout);
        let age = tokio::time::sleep(self.max_connection_age);
        // Armed once the connection was asked to go away for its age.
        let grace = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(handshake, idle, age, grace);
        let mut handshake_checked = false;
        let mut going_away = false;
        let mut grace_armed = false;

        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = stop.cancelled(), if !going_away => {
                    going_away = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = &mut handshake, if !handshake_checked => {
                    handshake_checked = true;
                    if state.bytes_read.load(Ordering::Relaxed) < HTTP2_PREFACE_LEN {
                        self.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "no HTTP/2 preface before the handshake timeout");
                        return;
                    }
                }
                () = &mut idle, if !going_away => {
                    let idle_for = state.idle_for();
                    if idle_for >= self.idle_timeout {
                        self.stats.idle_connections_closed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "closing idle connection");
                        going_away = true;
                        connection.as_mut().graceful_shutdown();
                    } else {
                        let next = Instant::now() + (self.idle_timeout - idle_for);
                        idle.as_mut().reset(next);
                    }
                }
                () = &mut age, if !going_away => {
                    self.stats.aged_connections_closed.fetch_add(1, Ordering::Relaxed);
                    going_away = true;
                    grace_armed = true;
                    grace.as_mut().reset(Instant::now() + self.max_connection_age_grace);
                    connection.as_mut().graceful_shutdown();
                }
                () = &mut grace, if grace_armed => {
                    tracing::debug!(%peer, "connection outlived its age grace period");
                    return;
                }
            }
        }
    }
}

/// Counters one connection's watchdogs read.
struct ConnectionState {
    created: Instant,
    bytes_read: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `created` when the last call finished.
    last_call_ended_ms: AtomicU64,
}

impl ConnectionState {
    fn new() -> Self {
        Self {
            created: Instant::now(),
            bytes_read: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_call_ended_ms: AtomicU64::new(0),
        }
    }

    /// How long the connection has had no call in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since_created = self.created.elapsed();
        let last_end = Duration::from_millis(self.last_call_ended_ms.load(Ordering::Acquire));
        since_created.saturating_sub(last_end)
    }

    fn call_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            state: Arc::clone(self),
        }
    }
}

/// Marks a call in flight until dropped (when its response body is done).
struct InFlight {
    state: Arc<ConnectionState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let elapsed = u64::try_from(self.state.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.state
            .last_call_ended_ms
            .store(elapsed, Ordering::Release);
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The accepted socket (or its TLS stream), counting bytes read for the handshake
    /// deadline.
    struct CountingIo<I> {
        #[pin]
        inner: I,
        state: Arc<ConnectionState>,
    }
}

impl<I: AsyncRead> AsyncRead for CountingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        this.state.bytes_read.fetch_add(read, Ordering::Relaxed);
        result
    }
}

impl<I: AsyncWrite> AsyncWrite for CountingIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The per-connection request stack described in the module docs.
#[derive(Clone)]
struct ConnectionService {
    routes: Routes,
    fallback: Option<Fallback>,
    state: Arc<ConnectionState>,
    unary_permits: Arc<Semaphore>,
    message_size: MessageSizeLimit,
    stats: Arc<ServerStats>,
    verifier: Option<Arc<Verifier>>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for ConnectionService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Routes are always ready; shedding happens per call below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let in_flight = self.state.call_started();
        if let (Some(verifier), Some(policy)) = (
            &self.verifier,
            proto::policy::method_policy(request.uri().path()),
        ) {
            match crate::identity::authorize(verifier, &policy.required_scope, request.headers()) {
                Ok(identity) => {
                    crate::telemetry::record_principal(&identity.principal);
                    request.extensions_mut().insert(identity);
                }
                Err(status) => {
                    return Box::pin(std::future::ready(Ok(tracked(
                        status.into_http(),
                        in_flight,
                        None,
                    ))));
                }
            }
        }
        let streaming = is_streaming(request.uri().path());
        let permit = if streaming {
            None
        } else {
            match Arc::clone(&self.unary_permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.stats.unary_calls_shed.fetch_add(1, Ordering::Relaxed);
                    let status = Status::unavailable(
                        "server overloaded: too many calls in flight on this connection",
                    );
                    return Box::pin(std::future::ready(Ok(tracked(
                        status.into_http(),
                        in_flight,
                        None,
                    ))));
                }
            }
        };
        let deadline = crate::deadline::grpc_timeout(request.headers());
        let message_size = self.message_size.clone();
        let request = request.map(|body| tonic::body::Body::new(message_size.wrap(body)));
        let mut routes = self.routes.clone();
        let fallback = self
            .fallback
            .as_ref()
            .filter(|fallback| fallback.takes(request.uri().path()))
            .map(|fallback| fallback.service.clone());
        let stats = Arc::clone(&self.stats);
        Box::pin(async move {
            // Our own routes' undecodable-request refusals become INVALID_ARGUMENT
            // (`malformed`); the fallback's (proxied) answers pass untouched.
            let call: Pin<Box<dyn Future<Output = Result<GrpcResponse, Infallible>> + Send>> =
                match fallback {
                    Some(mut fallback) => fallback.call(request),
                    None => Box::pin(async move {
                        routes.call(request).await.map(crate::malformed::clarify)
                    }),
                };
            let response =
                match deadline {
                    None => call.await,
                    Some(deadline) => match tokio::time::timeout(deadline, call).await {
                        Ok(response) => response,
                        Err(_) => {
                            stats.deadlines_exceeded.fetch_add(1, Ordering::Relaxed);
                            Ok(Status::deadline_exceeded(
                                "deadline exceeded before the call completed",
                            )
                            .into_http())
                        }
                    },
                };
            let response = match response {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(tracked(response, in_flight, permit))
        })
    }
}

fn tracked(
    response: GrpcResponse,
    in_flight: InFlight,
    permit: Option<OwnedSemaphorePermit>,
) -> Response<TrackedBody> {
    response.map(|body| TrackedBody {
        inner: body,
        _in_flight: in_flight,
        _permit: permit,
    })
}

/// Streaming calls are long-lived, so they are exempt from the unary concurrency limit.
fn is_streaming(path: &str) -> bool {
    if let Some(policy) = proto::policy::method_policies().get(path) {
        return policy.client_streaming || policy.server_streaming;
    }
    path == "/grpc.health.v1.Health/Watch" || path.starts_with("/grpc.reflection.")
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted (and its unary permit held) until the
    /// body is finished or dropped.
    struct TrackedBody {
        #[pin]
        inner: tonic::body::Body,
        _in_flight: InFlight,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
