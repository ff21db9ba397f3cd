//! `cargo xtask up`: the whole suite on this machine, in the foreground.
//!
//! Phases, each its own function so later ones slot in:
//! 1. [`ports::ensure_free`] on the three service ports, tools, `cargo build`;
//! 2. backends: PostgreSQL and Redis ([`Postgres`], [`Redis`]), then [`create_database`]
//!    (roles `paysuite_owner` and `paysuite_app`, database `paysuite`);
//! 3. [`DevSecrets`]: what the services trust in development (identity key, card keys),
//!    and [`DemoKey`]: the gateway's API key pepper, keys file and a demo API key;
//! 4. [`Services`]: start the three binaries, wait for gRPC readiness, print how to call them;
//! 5. wait for Ctrl-C, SIGTERM or a service dying; then stop the services, Redis and
//!    PostgreSQL, in that order (guards dropping in reverse declaration order).

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::ExposeSecret as _;

use crate::postgres::Postgres;
use crate::process::{cargo, step, tail, wait_timeout};
use crate::redis::Redis;
use crate::{Interrupted, ports, random_hex, target_dir, tools, workspace_root};

const GATEWAY: &str = "127.0.0.1:50051";
const PAYMENT: &str = "127.0.0.1:50052";
const RATELIMIT: &str = "127.0.0.1:50053";

/// How long the services may take to report SERVING (payment-svc migrates first).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the services may take to drain after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Provisions, starts the services, prints how to call them, and waits for Ctrl-C.
pub fn run(interrupted: &Interrupted) -> anyhow::Result<()> {
    let addresses = [GATEWAY, PAYMENT, RATELIMIT]
        .map(|address| address.parse::<SocketAddr>().context("service address"));
    let addresses: Vec<SocketAddr> = addresses.into_iter().collect::<Result<_, _>>()?;
    ports::ensure_free(&addresses)?;

    let grpcurl = tools::grpcurl(interrupted)?;
    step(
        "cargo build",
        cargo(&["build", "--workspace", "--bins"]),
        interrupted,
    )?;
    let run_dir = workspace_root().join(".paysuite/up");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    let postgres = Postgres::provision(interrupted).context("provisioning PostgreSQL")?;
    interrupted.check()?;
    let redis = Redis::provision(interrupted).context("provisioning Redis")?;
    interrupted.check()?;
    let database = create_database(&postgres, interrupted).context("creating the database")?;
    let secrets = DevSecrets::load()?;
    let demo = DemoKey::load(&target_dir().join("debug"))?;

    let mut services = Services::new(target_dir().join("debug"), run_dir);
    services.start(
        "payment-svc",
        PAYMENT,
        &[
            ("LISTEN_ADDR", PAYMENT),
            ("DATABASE_URL", &database.service_url),
            ("DATABASE_MIGRATION_URL", &database.owner_url),
            ("IDENTITY_PUBLIC_KEYS", &secrets.identity_public_keys),
            ("CARD_ENCRYPTION_KEYS", &secrets.card_encryption_keys),
            ("CARD_FINGERPRINT_KEY", &secrets.card_fingerprint_key),
        ],
    )?;
    // The gateway's rate limit tiers (the demo key is `standard`).
    let gateway_rules = workspace_root().join("ratelimit-svc/rules/gateway.yaml");
    services.start(
        "ratelimit-svc",
        RATELIMIT,
        &[
            ("LISTEN_ADDR", RATELIMIT),
            ("REDIS_URL", redis.url()),
            ("RATELIMIT_CONFIG", &gateway_rules.to_string_lossy()),
            ("IDENTITY_PUBLIC_KEYS", &secrets.identity_public_keys),
        ],
    )?;
    let keys_file = demo.keys_file.to_string_lossy();
    services.start(
        "gateway-svc",
        GATEWAY,
        &[
            ("LISTEN_ADDR", GATEWAY),
            // Local development: plaintext, so the printed grpcurl commands need no CA.
            ("TLS_PLAINTEXT", "true"),
            ("PAYMENT_SVC_ADDR", &format!("http://{PAYMENT}")),
            ("RATELIMIT_SVC_ADDR", &format!("http://{RATELIMIT}")),
            ("API_KEYS_FILE", &keys_file),
            ("API_KEY_PEPPER", &demo.pepper),
            ("IDENTITY_SIGNING_KEY", &secrets.identity_signing_key),
        ],
    )?;
    println!("xtask: service logs in {}", services.run_dir.display());
    services.wait_ready(&grpcurl, interrupted)?;

    print_instructions(
        &grpcurl,
        &services.run_dir,
        &database,
        &postgres,
        redis.url(),
        &demo,
    );
    while !interrupted.is_set() {
        services.check_alive()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("xtask: stopping");
    Ok(())
    // `services`, then `redis`, then `postgres` drop here, and on every early return.
}

/// The URLs of the application database.
#[derive(Debug)]
pub(crate) struct Database {
    /// `paysuite_app`: what the service runs as (no ownership, only granted privileges).
    pub(crate) service_url: String,
    /// `paysuite_owner`: owns the schema and runs migrations.
    pub(crate) owner_url: String,
}

/// Creates (or, on a server given by DATABASE_URL, updates) the roles and the database,
/// with fresh generated passwords.
pub(crate) fn create_database(
    postgres: &Postgres,
    interrupted: &Interrupted,
) -> anyhow::Result<Database> {
    let owner_password = random_hex(16)?;
    let service_password = random_hex(16)?;
    // The passwords are hex, so they need no quoting beyond the literal's quotes.
    postgres.psql(
        &format!(
            "SELECT format('CREATE ROLE %I LOGIN', r) \
               FROM unnest(ARRAY['paysuite_owner', 'paysuite_app']) AS r \
              WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \\gexec\n\
             ALTER ROLE paysuite_owner LOGIN CREATEROLE PASSWORD '{owner_password}';\n\
             ALTER ROLE paysuite_app LOGIN PASSWORD '{service_password}';\n\
             SELECT 'CREATE DATABASE paysuite OWNER paysuite_owner' \
              WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'paysuite') \\gexec\n"
        ),
        interrupted,
    )?;
    Ok(Database {
        service_url: postgres.url_for("paysuite_app", &service_password, "paysuite"),
        owner_url: postgres.url_for("paysuite_owner", &owner_password, "paysuite"),
    })
}

/// Development secrets the services are started with, kept under `.paysuite/` so a
/// database kept across runs stays readable and minted tokens stay valid.
#[derive(Debug)]
struct DevSecrets {
    /// `IDENTITY_PUBLIC_KEYS`: the public half of the development signing key.
    identity_public_keys: String,
    /// `IDENTITY_SIGNING_KEY`: the development signing key itself, for the gateway.
    identity_signing_key: String,
    /// `CARD_ENCRYPTION_KEYS` for payment-svc's card vault.
    card_encryption_keys: String,
    /// `CARD_FINGERPRINT_KEY` for payment-svc's card vault.
    card_fingerprint_key: String,
}

impl DevSecrets {
    fn load() -> anyhow::Result<Self> {
        let identity_key = crate::identity::dev_key()?;
        let identity_public_keys = identity_key.public_key().to_string();
        let identity_signing_key = identity_key.to_secret_string().expose_secret().to_owned();
        let (card_encryption_keys, card_fingerprint_key) = crate::identity::dev_card_keys()?;
        Ok(Self {
            identity_public_keys,
            identity_signing_key,
            card_encryption_keys,
            card_fingerprint_key,
        })
    }
}

/// The gateway's development API keys: a pepper, a keys file and one demo key (scopes
/// `payments:read,payments:write,admin`), generated once under `.paysuite/` by
/// `gateway-svc generate-key` so printed commands keep working across runs.
#[derive(Debug)]
struct DemoKey {
    /// `API_KEY_PEPPER`.
    pepper: String,
    /// `API_KEYS_FILE`.
    keys_file: PathBuf,
    /// The demo API key, for `authorization: Bearer …`.
    key: String,
}

impl DemoKey {
    const PRINCIPAL: &'static str = "demo";
    const SCOPES: &'static str = "payments:read,payments:write,admin";

    fn load(bin_dir: &Path) -> anyhow::Result<Self> {
        let dir = workspace_root().join(".paysuite");
        std::fs::create_dir_all(&dir)?;
        let pepper_path = dir.join("dev-api-key-pepper");
        let key_path = dir.join("dev-api-key");
        let keys_file = dir.join("dev-api-keys.yaml");
        let pepper = match std::fs::read_to_string(&pepper_path) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
            _ => {
                let pepper = random_hex(32)?;
                crate::identity::write_private(&pepper_path, &pepper)?;
                pepper
            }
        };
        if let (Ok(key), Ok(_)) = (
            std::fs::read_to_string(&key_path),
            std::fs::metadata(&keys_file),
        ) && !key.trim().is_empty()
        {
            return Ok(Self {
                pepper,
                keys_file,
                key: key.trim().to_owned(),
            });
        }
        let binary = bin_dir.join("gateway-svc");
        let output = Command::new(&binary)
            .args(["generate-key", "--principal", Self::PRINCIPAL])
            .args(["--scopes", Self::SCOPES, "--tier", "standard"])
            .env("API_KEY_PEPPER", &pepper)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} generate-key", binary.display()))?;
        if !output.status.success() {
            bail!(
                "gateway-svc generate-key failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines();
        let (Some(key), Some(line)) = (lines.next(), lines.next()) else {
            bail!("gateway-svc generate-key printed no key");
        };
        crate::identity::write_private(
            &keys_file,
            &format!(
                "# Development API keys (cargo xtask up); the demo key is in dev-api-key.\n{line}\n"
            ),
        )?;
        crate::identity::write_private(&key_path, key)?;
        Ok(Self {
            pepper,
            keys_file,
            key: key.to_owned(),
        })
    }
}

/// The running service binaries; on drop all get SIGTERM, then SIGKILL after
/// [`STOP_TIMEOUT`].
#[derive(Debug)]
struct Services {
    bin_dir: PathBuf,
    run_dir: PathBuf,
    running: Vec<Service>,
}

#[derive(Debug)]
struct Service {
    name: &'static str,
    address: &'static str,
    child: Child,
    log: PathBuf,
}

impl Services {
    fn new(bin_dir: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            bin_dir,
            run_dir,
            running: Vec::new(),
        }
    }

    /// Starts `name` from the binary directory with `envs` (and `RUST_LOG=info` unless
    /// set), output to `<run dir>/<name>.log`, in its own process group so that a
    /// terminal's Ctrl-C reaches xtask only and the stop order stays xtask's.
    fn start(
        &mut self,
        name: &'static str,
        address: &'static str,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let binary = self.bin_dir.join(name);
        let log = self.run_dir.join(format!("{name}.log"));
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&binary)
            .envs(envs.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        println!("xtask: started {name} (pid {}) on {address}", child.id());
        self.running.push(Service {
            name,
            address,
            child,
            log,
        });
        Ok(())
    }

    /// Fails naming the first service that has exited, with the end of its log.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for service in &mut self.running {
            if let Some(status) = service.child.try_wait()? {
                bail!(
                    "{} exited ({status}); {}",
                    service.name,
                    tail(&service.log, 30)
                );
            }
        }
        Ok(())
    }

    /// Waits until every service answers the gRPC health check for "readiness" with
    /// SERVING.
    fn wait_ready(&mut self, grpcurl: &Path, interrupted: &Interrupted) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for index in 0..self.running.len() {
            loop {
                self.check_alive()?;
                interrupted.check()?;
                let Some(service) = self.running.get(index) else {
                    break;
                };
                if is_serving(grpcurl, service.address) {
                    println!("xtask: {} ready on {}", service.name, service.address);
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} did not report SERVING for \"readiness\" on {} within {}s; {}",
                        service.name,
                        service.address,
                        READY_TIMEOUT.as_secs(),
                        tail(&service.log, 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        // All at once: each drains on its own, so stopping takes one drain, not three.
        for service in &self.running {
            if let Ok(pid) = i32::try_from(service.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for service in &mut self.running {
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_timeout(&mut service.child, left) {
                Some(status) => println!("xtask: {} stopped ({status})", service.name),
                None => {
                    let _ = service.child.kill();
                    let _ = service.child.wait();
                    println!(
                        "xtask: {} killed after {}s without stopping",
                        service.name,
                        STOP_TIMEOUT.as_secs()
                    );
                }
            }
        }
    }
}

/// Whether the service at `address` answers `grpc.health.v1.Health/Check` for
/// "readiness" with SERVING.
fn is_serving(grpcurl: &Path, address: &str) -> bool {
    Command::new(grpcurl)
        .args(["-plaintext", "-connect-timeout", "2", "-max-time", "3"])
        .args(["-d", r#"{"service":"readiness"}"#, address])
        .arg("grpc.health.v1.Health/Check")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("\"SERVING\""))
}

fn print_instructions(
    grpcurl: &Path,
    run_dir: &Path,
    database: &Database,
    postgres: &Postgres,
    redis_url: &str,
    demo: &DemoKey,
) {
    // The short name when the one on PATH is the same binary, so commands paste cleanly.
    let grpcurl = match tools::which("grpcurl") {
        Some(on_path) if same_file(&on_path, grpcurl) => "grpcurl".to_owned(),
        _ => grpcurl.display().to_string(),
    };
    let service_url = &database.service_url;
    let superuser_url = postgres.superuser_url();
    println!(
        "
paysuite is up. Service logs: {logs}

  # Through the gateway, with the demo API key (principal {principal}, scopes {scopes}):
  export PAYSUITE_KEY={key}
  {grpcurl} -plaintext {GATEWAY} list
  {grpcurl} -plaintext -H \"authorization: Bearer $PAYSUITE_KEY\" -d '{{\"idempotency_key\":\"demo-merchant-1\",\"currency\":\"BRL\",\"kind\":\"ACCOUNT_KIND_MERCHANT\"}}' {GATEWAY} paysuite.payments.v1.PaymentService/CreateAccount
  {grpcurl} -plaintext -H \"authorization: Bearer $PAYSUITE_KEY\" -d '{{\"idempotency_key\":\"demo-payment-1\",\"merchant_account_id\":\"<account id from above>\",\"amount\":{{\"amount_minor\":\"1999\",\"currency\":\"BRL\"}},\"card\":{{\"number\":\"4242424242424242\",\"exp_month\":12,\"exp_year\":2034,\"cvc\":\"123\"}}}}' {GATEWAY} paysuite.payments.v1.PaymentService/CreatePayment
  {grpcurl} -plaintext -H \"authorization: Bearer $PAYSUITE_KEY\" -d '{{\"payment_id\":\"<payment id from above>\"}}' {GATEWAY} paysuite.payments.v1.PaymentService/GetPayment
  {grpcurl} -plaintext -H \"authorization: Bearer $PAYSUITE_KEY\" -d '{{\"account_id\":\"<account id>\"}}' {GATEWAY} paysuite.payments.v1.PaymentService/WatchBalance
  {grpcurl} -plaintext {GATEWAY} describe paysuite.payments.v1.PaymentService
  {grpcurl} -plaintext {GATEWAY} describe paysuite.payments.v1.CreatePaymentRequest

  # More keys: append the second line this prints to {keys_file} (reloaded within 5s):
  API_KEY_PEPPER=$(cat {pepper_file}) target/debug/gateway-svc generate-key --principal acme --scopes payments:read --tier standard

  # Readiness of each service:
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {GATEWAY} grpc.health.v1.Health/Check
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {PAYMENT} grpc.health.v1.Health/Check
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {RATELIMIT} grpc.health.v1.Health/Check

  # Straight to payment-svc, with an identity token from the development key:
  {grpcurl} -plaintext -H \"x-paysuite-identity: $(cargo xtask token --principal demo --scopes payments:read,payments:write)\" {PAYMENT} paysuite.payments.v1.PaymentService/ListAccounts

  # The databases (as the service role; as superuser):
  psql '{service_url}'
  psql '{superuser_url}'
  redis-cli -u {redis_url}

Ctrl-C stops everything.",
        logs = run_dir.display(),
        principal = DemoKey::PRINCIPAL,
        scopes = DemoKey::SCOPES,
        key = demo.key,
        keys_file = demo.keys_file.display(),
        pepper_file = workspace_root().join(".paysuite/dev-api-key-pepper").display(),
    );
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
