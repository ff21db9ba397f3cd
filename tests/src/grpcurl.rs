//! The real grpcurl binary, as operators use it.

use std::process::Stdio;

use anyhow::Context as _;
use tokio::process::Command;

use crate::{ENV_GRPCURL, LIVENESS};

/// What grpcurl printed and whether it succeeded.
#[derive(Debug)]
pub struct GrpcurlOutput {
    /// Exit status was zero.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `grpcurl -plaintext <args…>` (bounded by [`LIVENESS`]).
pub async fn grpcurl(args: &[&str]) -> anyhow::Result<GrpcurlOutput> {
    run(&["-plaintext"], args).await
}

/// Runs `grpcurl -cacert <ca> <args…>`: TLS, trusting only the authority in `ca`.
pub async fn grpcurl_tls(ca: &std::path::Path, args: &[&str]) -> anyhow::Result<GrpcurlOutput> {
    let ca = ca.to_string_lossy();
    run(&["-cacert", &ca], args).await
}

async fn run(transport: &[&str], args: &[&str]) -> anyhow::Result<GrpcurlOutput> {
    let binary = std::env::var(ENV_GRPCURL).unwrap_or_else(|_| "grpcurl".to_owned());
    let output = Command::new(&binary)
        .args(transport)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIVENESS, output)
        .await
        .context("grpcurl did not finish")?
        .with_context(|| format!("running {binary} (set {ENV_GRPCURL}; cargo xtask test does)"))?;
    Ok(GrpcurlOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
