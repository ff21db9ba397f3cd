//! Project automation: `cargo xtask <command>`.
//!
//! - `up`: provision PostgreSQL and Redis, start the three services, print grpcurl
//!   commands, and tear everything down on Ctrl-C.
//! - `test`: the same provisioning, then every check CI runs (`.ci/run` calls this).
//! - `check-manifests`: render and validate `k8s/` offline (part of `test` too).
//! - `token`: an identity token signed with the development key, for grpcurl.
//! - `bench`: the DESIGN §9 measurements, written to BENCHMARKS.md.
//! - `soak`: the long runs (`PAYSUITE_SOAK=1`): the request fuzzers with thousands of inputs,
//!   the bank workload under faults for ten minutes.
//!
//! Modules:
//! - [`tools`] finds or installs what the commands run (apt, pip, npm);
//! - [`postgres`] and [`redis`] provision a throwaway server (or take one from the
//!   environment) behind a guard that stops it on drop;
//! - [`ports`] finds free ports and refuses busy ones;
//! - [`process`] runs child processes: named steps, signal forwarding, bounded stops;
//! - [`manifests`] renders and validates `k8s/` and checks it against the services' config;
//! - [`identity`] keeps the development keys `up` hands to the services;
//! - [`up`] and [`test`] are the commands; [`bench`] holds the benchmarks (one file per
//!   scenario, shared load generation and reporting).
//!
//! Teardown rides on `Drop`: every server or service xtask starts is owned by a guard, and
//! commands return errors instead of exiting, so guards run on success, on failure and after
//! Ctrl-C or SIGTERM (which only raise [`Interrupted`]; the commands notice and unwind).

#![allow(clippy::print_stdout)]

mod bench;
mod identity;
mod manifests;
mod ports;
mod postgres;
mod process;
mod redis;
mod test;
mod tools;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "paysuite project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start PostgreSQL, Redis and the three services; print grpcurl commands; Ctrl-C stops all.
    ///
    /// Uses DATABASE_URL (a superuser) and REDIS_URL instead of starting servers when set.
    /// Service logs go to .paysuite/up/ in the workspace.
    Up,
    /// What CI runs: rustfmt, clippy, buf lint, then every test against throwaway
    /// PostgreSQL and Redis (or DATABASE_URL, a superuser, and REDIS_URL when set).
    ///
    /// With arguments, only the tests they select run and the static checks (rustfmt,
    /// clippy, buf lint) are skipped. The arguments go to `cargo nextest run` as they are:
    /// `cargo xtask test ledger` runs tests whose name contains "ledger";
    /// `cargo xtask test -- -E 'test(/spawned/)' --no-capture` passes nextest options.
    Test {
        /// Test-name filters and nextest options, passed through to `cargo nextest run`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "NEXTEST_ARGS"
        )]
        nextest_args: Vec<String>,
    },
    /// The long runs kept out of `test`, with PAYSUITE_SOAK=1: the request fuzzers
    /// (thousands of generated inputs per method) and the bank workload under faults (ten
    /// minutes). Arguments select tests as for `test`.
    Soak {
        /// Test-name filters and nextest options (default: the fuzzers and the bank).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "NEXTEST_ARGS"
        )]
        nextest_args: Vec<String>,
    },
    /// Render every k8s/ overlay and validate it offline: the drift check against the
    /// services' configuration, kubernetes-validate --strict and checkov (manifests and
    /// Dockerfile). `test` runs the same among its static checks.
    CheckManifests,
    /// Print an identity token signed with the development key (what `up` trusts), for
    /// `grpcurl -H "x-paysuite-identity: $(cargo xtask token …)"` straight to a service.
    Token {
        /// The principal (tenant) the token speaks for.
        #[arg(long, default_value = "demo")]
        principal: String,
        /// Comma-separated scopes: payments:read, payments:write, admin, ratelimit:check.
        #[arg(long, default_value = "payments:read,payments:write")]
        scopes: String,
        /// The service the token is for: payment-svc or ratelimit-svc.
        #[arg(long, default_value = "payment-svc")]
        audience: String,
        /// Lifetime, at most the services' IDENTITY_MAX_TTL (1h by default).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// The DESIGN §9 benchmarks: release builds pinned to CPU 1, our load generator on
    /// CPU 0, every figure a ratio against a baseline of the same run; prints a table and
    /// writes BENCHMARKS.md (only with the default protocol unless --write).
    ///
    /// `cargo xtask bench gateway --quick` is a quick check (1 s warm-up, 3 s runs, 1 round).
    Bench(bench::BenchArgs),
    /// The load generator of `bench` (run by it, release build, pinned).
    #[command(hide = true)]
    BenchLoad(bench::load::LoadArgs),
    /// The no-op tonic RateLimitService of the `limiter` and `gateway` benches (run by them, pinned).
    #[command(hide = true)]
    BenchNoopServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench's helper processes own nothing to tear down: they keep the default
    // signal handling (the no-op server drains on SIGTERM by itself), so a stop signal
    // ends them at once.
    let cli = match cli.command {
        Command::BenchLoad(args) => return exit_code(bench::load::main(&args)),
        Command::BenchNoopServer { listen } => return exit_code(bench::noop::main(listen)),
        command => Cli { command },
    };
    let interrupted = Interrupted::install();
    let result = match cli.command {
        Command::Up => up::run(&interrupted),
        Command::Test { nextest_args } => test::run(&nextest_args, &interrupted),
        Command::Soak { nextest_args } => test::soak(&nextest_args, &interrupted),
        Command::CheckManifests => manifests::validate(&interrupted),
        Command::Token {
            principal,
            scopes,
            audience,
            ttl,
        } => identity::print_token(&principal, &scopes, &audience, &ttl),
        Command::Bench(args) => bench::run(&args, &interrupted),
        // Ran above, before any signal handler was installed.
        Command::BenchLoad(_) | Command::BenchNoopServer { .. } => Ok(()),
    };
    // Every guard has dropped by now: the servers are stopped and temp dirs removed.
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set once SIGINT, SIGTERM or SIGHUP arrives. xtask does not die of those signals: it
/// stops what it started and then exits non-zero.
#[derive(Debug, Clone)]
pub struct Interrupted(Arc<AtomicBool>);

impl Interrupted {
    fn install() -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = Arc::clone(&flag);
        let installed = ctrlc::set_handler(move || {
            if !handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nxtask: interrupted, stopping what was started");
            }
        });
        if let Err(err) = installed {
            eprintln!("xtask: cannot install the Ctrl-C handler: {err}");
        }
        Self(flag)
    }

    /// Whether a stop signal has arrived.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Fails with "interrupted" once a stop signal has arrived, so commands unwind
    /// (dropping their guards) between phases.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` (made absolute, as cargo resolves it
/// against the directory cargo was started in) or `<workspace>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            std::path::absolute(&dir).unwrap_or(dir)
        }
        _ => workspace_root().join("target"),
    }
}

/// A random hex string from the kernel's CSPRNG, for throwaway passwords and names.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command};

    fn nextest_args(args: &[&str]) -> anyhow::Result<Vec<String>> {
        match Cli::try_parse_from(args)?.command {
            Command::Test { nextest_args } => Ok(nextest_args),
            other => anyhow::bail!("parsed as {other:?}"),
        }
    }

    #[test]
    fn test_arguments_pass_through_to_nextest() -> anyhow::Result<()> {
        assert!(nextest_args(&["xtask", "test"])?.is_empty());
        assert_eq!(nextest_args(&["xtask", "test", "ledger"])?, ["ledger"]);
        assert_eq!(
            nextest_args(&["xtask", "test", "--", "-E", "test(/spawned/)"])?,
            ["-E", "test(/spawned/)"]
        );
        assert_eq!(
            nextest_args(&["xtask", "test", "ledger", "--no-capture"])?,
            ["ledger", "--no-capture"]
        );
        assert_eq!(
            nextest_args(&["xtask", "test", "-E", "test(x)"])?,
            ["-E", "test(x)"]
        );
        Ok(())
    }
}
