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
