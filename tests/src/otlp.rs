//! A small OTLP collector for tests: the OTLP/gRPC trace and metrics export services on
//! `127.0.0.1:0`, keeping every span and metric data point it is sent (flattened, with
//! the reporting service's name), and the text of every export request so tests can scan
//! exported telemetry for secrets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use secrecy::ExposeSecret as _;

use crate::LIVENESS;
use crate::postgres::TestDatabase;
use crate::process::SpawnedService;

/// A span as the collector received it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id; empty for a root.
    pub parent_span_id: String,
    /// OTLP span kind (2 = server, 3 = client).
    pub kind: i32,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// The spans it links to: (hex trace id, hex span id).
    pub links: Vec<(String, String)>,
}

/// OTLP span kind `SERVER`.
pub const KIND_SERVER: i32 = 2;
/// OTLP span kind `CLIENT`.
pub const KIND_CLIENT: i32 = 3;

/// One data point of a metric, as received.
#[derive(Debug, Clone)]
pub struct CollectedPoint {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The metric's name.
    pub metric: String,
    /// The point's attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// The point's value: a sum's or gauge's value, a histogram's count.
    pub value: f64,
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<CollectedSpan>,
    points: Vec<CollectedPoint>,
    /// Every export request, Debug-formatted.
    requests: Vec<String>,
}

#[derive(Debug, Clone)]
struct Sink {
    received: Arc<Mutex<Received>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Sink {
    fn with(&self, change: impl FnOnce(&mut Received)) {
        if let Ok(mut received) = self.received.lock() {
            change(&mut received);
        }
        self.changed.send_modify(|version| *version += 1);
    }
}

/// The collector; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    sink: Sink,
    task: JoinHandle<()>,
}

impl Collector {
    /// Starts a collector on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let sink = Sink {
            received: Arc::default(),
            changed: Arc::new(changed),
        };
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .add_service(MetricsServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            // Ends only when the test drops the collector.
            let _ = server.await;
        });
        Ok(Self { addr, sink, task })
    }

    /// `http://<addr>`: the value of `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment that makes a service export here, as `service_name`, soon:
    /// spans batched for at most 100 ms, metrics every 500 ms.
    pub fn env(&self, service_name: &str) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint()),
            ("OTEL_SERVICE_NAME", service_name.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_owned()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.read(|received| received.spans.clone())
    }

    /// Every metric data point received so far.
    pub fn points(&self) -> Vec<CollectedPoint> {
        self.read(|received| received.points.clone())
    }

    /// The text of every export request received so far.
    pub fn requests(&self) -> Vec<String> {
        self.read(|received| received.requests.clone())
    }

    fn read<T: Default>(&self, f: impl FnOnce(&Received) -> T) -> T {
        self.sink
            .received
            .lock()
            .map(|received| f(&received))
            .unwrap_or_default()
    }

    /// Waits (at most [`LIVENESS`]) until `done` holds for what was received, naming
    /// `what` when it does not.
    pub async fn wait_for(
        &self,
        what: &str,
        mut done: impl FnMut(&[CollectedSpan], &[CollectedPoint]) -> bool,
    ) -> anyhow::Result<()> {
        let mut changed = self.sink.changed.subscribe();
        tokio::time::timeout(LIVENESS, async {
            loop {
                if self.read(|received| done(&received.spans, &received.points)) {
                    return Ok(());
                }
                changed.changed().await?;
            }
        })
        .await
        .with_context(|| format!("the collector did not receive {what} within {LIVENESS:?}"))?
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let request = request.into_inner();
        let text = format!("{request:?}");
        let mut spans = Vec::new();
        for resource_spans in request.resource_spans {
            let service = service_name(resource_spans.resource.as_ref().map(|r| &r.attributes));
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(CollectedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                        status_code: span.status.map(|s| s.code).unwrap_or_default(),
                        links: span
                            .links
                            .iter()
                            .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                            .collect(),
                    });
                }
            }
        }
        self.with(|received| {
            received.spans.extend(spans);
            received.requests.push(text);
        });
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let request = request.into_inner();
        let text = format!("{request:?}");
        let mut points = Vec::new();
        for resource_metrics in request.resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref().map(|r| &r.attributes));
            for scope_metrics in resource_metrics.scope_metrics {
                for metric in scope_metrics.metrics {
                    let mut point = |attrs: &[KeyValue], value: f64| {
                        points.push(CollectedPoint {
                            service: service.clone(),
                            metric: metric.name.clone(),
                            attributes: attributes(attrs),
                            value,
                        });
                    };
                    match &metric.data {
                        Some(Data::Sum(sum)) => {
                            for p in &sum.data_points {
                                point(&p.attributes, number(p.value.as_ref()));
                            }
                        }
                        Some(Data::Gauge(gauge)) => {
                            for p in &gauge.data_points {
                                point(&p.attributes, number(p.value.as_ref()));
                            }
                        }
                        Some(Data::Histogram(histogram)) => {
                            for p in &histogram.data_points {
                                #[allow(clippy::cast_precision_loss)]
                                point(&p.attributes, p.count as f64);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.with(|received| {
            received.points.extend(points);
            received.requests.push(text);
        });
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The value of the last point of `metric` from `service` whose attributes include
/// every pair of `labels` (cumulative sums: the last export holds the total), when any
/// arrived.
pub fn latest(
    points: &[CollectedPoint],
    service: &str,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    points
        .iter()
        .rev()
        .find(|point| {
            point.service == service
                && point.metric == metric
                && labels.iter().all(|(key, value)| {
                    point.attributes.get(*key).map(String::as_str) == Some(*value)
                })
        })
        .map(|point| point.value)
}

fn number(
    value: Option<&opentelemetry_proto::tonic::metrics::v1::number_data_point::Value>,
) -> f64 {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    match value {
        Some(Number::AsDouble(v)) => *v,
        #[allow(clippy::cast_precision_loss)]
        Some(Number::AsInt(v)) => *v as f64,
        None => 0.0,
    }
}

fn service_name(attributes: Option<&Vec<KeyValue>>) -> String {
    attributes
        .map(|attrs| self::attributes(attrs))
        .and_then(|attrs| attrs.get("service.name").cloned())
        .unwrap_or_default()
}

fn attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The whole path of a payment as real processes exporting to one collector: the
/// standalone sandbox acquirer, payment-svc calling it remotely (so the remote connector
/// and its propagation run), and gateway-svc in front with one API key; optionally
/// ratelimit-svc behind the gateway's rate limiting ([`TracedStack::start_rate_limited`]).
#[derive(Debug)]
pub struct TracedStack {
    /// The sandbox acquirer process.
    pub acquirer: SpawnedService,
    /// The payment-svc process.
    pub payment: SpawnedService,
    /// The gateway-svc process.
    pub gateway: SpawnedService,
    /// The ratelimit-svc process, when the gateway limits rates.
    pub ratelimit: Option<SpawnedService>,
    /// An API key of tenant `acme` (tier `standard`) holding the write scopes.
    pub api_key: String,
    /// An API key of a fresh `tryout-…` tenant in tier `trial` (3 writes a day), write
    /// scopes.
    pub trial_key: String,
    _dir: tempfile::TempDir,
}

impl TracedStack {
    /// Starts the three processes on `database`, exporting to `collector`, each also
    /// given `extra` (e.g. `RUST_LOG`).
    pub async fn start(
        collector: &Collector,
        database: &TestDatabase,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_with(collector, database, None, extra).await
    }

    /// [`TracedStack::start`] plus ratelimit-svc (the gateway's rules, on the Redis at
    /// `redis_url`), also exporting to `collector`, and the gateway limiting through it.
    pub async fn start_rate_limited(
        collector: &Collector,
        database: &TestDatabase,
        redis_url: &str,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_with(collector, database, Some(redis_url), extra).await
    }

    async fn start_with(
        collector: &Collector,
        database: &TestDatabase,
        ratelimit_redis: Option<&str>,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Self> {
        let with = |mut envs: Vec<(&'static str, String)>, service: &str| {
            envs.extend(collector.env(service));
            envs.extend(extra.iter().cloned());
            envs
        };
        let acquirer =
            SpawnedService::start("sandbox-acquirer", &with(Vec::new(), "sandbox-acquirer"))
                .await?;
        let payment = SpawnedService::start(
            "payment-svc",
            &with(
                vec![
                    ("DATABASE_URL", database.service_url()),
                    ("DATABASE_MIGRATION_URL", database.owner_url()),
                    ("ACQUIRER_URL", acquirer.endpoint()),
                ],
                "payment-svc",
            ),
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let mut envs = crate::gateway::spawned_env(dir.path())?;
        let pepper = gateway_svc::keys::Pepper::new(crate::gateway::TEST_PEPPER.to_owned().into())?;
        let scopes: Vec<String> = crate::gateway::WRITE_SCOPES
            .iter()
            .map(|scope| (*scope).to_owned())
            .collect();
        let generated = gateway_svc::keys::generate(&pepper, "acme", &scopes, "standard")?;
        // A tenant of its own: trial counters live a day in a shared Redis.
        let trial_tenant = format!("tryout-{}", uuid::Uuid::new_v4().simple());
        let trial = gateway_svc::keys::generate(&pepper, &trial_tenant, &scopes, "trial")?;
        std::fs::write(
            dir.path().join("api-keys.yaml"),
            format!("{}\n{}\n", generated.line, trial.line),
        )?;
        envs.push(("PAYMENT_SVC_ADDR", payment.endpoint()));
        let ratelimit = match ratelimit_redis {
            Some(redis_url) => {
                let ratelimit = SpawnedService::start(
                    "ratelimit-svc",
                    &with(
                        crate::gateway::ratelimit_rules_env(redis_url),
                        "ratelimit-svc",
                    ),
                )
                .await?;
                envs.push(("RATELIMIT_SVC_ADDR", ratelimit.endpoint()));
                Some(ratelimit)
            }
            None => None,
        };
        let gateway = SpawnedService::start("gateway-svc", &with(envs, "gateway-svc")).await?;
        Ok(Self {
            acquirer,
            payment,
            gateway,
            ratelimit,
            api_key: generated.key.expose_secret().to_owned(),
            trial_key: trial.key.expose_secret().to_owned(),
            _dir: dir,
        })
    }

    /// A channel to the gateway.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Channel::from_shared(self.gateway.endpoint())?
                .connect()
                .await?,
        )
    }
}
