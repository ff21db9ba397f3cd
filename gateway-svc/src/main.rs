//! The gateway-svc binary: serves by default; `gateway-svc generate-key --principal P
//! --scopes a,b --tier T` prints a new API key and its keys-file line.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use gateway_svc::Config;
use gateway_svc::config::ENV_API_KEY_PEPPER;
use gateway_svc::keys::{self, Pepper};
use secrecy::ExposeSecret as _;
use service_kit::{Env, shutdown, telemetry};

const USAGE: &str = "usage: gateway-svc [generate-key --principal P --scopes a,b --tier T]";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => main_inner().await,
        Some("generate-key") => generate_key(&args[1..]),
        Some(_) => Err(anyhow::anyhow!(USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line on stderr, for humans and for `kubectl logs --previous`.
            eprintln!("gateway-svc: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let telemetry = telemetry::init("gateway-svc")?;
    let result = serve(config).await;
    telemetry.shutdown().await;
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    gateway_svc::run(listener, config, shutdown::signal()).await?;
    Ok(())
}

/// Prints the key on the first line (shown once, never stored) and the line to append
/// to the keys file on the second.
#[allow(clippy::print_stdout)]
fn generate_key(args: &[String]) -> anyhow::Result<()> {
    let mut principal = None;
    let mut scopes = None;
    let mut tier = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--principal" => &mut principal,
            "--scopes" => &mut scopes,
            "--tier" => &mut tier,
            _ => bail!("unknown argument {flag}; {USAGE}"),
        };
        *slot = Some(
            args.next()
                .with_context(|| format!("{flag} needs a value"))?,
        );
    }
    let principal = principal.context(USAGE)?;
    let tier = tier.context(USAGE)?;
    let scopes: Vec<String> = scopes
        .context(USAGE)?
        .split(',')
        .map(str::trim)
        .filter(|scope| !scope.is_empty())
        .map(str::to_owned)
        .collect();
    let pepper = Env::from_process()
        .required_secret(ENV_API_KEY_PEPPER)
        .context("the key's hash is keyed with the gateway's pepper")?;
    let pepper = Pepper::new(pepper)?;
    let generated = keys::generate(&pepper, principal, &scopes, tier)?;
    println!("{}", generated.key.expose_secret());
    println!("{}", generated.line);
    Ok(())
}
