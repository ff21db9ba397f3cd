//! Project automation: `cargo xtask <command>`.
//!
//! - `up`: provision PostgreSQL and Redis, start the three services, print grpcurl
//!   commands, and tear everything down on Ctrl-C.
//! - `test`: the same provisioning, then every check CI runs (`.ci/run` calls this).
//! - `token`: an identity token signed with the development key, for grpcurl.
//!
//! Modules: [`tools`] installs what is missing, [`postgres`] and [`redis`] run throwaway
//! servers, [`up`] and [`test`] are the commands.

#![allow(clippy::print_stdout)]

mod identity;
mod postgres;
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
    Up,
    /// Run fmt, clippy, buf lint and every test against throwaway PostgreSQL and Redis.
    ///
    /// With FILTER arguments only matching tests run (passed to nextest) and the static
    /// checks (fmt, clippy, buf lint) are skipped.
    Test {
        /// nextest filters (test name substrings).
        filter: Vec<String>,
    },
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        // Children get the same SIGINT from the terminal; xtask itself only notes it, so
        // that its guards can stop the servers it started.
        let interrupted = Arc::clone(&interrupted);
        if let Err(err) = ctrlc::set_handler(move || interrupted.store(true, Ordering::SeqCst)) {
            eprintln!("xtask: cannot install the Ctrl-C handler: {err}");
        }
    }
    let result = match cli.command {
        Command::Up => up::run(&interrupted),
        Command::Test { filter } => test::run(&filter, &interrupted),
        Command::Token {
            principal,
            scopes,
            audience,
            ttl,
        } => identity::print_token(&principal, &scopes, &audience, &ttl),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
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

/// Where cargo puts build output.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A random hex string from the kernel's CSPRNG, for throwaway passwords.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
