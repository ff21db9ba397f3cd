//! The integration and end-to-end tests, one module per area (one binary, so the
//! workspace links it once). Tests whose name contains `spawned` start several processes
//! and run serially (see `.config/nextest.toml`).

mod acquirer;
mod background;
mod bank;
mod canary;
mod database;
mod envoy;
mod fuzz;
mod gateway;
mod gateway_breaker;
mod gateway_dns;
mod gateway_ratelimit;
mod gateway_retry;
mod hostile;
mod idempotency;
mod identity;
mod jobs;
mod ledger;
mod ledger_model;
mod lifecycle;
mod limits;
mod payments;
mod ratelimit;
mod ratelimit_cluster;
mod ratelimit_distributed;
mod ratelimit_faults;
mod ratelimit_tls;
mod reconcile;
mod reflection;
mod shutdown;
mod streams;
mod takeover;
mod telemetry;
mod vault;
