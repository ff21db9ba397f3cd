//! The payment-svc binary: `payment-svc` serves, `payment-svc migrate` migrates and exits.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use payment_svc::Config;
use service_kit::{Env, shutdown, telemetry};

#[derive(Debug, Parser)]
#[command(version, about = "paysuite payment service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply database migrations and grant the service role its privileges, then exit.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line on stderr, for humans and for `kubectl logs --previous`.
            eprintln!("payment-svc: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env(&Env::from_process())?;
    let telemetry = telemetry::init("payment-svc")?;
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => payment_svc::db::migrate(&config.database)
            .await
            .map_err(Into::into),
    };
    telemetry.shutdown().await;
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    payment_svc::run(listener, config, shutdown::signal()).await?;
    Ok(())
}
