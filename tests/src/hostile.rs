//! Hostile clients, and the three spawned services they attack.
//!
//! [`Targets`] spawns payment-svc, ratelimit-svc and gateway-svc (in front of that
//! payment-svc) as real processes. [`Probe`] keeps calling a target's health check and one
//! normal RPC while a test attacks it, counting successes and sampling the process's
//! resident memory from `/proc/<pid>/status`. The attackers speak HTTP/2 either through the
//! `h2` crate ([`H2Client`]: giant metadata, slow readers, calls with hand-made bodies) or
//! frame by frame over raw TCP ([`RawConnection`]: resets, malformed frames, idle
//! connections), since no well-behaved client library can send what a hostile one does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use proto::payments::v1 as payments_pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use proto::ratelimit::v1 as ratelimit_pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use secrecy::ExposeSecret as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::postgres::TestDatabase;
use crate::process::SpawnedService;

/// One bound on every probe call: a liveness bound (a healthy call takes milliseconds).
const PROBE_CALL_BOUND: Duration = Duration::from_secs(10);
/// The pause between two probe rounds.
const PROBE_PAUSE: Duration = Duration::from_millis(20);

/// Which service a [`Target`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// payment-svc, called with an identity token.
    Payment,
    /// ratelimit-svc, called with an identity token.
    Ratelimit,
    /// gateway-svc, called with an API key; it proxies payment calls to payment-svc.
    Gateway,
}

/// A spawned service under attack.
#[derive(Debug)]
pub struct Target {
    kind: Kind,
    service: SpawnedService,
    /// The gateway's API key (gateway targets only).
    api_key: Option<String>,
}

impl Target {
    /// Its name in assertion messages.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Payment => "payment-svc",
            Kind::Ratelimit => "ratelimit-svc",
            Kind::Gateway => "gateway-svc",
        }
    }

    /// Which service it is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.service.addr()
    }

    /// The process.
    pub fn service(&self) -> &SpawnedService {
        &self.service
    }

    /// Its resident memory now.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of(self.service.pid().context("the target has exited")?)
    }

    /// The metadata that authorizes a call to this target: an identity token for the
    /// services, the API key for the gateway.
    pub fn credentials(&self) -> (&'static str, String) {
        credentials(self.kind, self.api_key.as_deref())
    }

    /// The unary method hostile calls go to (through the gateway: a proxied payment call),
    /// and a valid encoded request for it.
    pub fn unary_method(&self) -> (&'static str, Bytes) {
        match self.kind {
            Kind::Ratelimit => (
                "/paysuite.ratelimit.v1.RateLimitService/Peek",
                prost::Message::encode_to_vec(&peek_request()).into(),
            ),
            Kind::Payment | Kind::Gateway => (
                "/paysuite.payments.v1.PaymentService/ListAccounts",
                prost::Message::encode_to_vec(&payments_pb::ListAccountsRequest::default()).into(),
            ),
        }
    }

    /// A channel over a fresh connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.service.endpoint())?
            .connect()
            .await?)
    }
}

async fn bounded(call: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(PROBE_CALL_BOUND * 2, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", PROBE_CALL_BOUND * 2)))
}

fn authorized<T>(
    message: T,
    header: &'static str,
    value: &str,
) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(PROBE_CALL_BOUND);
    let value = value
        .parse()
        .map_err(|_| "credentials are not ASCII".to_owned())?;
    request.metadata_mut().insert(header, value);
    Ok(request)
}

fn peek_request() -> ratelimit_pb::PeekRequest {
    ratelimit_pb::PeekRequest {
        key: "hostile-probe".to_owned(),
        limit: Some(ratelimit_pb::Limit {
            limit: 100,
            window: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            algorithm: ratelimit_pb::Algorithm::Gcra as i32,
        }),
    }
}

/// payment-svc, ratelimit-svc and a gateway in front of that payment-svc, spawned.
#[derive(Debug)]
pub struct Targets {
    targets: Vec<Target>,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

impl Targets {
    /// Spawns the three services, each with `envs` added to its environment (`GRPC_*`
    /// limits).
    pub async fn start(envs: &[(&'static str, String)]) -> anyhow::Result<Self> {
        raise_open_files_limit()?;
        let database = TestDatabase::create().await?;
        let mut payment_env = vec![
            ("DATABASE_URL", database.service_url()),
            ("DATABASE_MIGRATION_URL", database.owner_url()),
        ];
        payment_env.extend(envs.iter().cloned());
        let payment = SpawnedService::start("payment-svc", &payment_env).await?;
        let ratelimit = SpawnedService::start("ratelimit-svc", envs).await?;

        let dir = tempfile::tempdir()?;
        let mut gateway_env = crate::gateway::spawned_env(dir.path())?;
        let pepper = gateway_env
            .iter()
            .find(|(name, _)| *name == "API_KEY_PEPPER")
            .map(|(_, value)| value.clone())
            .context("spawned_env sets a pepper")?;
        let pepper = gateway_svc::keys::Pepper::new(pepper.into())?;
        let scopes: Vec<String> = crate::payments::TENANT_SCOPES
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let key = gateway_svc::keys::generate(&pepper, "hostile", &scopes, "standard")?;
        std::fs::write(dir.path().join("api-keys.yaml"), format!("{}\n", key.line))?;
        gateway_env.extend([
            ("PAYMENT_SVC_ADDR", payment.endpoint()),
            ("RATELIMIT_SVC_ADDR", ratelimit.endpoint()),
            ("RATELIMIT_ENABLED", "false".to_owned()),
        ]);
        gateway_env.extend(envs.iter().cloned());
        let gateway = SpawnedService::start("gateway-svc", &gateway_env).await?;

        Ok(Self {
            targets: vec![
                Target {
                    kind: Kind::Payment,
                    service: payment,
                    api_key: None,
                },
                Target {
                    kind: Kind::Ratelimit,
                    service: ratelimit,
                    api_key: None,
                },
                Target {
                    kind: Kind::Gateway,
                    service: gateway,
                    api_key: Some(key.key.expose_secret().to_owned()),
                },
            ],
            _database: database,
            _dir: dir,
        })
    }

    /// The three targets.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }
}

/// Raises this process's open-files soft limit to its hard limit: the idle-connections
/// case holds thousands of sockets, and spawned services inherit the limit.
pub fn raise_open_files_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now, KiB.
    pub rss_kib: u64,
    /// `VmHWM`: the resident peak since the process started, KiB.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads `pid`'s figures.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// What a probe saw while it ran.
#[derive(Debug, Default, Clone)]
pub struct ProbeReport {
    /// Health checks answered SERVING.
    pub health_ok: u64,
    /// Normal calls answered OK.
    pub calls_ok: u64,
    /// Every failure, described.
    pub failures: Vec<String>,
    /// Resident memory when the probe started (the baseline), KiB.
    pub baseline_rss_kib: u64,
    /// The largest resident memory seen while it ran (sampled, and the peak `VmHWM` when
    /// that rose during the run), KiB.
    pub peak_rss_kib: u64,
}

impl ProbeReport {
    /// Peak growth over the baseline, in MiB.
    pub fn growth_mib(&self) -> f64 {
        self.peak_rss_kib.saturating_sub(self.baseline_rss_kib) as f64 / 1024.0
    }

    /// Asserts the target stayed healthy and within `bound_mib` of its baseline, and that
    /// the probe really ran `min_rounds` times (so "no failures" means something).
    pub fn assert_healthy(&self, target: &Target, case: &str, bound_mib: f64) {
        let name = target.name();
        assert!(
            self.failures.is_empty(),
            "{name} / {case}: probe failures (allowance: zero): {:?}",
            self.failures
        );
        assert!(
            self.health_ok >= MIN_PROBE_ROUNDS && self.calls_ok >= MIN_PROBE_ROUNDS,
            "{name} / {case}: the probe ran too little: {self:?}"
        );
        let growth = self.growth_mib();
        assert!(
            growth <= bound_mib,
            "{name} / {case}: resident memory grew {growth:.1} MiB (bound {bound_mib} MiB): {self:?}"
        );
        tracing_line(name, case, self, bound_mib);
    }
}

/// Probe rounds a report must hold.
const MIN_PROBE_ROUNDS: u64 = 3;

/// The figures go to the test's output (`--no-capture` shows them) so bounds can be
/// revisited from real measurements.
fn tracing_line(name: &str, case: &str, report: &ProbeReport, bound_mib: f64) {
    eprintln!(
        "hostile: {name} / {case}: baseline {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB \
         (bound {bound_mib} MiB), {} health checks and {} calls ok",
        report.baseline_rss_kib as f64 / 1024.0,
        report.peak_rss_kib as f64 / 1024.0,
        report.growth_mib(),
        report.health_ok,
        report.calls_ok,
    );
}

/// Calls a target's health check and normal RPC over one connection, opened before the
/// attack, until stopped.
#[derive(Debug)]
pub struct Probe {
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<ProbeReport>>,
}

impl Probe {
    /// Starts probing `target` (after one successful round, so the baseline is warm).
    pub async fn start(target: &Target) -> anyhow::Result<Self> {
        let channel = target.channel().await?;
        let (health, call) = probe_calls(target.kind, target.api_key.as_deref(), &channel).await;
        if let Err(err) = health.and(call) {
            anyhow::bail!("{}: not healthy before the attack: {err}", target.name());
        }
        let pid = target.service().pid().context("target exited")?;
        let baseline = Memory::of(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let (kind, api_key) = (target.kind, target.api_key.clone());
        let task = tokio::spawn(async move {
            let mut report = ProbeReport {
                baseline_rss_kib: baseline.rss_kib,
                peak_rss_kib: baseline.rss_kib,
                ..ProbeReport::default()
            };
            let mut rounds_after_stop = 0;
            loop {
                let (health, call) = probe_calls(kind, api_key.as_deref(), &channel).await;
                match health {
                    Ok(()) => report.health_ok += 1,
                    Err(err) => report.failures.push(err),
                }
                match call {
                    Ok(()) => report.calls_ok += 1,
                    Err(err) => report.failures.push(err),
                }
                let now = Memory::of(pid)?;
                report.peak_rss_kib = report.peak_rss_kib.max(now.rss_kib);
                if now.hwm_kib > baseline.hwm_kib {
                    report.peak_rss_kib = report.peak_rss_kib.max(now.hwm_kib);
                }
                // Two rounds after the attack ended: the service still answers.
                if stopped.load(Ordering::Acquire) {
                    rounds_after_stop += 1;
                    if rounds_after_stop > 2 {
                        return Ok(report);
                    }
                }
                tokio::time::sleep(PROBE_PAUSE).await;
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops the probe (after a couple more rounds) and returns what it saw.
    pub async fn finish(self) -> anyhow::Result<ProbeReport> {
        self.stop.store(true, Ordering::Release);
        tokio::time::timeout(crate::LIVENESS * 2, self.task)
            .await
            .context("the probe did not finish")??
    }
}

/// One health check and one normal RPC on `channel`: `Ok` when each succeeds.
async fn probe_calls(
    kind: Kind,
    api_key: Option<&str>,
    channel: &Channel,
) -> (Result<(), String>, Result<(), String>) {
    let health = bounded(async {
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request.set_timeout(PROBE_CALL_BOUND);
        match HealthClient::new(channel.clone()).check(request).await {
            Ok(response) if response.get_ref().status == 1 => Ok(()),
            Ok(response) => Err(format!("health: {:?}", response.get_ref().status)),
            Err(status) => Err(format!("health: {status}")),
        }
    })
    .await;
    let (header, value) = credentials(kind, api_key);
    let call = bounded(async {
        let result = match kind {
            Kind::Ratelimit => {
                let request = authorized(peek_request(), header, &value)?;
                RateLimitServiceClient::new(channel.clone())
                    .peek(request)
                    .await
                    .map(drop)
            }
            Kind::Payment | Kind::Gateway => {
                let request =
                    authorized(payments_pb::ListAccountsRequest::default(), header, &value)?;
                PaymentServiceClient::new(channel.clone())
                    .list_accounts(request)
                    .await
                    .map(drop)
            }
        };
        result.map_err(|status| format!("normal call: {status}"))
    })
    .await;
    (health, call)
}

fn credentials(kind: Kind, api_key: Option<&str>) -> (&'static str, String) {
    match (kind, api_key) {
        (Kind::Gateway, Some(key)) => ("authorization", format!("Bearer {key}")),
        (Kind::Ratelimit, _) => (
            service_kit::identity::IDENTITY_HEADER,
            crate::identity::token(
                "hostile",
                &["ratelimit:check"],
                ratelimit_svc::config::AUDIENCE,
            ),
        ),
        _ => (
            service_kit::identity::IDENTITY_HEADER,
            crate::identity::token(
                "hostile",
                &crate::payments::TENANT_SCOPES,
                payment_svc::config::AUDIENCE,
            ),
        ),
    }
}

/// One length-prefixed gRPC message holding `payload`.
pub fn grpc_message(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.extend_from_slice(payload);
    frame.freeze()
}

/// How the server answered a hostile call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A gRPC status (from trailers, or from the headers of a trailers-only answer).
    Grpc {
        /// The HTTP status.
        http: u16,
        /// `grpc-status`.
        code: tonic::Code,
        /// `grpc-message`, decoded.
        message: String,
        /// The `BadRequest` field violations' fields, and `reason:<R>` for an `ErrorInfo`.
        details: Vec<String>,
    },
    /// An HTTP answer without `grpc-status` (e.g. 431 from the HTTP/2 layer).
    Http(u16),
    /// The stream was reset.
    Reset(h2::Reason),
    /// The connection failed.
    Connection(String),
}

/// An HTTP/2 client connection from the `h2` crate.
#[derive(Debug)]
pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    connection: JoinHandle<Result<(), h2::Error>>,
}

impl H2Client {
    /// Connects with default settings.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::connect_with(addr, h2::client::Builder::new()).await
    }

    /// Connects with `builder`'s settings (e.g. a zero initial window: a slow reader).
    pub async fn connect_with(
        addr: SocketAddr,
        builder: h2::client::Builder,
    ) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let (send, connection) = builder.handshake(tcp).await?;
        let connection = tokio::spawn(connection);
        let send = send.ready().await?;
        Ok(Self {
            send,
            addr,
            connection,
        })
    }

    /// A gRPC POST to `path` with `metadata`.
    pub fn request(
        &self,
        path: &str,
        metadata: &[(String, String)],
    ) -> anyhow::Result<http::Request<()>> {
        let mut builder = http::Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in metadata {
            builder = builder.header(name.as_str(), value.as_str());
        }
        Ok(builder.body(())?)
    }

    /// Sends `request` with `body` and reads the whole answer.
    pub async fn call(&mut self, request: http::Request<()>, body: Bytes) -> Answer {
        let sent = async {
            self.send = self.send.clone().ready().await?;
            let (response, mut stream) = self.send.send_request(request, false)?;
            // The server may answer (HTTP 431) and end the stream before the body goes
            // out; the body is then refused ("inactive stream") and the answer, or the
            // connection's error, is what counts.
            let _refused_after_an_answer = stream.send_data(body, true);
            let response = response.await?;
            // Keep `stream` alive until the answer is read: dropping it resets the call.
            let answer = read_answer(response).await;
            drop(stream);
            answer
        };
        match tokio::time::timeout(crate::LIVENESS, sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => answer_from_error(&err),
            Err(_) => Answer::Connection(format!("no answer within {:?}", crate::LIVENESS)),
        }
    }

    /// The sender, for tests that open streams themselves.
    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.send.clone()
    }

    /// Whether the connection task has ended (the server closed the connection).
    pub fn is_closed(&self) -> bool {
        self.connection.is_finished()
    }
}

impl Drop for H2Client {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

async fn read_answer(response: http::Response<h2::RecvStream>) -> Result<Answer, h2::Error> {
    let http = response.status().as_u16();
    if let Some(answer) = grpc_status(http, response.headers()) {
        return Ok(answer);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    Ok(trailers
        .and_then(|trailers| grpc_status(http, &trailers))
        .unwrap_or(Answer::Http(http)))
}

fn grpc_status(http: u16, headers: &http::HeaderMap) -> Option<Answer> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    let mut details = Vec::new();
    if let Some(status) = tonic::Status::from_header_map(headers) {
        use tonic_types::StatusExt as _;
        details = service_kit::validation::violated_fields(&status);
        if let Some(info) = status.get_details_error_info() {
            details.push(format!("reason:{}", info.reason));
        }
    }
    Some(Answer::Grpc {
        http,
        code: tonic::Code::from_i32(code),
        message,
        details,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len() + 1
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answer_from_error(err: &h2::Error) -> Answer {
    match err.reason() {
        Some(reason) if !err.is_go_away() && !err.is_io() => Answer::Reset(reason),
        _ => Answer::Connection(err.to_string()),
    }
}

/// HTTP/2 frame types (RFC 9113 §6).
pub mod frame_type {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flags {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
}

/// HTTP/2 error codes.
pub mod error_code {
    /// NO_ERROR.
    pub const NO_ERROR: u32 = 0x0;
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    /// FRAME_SIZE_ERROR.
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    /// CANCEL.
    pub const CANCEL: u32 = 0x8;
    /// COMPRESSION_ERROR.
    pub const COMPRESSION_ERROR: u32 = 0x9;
    /// ENHANCE_YOUR_CALM.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One HTTP/2 frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Its type.
    pub kind: u8,
    /// Its flags.
    pub flags: u8,
    /// Its stream.
    pub stream_id: u32,
    /// Its payload.
    pub payload: Bytes,
}

/// A connection that writes HTTP/2 frames by hand over raw TCP.
#[derive(Debug)]
pub struct RawConnection {
    stream: TcpStream,
    addr: SocketAddr,
    read: BytesMut,
}

/// The client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl RawConnection {
    /// Opens a TCP connection and sends the preface and an empty SETTINGS frame.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut connection = Self::open_tcp(addr).await?;
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&frame(frame_type::SETTINGS, 0, 0, &[]));
        connection.send(&hello).await?;
        Ok(connection)
    }

    /// Opens a TCP connection and sends nothing.
    pub async fn open_tcp(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr).await?,
            addr,
            read: BytesMut::new(),
        })
    }

    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// A HEADERS block (HPACK literals, no Huffman, no indexing) for a gRPC POST to
    /// `path` with `metadata`.
    pub fn request_headers(&self, path: &str, metadata: &[(&str, &str)]) -> Vec<u8> {
        let authority = self.addr.to_string();
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .into_iter()
        .chain(metadata.iter().copied())
        {
            hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
        }
        block
    }

    /// Reads the next frame; `None` at end of stream (or a reset connection).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.read.len() >= 9 {
                let length = (usize::from(self.read[0]) << 16)
                    | (usize::from(self.read[1]) << 8)
                    | usize::from(self.read[2]);
                if self.read.len() >= 9 + length {
                    let head = self.read.split_to(9);
                    let payload = self.read.split_to(length).freeze();
                    let stream_id =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Some(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream_id,
                        payload,
                    });
                }
            }
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads (bounded by the liveness bound) until the server sends GOAWAY, returning its
    /// error code, or `None` when the connection closed without one. RST_STREAM codes
    /// seen on the way are collected in `resets`.
    pub async fn until_goaway(&mut self, resets: &mut Vec<u32>) -> Option<u32> {
        let read = async {
            while let Some(frame) = self.read_frame().await {
                match frame.kind {
                    frame_type::GOAWAY if frame.payload.len() >= 8 => {
                        let p = &frame.payload;
                        return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                    }
                    frame_type::RST_STREAM if frame.payload.len() >= 4 => {
                        let p = &frame.payload;
                        resets.push(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                    }
                    _ => {}
                }
            }
            None
        };
        tokio::time::timeout(crate::LIVENESS, read)
            .await
            .ok()
            .flatten()
    }
}

impl RawConnection {
    /// Whether the server closes the connection within the liveness bound (frames it
    /// sends on the way, such as its SETTINGS, are skipped).
    pub async fn closed_by_server(&mut self) -> bool {
        let drained = async { while self.read_frame().await.is_some() {} };
        tokio::time::timeout(crate::LIVENESS, drained).await.is_ok()
    }
}

/// One frame.
pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len();
    let mut out = Vec::with_capacity(9 + length);
    out.extend_from_slice(&[(length >> 16) as u8, (length >> 8) as u8, length as u8]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2).
pub fn hpack_literal(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.push(0x00);
    hpack_string(block, name);
    hpack_string(block, value);
}

fn hpack_string(block: &mut Vec<u8>, text: &[u8]) {
    hpack_integer(block, 0x00, 7, text.len());
    block.extend_from_slice(text);
}

/// An HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1).
fn hpack_integer(block: &mut Vec<u8>, first_byte: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        block.push(first_byte | value as u8);
        return;
    }
    block.push(first_byte | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        block.push((rest % 128 + 128) as u8);
        rest /= 128;
    }
    block.push(rest as u8);
}
