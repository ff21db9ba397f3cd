//! Child processes: named steps that fail naming themselves, waits that notice Ctrl-C, and
//! bounded stops (SIGTERM, then SIGKILL).

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};

use crate::{Interrupted, target_dir, workspace_root};

/// How often waits look at the child and at the interrupt flag.
const POLL: Duration = Duration::from_millis(50);

/// `cargo <args>` in the workspace root, in its own process group (see [`step`]).
/// `CARGO_TARGET_DIR`, when set, is passed on as an absolute path so the build lands where
/// [`target_dir`] says.
pub fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Its own process group is a background group on a terminal: it must not read the
    // terminal (it never needs to), or the kernel would stop it.
    command
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .process_group(0);
    if std::env::var_os("CARGO_TARGET_DIR").is_some() {
        command.env("CARGO_TARGET_DIR", target_dir());
    }
    // `cargo run` (through the `xtask` alias) gave us the variables cargo sets for a
    // package. Build scripts that track them (ring's does) would see values a plain
    // `cargo build` never sets and rebuild everything on each switch between the two.
    for (name, _) in std::env::vars_os() {
        let set_by_cargo_run = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    name,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if set_by_cargo_run {
            command.env_remove(name);
        }
    }
    command
}

/// Runs one named step with inherited output; fails naming the step. On Ctrl-C the child
/// is interrupted and the step fails as interrupted.
///
/// A child started in its own process group (like [`cargo`]'s) gets SIGINT for its whole
/// group, as a terminal would send it, whether the signal reached xtask from a terminal or
/// from `kill`, so cargo's rustc processes and nextest's tests stop too; the group is
/// killed if it has not stopped after [`GROUP_GRACE`]. Other children (package managers,
/// which may need the terminal for a sudo password) stay in xtask's group.
pub fn step(name: &str, mut command: Command, interrupted: &Interrupted) -> anyhow::Result<()> {
    interrupted.check()?;
    println!("xtask: ── {name}");
    let mut child = command
        .spawn()
        .with_context(|| format!("step `{name}`: cannot start {:?}", command.get_program()))?;
    let status =
        wait_interruptible(&mut child, interrupted).with_context(|| format!("step `{name}`"))?;
    if !status.success() {
        bail!("step `{name}` failed ({status})");
    }
    Ok(())
}

/// How long an interrupted process group may take to stop before it is killed.
const GROUP_GRACE: Duration = Duration::from_secs(30);

/// Waits for `child`; after Ctrl-C interrupts it (see [`step`]) and fails.
pub fn wait_interruptible(
    child: &mut Child,
    interrupted: &Interrupted,
) -> anyhow::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            interrupted.check()?;
            return Ok(status);
        }
        if interrupted.is_set() {
            interrupt(child);
            bail!("interrupted");
        }
        std::thread::sleep(POLL);
    }
}

fn interrupt(child: &mut Child) {
    let Ok(raw_pid) = i32::try_from(child.id()) else {
        return;
    };
    let pid = Pid::from_raw(raw_pid);
    if getpgid(Some(pid)).is_ok_and(|group| group == pid) {
        let _ = killpg(pid, Signal::SIGINT);
        if wait_timeout(child, GROUP_GRACE).is_none() {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = child.wait();
        }
    } else if wait_timeout(child, Duration::from_secs(3)).is_none() {
        // A terminal's Ctrl-C reached it too and had 3 s to work; a `kill` did not.
        stop(child, GROUP_GRACE);
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs; always reaps the child.
pub fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if wait_timeout(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The exit status if `child` exits within `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            // Not our child any more (reaped elsewhere): nothing left to wait for.
            Err(_) => return None,
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}

/// Runs `command` to completion with captured output; fails with `what` and its output.
pub fn run_captured(mut command: Command, what: &str) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {} {}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}
