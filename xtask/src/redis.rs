//! A throwaway Redis on a free port of 127.0.0.1 (no persistence), or the server named by
//! `REDIS_URL`.
//!
//! The server runs as a child of xtask in its own process group, so a terminal's Ctrl-C
//! reaches xtask only and Redis stops after the processes that use it. Its working
//! directory and log live in a temporary directory removed on drop.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::{stop, tail};
use crate::{Interrupted, ports, random_hex, tools};

/// How long a fresh redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis server the commands can use; stopped on drop if xtask started it.
#[derive(Debug)]
pub struct Redis {
    url: String,
    server: Option<Server>,
}

#[derive(Debug)]
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Redis {
    /// Uses `REDIS_URL` when set, otherwise starts a throwaway server, installing
    /// redis-server when missing.
    pub fn provision(interrupted: &Interrupted) -> anyhow::Result<Self> {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => {
                println!("xtask: using Redis from REDIS_URL");
                Ok(Self { url, server: None })
            }
            _ => {
                let binary = tools::redis_server(interrupted)?;
                Self::start(binary, interrupted).context("starting a throwaway Redis")
            }
        }
    }

    fn start(binary: PathBuf, interrupted: &Interrupted) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "paysuite-redis-{}-{}",
            std::process::id(),
            random_hex(4)?
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("redis.log");
        let port = ports::free_port()?;
        let spawned = Command::new(&binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err).with_context(|| format!("starting {}", binary.display()));
            }
        };
        // From here on dropping `redis` stops the server and removes `dir`.
        let mut redis = Self {
            url: format!("redis://127.0.0.1:{port}"),
            server: Some(Server { child, dir }),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !answers_ping(port) {
            interrupted.check()?;
            if let Some(server) = &mut redis.server
                && let Some(status) = server.child.try_wait()?
            {
                bail!("redis-server exited ({status}); {}", tail(&log, 20));
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer PING on port {port} within {}s; {}",
                    START_TIMEOUT.as_secs(),
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("xtask: Redis running on 127.0.0.1:{port}");
        Ok(redis)
    }

    /// The Redis URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            stop(&mut server.child, Duration::from_secs(10));
            println!("xtask: Redis stopped");
            if let Err(err) = std::fs::remove_dir_all(&server.dir) {
                eprintln!("xtask: removing {}: {err}", server.dir.display());
            }
        }
    }
}

/// Whether a Redis on 127.0.0.1:`port` answers PING (it refuses commands while loading).
fn answers_ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        let read = stream.read(&mut reply)?;
        Ok(reply[..read].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}
