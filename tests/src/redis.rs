//! Redis for tests: each test's own key space on the shared throwaway Redis
//! ([`TestRedis`]), or private `redis-server` processes a test may freeze, kill and
//! restart without disturbing anyone else ([`PrivateRedis`], [`RedisCluster`]).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{ENV_REDIS_CLI, ENV_REDIS_SERVER, ENV_REDIS_URL, LIVENESS, provided};

/// One test's Redis.
#[derive(Debug)]
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    /// A key space no other test uses.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            url: provided(ENV_REDIS_URL)?,
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        })
    }

    /// The Redis URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The prefix every key of this test must start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A connection, for assertions on what the service wrote.
    pub async fn connection(&self) -> anyhow::Result<::redis::aio::MultiplexedConnection> {
        let client = ::redis::Client::open(self.url.as_str())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

/// A `redis-server` process of this test's own on a free port of 127.0.0.1, without
/// persistence; killed when dropped (also when frozen).
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a standalone server.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` arguments (`--cluster-enabled yes`, …).
    pub async fn start_with(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_inner(extra_args, None).await
    }

    /// Starts a server that speaks only TLS, with a certificate for 127.0.0.1 signed by a
    /// CA made for it ([`PrivateRedis::ca_file`]); clients need no certificate.
    pub async fn start_tls() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let files = write_certificates(dir.path())?;
        let mut redis = Self::prepare(&[], Some(files))?;
        redis.dir = dir;
        redis.spawn().await?;
        Ok(redis)
    }

    async fn start_inner(extra_args: &[&str], tls: Option<TlsFiles>) -> anyhow::Result<Self> {
        let mut redis = Self::prepare(extra_args, tls)?;
        redis.spawn().await?;
        Ok(redis)
    }

    fn prepare(extra_args: &[&str], tls: Option<TlsFiles>) -> anyhow::Result<Self> {
        Ok(Self {
            port: free_port()?,
            dir: tempfile::tempdir()?,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            tls,
            child: None,
        })
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` when it speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The PEM file of the CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|files| files.ca.clone())
    }

    /// A client for this server (trusting its CA when it speaks TLS).
    pub fn client(&self) -> anyhow::Result<::redis::Client> {
        Ok(match self.ca_file() {
            Some(ca_file) => ::redis::Client::build_with_tls(
                self.url(),
                ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca_file)?),
                },
            )?,
            None => ::redis::Client::open(self.url())?,
        })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, as the cluster commands name nodes.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A fresh connection (a frozen server makes it wait: bound the calls).
    pub async fn connection(&self) -> anyhow::Result<::redis::aio::MultiplexedConnection> {
        let client = self.client()?;
        let connection = tokio::time::timeout(LIVENESS, client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("connecting to {}", self.address()))??;
        Ok(connection)
    }

    /// Runs one command on a fresh connection, bounded by [`LIVENESS`].
    pub async fn query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> anyhow::Result<T> {
        let mut connection = self.connection().await?;
        tokio::time::timeout(LIVENESS, cmd.query_async(&mut connection))
            .await
            .with_context(|| format!("{} did not answer", self.address()))?
            .with_context(|| format!("on {}", self.address()))
    }

    /// One counter of `INFO <section>` (`cmdstat_evalsha` → its `calls`, or a plain
    /// `field:value` line), 0 when absent.
    pub async fn info_counter(&self, section: &str, field: &str) -> anyhow::Result<u64> {
        let info: String = self.query(::redis::cmd("INFO").arg(section)).await?;
        Ok(info_counter(&info, field))
    }

    /// Freezes the server ([`crate::process::freeze`]): connections stay open and nothing
    /// is answered, the fault that exercises deadlines (a killed server refuses connections
    /// at once).
    pub async fn freeze(&self) -> anyhow::Result<()> {
        crate::process::freeze(self.pid()?).await
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            tokio::time::timeout(LIVENESS, child.wait())
                .await
                .context("redis-server still running after SIGKILL")??;
        }
        Ok(())
    }

    /// Kills the server and starts a new one on the same port and directory: its data
    /// (no persistence) and its script cache are gone; a cluster node keeps its identity
    /// and slots (`nodes.conf`).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .context("redis-server is not running")
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(self.pid()?)?), signal)?;
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = provided(ENV_REDIS_SERVER)?;
        let log = self.dir.path().join("redis.log");
        let mut command = Command::new(&binary);
        if let Some(files) = &self.tls {
            command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + LIVENESS;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server exited ({status}): {}", tail(&log));
            }
            if self.ping().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "redis-server on port {} not answering after {LIVENESS:?}: {}",
                    self.port,
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ping(&self) -> bool {
        let attempt = async {
            let client = self.client()?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            let pong: String = ::redis::cmd("PING").query_async(&mut connection).await?;
            anyhow::Ok(pong == "PONG")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), attempt).await,
            Ok(Ok(true))
        )
    }

    fn directory(&self) -> &Path {
        self.dir.path()
    }
}

/// A Redis Cluster of three masters (no replicas), each a [`PrivateRedis`].
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<PrivateRedis>,
    /// The CA and the nodes' certificate, with TLS.
    _certificates: Option<tempfile::TempDir>,
}

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create`
    /// (slots split evenly) and waits until every node reports `cluster_state:ok`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_inner(false).await
    }

    /// [`RedisCluster::start`] with TLS everywhere: clients and the cluster bus
    /// (`tls-cluster`), one CA for every node ([`RedisCluster::ca_file`]).
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start_inner(true).await
    }

    async fn start_inner(tls: bool) -> anyhow::Result<Self> {
        let certificates = if tls {
            Some(tempfile::tempdir()?)
        } else {
            None
        };
        let files = match &certificates {
            Some(dir) => Some(write_certificates(dir.path())?),
            None => None,
        };
        let mut nodes = Vec::new();
        for _ in 0..3 {
            // The bus port defaults to port + 10000, which may not exist above 55535.
            let bus_port = free_port()?.to_string();
            let tls_args: &[&str] = if tls {
                &["--tls-cluster", "yes", "--tls-replication", "yes"]
            } else {
                &[]
            };
            nodes.push(
                PrivateRedis::start_inner(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus_port,
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        // A master killed and restarted by a test must not stop the others
                        // from serving their own slots.
                        "--cluster-require-full-coverage",
                        "no",
                    ]
                    .into_iter()
                    .chain(tls_args.iter().copied())
                    .collect::<Vec<_>>(),
                    files.clone(),
                )
                .await?,
            );
        }
        let cli = provided(ENV_REDIS_CLI)?;
        let mut create = Command::new(&cli);
        if let Some(ca_file) = nodes.first().and_then(PrivateRedis::ca_file) {
            create.arg("--tls").arg("--cacert").arg(ca_file);
        }
        create
            .args(["--cluster", "create"])
            .args(nodes.iter().map(PrivateRedis::address))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(LIVENESS, create.output())
            .await
            .context("redis-cli --cluster create did not finish")??;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let cluster = Self {
            nodes,
            _certificates: certificates,
        };
        cluster.wait_until_ok().await?;
        Ok(cluster)
    }

    /// The PEM file of the CA of a TLS cluster's certificate.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.nodes.first().and_then(PrivateRedis::ca_file)
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[PrivateRedis] {
        &self.nodes
    }

    /// A node, to freeze or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut PrivateRedis {
        &mut self.nodes[index]
    }

    /// The seed URLs, comma-separated, as `REDIS_URL` takes them with `REDIS_CLUSTER`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(PrivateRedis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every node says `cluster_state:ok` and agrees on who owns each slot.
    pub async fn wait_until_ok(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + LIVENESS;
        loop {
            let mut states = Vec::new();
            let mut slot_maps = Vec::new();
            for node in &self.nodes {
                let info: String = node
                    .query(::redis::cmd("CLUSTER").arg("INFO"))
                    .await
                    .unwrap_or_default();
                states.push(info.contains("cluster_state:ok"));
                slot_maps.push(self.slot_owners_seen_by(node).await.unwrap_or_default());
            }
            let agreed = slot_maps.windows(2).all(|pair| pair[0] == pair[1])
                && slot_maps.first().is_some_and(|map| !map.is_empty());
            if states.iter().all(|ok| *ok) && agreed {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("cluster not ok after {LIVENESS:?}: states {states:?}, slots {slot_maps:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node id of node `index`.
    pub async fn node_id(&self, index: usize) -> anyhow::Result<String> {
        self.nodes[index]
            .query(::redis::cmd("CLUSTER").arg("MYID"))
            .await
    }

    /// The hash slot of `key`.
    pub async fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        self.nodes[0]
            .query(::redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
    }

    /// The index of the node that owns `slot`, as node 0 sees it.
    pub async fn owner_of(&self, slot: u16) -> anyhow::Result<usize> {
        let owners = self.slot_owners_seen_by(&self.nodes[0]).await?;
        owners
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, port)| *port)
            .and_then(|port| self.nodes.iter().position(|node| node.port() == port))
            .with_context(|| format!("no node owns slot {slot}"))
    }

    /// Moves `slot` with its keys from its owner to node `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the
    /// source, MIGRATE of every key, then SETSLOT NODE on every node. Clients that still
    /// route the slot to the old owner get MOVED from then on.
    pub async fn move_slot(&self, slot: u16, to: usize) -> anyhow::Result<()> {
        let from = self.owner_of(slot).await?;
        if from == to {
            bail!("slot {slot} already lives on node {to}");
        }
        let from_id = self.node_id(from).await?;
        let to_id = self.node_id(to).await?;
        let setslot = |state: &str, id: &str| {
            let mut cmd = ::redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let () = self.nodes[to]
            .query(&setslot("IMPORTING", &from_id))
            .await?;
        let () = self.nodes[from]
            .query(&setslot("MIGRATING", &to_id))
            .await?;
        loop {
            let keys: Vec<String> = self.nodes[from]
                .query(
                    ::redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                )
                .await?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = ::redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(self.nodes[to].port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys);
            let _: String = self.nodes[from].query(&migrate).await?;
        }
        // The new owner first, then the old one (which then answers MOVED), then the rest.
        for index in [to, from]
            .into_iter()
            .chain((0..self.nodes.len()).filter(|index| *index != to && *index != from))
        {
            let () = self.nodes[index].query(&setslot("NODE", &to_id)).await?;
        }
        self.wait_until_ok().await?;
        if self.owner_of(slot).await? != to {
            bail!("slot {slot} did not move to node {to}");
        }
        Ok(())
    }

    /// `CLUSTER SLOTS` as (first slot, last slot, master port), sorted.
    async fn slot_owners_seen_by(
        &self,
        node: &PrivateRedis,
    ) -> anyhow::Result<Vec<(u16, u16, u16)>> {
        let slots: Vec<::redis::Value> = node.query(::redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let mut owners = Vec::new();
        for range in slots {
            let ::redis::Value::Array(fields) = range else {
                continue;
            };
            let number = |value: Option<&::redis::Value>| match value {
                Some(::redis::Value::Int(n)) => u16::try_from(*n).ok(),
                _ => None,
            };
            let master_port = match fields.get(2) {
                Some(::redis::Value::Array(master)) => number(master.get(1)),
                _ => None,
            };
            if let (Some(start), Some(end), Some(port)) =
                (number(fields.first()), number(fields.get(1)), master_port)
            {
                owners.push((start, end, port));
            }
        }
        owners.sort_unstable();
        Ok(owners)
    }

    /// Where a node keeps its files (its log, for failure messages).
    pub fn log_of(&self, index: usize) -> String {
        tail(&self.nodes[index].directory().join("redis.log"))
    }
}

/// A TLS server's files: the CA, and the certificate (for 127.0.0.1) it signed.
#[derive(Debug, Clone)]
struct TlsFiles {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// Writes a CA and a certificate for 127.0.0.1 signed by it into `dir`.
fn write_certificates(dir: &Path) -> anyhow::Result<TlsFiles> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "paysuite test Redis CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let server = server_params.signed_by(&server_key, &ca)?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, server.pem())?;
    std::fs::write(&files.key, server_key.serialize_pem())?;
    Ok(files)
}

/// A counter from `INFO` text: the `calls` of a `cmdstat_*` line, the `count` of an
/// `errorstat_*` line, or the number of a `field:value` line; 0 when absent.
pub fn info_counter(info: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| {
            let value = value.trim();
            if value.contains('=') {
                value.split(',').find_map(|pair| {
                    let (name, number) = pair.split_once('=')?;
                    matches!(name, "calls" | "count")
                        .then(|| number.parse().ok())
                        .flatten()
                })
            } else {
                value.parse().ok()
            }
        })
        .unwrap_or(0)
}

/// A port on 127.0.0.1 nothing listens on now (the kernel picks it).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
