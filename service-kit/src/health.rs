//! Health reporting: `grpc.health.v1.Health` with an overall status (`""`), a
//! `readiness` status (what Kubernetes probes ask), and one status per served service.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service name Kubernetes readiness probes and load balancers ask for.
pub const READINESS: &str = "readiness";

/// A handle to flip a server's health statuses; cheap to clone.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    names: Vec<String>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("names", &self.names)
            .finish()
    }
}

impl Health {
    pub(crate) fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            names: vec![String::new(), READINESS.to_owned()],
        }
    }

    pub(crate) fn track(&mut self, service_name: &str) {
        if !self.names.iter().any(|name| name == service_name) {
            self.names.push(service_name.to_owned());
        }
    }

    /// Marks the server and every service SERVING.
    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Marks the server and every service NOT_SERVING (first step of shutdown).
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    /// Sets only the `readiness` status, e.g. while a dependency is down.
    pub async fn set_ready(&self, ready: bool) {
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(READINESS, status).await;
    }

    /// Sets one tracked service's status, e.g. a gateway's upstream whose endpoints are
    /// all tripped.
    pub async fn set_service_serving(&self, service_name: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service_name, status).await;
    }

    async fn set_all(&self, status: ServingStatus) {
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }
}
