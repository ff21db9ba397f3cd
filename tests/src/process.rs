//! Service binaries as real processes, for tests that signal or kill them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{ENV_BIN_DIR, LIVENESS};

/// Freezes process `pid` (SIGSTOP) and returns once every one of its threads is stopped:
/// connections stay open and nothing is answered. `kill` only starts the stop — the
/// kernel stops a process's threads one after another — so until the last one is stopped
/// the process may still answer a request sent after the signal.
pub async fn freeze(pid: u32) -> anyhow::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGSTOP)?;
    tokio::time::timeout(LIVENESS, async {
        while !all_threads_stopped(pid)? {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("process {pid} not stopped after {LIVENESS:?}"))?
}

/// Whether every thread of `pid` is in state `T` (stopped), from `/proc/<pid>/task/*/stat`.
fn all_threads_stopped(pid: u32) -> anyhow::Result<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        // `pid (comm) state …`: the state follows the last `)` (comm may hold one).
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state != Some("T") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The path of a workspace binary (`payment-svc`, …) built by `cargo xtask test`.
pub fn binary_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os(ENV_BIN_DIR) {
        Some(dir) => PathBuf::from(dir),
        // target/debug/deps/suite-<hash> → target/debug
        None => std::env::current_exe()?
            .parent()
            .and_then(|deps| deps.parent())
            .map(PathBuf::from)
            .context("cannot locate the target directory")?,
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} does not exist: run `cargo build --bins` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// Captured output lines of a child process.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(line);
        }
    }

    /// Everything captured so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().map(|lines| lines.clone()).unwrap_or_default()
    }

    /// Everything captured so far, joined for assertion messages.
    pub fn joined(&self) -> String {
        self.snapshot().join("\n")
    }
}

/// A running service binary; killed when dropped.
#[derive(Debug)]
pub struct SpawnedService {
    name: String,
    child: Child,
    addr: SocketAddr,
    stdout: Lines,
    stderr: Lines,
    /// The tasks reading its stdout and stderr, done at end of file.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl SpawnedService {
    /// Starts `binary` with `envs` (plus `LISTEN_ADDR=127.0.0.1:0` unless given) and waits
    /// until its log says where it is serving.
    pub async fn start(binary: &str, envs: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::spawn(binary, Command::new(binary_path(binary)?), envs).await
    }

    /// Starts `binary` as [`Self::start`] does, in a mount namespace of its own where
    /// `/etc/hosts` is `hosts`, bind-mounted: rewriting `hosts` in place (not by rename)
    /// changes what the process resolves, as a DNS update would. Needs root, as the suite
    /// has on its CI machine; the process keeps its pid (`unshare` and `sh` exec it).
    pub async fn start_with_hosts(
        binary: &str,
        envs: &[(&str, String)],
        hosts: &Path,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$1""#)
            .arg(hosts)
            .arg(binary_path(binary)?);
        Self::spawn(binary, command, envs).await
    }

    async fn spawn(
        binary: &str,
        mut command: Command,
        envs: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .envs(crate::identity::service_env())
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {binary}"))?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        let (addr_tx, mut addr_rx) = watch::channel(None::<SocketAddr>);
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let lines = stdout.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(out).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if let Some(addr) = serving_address(&line) {
                        let _ = addr_tx.send(Some(addr));
                    }
                    lines.push(line);
                }
            }));
        }
        if let Some(err) = child.stderr.take() {
            let lines = stderr.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(err).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.push(line);
                }
            }));
        }
        let addr = tokio::time::timeout(LIVENESS, async {
            loop {
                if let Some(addr) = *addr_rx.borrow_and_update() {
                    return Ok(addr);
                }
                if addr_rx.changed().await.is_err() {
                    bail!("exited before serving");
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("not serving after {LIVENESS:?}")));
        match addr {
            Ok(addr) => Ok(Self {
                name: binary.to_owned(),
                child,
                addr,
                stdout,
                stderr,
                readers,
            }),
            Err(err) => {
                let _ = child.start_kill();
                bail!(
                    "{binary}: {err}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    stdout.joined(),
                    stderr.joined()
                )
            }
        }
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Freezes the process (see [`freeze`]).
    pub async fn freeze(&self) -> anyhow::Result<()> {
        freeze(self.child.id().context("process already reaped")?).await
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Waits (at most `bound`) for the process to exit, then reads its output to the end,
    /// so its last log lines are there.
    pub async fn wait(&mut self, bound: Duration) -> anyhow::Result<ExitStatus> {
        let status = tokio::time::timeout(bound, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {bound:?}", self.name))?
            .context("waiting for the process")?;
        // A child it left behind may hold the pipes open: bounded, then give up on them.
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(LIVENESS, reader).await;
        }
        Ok(status)
    }

    /// Its stdout lines (JSON logs).
    pub fn stdout(&self) -> &Lines {
        &self.stdout
    }

    /// Its stderr lines.
    pub fn stderr(&self) -> &Lines {
        &self.stderr
    }
}

/// The address from the server's `serving gRPC` log line.
fn serving_address(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "serving gRPC" {
        return None;
    }
    fields.get("address")?.as_str()?.parse().ok()
}

/// What a process that ran to completion left behind.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output (JSON logs).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `binary` to completion (bounded by [`LIVENESS`]), for commands and start-up failures.
pub async fn run_to_exit(
    binary: &str,
    envs: &[(&str, String)],
    args: &[&str],
) -> anyhow::Result<Finished> {
    let output = Command::new(binary_path(binary)?)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        // Tests bind only to loopback, on a port the kernel picks.
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(crate::identity::service_env())
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIVENESS, output)
        .await
        .with_context(|| format!("{binary} still running after {LIVENESS:?}"))??;
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
