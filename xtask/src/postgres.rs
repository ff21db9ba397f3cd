//! A throwaway PostgreSQL cluster on a free port of 127.0.0.1, or an existing server
//! named by `DATABASE_URL`.
//!
//! PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user
//! with its data under /tmp (a place that user can reach). The cluster is tuned for tests
//! (no fsync) and removed, data and all, when the guard drops.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{free_port, random_hex};

/// A PostgreSQL server the commands can use; stopped on drop if we started it.
#[derive(Debug)]
pub struct Postgres {
    superuser_url: String,
    host: String,
    port: u16,
    psql: PathBuf,
    owned: Option<OwnedCluster>,
}

#[derive(Debug)]
struct OwnedCluster {
    base_dir: PathBuf,
    pg_ctl: PathBuf,
    run_as_postgres: bool,
}

impl Postgres {
    /// Uses `DATABASE_URL` when set, otherwise starts a throwaway cluster.
    pub fn provision(bin_dir: &Path) -> anyhow::Result<Self> {
        let psql = bin_dir.join("psql");
        if let Ok(url) = std::env::var("DATABASE_URL") {
            println!("xtask: using PostgreSQL from DATABASE_URL");
            let parsed = Url::parse(&url)?;
            return Ok(Self {
                superuser_url: url,
                host: parsed.host,
                port: parsed.port,
                psql,
                owned: None,
            });
        }
        Self::start(bin_dir)
    }

    fn start(bin_dir: &Path) -> anyhow::Result<Self> {
        let run_as_postgres = nix::unistd::geteuid().is_root();
        let base_dir = std::env::temp_dir().join(format!(
            "paysuite-pg-{}-{}",
            std::process::id(),
            random_hex(4)?
        ));
        let data_dir = base_dir.join("data");
        std::fs::create_dir_all(&base_dir)?;
        let password = random_hex(16)?;
        let password_file = base_dir.join("pwfile");
        std::fs::write(&password_file, format!("{password}\n"))?;
        let owned = OwnedCluster {
            base_dir: base_dir.clone(),
            pg_ctl: bin_dir.join("pg_ctl"),
            run_as_postgres,
        };
        if run_as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base_dir)
                .status()?;
            if !status.success() {
                bail!("chown of {} to postgres failed", base_dir.display());
            }
        }
        let port = free_port()?;
        owned.run(
            Command::new(bin_dir.join("initdb"))
                .arg("-D")
                .arg(&data_dir)
                .args([
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", password_file.display())),
            "initdb",
        )?;
        let server_options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=128MB",
            base_dir.display()
        );
        owned.run(
            Command::new(&owned.pg_ctl)
                .arg("-D")
                .arg(&data_dir)
                .arg("-l")
                .arg(base_dir.join("postgres.log"))
                .args(["-o", &server_options, "-w", "-t", "60", "start"]),
            "pg_ctl start",
        )?;
        println!(
            "xtask: PostgreSQL running on 127.0.0.1:{port} (data in {})",
            data_dir.display()
        );
        Ok(Self {
            superuser_url: format!("postgres://postgres:{password}@127.0.0.1:{port}/postgres"),
            host: "127.0.0.1".to_owned(),
            port,
            psql: bin_dir.join("psql"),
            owned: Some(owned),
        })
    }

    /// A superuser URL (`postgres` database).
    pub fn superuser_url(&self) -> &str {
        &self.superuser_url
    }

    /// The URL of `role` with `password` on `database`.
    pub fn url_for(&self, role: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{role}:{password}@{}:{}/{database}",
            self.host, self.port
        )
    }

    /// Runs a SQL script (psql meta-commands allowed) as the superuser, stopping at the
    /// first error.
    pub fn psql(&self, script: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new(&self.psql)
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-X",
                "-d",
                &self.superuser_url,
                "-f",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running psql")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

impl OwnedCluster {
    fn run(&self, command: &mut Command, what: &str) -> anyhow::Result<()> {
        let command = if self.run_as_postgres {
            let mut wrapped = Command::new("runuser");
            wrapped
                .args(["-u", "postgres", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            wrapped
        } else {
            std::mem::replace(command, Command::new("true"))
        };
        run_quiet(command, what)
    }
}

fn run_quiet(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(owned) = self.owned.take() {
            let data_dir = owned.base_dir.join("data");
            let stopped = owned.run(
                Command::new(&owned.pg_ctl).arg("-D").arg(&data_dir).args([
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ]),
                "pg_ctl stop",
            );
            if let Err(err) = stopped {
                eprintln!("xtask: {err:#}");
            }
            if let Err(err) = std::fs::remove_dir_all(&owned.base_dir) {
                eprintln!("xtask: removing {}: {err}", owned.base_dir.display());
            }
            println!("xtask: PostgreSQL stopped");
        }
    }
}

/// The host and port of a `postgres://` URL (enough to build sibling URLs).
struct Url {
    host: String,
    port: u16,
}

impl Url {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .context("DATABASE_URL is not a URL")?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().context("DATABASE_URL port")?),
            None => (host_port, 5432),
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}
