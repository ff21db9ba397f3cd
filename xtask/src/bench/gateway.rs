//! Scenario `gateway`: what gateway-svc costs in front of a service, against what nginx
//! `grpc_pass` costs in front of the same service. Three targets share one backend, the
//! no-op tonic service ([`super::noop`]) on the CPU under test:
//!
//! 1. direct: the generator calls the no-op service (the baseline: its peak sets the
//!    open-loop rate);
//! 2. gateway-svc (release build, plaintext listener, rate limiting off) with its API key
//!    authentication on: the generator sends a real API key, the gateway checks it and the
//!    RPC's scope, mints the identity token the upstream trusts and forwards the call to its
//!    `ratelimit` cluster, whose one endpoint is the no-op service;
//! 3. nginx `grpc_pass` with the committed configuration `xtask/bench/nginx-grpc.conf`
//!    (one worker, upstream keepalive, `keepalive_requests 1000000`, `access_log off`),
//!    run from its own prefix under /tmp.
//!
//! The call is the [`super::check`] workload (`RateLimitService/Check`), every answer
//! checked. Proof of path: around each run the no-op service's counters are read
//! ([`super::noop::counters`]); the run fails unless the backend answered at least every
//! measured call, and unless the Checks it saw carried an identity token exactly when the
//! gateway was in the path (the generator never sends one; only the gateway mints them).
//!
//! Targets (DESIGN §9): the gateway's throughput ≥ 2× nginx's and ≥ 50% of direct; its
//! added p99 (its p99 minus direct's, at the same open-loop rate) ≤ nginx's added p99.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use secrecy::ExposeSecret as _;

use super::check::{CHECK_WORKLOAD, ENV_API_KEY, KEY_SPACE, LIMIT, WINDOW};
use super::load::{GeneratorTarget, LoadRun, Measurement, RunHooks};
use super::noop::{self, Counters};
use super::pin::{self, PinnedProcess};
use super::protocol::{self, Protocol, Spread};
use super::report::{Bound, Check, Ratio, ScenarioReport};
use super::{Context, Scenario};
use crate::process::run_captured;
use crate::{ports, tools, workspace_root};

/// The scenario's entry in [`super::SCENARIOS`].
pub const SCENARIO: Scenario = Scenario {
    name: "gateway",
    summary: "a no-op tonic service called directly, through gateway-svc (auth on, rate \
              limiting off) and through nginx grpc_pass",
    packages: &["gateway-svc"],
    run,
};

const DIRECT: &str = "direct (no-op tonic service)";
const GATEWAY: &str = "gateway-svc → no-op";
const NGINX: &str = "nginx grpc_pass → no-op";

/// The committed nginx configuration, relative to the workspace root.
const NGINX_CONF: &str = "xtask/bench/nginx-grpc.conf";
/// The bench's API key: its principal, and the one scope the Check route requires.
const PRINCIPAL: &str = "bench";
/// A tier is required by the keys file; rate limiting is off, so it limits nothing.
const TIER: &str = "standard";

fn run(context: &Context<'_>) -> anyhow::Result<ScenarioReport> {
    let interrupted = context.interrupted;
    let nginx_binary = tools::nginx(interrupted)?;
    let pinning = context.pinning;

    let noop_address = format!("127.0.0.1:{}", ports::free_port()?);
    let mut noop_command = pinning.command(pin::SUBJECT_CPU, &context.xtask());
    noop_command.args(["bench-noop-server", "--listen", &noop_address]);
    let mut noop = PinnedProcess::start(
        "no-op tonic service",
        noop_command,
        context.run_dir.join("noop.log"),
    )?;

    let gateway_binary = context.release_dir.join("gateway-svc");
    let credentials = Credentials::generate(
        &gateway_binary,
        &context.run_dir,
        proto::api::v1::SCOPE_RATELIMIT_CHECK,
    )?;
    let routes_file = context.run_dir.join("routes.yaml");
    std::fs::write(&routes_file, routes_yaml(&noop_address))
        .with_context(|| format!("writing {}", routes_file.display()))?;
    let signing_key = crate::identity::dev_key()?;
    let gateway_address = format!("127.0.0.1:{}", ports::free_port()?);
    let mut gateway_command = pinning.command(pin::SUBJECT_CPU, &gateway_binary);
    gateway_command
        .envs([
            ("LISTEN_ADDR", gateway_address.as_str()),
            ("TLS_PLAINTEXT", "true"),
            ("ROUTES_FILE", &routes_file.to_string_lossy()),
            ("API_KEYS_FILE", &credentials.keys_file.to_string_lossy()),
            ("API_KEY_PEPPER", &credentials.pepper),
            (
                "IDENTITY_SIGNING_KEY",
                signing_key.to_secret_string().expose_secret(),
            ),
            ("RATELIMIT_ENABLED", "false"),
            ("RUST_LOG", "info"),
        ])
        // Nothing from the caller's shell changes what is measured.
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RATELIMIT_SVC_ADDR")
        .env_remove("PAYMENT_SVC_ADDR");
    let mut gateway = PinnedProcess::start(
        "gateway-svc",
        gateway_command,
        context.run_dir.join("gateway-svc.log"),
    )?;

    let nginx_address = format!("127.0.0.1:{}", ports::free_port()?);
    let prefix = NginxPrefix::create(&context.run_dir)?;
    let nginx_conf = prefix.write_config(&nginx_address, &noop_address)?;
    let mut test = Command::new(&nginx_binary);
    test.arg("-t").args(prefix.args(&nginx_conf));
    run_captured(test, "nginx -t (the bench's nginx configuration)")?;
    let mut nginx_command = pinning.command(pin::SUBJECT_CPU, &nginx_binary);
    nginx_command.args(prefix.args(&nginx_conf));
    let mut nginx =
        PinnedProcess::start("nginx", nginx_command, context.run_dir.join("nginx.log"))?;
    let nginx_worker = nginx_worker(&mut nginx)?;

    pinning.ensure("the no-op service", noop.pid())?;
    pinning.ensure("gateway-svc", gateway.pid())?;
    pinning.ensure("nginx (master)", nginx.pid())?;
    pinning.ensure("nginx (worker)", nginx_worker)?;

    let load = |address: &str, env: Vec<(String, String)>| LoadRun {
        workload: CHECK_WORKLOAD.to_owned(),
        params: vec![("expect".to_owned(), "any".to_owned())],
        env,
        address: format!("http://{address}"),
        connections: context.protocol.connections,
        concurrency: context.protocol.concurrency,
    };
    let target = |name, address: &str, env, pids, through_gateway| GeneratorTarget {
        name,
        xtask: context.xtask(),
        pinning,
        load: load(address, env),
        pids,
        hooks: PathProof::new(&noop_address, name, through_gateway),
    };
    let mut direct = target(DIRECT, &noop_address, Vec::new(), vec![noop.pid()], false);
    let mut through_gateway = target(
        GATEWAY,
        &gateway_address,
        vec![(ENV_API_KEY.to_owned(), credentials.key.clone())],
        vec![gateway.pid(), noop.pid()],
        true,
    );
    let mut through_nginx = target(
        NGINX,
        &nginx_address,
        Vec::new(),
        vec![nginx.pid(), nginx_worker, noop.pid()],
        false,
    );
    let results = protocol::run(
        &mut [&mut direct, &mut through_gateway, &mut through_nginx],
        &context.protocol,
        interrupted,
    )?;
    noop.check_alive()?;
    gateway.check_alive()?;
    nginx.check_alive()?;

    let (Some(direct_runs), Some(gateway_runs), Some(nginx_runs)) =
        (results.of(DIRECT), results.of(GATEWAY), results.of(NGINX))
    else {
        bail!("a target has no runs");
    };
    let p99 = |m: &Measurement| m.p99_us;
    let checks = vec![
        Check {
            label: format!("{GATEWAY} / {NGINX}: throughput"),
            spread: protocol::ratio(&gateway_runs.throughput, &nginx_runs.throughput, |m| {
                m.throughput
            }),
            bound: Bound::AtLeast(2.0),
        },
        Check {
            label: format!("{GATEWAY} / {DIRECT}: throughput"),
            spread: protocol::ratio(&gateway_runs.throughput, &direct_runs.throughput, |m| {
                m.throughput
            }),
            bound: Bound::AtLeast(0.5),
        },
        Check {
            label: format!(
                "added p99 at the same rate, {GATEWAY} / {NGINX} (each p99 minus direct's)"
            ),
            spread: protocol::added_ratio(
                &gateway_runs.latency,
                &nginx_runs.latency,
                &direct_runs.latency,
                p99,
            ),
            bound: Bound::AtMost(1.0),
        },
    ];
    let ratios = vec![
        Ratio {
            label: format!("{NGINX} / {DIRECT}: throughput"),
            spread: protocol::ratio(&nginx_runs.throughput, &direct_runs.throughput, |m| {
                m.throughput
            }),
        },
        Ratio {
            label: format!(
                "added p50 at the same rate, {GATEWAY} / {NGINX} (each p50 minus direct's)"
            ),
            spread: protocol::added_ratio(
                &gateway_runs.latency,
                &nginx_runs.latency,
                &direct_runs.latency,
                |m| m.p50_us,
            ),
        },
        Ratio {
            label: format!(
                "added CPU time per call under test, closed loop, {GATEWAY} / {NGINX} (each \
                 minus direct's: what the proxy itself costs per call)"
            ),
            spread: protocol::added_ratio(
                &gateway_runs.throughput,
                &nginx_runs.throughput,
                &direct_runs.throughput,
                Measurement::cpu_per_call,
            ),
        },
    ];

    let added_p99 = |runs: &[Measurement]| {
        spread_text(Spread::of(protocol::added(runs, &direct_runs.latency, p99)))
    };
    let added_cpu = |runs: &[Measurement]| {
        spread_text(Spread::of(
            protocol::added(runs, &direct_runs.throughput, Measurement::cpu_per_call)
                .into_iter()
                .map(|seconds| seconds * 1e6),
        ))
    };
    let proof = |hooks: &PathProof| {
        let seen = hooks
            .seen
            .iter()
            .fold(Counters::default(), |sum, run| Counters {
                checks: sum.checks + run.checks,
                checks_with_identity: sum.checks_with_identity + run.checks_with_identity,
            });
        format!(
            "{} answered {} Checks ({} carrying an identity token) for {} measured successful \
             calls",
            hooks.name, seen.checks, seen.checks_with_identity, hooks.measured_ok
        )
    };
    let notes = vec![
        format!(
            "Proof of path (the no-op service's counters, read around every run, warm-ups \
             included): {}; {}; {}. A run fails unless the backend answered at least every \
             measured call and saw identity tokens exactly on the gateway's calls (the \
             generator sends none; the gateway mints one per caller and audience). Every \
             answer is checked: a decision admitting the call and echoing the limit asked \
             for.",
            proof(&direct.hooks),
            proof(&through_gateway.hooks),
            proof(&through_nginx.hooks)
        ),
        format!(
            "Added p99 at {:.0}/s in µs, median (min–max) over rounds: {GATEWAY} {}, {NGINX} \
             {}. Added CPU time per call under test in µs, closed loop: {GATEWAY} {}, {NGINX} \
             {}.",
            results.rate,
            added_p99(&gateway_runs.latency),
            added_p99(&nginx_runs.latency),
            added_cpu(&gateway_runs.throughput),
            added_cpu(&nginx_runs.throughput)
        ),
        format!(
            "Generator: our own (`xtask bench-load`, one tokio thread on CPU {}), tonic \
             client, plaintext HTTP/2 to every target.",
            pin::GENERATOR_CPU
        ),
    ];
    Ok(ScenarioReport {
        name: SCENARIO.name,
        title: "gateway-svc vs nginx grpc_pass in front of the gRPC floor".to_owned(),
        setup: vec![
            format!(
                "Call: `RateLimitService/Check`, cost 1, key drawn from {KEY_SPACE} keys, a \
                 sliding window of {LIMIT} per {}s; the backend of every target is the no-op \
                 tonic service (`xtask bench-noop-server`, a fixed decision).",
                WINDOW.as_secs()
            ),
            format!("Baseline, {DIRECT}: the generator calls the no-op service itself."),
            format!(
                "Subject, {GATEWAY}: the release binary, plaintext listener, \
                 `RATELIMIT_ENABLED=false`, API key authentication on (a key made by \
                 `gateway-svc generate-key` with scope `{}`, sent as `authorization: Bearer`), \
                 a routes file sending `RateLimitService` to the no-op service; the gateway \
                 mints the identity token forwarded upstream.",
                proto::api::v1::SCOPE_RATELIMIT_CHECK
            ),
            format!(
                "Competitor, {NGINX}: {} (`{}`, Debian's nginx-light), `{NGINX_CONF}` — one worker, \
                 `grpc_pass` to an upstream with keepalive, `keepalive_requests 1000000`, \
                 `access_log off`, HTTP/2 listener.",
                nginx_version(&nginx_binary),
                nginx_binary.display()
            ),
            format!(
                "Under test on CPU {}: the no-op service, gateway-svc, nginx (master and \
                 worker); on CPU {}: our generator. CPU under test counts the proxy and the \
                 no-op service together.",
                pin::SUBJECT_CPU,
                pin::GENERATOR_CPU
            ),
        ],
        results,
        ratios,
        checks,
        notes,
        context: None,
    })
    // nginx, gateway-svc, then the no-op service stop here (and on every early return),
    // then the nginx prefix is removed.
}

fn spread_text(spread: Spread) -> String {
    format!("{:.0} ({:.0}–{:.0})", spread.median, spread.min, spread.max)
}

/// The gateway's routes file: the `ratelimit` cluster is the no-op service.
fn routes_yaml(noop_address: &str) -> String {
    format!(
        "# cargo xtask bench gateway: RateLimitService goes to the no-op tonic service.\n\
         clusters:\n\
         \x20 - name: ratelimit\n\
         \x20   audience: ratelimit-svc\n\
         \x20   endpoints: [http://{noop_address}]\n\
         \x20   services: [paysuite.ratelimit.v1.RateLimitService]\n"
    )
}

/// The bench's API key, made by `gateway-svc generate-key` with a fresh pepper.
pub(super) struct Credentials {
    pub(super) pepper: String,
    pub(super) keys_file: PathBuf,
    pub(super) key: String,
}

impl Credentials {
    /// A key of principal `bench` with `scopes` (comma-separated).
    pub(super) fn generate(gateway: &Path, run_dir: &Path, scopes: &str) -> anyhow::Result<Self> {
        let pepper = crate::random_hex(32)?;
        let mut command = Command::new(gateway);
        command
            .args(["generate-key", "--principal", PRINCIPAL])
            .args(["--scopes", scopes])
            .args(["--tier", TIER])
            .env("API_KEY_PEPPER", &pepper);
        let output = run_captured(command, "gateway-svc generate-key")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines();
        let (Some(key), Some(line)) = (lines.next(), lines.next()) else {
            bail!("gateway-svc generate-key printed no key");
        };
        let keys_file = run_dir.join("api-keys.yaml");
        crate::identity::write_private(
            &keys_file,
            &format!("# cargo xtask bench (a new key every run).\n{line}\n"),
        )?;
        Ok(Self {
            pepper,
            keys_file,
            key: key.trim().to_owned(),
        })
    }
}

/// nginx's own directory (configuration, pid, error log, temporary files) under /tmp,
/// where nginx's worker can reach it whichever user it runs as; removed on drop, after
/// its error log is copied into the scenario's run directory.
struct NginxPrefix {
    dir: PathBuf,
    run_dir: PathBuf,
}

impl NginxPrefix {
    fn create(run_dir: &Path) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("paysuite-bench-nginx-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            run_dir: run_dir.to_owned(),
        })
    }

    /// `nginx.conf` from the committed template; returns its path.
    fn write_config(&self, listen: &str, upstream: &str) -> anyhow::Result<PathBuf> {
        let template_path = workspace_root().join(NGINX_CONF);
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        let config = fill(
            &template,
            &[
                ("PREFIX", &self.dir.to_string_lossy()),
                ("LISTEN", listen),
                ("UPSTREAM", upstream),
            ],
        )?;
        let path = self.dir.join("nginx.conf");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `-p PREFIX -c CONF -e ERROR_LOG`: nothing outside the prefix is read or written
    /// (`-e` covers the start-up, before the configuration's `error_log` applies).
    fn args(&self, conf: &Path) -> Vec<String> {
        vec![
            "-p".to_owned(),
            format!("{}/", self.dir.display()),
            "-c".to_owned(),
            conf.display().to_string(),
            "-e".to_owned(),
            self.dir.join("error.log").display().to_string(),
        ]
    }
}

impl Drop for NginxPrefix {
    fn drop(&mut self) {
        let _ = std::fs::copy(
            self.dir.join("error.log"),
            self.run_dir.join("nginx-error.log"),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `template` with every `{{NAME}}` replaced; fails on a placeholder left unfilled.
fn fill(template: &str, values: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let end = rest.find("}}").map_or(rest.len(), |end| end + 2);
        bail!("{NGINX_CONF}: placeholder {} is not filled", &rest[..end]);
    }
    Ok(text)
}

/// The pid of nginx's one worker process, once the master has started it.
fn nginx_worker(nginx: &mut PinnedProcess) -> anyhow::Result<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        nginx.check_alive()?;
        let workers = pin::children(nginx.pid())?;
        match workers.as_slice() {
            [worker] => return Ok(*worker),
            [] if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            [] => bail!("nginx started no worker process within 10s"),
            many => bail!("nginx runs {} worker processes, not 1", many.len()),
        }
    }
}

/// `nginx -v`'s version line, e.g. "nginx/1.22.1".
fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .ok()
        .map(|output| {
            // nginx prints its version on stderr.
            String::from_utf8_lossy(&output.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned()
        })
        .filter(|version| !version.is_empty())
        .unwrap_or_else(|| "nginx (version unknown)".to_owned())
}

/// Around each run: the no-op service's counters before and after, checked against what
/// the generator measured and whether the gateway is in the path.
struct PathProof {
    noop_address: String,
    name: &'static str,
    through_gateway: bool,
    before: Counters,
    /// What the backend counted in each run (warm-up included).
    seen: Vec<Counters>,
    /// Successful calls the generator measured, over every run.
    measured_ok: u64,
}

impl PathProof {
    fn new(noop_address: &str, name: &'static str, through_gateway: bool) -> Self {
        Self {
            noop_address: noop_address.to_owned(),
            name,
            through_gateway,
            before: Counters::default(),
            seen: Vec::new(),
            measured_ok: 0,
        }
    }
}

impl RunHooks for PathProof {
    fn before(&mut self, _load: &mut LoadRun, _protocol: &Protocol) -> anyhow::Result<()> {
        self.before = noop::counters(&self.noop_address)?;
        Ok(())
    }

    fn after(&mut self, measurement: &Measurement) -> anyhow::Result<()> {
        let seen = noop::counters(&self.noop_address)? - self.before;
        if seen.checks < measurement.ok {
            bail!(
                "{}: the no-op service answered {} Checks, fewer than the {} the generator \
                 counted as answered: something else answered them",
                self.name,
                seen.checks,
                measurement.ok
            );
        }
        let expected_with_identity = if self.through_gateway { seen.checks } else { 0 };
        if seen.checks_with_identity != expected_with_identity {
            bail!(
                "{}: {} of the {} Checks the no-op service answered carried an identity \
                 token, not {expected_with_identity}: the calls did not take the path under \
                 test",
                self.name,
                seen.checks_with_identity,
                seen.checks
            );
        }
        self.seen.push(seen);
        self.measured_ok += measurement.ok;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_nginx_config_fills_every_placeholder() -> anyhow::Result<()> {
        let template = std::fs::read_to_string(workspace_root().join(NGINX_CONF))?;
        let config = fill(
            &template,
            &[
                ("PREFIX", "/tmp/p"),
                ("LISTEN", "127.0.0.1:1"),
                ("UPSTREAM", "127.0.0.1:2"),
            ],
        )?;
        assert!(config.contains("listen 127.0.0.1:1 http2;"));
        assert!(config.contains("server 127.0.0.1:2;"));
        assert!(config.contains("keepalive_requests 1000000;"));
        assert!(config.contains("worker_processes 1;"));
        assert!(fill("a {{MISSING}} b", &[]).is_err());
        Ok(())
    }

    #[test]
    fn the_routes_file_sends_ratelimit_to_the_noop_service() {
        let yaml = routes_yaml("127.0.0.1:7");
        assert!(yaml.contains("endpoints: [http://127.0.0.1:7]"), "{yaml}");
        assert!(
            yaml.contains("services: [paysuite.ratelimit.v1.RateLimitService]"),
            "{yaml}"
        );
    }
}
