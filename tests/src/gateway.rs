//! gateway-svc in-process for tests: its API keys file in a temporary directory (keys
//! added and removed while it runs), optionally TLS with a throwaway certificate
//! authority, upstreams at the given endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use gateway_svc::config::Listener;
use gateway_svc::keys::Pepper;
use gateway_svc::routes::RouteTable;
use gateway_svc::{Config, Gateway, GatewayStats};
use secrecy::ExposeSecret as _;
use service_kit::identity::SigningKey;
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::services::RunningService;

/// An address nothing listens on (the discard port on loopback is closed): calls routed
/// there fail fast with UNAVAILABLE.
pub const NOWHERE: &str = "http://127.0.0.1:9";

/// Scopes of a tenant allowed to write.
pub const WRITE_SCOPES: [&str; 2] = ["payments:read", "payments:write"];

/// What a test gateway fronts and how it listens.
#[derive(Debug)]
pub struct GatewayOptions {
    /// payment-svc endpoints (`http://…`), comma-separated.
    pub payment: String,
    /// ratelimit-svc endpoints.
    pub ratelimit: String,
    /// Serve TLS with a throwaway certificate for `localhost` and `127.0.0.1`.
    pub tls: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            payment: NOWHERE.to_owned(),
            ratelimit: NOWHERE.to_owned(),
            tls: false,
        }
    }
}

/// A gateway running in this process.
#[derive(Debug)]
pub struct TestGateway {
    service: RunningService,
    stats: GatewayStats,
    keys: KeysFile,
    tls_ca: Option<PathBuf>,
    // Holds the keys file and certificates; removed when the gateway is dropped.
    _dir: TempDir,
}

/// The gateway's API keys file, which tests edit while it runs.
#[derive(Debug, Clone)]
pub struct KeysFile {
    path: PathBuf,
    pepper: Pepper,
    /// The file's line of each key this harness generated, in file order.
    lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl KeysFile {
    /// A keys file at `path` with no keys yet, for gateway-svc processes to read.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let keys = Self {
            path: path.to_owned(),
            pepper: pepper()?,
            lines: Arc::default(),
        };
        keys.edit(|_| {})?;
        Ok(keys)
    }

    /// Generates a key for `principal` with `scopes` and `tier`, adds its line to the file
    /// and returns the key.
    pub fn add(&self, principal: &str, scopes: &[&str], tier: &str) -> anyhow::Result<String> {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        let generated = gateway_svc::keys::generate(&self.pepper, principal, &scopes, tier)?;
        let key = generated.key.expose_secret().to_owned();
        self.edit(|lines| lines.push((key.clone(), generated.line)))?;
        Ok(key)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes `key`'s line from the file.
    pub fn remove(&self, key: &str) -> anyhow::Result<()> {
        self.edit(|lines| lines.retain(|(listed, _)| listed != key))
    }

    /// Rewrites the file atomically (write then rename), as a Secret update would.
    fn edit(&self, change: impl FnOnce(&mut Vec<(String, String)>)) -> anyhow::Result<()> {
        let mut lines = self
            .lines
            .lock()
            .map_err(|_| anyhow::anyhow!("keys file lock poisoned"))?;
        change(&mut lines);
        let mut text = String::from("# API keys of a test gateway\n");
        for (_, line) in lines.iter() {
            text.push_str(line);
            text.push('\n');
        }
        write_atomically(&self.path, &text)
    }
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The API key pepper of test gateways, in-process and spawned.
pub const TEST_PEPPER: &str = "test pepper: long enough to key an HMAC-SHA256";

/// A pepper for test gateways.
fn pepper() -> anyhow::Result<Pepper> {
    Ok(Pepper::new(TEST_PEPPER.to_owned().into())?)
}

/// The harness's identity key, which every test upstream trusts.
fn signing_key() -> anyhow::Result<Arc<SigningKey>> {
    let text = crate::identity::signing_key().to_secret_string();
    Ok(Arc::new(SigningKey::parse(&text)?))
}

impl TestGateway {
    /// A gateway in front of `options`' upstreams, with `adjust` applied to its config.
    pub async fn start_with(
        options: GatewayOptions,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let keys = KeysFile {
            path: dir.path().join("api-keys.yaml"),
            pepper: pepper()?,
            lines: Arc::default(),
        };
        keys.edit(|_| {})?;
        let (listener, tls_ca) = if options.tls {
            let tls = write_dev_certificates(dir.path())?;
            (
                Listener::Tls {
                    cert_file: tls.cert,
                    key_file: tls.key,
                },
                Some(tls.ca),
            )
        } else {
            (Listener::Plaintext, None)
        };
        let routes = RouteTable::standard(&options.payment, &options.ratelimit)
            .map_err(|err| anyhow::anyhow!(err))?;
        let placeholder: SocketAddr = "127.0.0.1:0".parse()?;
        let mut config = Config::new(
            placeholder,
            listener,
            routes,
            keys.path.clone(),
            keys.pepper.clone(),
            signing_key()?,
        );
        // Tests add keys while the gateway runs and wait for it to notice.
        config.api_keys_reload_interval = Duration::from_millis(50);
        adjust(&mut config);
        let gateway = Gateway::new(config).await?;
        let stats = gateway.stats();
        let service = RunningService::start(|listener, stopped| async move {
            gateway
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await?;
            Ok(())
        })
        .await?;
        Ok(Self {
            service,
            stats,
            keys,
            tls_ca,
            _dir: dir,
        })
    }

    /// A plaintext gateway in front of `options`' upstreams.
    pub async fn start(options: GatewayOptions) -> anyhow::Result<Self> {
        Self::start_with(options, |_| {}).await
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.service.addr()
    }

    /// `http://<addr>`, for tonic clients (plaintext gateways only).
    pub fn endpoint(&self) -> String {
        self.service.endpoint()
    }

    /// A connected plaintext channel.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.endpoint())?.connect().await?)
    }

    /// The API keys file, edited without waiting for the gateway to notice (tests of the
    /// reload itself).
    pub fn keys(&self) -> &KeysFile {
        &self.keys
    }

    /// Adds a key for `principal` and waits until the gateway has loaded it.
    pub async fn add_key(
        &self,
        principal: &str,
        scopes: &[&str],
        tier: &str,
    ) -> anyhow::Result<String> {
        let before = self.stats.keys.reloads();
        let key = self.keys.add(principal, scopes, tier)?;
        self.wait_for_reload_after(before).await?;
        Ok(key)
    }

    /// Removes `key` and waits until the gateway has dropped it.
    pub async fn remove_key(&self, key: &str) -> anyhow::Result<()> {
        let before = self.stats.keys.reloads();
        self.keys.remove(key)?;
        self.wait_for_reload_after(before).await
    }

    async fn wait_for_reload_after(&self, before: u64) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        while self.stats.keys.reloads() <= before {
            anyhow::ensure!(
                started.elapsed() < crate::LIVENESS,
                "the gateway did not reload its keys"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// The PEM file of the certificate authority its TLS certificate chains to.
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    /// Shuts it down gracefully.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.service.stop().await
    }
}

/// `authorization: Bearer <key>` on `message`.
pub fn with_key<T>(message: T, key: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(request)
}

/// PEM files of a throwaway certificate authority and a server certificate it signed.
#[derive(Debug)]
pub struct DevCertificates {
    /// The authority's certificate (what clients trust).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// Writes a certificate authority and a server certificate for `localhost` and
/// `127.0.0.1` into `dir`.
pub fn write_dev_certificates(dir: &Path) -> anyhow::Result<DevCertificates> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "paysuite test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = server_params.signed_by(&server_key, &ca)?;
    let files = DevCertificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, server.pem())?;
    std::fs::write(&files.key, server_key.serialize_pem())?;
    Ok(files)
}

/// The environment a spawned gateway-svc binary needs (plaintext, an empty keys file in
/// `dir`, the harness's identity key), for tests that signal the real process.
pub fn spawned_env(dir: &Path) -> anyhow::Result<Vec<(&'static str, String)>> {
    let keys_file = dir.join("api-keys.yaml");
    std::fs::write(&keys_file, "# no keys\n")?;
    let signing_key = crate::identity::signing_key().to_secret_string();
    Ok(vec![
        ("TLS_PLAINTEXT", "true".to_owned()),
        ("API_KEYS_FILE", keys_file.to_string_lossy().into_owned()),
        ("API_KEY_PEPPER", TEST_PEPPER.to_owned()),
        (
            "IDENTITY_SIGNING_KEY",
            signing_key.expose_secret().to_owned(),
        ),
    ])
}

/// The rate limit tiers gateway-svc ships for ratelimit-svc
/// (`ratelimit-svc/rules/gateway.yaml`, domain `paysuite-gateway`).
pub fn ratelimit_rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ratelimit-svc/rules/gateway.yaml")
}

/// The environment of a spawned ratelimit-svc serving [`ratelimit_rules_file`] from the
/// Redis at `redis_url`.
pub fn ratelimit_rules_env(redis_url: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            ratelimit_svc::config::ENV_RATELIMIT_CONFIG,
            ratelimit_rules_file().display().to_string(),
        ),
        (ratelimit_svc::config::ENV_REDIS_URL, redis_url.to_owned()),
    ]
}

/// ratelimit-svc in this process serving [`ratelimit_rules_file`] from the Redis at
/// `redis_url`.
pub async fn ratelimit_with_gateway_rules(redis_url: &str) -> anyhow::Result<RunningService> {
    let redis_url = redis_url.to_owned();
    crate::services::ratelimit_with(move |config| {
        config.ratelimit_config = Some(ratelimit_rules_file());
        config.redis_url = Some(redis_url);
    })
    .await
}

/// A plaintext gateway in front of payment-svc at `payment`, rate limiting through the
/// ratelimit-svc at `ratelimit` with the defaults adjusted by `adjust`.
pub async fn rate_limited(
    payment: &str,
    ratelimit: &str,
    adjust: impl FnOnce(&mut gateway_svc::config::RateLimiting),
) -> anyhow::Result<TestGateway> {
    let mut settings = gateway_svc::config::RateLimiting::new(vec![ratelimit.parse()?]);
    adjust(&mut settings);
    TestGateway::start_with(
        GatewayOptions {
            payment: payment.to_owned(),
            ratelimit: ratelimit.to_owned(),
            ..Default::default()
        },
        |config| config.rate_limiting = Some(settings),
    )
    .await
}

/// Scopes of an operator: a tenant's plus `admin` (the gateway's admin API).
pub const ADMIN_SCOPES: [&str; 3] = ["payments:read", "payments:write", "admin"];

/// Breakers that trip after `consecutive_failures` failures in a row and probe after
/// `base_backoff` (up to twice that), so tests see trips and probes soon.
pub fn quick_breakers(config: &mut Config, consecutive_failures: u32, base_backoff: Duration) {
    config.upstream_breaker = service_kit::breaker::BreakerConfig {
        consecutive_failures,
        base_backoff,
        max_backoff: base_backoff * 2,
        ..Default::default()
    };
}

/// A payment-svc binary on `database`, at `listen` when given (a replica restarted on
/// the address it had), for tests that kill it.
pub async fn spawn_payment_svc(
    database: &crate::postgres::TestDatabase,
    listen: Option<SocketAddr>,
) -> anyhow::Result<crate::process::SpawnedService> {
    let mut envs = vec![
        ("DATABASE_URL", database.service_url()),
        ("DATABASE_MIGRATION_URL", database.owner_url()),
    ];
    if let Some(listen) = listen {
        envs.push(("LISTEN_ADDR", listen.to_string()));
    }
    crate::process::SpawnedService::start("payment-svc", &envs).await
}

/// Opens a BRL merchant account through the gateway with `key`; its id.
pub async fn open_merchant(channel: Channel, key: &str) -> anyhow::Result<String> {
    use proto::payments::v1 as pb;
    let account = pb::payment_service_client::PaymentServiceClient::new(channel)
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: uuid::Uuid::new_v4().to_string(),
                currency: "BRL".to_owned(),
                kind: pb::AccountKind::Merchant as i32,
                ..Default::default()
            },
            key,
        )?)
        .await?
        .into_inner()
        .account
        .context("CreateAccount answered no account")?;
    Ok(account.id)
}

/// Waits until `check` holds, at most [`crate::LIVENESS`], naming `what` when it does not.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = tokio::time::Instant::now();
    while !check().await? {
        anyhow::ensure!(
            started.elapsed() < crate::LIVENESS,
            "not within {:?}: {what}",
            crate::LIVENESS
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether `status` is the gateway's UNAVAILABLE/CIRCUIT_OPEN refusal.
pub fn is_circuit_open(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && crate::payments::reason(status).as_deref() == Some(gateway_svc::balance::CIRCUIT_OPEN)
}

impl TestGateway {
    /// The upstream cluster `name` (its endpoints, breakers and counters).
    pub fn upstream(&self, name: &str) -> anyhow::Result<Arc<gateway_svc::balance::Upstream>> {
        self.stats
            .upstream(name)
            .cloned()
            .with_context(|| format!("no upstream {name}"))
    }

    /// The endpoint at `address` of upstream `name`.
    pub fn upstream_endpoint(
        &self,
        name: &str,
        address: SocketAddr,
    ) -> anyhow::Result<Arc<gateway_svc::balance::UpstreamEndpoint>> {
        self.upstream(name)?
            .endpoint(&address.to_string())
            .with_context(|| format!("upstream {name} has no endpoint {address}"))
    }

    /// Sets a breaker override through the admin API, with `key`.
    pub async fn set_breaker(
        &self,
        key: &str,
        upstream: &str,
        address: SocketAddr,
        forced: proto::gateway::v1::BreakerOverride,
    ) -> anyhow::Result<proto::gateway::v1::Endpoint> {
        use proto::gateway::v1::gateway_admin_service_client::GatewayAdminServiceClient;
        let mut admin = GatewayAdminServiceClient::new(self.channel().await?);
        let request = proto::gateway::v1::SetBreakerStateRequest {
            upstream: upstream.to_owned(),
            address: address.to_string(),
            r#override: forced as i32,
        };
        admin
            .set_breaker_state(with_key(request, key)?)
            .await?
            .into_inner()
            .endpoint
            .context("SetBreakerState answered no endpoint")
    }

    /// The health status the gateway reports for `service`.
    pub async fn health(
        &self,
        service: &str,
    ) -> anyhow::Result<tonic_health::pb::health_check_response::ServingStatus> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let response = HealthClient::new(self.channel().await?)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(response.into_inner().status())
    }
}
