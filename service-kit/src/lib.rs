//! What every paysuite service needs to run, and nothing about payments.
//!
//! - [`server`]: the gRPC server — routes plus health and reflection (v1 and v1alpha),
//!   served under [`ServerLimits`], with graceful shutdown.
//! - [`limits`]: [`ServerLimits`], every resource bound a server enforces.
//! - [`message_size`]: oversize request messages → RESOURCE_EXHAUSTED from the length prefix.
//! - [`malformed`]: undecodable requests → INVALID_ARGUMENT instead of tonic's INTERNAL.
//! - [`deadline`]: the caller's `grpc-timeout`.
//! - [`health`]: the health statuses, including `readiness`.
//! - [`identity`]: Ed25519 identity tokens between the gateway and the services.
//! - [`shutdown`]: the SIGTERM / Ctrl-C signal.
//! - [`telemetry`]: JSON logs, OTLP traces and metrics when configured, W3C trace
//!   context in and out.
//! - [`rpc_telemetry`]: the span and RED metrics of every call a server answers.
//! - [`breaker`]: the circuit breaker (Closed, Open, HalfOpen).
//! - [`config`]: typed settings from environment variables.
//! - [`validation`]: INVALID_ARGUMENT with one field violation per bad field.

pub mod breaker;
pub mod config;
pub mod deadline;
pub mod health;
pub mod identity;
pub mod limits;
pub mod malformed;
pub mod message_size;
pub mod rpc_telemetry;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod validation;

pub use config::{ConfigError, Env};
pub use health::Health;
pub use identity::{Identity, IdentityConfig};
pub use limits::ServerLimits;
pub use server::{ServeError, ServerStats, ServiceSet, serve};
