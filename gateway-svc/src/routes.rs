//! Which upstream cluster answers which paysuite service.
//!
//! By default two clusters come from the environment (`PAYMENT_SVC_ADDR`,
//! `RATELIMIT_SVC_ADDR`: comma-separated `http://host:port` endpoints); a YAML routes file
//! (`ROUTES_FILE`) replaces them:
//!
//! ```yaml
//! clusters:
//!   - name: payments
//!     audience: payment-svc          # the identity tokens' `aud`
//!     endpoints: [http://payment-0.payment:50052, http://payment-1.payment:50052]
//!     services: [paysuite.payments.v1.PaymentService, paysuite.payments.v1.PaymentAdminService]
//! ```
//!
//! Only paysuite services the contract declares can be routed, each to one cluster; the
//! acquirer's services never are (payment-svc alone talks to the acquirer), nor the
//! gateway's own API (served here).

use std::collections::BTreeSet;

use http::Uri;

/// The cluster name of payment-svc.
pub const PAYMENTS: &str = "payments";
/// The cluster name of ratelimit-svc.
pub const RATELIMIT: &str = "ratelimit";

/// Services that are never routed to an upstream.
const NEVER_ROUTED_PREFIXES: [&str; 2] = ["paysuite.acquirer.", "paysuite.gateway."];

/// One upstream cluster: interchangeable endpoints serving the same services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// For logs and the admin API.
    pub name: String,
    /// The `aud` of identity tokens minted for it (the service's `IDENTITY_AUDIENCE`).
    pub audience: String,
    /// `http://host:port` of each endpoint.
    pub endpoints: Vec<Uri>,
    /// Full names of the services it answers, e.g. `paysuite.payments.v1.PaymentService`.
    pub services: Vec<String>,
}

/// Every cluster and what it serves; valid by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    clusters: Vec<Cluster>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    clusters: Vec<ClusterEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterEntry {
    name: String,
    audience: String,
    endpoints: Vec<String>,
    services: Vec<String>,
}

impl RouteTable {
    /// payment-svc and ratelimit-svc at the given comma-separated endpoint lists.
    pub fn standard(payment_endpoints: &str, ratelimit_endpoints: &str) -> Result<Self, String> {
        Self::new(vec![
            ClusterEntry {
                name: PAYMENTS.to_owned(),
                audience: "payment-svc".to_owned(),
                endpoints: split_list(payment_endpoints),
                services: vec![
                    "paysuite.payments.v1.PaymentService".to_owned(),
                    "paysuite.payments.v1.PaymentAdminService".to_owned(),
                ],
            },
            ClusterEntry {
                name: RATELIMIT.to_owned(),
                audience: "ratelimit-svc".to_owned(),
                endpoints: split_list(ratelimit_endpoints),
                services: vec!["paysuite.ratelimit.v1.RateLimitService".to_owned()],
            },
        ])
    }

    /// The clusters of a routes file.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let file: RoutesFile = yaml_serde::from_str(text).map_err(|err| err.to_string())?;
        Self::new(file.clusters)
    }

    fn new(entries: Vec<ClusterEntry>) -> Result<Self, String> {
        let known: BTreeSet<String> = proto::policy::paysuite_service_names()
            .into_iter()
            .collect();
        let mut routed = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut clusters = Vec::with_capacity(entries.len());
        for entry in entries {
            let name = entry.name;
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(format!(
                    "cluster names must be unique and non-empty ({name:?})"
                ));
            }
            if entry.audience.is_empty() {
                return Err(format!("cluster {name}: audience is empty"));
            }
            if entry.endpoints.is_empty() {
                return Err(format!("cluster {name}: no endpoints"));
            }
            let endpoints = entry
                .endpoints
                .iter()
                .map(|endpoint| {
                    parse_endpoint(endpoint).map_err(|err| format!("cluster {name}: {err}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            for service in &entry.services {
                if NEVER_ROUTED_PREFIXES
                    .iter()
                    .any(|prefix| service.starts_with(prefix))
                {
                    return Err(format!("cluster {name}: {service} is never routed"));
                }
                if !known.contains(service) {
                    return Err(format!(
                        "cluster {name}: {service} is not a paysuite service"
                    ));
                }
                if !routed.insert(service.clone()) {
                    return Err(format!("cluster {name}: {service} is routed twice"));
                }
            }
            clusters.push(Cluster {
                name,
                audience: entry.audience,
                endpoints,
                services: entry.services,
            });
        }
        Ok(Self { clusters })
    }

    /// The clusters, in configuration order.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }
}

pub(crate) fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `http://host:port` (plaintext HTTP/2 inside the cluster network; no path).
pub(crate) fn parse_endpoint(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|err| format!("endpoint {text:?} is not a URI: {err}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("endpoint {text:?} must start with http://"));
    }
    if uri
        .authority()
        .and_then(|authority| authority.port_u16())
        .is_none()
    {
        return Err(format!("endpoint {text:?} must name a host and port"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("endpoint {text:?} must not have a path"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_table_routes_payments_and_ratelimit() -> Result<(), String> {
        let table = RouteTable::standard(
            "http://127.0.0.1:50052, http://127.0.0.1:60052",
            "http://127.0.0.1:50053",
        )?;
        let payments = &table.clusters()[0];
        assert_eq!(payments.audience, "payment-svc");
        assert_eq!(payments.endpoints.len(), 2);
        assert_eq!(
            table.clusters()[1].services,
            ["paysuite.ratelimit.v1.RateLimitService"]
        );
        Ok(())
    }

    #[test]
    fn a_routes_file_is_checked() {
        let file = |services: &str, endpoints: &str| {
            format!(
                "clusters:\n  - name: c\n    audience: a\n    endpoints: [{endpoints}]\n    services: [{services}]\n"
            )
        };
        assert!(
            RouteTable::from_yaml(&file("paysuite.payments.v1.PaymentService", "http://h:1"))
                .is_ok()
        );
        for (text, expected) in [
            (
                file("paysuite.acquirer.v1.AcquirerService", "http://h:1"),
                "never routed",
            ),
            (
                file("paysuite.gateway.v1.GatewayAdminService", "http://h:1"),
                "never routed",
            ),
            (
                file("paysuite.nope.v1.Nope", "http://h:1"),
                "not a paysuite service",
            ),
            (
                file(
                    "paysuite.payments.v1.PaymentService, paysuite.payments.v1.PaymentService",
                    "http://h:1",
                ),
                "routed twice",
            ),
            (
                file("paysuite.payments.v1.PaymentService", "https://h:1"),
                "http://",
            ),
            (
                file("paysuite.payments.v1.PaymentService", "http://h"),
                "host and port",
            ),
            (
                file("paysuite.payments.v1.PaymentService", ""),
                "no endpoints",
            ),
        ] {
            let err = RouteTable::from_yaml(&text).err().unwrap_or_default();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
