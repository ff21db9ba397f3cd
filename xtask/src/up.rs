//! `cargo xtask up`: the whole suite on this machine, in the foreground.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::postgres::Postgres;
use crate::redis::Redis;
use crate::test::{cargo, step};
use crate::tools::Tools;
use crate::{random_hex, target_dir, workspace_root};

const GATEWAY: &str = "127.0.0.1:50051";
const PAYMENT: &str = "127.0.0.1:50052";
const RATELIMIT: &str = "127.0.0.1:50053";

/// Provisions, starts the services, prints how to call them, and waits for Ctrl-C.
pub fn run(interrupted: &AtomicBool) -> anyhow::Result<()> {
    for address in [GATEWAY, PAYMENT, RATELIMIT] {
        if std::net::TcpListener::bind(address).is_err() {
            bail!("{address} is busy: stop whatever listens there (another `cargo xtask up`?)");
        }
    }
    let tools = Tools::ensure(&target_dir().join("tools"), true)?;
    step(
        "build binaries",
        cargo(&["build", "--workspace", "--bins", "--locked"]),
        interrupted,
    )?;
    let run_dir = workspace_root().join(".paysuite/up");
    std::fs::create_dir_all(&run_dir)?;

    let postgres = Postgres::provision(&tools.postgres_bin)?;
    let redis = Redis::provision(&tools.redis_server)?;
    let owner_password = random_hex(12)?;
    let service_password = random_hex(12)?;
    postgres.psql(&format!(
        "SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['paysuite_owner', 'paysuite_app']) AS r \
           WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \\gexec\n\
         ALTER ROLE paysuite_owner PASSWORD '{owner_password}';\n\
         ALTER ROLE paysuite_app PASSWORD '{service_password}';\n\
         SELECT 'CREATE DATABASE paysuite OWNER paysuite_owner' \
           WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'paysuite') \\gexec\n"
    ))?;
    let service_url = postgres.url_for("paysuite_app", &service_password, "paysuite");
    let owner_url = postgres.url_for("paysuite_owner", &owner_password, "paysuite");

    let identity_keys = crate::identity::dev_key()?.public_key().to_string();
    let (card_keys, card_fingerprint_key) = crate::identity::dev_card_keys()?;
    let bin_dir = target_dir().join("debug");
    let mut services = vec![
        Service::start(
            "payment-svc",
            &bin_dir,
            &run_dir,
            &[
                ("LISTEN_ADDR", PAYMENT),
                ("DATABASE_URL", &service_url),
                ("DATABASE_MIGRATION_URL", &owner_url),
                ("IDENTITY_PUBLIC_KEYS", &identity_keys),
                ("CARD_ENCRYPTION_KEYS", &card_keys),
                ("CARD_FINGERPRINT_KEY", &card_fingerprint_key),
            ],
        )?,
        Service::start(
            "ratelimit-svc",
            &bin_dir,
            &run_dir,
            &[
                ("LISTEN_ADDR", RATELIMIT),
                ("REDIS_URL", redis.url()),
                ("IDENTITY_PUBLIC_KEYS", &identity_keys),
            ],
        )?,
        Service::start(
            "gateway-svc",
            &bin_dir,
            &run_dir,
            &[("LISTEN_ADDR", GATEWAY)],
        )?,
    ];
    for (service, address) in services.iter_mut().zip([PAYMENT, RATELIMIT, GATEWAY]) {
        service.wait_ready(&tools.grpcurl, address, interrupted)?;
    }

    print_instructions(&tools.grpcurl, &run_dir, &service_url, redis.url());
    while !interrupted.load(Ordering::SeqCst) {
        for service in &mut services {
            if let Some(status) = service.child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log: {}",
                    service.name,
                    service.log.display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nxtask: stopping");
    // Services stop before the databases they use (reverse drop order is explicit here).
    drop(services);
    drop(redis);
    drop(postgres);
    Ok(())
}

fn print_instructions(grpcurl: &Path, run_dir: &Path, service_url: &str, redis_url: &str) {
    let grpcurl = grpcurl.display();
    println!(
        "
paysuite is up. Logs: {logs}

  # The whole API, through the gateway:
  {grpcurl} -plaintext {GATEWAY} list
  {grpcurl} -plaintext {GATEWAY} describe paysuite.payments.v1.PaymentService
  {grpcurl} -plaintext {GATEWAY} describe paysuite.payments.v1.CreatePaymentRequest

  # Readiness of each service:
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {GATEWAY} grpc.health.v1.Health/Check
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {PAYMENT} grpc.health.v1.Health/Check
  {grpcurl} -plaintext -d '{{\"service\":\"readiness\"}}' {RATELIMIT} grpc.health.v1.Health/Check

  # Straight to payment-svc, with an identity token from the development key:
  {grpcurl} -plaintext -H \"x-paysuite-identity: $(cargo xtask token --principal demo --scopes payments:read,payments:write)\" {PAYMENT} paysuite.payments.v1.PaymentService/ListAccounts

  # The databases:
  psql '{service_url}'
  redis-cli -u {redis_url}

Ctrl-C stops everything.",
        logs = run_dir.display()
    );
}

/// A running service binary; sent SIGTERM (then killed) on drop.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(
        name: &'static str,
        bin_dir: &Path,
        run_dir: &Path,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = run_dir.join(format!("{name}.log"));
        let output = File::create(&log)?;
        let child = Command::new(bin_dir.join(name))
            .envs(envs.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    fn wait_ready(
        &mut self,
        grpcurl: &Path,
        address: &str,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}):\n{}", self.name, tail(&self.log));
            }
            let output = Command::new(grpcurl)
                .args([
                    "-plaintext",
                    "-max-time",
                    "2",
                    "-d",
                    r#"{"service":"readiness"}"#,
                    address,
                ])
                .arg("grpc.health.v1.Health/Check")
                .output()?;
            if String::from_utf8_lossy(&output.stdout).contains("\"SERVING\"") {
                println!("xtask: {} ready on {address}", self.name);
                return Ok(());
            }
            if interrupted.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!("{} not ready after 120s:\n{}", self.name, tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        println!("xtask: {} stopped", self.name);
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
