//! `cargo xtask test`: what CI runs (`.ci/run`).
//!
//! Order: tools; static checks, cheapest first (rustfmt, clippy, one version of each core
//! crate, buf lint, Kubernetes manifests); the service binaries (tests spawn them); then
//! PostgreSQL and Redis, and every test under nextest. The first failing step stops the run
//! and is named in the error; the servers stop on the way out whatever happened.
//!
//! The tests find what they need in the environment ([`ENV_PG_URL`] and friends; the
//! `tests` crate reads the same names).

use anyhow::{Context as _, bail};

use crate::Interrupted;
use crate::postgres::Postgres;
use crate::process::{cargo, step};
use crate::redis::Redis;
use crate::{target_dir, tools, workspace_root};

/// A superuser URL of the PostgreSQL the tests may use (each test creates its own database).
pub const ENV_PG_URL: &str = "PAYSUITE_TEST_PG_URL";
/// The Redis the tests may use (each test uses its own key prefix).
pub const ENV_REDIS_URL: &str = "PAYSUITE_TEST_REDIS_URL";
/// The absolute path of redis-server (tests start private servers to freeze and kill).
pub const ENV_REDIS_SERVER: &str = "PAYSUITE_REDIS_SERVER";
/// The absolute path of redis-cli (tests create Redis Clusters with it).
pub const ENV_REDIS_CLI: &str = "PAYSUITE_REDIS_CLI";
/// The absolute path of the grpcurl binary.
pub const ENV_GRPCURL: &str = "PAYSUITE_GRPCURL";
/// The absolute path of the directory holding the freshly built service binaries.
pub const ENV_BIN_DIR: &str = "PAYSUITE_BIN_DIR";

/// Runs every check. Non-empty `nextest_args` select tests (passed to `cargo nextest run`)
/// and skip the static checks.
pub fn run(nextest_args: &[String], interrupted: &Interrupted) -> anyhow::Result<()> {
    run_with(nextest_args, &[], interrupted)
}

/// `cargo xtask soak`: the long runs kept out of `test`, with [`ENV_SOAK`] set — the
/// request fuzzers (thousands of inputs per method instead of dozens) and the bank
/// workload under faults (ten minutes instead of one). Arguments select other tests
/// instead, as for `test`.
pub fn soak(nextest_args: &[String], interrupted: &Interrupted) -> anyhow::Result<()> {
    let mut selection = if nextest_args.is_empty() {
        vec!["fuzz_".to_owned(), "spawned_bank_".to_owned()]
    } else {
        nextest_args.to_vec()
    };
    // A passing soak's figures (the bank's seed, operations, faults) are its report: shown
    // at the end, not captured away.
    selection.extend(["--success-output".to_owned(), "final".to_owned()]);
    run_with(&selection, &[(ENV_SOAK, "1")], interrupted)
}

/// `PAYSUITE_SOAK=1`: tests that have a long form run it.
pub const ENV_SOAK: &str = "PAYSUITE_SOAK";

fn run_with(
    nextest_args: &[String],
    extra_env: &[(&str, &str)],
    interrupted: &Interrupted,
) -> anyhow::Result<()> {
    let grpcurl = tools::grpcurl(interrupted)?;
    let redis_server = tools::redis_server(interrupted)?;
    let redis_cli = tools::redis_cli(interrupted)?;
    if nextest_args.is_empty() {
        static_checks(interrupted)?;
    } else {
        println!("xtask: test arguments given, skipping rustfmt, clippy and buf lint");
    }

    // Tests spawn the service binaries from target/debug. The test targets are built in
    // the same invocation: with them, dev-dependencies take part in feature resolution, so
    // the binaries and nextest's build share one set of dependency builds instead of two.
    step(
        "cargo build",
        cargo(&["build", "--workspace", "--bins", "--tests", "--locked"]),
        interrupted,
    )?;

    let postgres = Postgres::provision(interrupted).context("step `provision PostgreSQL`")?;
    interrupted.check()?;
    let redis = Redis::provision(interrupted).context("step `provision Redis`")?;
    interrupted.check()?;

    let mut nextest = cargo(&[
        "nextest",
        "run",
        "--workspace",
        "--locked",
        "--no-fail-fast",
    ]);
    nextest
        .args(nextest_args)
        .env(ENV_PG_URL, postgres.superuser_url())
        .env(ENV_REDIS_URL, redis.url())
        .env(ENV_REDIS_SERVER, &redis_server)
        .env(ENV_REDIS_CLI, &redis_cli)
        .env(ENV_GRPCURL, &grpcurl)
        .env(ENV_BIN_DIR, target_dir().join("debug"))
        .envs(extra_env.iter().copied());
    step("cargo nextest", nextest, interrupted)?;

    println!("xtask: all checks passed");
    Ok(())
    // `redis` and then `postgres` drop here (and on every early return above).
}

/// The checks that need no servers, cheapest first.
fn static_checks(interrupted: &Interrupted) -> anyhow::Result<()> {
    step(
        "cargo fmt --check",
        cargo(&["fmt", "--all", "--", "--check"]),
        interrupted,
    )?;
    step(
        "cargo clippy",
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
        interrupted,
    )?;
    check_no_duplicate_core_dependencies(interrupted)
        .context("step `one version of each core crate`")?;
    let mut buf = std::process::Command::new(tools::buf(interrupted)?);
    buf.arg("lint").current_dir(workspace_root());
    step("buf lint", buf, interrupted)?;
    crate::manifests::validate(interrupted)
}

/// Crates of which exactly one version may be linked: two tonics or prosts do not
/// interoperate, and two OpenTelemetry SDKs silently lose telemetry.
const SINGLE_VERSION: &[&str] = &[
    "tonic",
    "prost",
    "opentelemetry",
    "tokio",
    "hyper",
    "h2",
    "tower",
    "sqlx",
    "redis",
];

/// Fails when `cargo tree -d` shows a second version of a [`SINGLE_VERSION`] crate family.
fn check_no_duplicate_core_dependencies(interrupted: &Interrupted) -> anyhow::Result<()> {
    interrupted.check()?;
    println!("xtask: ── one version of each core crate");
    let output = cargo(&[
        "tree",
        "--workspace",
        "-d",
        "--depth",
        "0",
        "--prefix",
        "none",
        "--locked",
    ])
    .output()
    .context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut versions: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(version)) = (words.next(), words.next()) {
            let family = name.split(['-', '_']).next().unwrap_or(name);
            if SINGLE_VERSION.contains(&family) {
                versions
                    .entry(name.to_owned())
                    .or_default()
                    .insert(version.to_owned());
            }
        }
    }
    let duplicated: Vec<String> = versions
        .into_iter()
        .filter(|(_, versions)| versions.len() > 1)
        .map(|(name, versions)| format!("{name} {versions:?}"))
        .collect();
    if !duplicated.is_empty() {
        bail!("several versions linked of: {}", duplicated.join(", "));
    }
    Ok(())
}
