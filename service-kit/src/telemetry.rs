//! Logs, traces and metrics.
//!
//! Logs are JSON lines on stdout, filtered by `RUST_LOG` (default `info`). Traces and
//! metrics are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
//! otherwise no exporter, no background task and no per-span export cost exist, and trace
//! context is neither read nor written. The standard `OTEL_*` variables (service name,
//! resource attributes, sampler, batch delay, metric export interval) are read by the
//! OpenTelemetry SDK itself.
//!
//! With export on, every log line written inside a span carries that span's `trace_id`
//! and `span_id`, and W3C trace context travels in the `traceparent`/`tracestate`
//! headers: [`extract`] on the server side (the RPC layer in [`crate::rpc_telemetry`]),
//! [`inject`] and [`inject_metadata`] on the client side.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether OTLP export is on (set once by [`init`]): trace context is only read and
/// written when it is.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: where traces and metrics go; unset turns export off.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_SERVICE_NAME`: overrides the service name reported in telemetry.
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// `RUST_LOG`: the log filter, e.g. `info` or `payment_svc=debug,info`.
pub const ENV_LOG_FILTER: &str = "RUST_LOG";

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("RUST_LOG: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// An OTLP exporter could not be built from the `OTEL_*` settings.
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The installed telemetry; call [`Telemetry::shutdown`] before exiting to flush exports.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

/// Installs JSON logging and, when configured, OTLP export for `service_name`.
/// Must run inside the Tokio runtime (the OTLP exporter uses a tonic channel).
pub fn init(service_name: &'static str) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var(ENV_LOG_FILTER) {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::new("info"),
    };
    // Span fields must be recorded as JSON for the JSON event format to embed them.
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .fmt_fields(AppendingJsonFields::default())
        .event_format(WithTraceIds(
            format::json()
                .with_current_span(true)
                .with_span_list(false)
                .with_target(true),
        ));

    let otlp_enabled = std::env::var_os(ENV_OTLP_ENDPOINT).is_some_and(|v| !v.is_empty());
    let (tracer_provider, meter_provider) = if otlp_enabled {
        let resource = resource(service_name);
        let span_exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(span_exporter)
            .with_resource(resource.clone())
            .build();
        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?;
        let meter_provider = SdkMeterProvider::builder()
            .with_periodic_exporter(metric_exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(meter_provider.clone());
        opentelemetry::global::set_tracer_provider(tracer_provider.clone());
        (Some(tracer_provider), Some(meter_provider))
    } else {
        (None, None)
    };
    if otlp_enabled {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }

    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(exported_spans())
            .boxed()
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if otlp_enabled {
        EXPORTING.store(true, Ordering::Release);
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
    })
}

/// What becomes spans and span events: INFO and above (our RPC, SQL, Redis, acquirer
/// and job spans), never the HTTP/2 and gRPC plumbing — the exporter itself runs on it,
/// and exporting its spans would feed on itself — nor the SDK's own logs.
fn exported_spans() -> tracing_subscriber::filter::Targets {
    use tracing::level_filters::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::INFO)
        .with_targets(
            [
                "h2",
                "hyper",
                "hyper_util",
                "tonic",
                "tower",
                "opentelemetry",
                "opentelemetry_sdk",
                "opentelemetry_otlp",
            ]
            .map(|target| (target, LevelFilter::OFF)),
        )
}

fn resource(service_name: &'static str) -> Resource {
    let builder = Resource::builder();
    // OTEL_SERVICE_NAME, read by the builder, wins over the built-in name.
    if std::env::var_os(ENV_SERVICE_NAME).is_some() {
        builder.build()
    } else {
        builder.with_service_name(service_name).build()
    }
}

impl Telemetry {
    /// Flushes and stops the exporters. The SDK's shutdown blocks on the export, which can
    /// deadlock a Tokio worker, so it runs on the blocking pool.
    pub async fn shutdown(self) {
        let Telemetry {
            tracer_provider,
            meter_provider,
        } = self;
        if tracer_provider.is_none() && meter_provider.is_none() {
            return;
        }
        let flushed = tokio::task::spawn_blocking(move || {
            if let Some(provider) = tracer_provider
                && let Err(err) = provider.shutdown()
            {
                tracing::warn!(error = %err, "trace exporter shutdown failed");
            }
            if let Some(provider) = meter_provider
                && let Err(err) = provider.shutdown()
            {
                tracing::warn!(error = %err, "metric exporter shutdown failed");
            }
        })
        .await;
        if let Err(err) = flushed {
            tracing::warn!(error = %err, "telemetry shutdown task failed");
        }
    }
}

/// `OTEL_METRIC_EXPORT_INTERVAL`: milliseconds between metric exports (read by the SDK).
pub const ENV_METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// The metric export interval (`OTEL_METRIC_EXPORT_INTERVAL`, the SDK's 60 s by default),
/// so that values read periodically for gauges are as fresh as the exports need.
pub fn metric_export_interval() -> std::time::Duration {
    std::env::var(ENV_METRIC_EXPORT_INTERVAL)
        .ok()
        .and_then(|millis| millis.trim().parse::<u64>().ok())
        .filter(|millis| *millis > 0)
        .map_or(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis,
        )
}

/// Whether traces and metrics are exported (OTLP configured and [`init`] done).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// The caller's trace context from W3C `traceparent`/`tracestate` headers (an empty
/// context when there is none or export is off).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    if !exporting() {
        return opentelemetry::Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// Writes the current span's trace context into outgoing request headers (replacing
/// any the caller sent); nothing when export is off.
pub fn inject(headers: &mut http::HeaderMap) {
    inject_span(&tracing::Span::current(), headers);
}

/// Writes `span`'s trace context into outgoing request headers.
pub fn inject_span(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if !exporting() {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Writes `span`'s trace context into a tonic request's metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    if !exporting() {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Makes `span` continue the trace in `parent` (a remote caller's, or the one that
/// enqueued a job). Must run before the span is first entered.
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if exporting() && parent.span().span_context().is_valid() {
        // Only fails when the span already started or export is off; the span then
        // simply starts a trace of its own.
        let _ = span.set_parent(parent);
    }
}

/// The current span's context as a `traceparent` value, to store with work done later
/// (a job); `None` when export is off or no span is sampled.
pub fn current_traceparent() -> Option<String> {
    if !exporting() {
        return None;
    }
    let mut headers = http::HeaderMap::new();
    inject(&mut headers);
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// The context a stored `traceparent` names (see [`current_traceparent`]).
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", value);
    }
    extract(&headers)
}

/// Links `span` to the span a stored `traceparent` names (work done later on behalf of
/// that request, such as a job); nothing when export is off or the value is unusable.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    if !exporting() {
        return;
    }
    let linked = context_from_traceparent(traceparent);
    let span_context = linked.span().span_context().clone();
    if span_context.is_valid() {
        span.add_link(span_context);
    }
}

/// Records who is calling on the current RPC span (the principal, never a credential).
pub fn record_principal(principal: &str) {
    tracing::Span::current().record("rpc.principal", principal);
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Span fields as a JSON object, like [`format::JsonFields`], except that a field
/// recorded later (an RPC's principal, its status) is appended to the object instead of
/// the object being parsed and written again: that was two JSON round trips per call.
/// A field recorded twice then appears twice; the JSON event format reads the object
/// into a map, where the later value wins.
#[derive(Debug, Default)]
struct AppendingJsonFields(format::JsonFields);

impl<'writer> FormatFields<'writer> for AppendingJsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        self.0.format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        if current.fields.is_empty() {
            return self.0.format_fields(current.as_writer(), fields);
        }
        let mut added = String::new();
        self.0.format_fields(Writer::new(&mut added), fields)?;
        // Nothing added, or current fields that are not an object (never written by
        // this formatter): left as they are.
        let Some(rest) = added.strip_prefix('{').filter(|rest| *rest != "}") else {
            return Ok(());
        };
        if !current.fields.ends_with('}') {
            return Ok(());
        }
        current.fields.pop();
        if !current.fields.ends_with('{') {
            current.fields.push(',');
        }
        current.fields.push_str(rest);
        Ok(())
    }
}

/// The JSON event format with the current span's `trace_id` and `span_id` in front, so
/// a log line can be found from its trace and the other way round.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = exporting().then(|| trace_ids(ctx)).flatten();
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// The ids of the span the event happened in, when it belongs to a valid trace.
///
/// Read from the thread's current OpenTelemetry context (the layer attaches a span's
/// context while it is entered), not from the span's own data: that is locked while the
/// layer builds the span, and the SDK may log from inside that.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    ctx.lookup_current()?;
    opentelemetry::Context::map_current(|context| {
        let span = context.span();
        let span_context = span.span_context();
        span_context.is_valid().then(|| {
            (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_recorded_later_are_appended_to_the_span_s_json_object() -> anyhow::Result<()> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(AppendingJsonFields::default())
                .event_format(format::json().with_current_span(true))
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                rpc.method = "/a.B/C",
                rpc.principal = tracing::field::Empty,
                rpc.grpc.status_code = tracing::field::Empty,
                note = tracing::field::Empty,
            );
            span.record("rpc.principal", "merchant \"one\"");
            span.record("rpc.grpc.status_code", 5);
            span.record("rpc.grpc.status_code", 0);
            span.in_scope(|| tracing::info!("inside"));
        });
        let output = captured.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let line: serde_json::Value = serde_json::from_slice(&output)?;
        let span = &line["span"];
        assert_eq!(span["rpc.method"], "/a.B/C");
        assert_eq!(span["rpc.principal"], "merchant \"one\"");
        // Recorded twice: the later value wins.
        assert_eq!(span["rpc.grpc.status_code"], 0);
        assert!(span.get("note").is_none());
        Ok(())
    }
}
