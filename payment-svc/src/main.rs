//! The payment-svc binary: `payment-svc` serves; `migrate`, `reconcile` and
//! `rotate-card-keys` do their maintenance job and exit.

use std::io::Write as _;
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
    /// Compare the acquirer's operations (ACQUIRER_URL) with attempts, payments and the
    /// ledger; print every difference and exit non-zero when there is any.
    Reconcile,
    /// Re-encrypt every vaulted card under CARD_ENCRYPTION_ACTIVE_KEY, then exit
    /// (non-zero when a card does not open or rows remain under other keys).
    RotateCardKeys {
        /// Cards re-encrypted per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch_size: i64,
    },
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
        Command::RotateCardKeys { batch_size } => rotate_card_keys(config, batch_size).await,
        Command::Reconcile => reconcile(config).await,
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

async fn rotate_card_keys(config: Config, batch_size: i64) -> anyhow::Result<()> {
    let vault = config.vault.vault()?;
    let pool = payment_svc::db::connect(&config.database).await?;
    let report = payment_svc::rotation::rotate_card_keys(&pool, &vault, batch_size).await;
    pool.close().await;
    let report = report?;
    // The report is the command's output (logs are JSON on stdout too, one object per line).
    writeln!(
        std::io::stdout().lock(),
        "rotate-card-keys: {} card(s) re-encrypted under key {:?}; {} remain under other keys",
        report.rotated,
        report.active_key,
        report.remaining
    )?;
    if !report.unreadable.is_empty() {
        anyhow::bail!(
            "{} card(s) do not open with the configured keys: {}",
            report.unreadable.len(),
            report.unreadable.join(", ")
        );
    }
    if report.remaining > 0 {
        anyhow::bail!(
            "{} card(s) remain under other keys (locked by a concurrent run?): run again",
            report.remaining
        );
    }
    Ok(())
}

async fn reconcile(config: Config) -> anyhow::Result<()> {
    if config.acquirer_url.is_none() {
        anyhow::bail!(
            "reconcile needs ACQUIRER_URL: the in-process sandbox keeps no operations between processes"
        );
    }
    let acquirer = payment_svc::acquirer_from_config(&config)?;
    let pool = payment_svc::db::connect(&config.database).await?;
    let report = payment_svc::reconcile::reconcile(&pool, acquirer.as_ref()).await;
    pool.close().await;
    let report = report?;
    let mut out = std::io::stdout().lock();
    for difference in &report.differences {
        writeln!(out, "difference: {difference}")?;
    }
    writeln!(
        out,
        "reconcile: {} acquirer operations, {} attempts, {} payments compared; {} difference(s)",
        report.operations,
        report.attempts,
        report.payments,
        report.differences.len()
    )?;
    if !report.differences.is_empty() {
        anyhow::bail!("{} difference(s) found", report.differences.len());
    }
    Ok(())
}
