//! A throwaway PostgreSQL cluster on a free port of 127.0.0.1, or the server named by
//! `DATABASE_URL`.
//!
//! PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user
//! (through `runuser`) with its files under /tmp, where that user can reach them (not under
//! /root, nor under a `TMPDIR` that may point there). The superuser gets a generated
//! password and scram-sha-256 authentication; the server listens on 127.0.0.1 only, keeps
//! its Unix socket inside the data directory, and trades durability for speed
//! (fsync, synchronous_commit and full_page_writes off). [`Cluster`] stops the server
//! (`pg_ctl stop -m immediate`) and removes every file when it drops, also when the start
//! failed halfway.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::process::{run_captured, tail};
use crate::{Interrupted, ports, random_hex, tools};

/// A PostgreSQL server the commands can use; stopped and deleted on drop if xtask
/// started it.
#[derive(Debug)]
pub struct Postgres {
    superuser_url: String,
    host: String,
    port: u16,
    /// Declared last so it drops last (it owns the server the fields above point to).
    cluster: Option<Cluster>,
}

impl Postgres {
    /// Uses `DATABASE_URL` (which must be a superuser URL) when set, otherwise starts a
    /// throwaway cluster, installing PostgreSQL when missing.
    pub fn provision(interrupted: &Interrupted) -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => {
                let (host, port) = host_and_port(&url)?;
                println!("xtask: using PostgreSQL from DATABASE_URL ({host}:{port})");
                Ok(Self {
                    superuser_url: url,
                    host,
                    port,
                    cluster: None,
                })
            }
            _ => {
                let bin_dir = tools::postgres_bin(interrupted)?;
                Self::start(&bin_dir).context("starting a throwaway PostgreSQL")
            }
        }
    }

    fn start(bin_dir: &Path) -> anyhow::Result<Self> {
        let as_postgres_user = nix::unistd::geteuid().is_root();
        let base_dir = if as_postgres_user {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        }
        .join(format!(
            "paysuite-pg-{}-{}",
            std::process::id(),
            random_hex(4)?
        ));
        create_private_dir(&base_dir)?;
        // From here on the guard removes `base_dir` whatever happens next.
        let mut cluster = Cluster {
            data_dir: base_dir.join("data"),
            log: base_dir.join("postgres.log"),
            base_dir,
            bin_dir: bin_dir.to_owned(),
            as_postgres_user,
            started: false,
        };
        if as_postgres_user {
            give_to_postgres_user(&cluster.base_dir)?;
        }

        let password = random_hex(16)?;
        let password_file = cluster.base_dir.join("superuser-password");
        write_private(&password_file, &format!("{password}\n"))?;
        if as_postgres_user {
            give_to_postgres_user(&password_file)?;
        }
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(&cluster.data_dir)
            .args([
                "--username=postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", password_file.display()));
        run_captured(initdb, "initdb")?;
        std::fs::remove_file(&password_file)
            .with_context(|| format!("removing {}", password_file.display()))?;

        let port = ports::free_port()?;
        let server_options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=300 -c shared_buffers=128MB",
            socket_dir = cluster.data_dir.display()
        );
        let mut pg_ctl = cluster.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&cluster.data_dir)
            .arg("-l")
            .arg(&cluster.log)
            .args(["-o", &server_options, "-w", "-t", "60", "start"]);
        // A failed start may still leave a postmaster behind: the guard stops it.
        cluster.started = true;
        run_captured(pg_ctl, "pg_ctl start").with_context(|| tail(&cluster.log, 20))?;
        println!(
            "xtask: PostgreSQL running on 127.0.0.1:{port} (files in {})",
            cluster.base_dir.display()
        );
        Ok(Self {
            superuser_url: format!("postgres://postgres:{password}@127.0.0.1:{port}/postgres"),
            host: "127.0.0.1".to_owned(),
            port,
            cluster: Some(cluster),
        })
    }

    /// The server's log (`pg_ctl -l`), when xtask started the server.
    pub fn log_file(&self) -> Option<&Path> {
        self.cluster.as_ref().map(|cluster| cluster.log.as_path())
    }

    /// The postmaster's pid (first line of `postmaster.pid`), when xtask started the server.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let cluster = self
            .cluster
            .as_ref()
            .context("PostgreSQL was not started by xtask: its postmaster is unknown")?;
        let path = cluster.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("{} names no pid", path.display()))
    }

    /// The directory of the PostgreSQL programs (pgbench, psql, …).
    pub fn bin_dir(&self, interrupted: &Interrupted) -> anyhow::Result<PathBuf> {
        match &self.cluster {
            Some(cluster) => Ok(cluster.bin_dir.clone()),
            None => tools::postgres_bin(interrupted),
        }
    }

    /// Runs one SQL query as the superuser on `database` and returns its rows, one per
    /// line, fields separated by `|` (`psql -At`).
    pub fn query(
        &self,
        database: &str,
        sql: &str,
        interrupted: &Interrupted,
    ) -> anyhow::Result<String> {
        let psql = self.bin_dir(interrupted)?.join("psql");
        let url = match self.superuser_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database}"),
            None => bail!("the superuser URL names no database"),
        };
        let mut command = Command::new(&psql);
        command
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q", "-d"])
            .arg(&url)
            .args(["-c", sql])
            .stdin(Stdio::null());
        let output = run_captured(command, "psql -c")?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned())
    }

    /// A superuser URL (database `postgres`).
    pub fn superuser_url(&self) -> &str {
        &self.superuser_url
    }

    /// The URL of `role` with `password` on `database`, on this server.
    pub fn url_for(&self, role: &str, password: &str, database: &str) -> String {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "postgres://{role}:{password}@{host}:{}/{database}",
            self.port
        )
    }

    /// Runs a SQL script (psql meta-commands such as `\gexec` allowed) as the superuser,
    /// stopping at the first error.
    pub fn psql(&self, script: &str, interrupted: &Interrupted) -> anyhow::Result<()> {
        use std::io::Write as _;
        let psql = match &self.cluster {
            Some(cluster) => cluster.bin_dir.join("psql"),
            None => tools::postgres_bin(interrupted)?.join("psql"),
        };
        let mut child = Command::new(&psql)
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-X", "-d"])
            .arg(&self.superuser_url)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", psql.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .context("writing to psql")?;
        }
        let output = child.wait_with_output().context("waiting for psql")?;
        if !output.status.success() {
            bail!(
                "psql failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A cluster xtask created: its files, and whether a server may be running on them.
#[derive(Debug)]
struct Cluster {
    base_dir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    bin_dir: PathBuf,
    as_postgres_user: bool,
    started: bool,
}

impl Cluster {
    /// A PostgreSQL program, run as the `postgres` user when xtask runs as root. It runs
    /// in its own process group: a terminal's Ctrl-C must not cut `initdb` or `pg_ctl`
    /// short (a half-started server could escape the guard); xtask notices the signal
    /// once they return.
    fn command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.process_group(0);
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started && self.data_dir.join("postmaster.pid").exists() {
            let mut pg_ctl = self.command("pg_ctl");
            pg_ctl.arg("-D").arg(&self.data_dir).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ]);
            match run_captured(pg_ctl, "pg_ctl stop") {
                Ok(_) => println!("xtask: PostgreSQL stopped"),
                Err(err) => eprintln!("xtask: {err:#}"),
            }
        }
        // A cluster that held many test databases takes a few seconds to delete.
        match std::fs::remove_dir_all(&self.base_dir) {
            Ok(()) => println!("xtask: removed {}", self.base_dir.display()),
            Err(err) => eprintln!("xtask: removing {}: {err}", self.base_dir.display()),
        }
    }
}

/// Creates `dir` readable by its owner only (it will hold the cluster and its password).
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn give_to_postgres_user(path: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context("no `postgres` user: is the postgresql package installed?")?;
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("chown postgres {}", path.display()))
}

/// The host and port of a `postgres://` URL (enough to build sibling URLs).
fn host_and_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .context("DATABASE_URL is not a postgres:// URL")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) if !port.ends_with(']') => {
            (host, port.parse().context("DATABASE_URL has a bad port")?)
        }
        _ => (host_port, 5432),
    };
    if host.is_empty() {
        bail!("DATABASE_URL names no host");
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn host_and_port_of_urls() -> anyhow::Result<()> {
        assert_eq!(
            host_and_port("postgres://u:p@db.example:6543/x?sslmode=require")?,
            ("db.example".to_owned(), 6543)
        );
        assert_eq!(
            host_and_port("postgres://localhost/x")?,
            ("localhost".to_owned(), 5432)
        );
        assert_eq!(
            host_and_port("postgresql://u@[::1]:5433/x")?,
            ("[::1]".to_owned(), 5433)
        );
        assert_eq!(
            host_and_port("postgres://[::1]/x")?,
            ("[::1]".to_owned(), 5432)
        );
        assert!(host_and_port("not a url").is_err());
        Ok(())
    }
}
