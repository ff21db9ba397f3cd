//! The ratelimit-svc binary.

use std::process::ExitCode;

use anyhow::Context as _;
use ratelimit_svc::Config;
use service_kit::{Env, shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line on stderr, for humans and for `kubectl logs --previous`.
            eprintln!("ratelimit-svc: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let telemetry = telemetry::init("ratelimit-svc")?;
    let result = serve(config).await;
    telemetry.shutdown().await;
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    ratelimit_svc::run(listener, config, shutdown::signal()).await?;
    Ok(())
}
