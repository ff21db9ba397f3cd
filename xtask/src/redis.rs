//! A throwaway Redis on a free port of 127.0.0.1 (no persistence), or the server named
//! by `REDIS_URL`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::free_port;

/// A Redis server the commands can use; killed on drop if we started it.
#[derive(Debug)]
pub struct Redis {
    url: String,
    child: Option<Child>,
}

impl Redis {
    /// Uses `REDIS_URL` when set, otherwise starts a throwaway server.
    pub fn provision(redis_server: &Path) -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("REDIS_URL") {
            println!("xtask: using Redis from REDIS_URL");
            return Ok(Self { url, child: None });
        }
        let port = free_port()?;
        let child = Command::new(redis_server)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", redis_server.display()))?;
        let redis = Self {
            url: format!("redis://127.0.0.1:{port}"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on port {port} within 30s");
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            println!("xtask: Redis stopped");
        }
    }
}
