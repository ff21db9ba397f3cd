//! The standalone sandbox acquirer (`paysuite.acquirer.v1` on :50054): the in-process
//! sandbox's logic as its own process, for fault tests and demos.

use std::process::ExitCode;

use anyhow::Context as _;
use payment_svc::acquirer::server::{self, SandboxServerConfig};
use service_kit::{Env, shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sandbox-acquirer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let config = SandboxServerConfig::from_env(&Env::from_process())?;
    let telemetry = telemetry::init("sandbox-acquirer")?;
    let result = async {
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
        server::run(listener, config, shutdown::signal()).await?;
        anyhow::Ok(())
    }
    .await;
    telemetry.shutdown().await;
    result
}
