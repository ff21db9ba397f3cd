//! `cargo xtask test`: what CI runs. Static checks first (cheap failures early), then
//! the service binaries, then every test against throwaway PostgreSQL and Redis.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

use crate::postgres::Postgres;
use crate::redis::Redis;
use crate::tools::Tools;
use crate::{target_dir, workspace_root};

/// Runs the checks; `filter` (nextest filters) narrows the tests and skips static checks.
pub fn run(filter: &[String], interrupted: &AtomicBool) -> anyhow::Result<()> {
    let tools = Tools::ensure(&target_dir().join("tools"), true)?;
    if filter.is_empty() {
        step(
            "rustfmt",
            cargo(&["fmt", "--all", "--", "--check"]),
            interrupted,
        )?;
        step(
            "clippy",
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
        check_no_duplicate_core_dependencies()?;
        let mut buf = Command::new(&tools.buf);
        buf.arg("lint").current_dir(workspace_root());
        step("buf lint", buf, interrupted)?;
    }
    // Tests spawn the service binaries from target/debug.
    step(
        "build binaries",
        cargo(&["build", "--workspace", "--bins", "--locked"]),
        interrupted,
    )?;

    let postgres = Postgres::provision(&tools.postgres_bin)?;
    let redis = Redis::provision(&tools.redis_server)?;
    let mut nextest = cargo(&[
        "nextest",
        "run",
        "--workspace",
        "--locked",
        "--no-fail-fast",
    ]);
    nextest
        .args(filter)
        .env("PAYSUITE_TEST_PG_URL", postgres.superuser_url())
        .env("PAYSUITE_TEST_REDIS_URL", redis.url())
        .env("PAYSUITE_GRPCURL", &tools.grpcurl)
        .env("PAYSUITE_BIN_DIR", target_dir().join("debug"));
    step("tests", nextest, interrupted)?;

    // Kubernetes manifest validation joins here once k8s/ holds manifests.
    println!("xtask: all checks passed");
    Ok(())
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
fn check_no_duplicate_core_dependencies() -> anyhow::Result<()> {
    println!("xtask: ── duplicate core dependencies");
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

/// `cargo <args>` in the workspace root.
pub fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.args(args).current_dir(workspace_root());
    command
}

/// Runs one named step with inherited output; fails naming the step.
pub fn step(name: &str, mut command: Command, interrupted: &AtomicBool) -> anyhow::Result<()> {
    println!("xtask: ── {name}");
    let status = command
        .status()
        .with_context(|| format!("{name}: cannot start"))?;
    if interrupted.load(Ordering::SeqCst) {
        bail!("{name}: interrupted");
    }
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
