//! Logs, traces and metrics.
//!
//! Logs are JSON lines on stdout, filtered by `RUST_LOG` (default `info`). Traces and
//! metrics are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
//! otherwise no exporter, no background task and no per-span export cost exist. The
//! standard `OTEL_*` variables (service name, resource attributes, sampler, export
//! interval) are read by the OpenTelemetry SDK itself.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true);

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
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .boxed()
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if otlp_enabled {
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
    })
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
