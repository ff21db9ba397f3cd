//! A bank-style workload under faults, and the checker that judges what it left behind.
//!
//! [`Bank::start`] runs two payment-svc replicas (spawned, so they can be killed) on one
//! database, the standalone sandbox acquirer, ratelimit-svc on a private Redis, and an
//! in-process gateway in front of them all. [`Bank::run`] opens accounts with known
//! starting balances for a few tenants, then lets many concurrent clients pay, capture,
//! void, refund and transfer through the gateway — retrying with the same idempotency key,
//! some attempts with deadlines too short to be met, some giving up (an unknown outcome)
//! — while a fault schedule drawn from the seed SIGKILLs and restarts replicas, terminates
//! the service's PostgreSQL backends, freezes ratelimit-svc and Redis, and makes the
//! acquirer slow or failing. Faults fire at operation counts, never at wall-clock times,
//! so a seed names one schedule.
//!
//! Afterwards every unknown outcome is retried to completion, the system is left to
//! settle (jobs, pending payments and refunds), and [`check`] compares the client's record
//! with the ground truth read from PostgreSQL and the acquirer: it returns the
//! violations, it never panics half-way. [`naive_transfer`] is the control: a transfer
//! that reads, sleeps and writes without the service's locking, which the checker must
//! report.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sqlx::{Connection as _, PgConnection, Row as _};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::gateway::{KeysFile, TestGateway, with_key};
use crate::payments::{cards, reason};
use crate::postgres::{SERVICE_ROLE, TestDatabase};
use crate::process::SpawnedService;
use crate::redis::PrivateRedis;

/// `PAYSUITE_BANK_SEED`: replays the workload and fault schedule of a printed seed.
pub const ENV_BANK_SEED: &str = "PAYSUITE_BANK_SEED";

/// The currency of every account (the sums are still checked per currency).
const CURRENCY: &str = "BRL";
/// What each customer account starts with.
pub const STARTING_BALANCE: i64 = 20_000;
/// payment-svc's acquirer timeout in the bank: the slow card outlives it.
const ACQUIRER_TIMEOUT: &str = "1s";
/// The sandbox's slow card answers after this (an unknown outcome for payment-svc).
const SLOW_ANSWER: Duration = Duration::from_secs(3);
/// A client's normal per-attempt deadline.
const NORMAL_DEADLINE: Duration = Duration::from_secs(10);
/// A deadline the call cannot meet: the client gives up on that attempt.
const EXPIRED_DEADLINE: Duration = Duration::from_millis(5);
/// A client's normal retry policy (rolling restarts): an operation is sent at most this
/// many times, again after UNAVAILABLE (on the next gateway) or ABORTED (its key busy).
pub const STEADY_ATTEMPTS: usize = 8;
/// Rolling restarts: operations the clients issue between one replacement and the next
/// replica's SIGTERM, so traffic flows through each replacement first.
const ROLL_GAP: u64 = 150;
/// Rolling restarts: how long a stopping process lets calls and streams in flight finish.
/// Calls still running then are cut (CANCELLED), which no normal retry policy retries:
/// 3 s lost 3 of 1,372 operations on a loaded machine. Every stop waits for it in full
/// while a consumer's stream is open through that process.
const DRAIN_TIMEOUT: &str = "10s";

/// The seed: [`ENV_BANK_SEED`] when set, otherwise a fresh one.
pub fn seed() -> anyhow::Result<u64> {
    match std::env::var(ENV_BANK_SEED) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{ENV_BANK_SEED}={text} is not a u64")),
        Err(_) => Ok(rand::random()),
    }
}

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct BankOptions {
    /// The seed of the workload's choices and of the fault schedule.
    pub seed: u64,
    /// How long clients keep issuing new operations.
    pub duration: Duration,
    /// Tenants (principals), each with its own merchant and customer accounts.
    pub tenants: usize,
    /// Concurrent clients per tenant (sharing its accounts).
    pub clients_per_tenant: usize,
    /// Customer accounts per tenant.
    pub customers_per_tenant: usize,
    /// What disturbs the system while the workload runs.
    pub disruption: Disruption,
}

/// What disturbs the system while the workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruption {
    /// Nothing: the clients alone (still retrying at random, some giving up).
    None,
    /// The seeded fault schedule. Clients retry at random, some attempts with deadlines
    /// too short to be met, and some give up (unknown outcomes).
    Faults,
    /// Every service in turn, replica by replica: SIGTERM, a clean exit, and a replacement
    /// on the same address; the workload lasts the whole roll (at least `duration`).
    /// Clients follow a normal retry policy ([`STEADY_ATTEMPTS`]). Needs
    /// [`Bank::start_replicated`].
    RollingRestarts,
}

/// The kinds of fault the schedule injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL one payment-svc replica, then restart it on its address.
    KillReplica,
    /// `pg_terminate_backend` on every backend of payment-svc's role.
    TerminateBackends,
    /// SIGSTOP ratelimit-svc for a while, then SIGCONT.
    FreezeRatelimit,
    /// SIGSTOP Redis for a while, then SIGCONT.
    FreezeRedis,
    /// The acquirer answers slowly for a while.
    SlowAcquirer,
    /// A share of acquirer calls fail for a while.
    FailingAcquirer,
}

const FAULT_KINDS: [FaultKind; 6] = [
    FaultKind::KillReplica,
    FaultKind::TerminateBackends,
    FaultKind::FreezeRatelimit,
    FaultKind::FreezeRedis,
    FaultKind::SlowAcquirer,
    FaultKind::FailingAcquirer,
];

/// What the clients did and what the faults were, for the report.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// Operations issued (each with its own idempotency key).
    pub attempted: u64,
    /// Calls sent, retries with the same key included.
    pub calls: u64,
    /// Attempts sent with a deadline too short to be met.
    pub expired_deadlines: u64,
    /// Operations answered (success or business refusal) while the workload ran.
    pub acknowledged: u64,
    /// Of those, business refusals (FAILED_PRECONDITION).
    pub refused: u64,
    /// Operations the client gave up on while the workload ran.
    pub unknown: u64,
    /// Of those, settled afterwards by retrying the same key.
    pub unknown_settled: u64,
    /// Acknowledged operations sent once more with the same key (a replay).
    pub replays: u64,
    /// Transient failures seen, by code.
    pub transient: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// payment-svc backends terminated.
    pub backends_terminated: u64,
    /// Events the resuming consumers received, and how often they resumed.
    pub events_received: u64,
    /// Stream resumptions from a cursor.
    pub stream_resumes: u64,
    /// Jobs out of attempts at the end (parked for an operator, not a violation).
    pub dead_jobs: u64,
    /// The first INTERNAL answers seen (method and message), which DESIGN §3 reserves
    /// for internal failures.
    pub internal_samples: Vec<String>,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ops attempted {} (calls {}, expired deadlines {}), acknowledged {} (refused {}), \
             unknown {} (settled {}), replays {}, transient {:?}, faults {:?}, \
             backends terminated {}, events received {} (resumes {}), dead jobs {}, \
             INTERNAL samples {:?}",
            self.attempted,
            self.calls,
            self.expired_deadlines,
            self.acknowledged,
            self.refused,
            self.unknown,
            self.unknown_settled,
            self.replays,
            self.transient,
            self.faults,
            self.backends_terminated,
            self.events_received,
            self.stream_resumes,
            self.dead_jobs,
            self.internal_samples
        )
    }
}

/// One tenant: its gateway key and accounts.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// The principal.
    pub principal: String,
    /// Its API key at the gateway.
    pub key: String,
    /// Its merchant account (payments land here).
    pub merchant: String,
    /// Its customer accounts (transfers move money between them).
    pub customers: Vec<String>,
    /// The allow-negative account that funded the customers.
    pub funding: String,
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub enum Request {
    /// CreatePayment (the key is also the description, to find it in the database).
    Pay(pb::CreatePaymentRequest),
    /// CapturePayment.
    Capture(pb::CapturePaymentRequest),
    /// CancelPayment.
    Cancel(pb::CancelPaymentRequest),
    /// RefundPayment (the key is also the reason).
    Refund(pb::RefundPaymentRequest),
    /// CreateTransfer (the key is also the description).
    Transfer(pb::CreateTransferRequest),
}

impl Request {
    fn key(&self) -> &str {
        match self {
            Self::Pay(r) => &r.idempotency_key,
            Self::Capture(r) => &r.idempotency_key,
            Self::Cancel(r) => &r.idempotency_key,
            Self::Refund(r) => &r.idempotency_key,
            Self::Transfer(r) => &r.idempotency_key,
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Self::Pay(_) => "CreatePayment",
            Self::Capture(_) => "CapturePayment",
            Self::Cancel(_) => "CancelPayment",
            Self::Refund(_) => "RefundPayment",
            Self::Transfer(_) => "CreateTransfer",
        }
    }
}

/// A definitive answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The call succeeded; the resource it created or changed, and the payment's state.
    Done {
        /// Payment, refund or transfer id.
        resource: String,
        /// The payment's status after the call (payment calls only).
        payment: Option<Box<pb::Payment>>,
    },
    /// A business refusal (FAILED_PRECONDITION) with its reason.
    Refused(String),
}

/// An operation and what the client knows of its outcome.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The tenant's principal.
    pub principal: String,
    /// What was asked.
    pub request: Request,
    /// The answer, once definitive; `None` while unknown.
    pub answer: Option<Answer>,
    /// Whether the client gave up on it while the workload ran.
    pub gave_up: bool,
    /// Something the client saw that must never happen (a changed replay, a key refused).
    pub anomaly: Option<String>,
}

/// The whole system under test.
pub struct Bank {
    /// The database every replica shares.
    pub database: TestDatabase,
    /// The standalone sandbox acquirer.
    pub sandbox: SpawnedService,
    /// The two payment-svc replicas.
    payment: Replicas,
    /// Redis behind ratelimit-svc.
    pub redis: PrivateRedis,
    /// ratelimit-svc, spawned so it can be frozen (or restarted).
    ratelimit: Replicas,
    /// Where the clients call.
    front: Front,
}

impl fmt::Debug for Bank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bank")
            .field("database", &self.database.name())
            .field("payment", &self.payment.addrs)
            .field("ratelimit", &self.ratelimit.addrs)
            .finish_non_exhaustive()
    }
}

/// Replicas of one service binary, each restarted on the address it had (a stopped one
/// is `None` until then).
struct Replicas {
    binary: &'static str,
    env: Vec<(&'static str, String)>,
    running: tokio::sync::Mutex<Vec<Option<SpawnedService>>>,
    addrs: Vec<SocketAddr>,
    /// The output of every process started, ended ones included, so a failing run can
    /// show what a replica logged about a request.
    logs: Mutex<Vec<crate::process::Lines>>,
}

impl Replicas {
    async fn start(
        binary: &'static str,
        env: Vec<(&'static str, String)>,
        count: usize,
    ) -> anyhow::Result<Self> {
        let mut running = Vec::new();
        for _ in 0..count {
            running.push(SpawnedService::start(binary, &env).await?);
        }
        let logs = running.iter().flat_map(output).collect();
        Ok(Self {
            binary,
            env,
            addrs: running.iter().map(SpawnedService::addr).collect(),
            running: tokio::sync::Mutex::new(running.into_iter().map(Some).collect()),
            logs: Mutex::new(logs),
        })
    }

    /// Up to `limit` lines any of its processes logged containing `needle`.
    fn logged(&self, needle: &str, limit: usize) -> Vec<String> {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        logs.iter()
            .flat_map(|lines| lines.snapshot())
            .filter(|line| line.contains(needle))
            .take(limit)
            .collect()
    }

    fn len(&self) -> usize {
        self.addrs.len()
    }

    /// `http://<addr>` of every replica, comma-separated (an upstream list).
    fn endpoints(&self) -> String {
        self.addrs
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sends `signal` to replica `index` and waits until it is gone: how it exited
    /// (`None` when it was not running).
    async fn end(
        &self,
        index: usize,
        signal: Signal,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let mut running = self.running.lock().await;
        let Some(mut replica) = running[index].take() else {
            return Ok(None);
        };
        replica.signal(signal)?;
        Ok(Some(replica.wait(crate::LIVENESS).await?))
    }

    /// Starts replica `index` again on the address it had, unless it runs.
    async fn restart(&self, index: usize) -> anyhow::Result<()> {
        let mut running = self.running.lock().await;
        if running[index].is_none() {
            let mut env = self.env.clone();
            env.push(("LISTEN_ADDR", self.addrs[index].to_string()));
            let started = SpawnedService::start(self.binary, &env).await?;
            if let Ok(mut logs) = self.logs.lock() {
                logs.extend(output(&started));
            }
            running[index] = Some(started);
        }
        Ok(())
    }

    async fn restart_all(&self) -> anyhow::Result<()> {
        for index in 0..self.len() {
            self.restart(index).await?;
        }
        Ok(())
    }

    async fn freeze(&self, index: usize) -> anyhow::Result<()> {
        if let Some(replica) = &self.running.lock().await[index] {
            replica.freeze().await?;
        }
        Ok(())
    }

    async fn resume(&self, index: usize) -> anyhow::Result<()> {
        if let Some(replica) = &self.running.lock().await[index] {
            replica.resume()?;
        }
        Ok(())
    }
}

/// A process's stdout and stderr.
fn output(service: &SpawnedService) -> [crate::process::Lines; 2] {
    [service.stdout().clone(), service.stderr().clone()]
}

/// Where the clients call.
enum Front {
    /// The gateway in this process (the fault run: it is never killed).
    InProcess(TestGateway),
    /// gateway-svc processes sharing one keys file (rolling restarts).
    Spawned {
        gateways: Replicas,
        keys: KeysFile,
        _dir: tempfile::TempDir,
    },
}

fn payment_env(database: &TestDatabase, acquirer: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database.service_url()),
        ("DATABASE_MIGRATION_URL", database.owner_url()),
        ("ACQUIRER_URL", acquirer.to_owned()),
        ("ACQUIRER_TIMEOUT", ACQUIRER_TIMEOUT.to_owned()),
        // A killed replica's keys come free soon, so retries resume them.
        ("IDEMPOTENCY_LEASE", "2s".to_owned()),
        ("JOB_POLL_INTERVAL", "200ms".to_owned()),
        ("JOB_LEASE", "2s".to_owned()),
        ("JOB_BACKOFF_BASE", "100ms".to_owned()),
        ("JOB_BACKOFF_MAX", "2s".to_owned()),
        // Faults last seconds: a job must outlive them rather than die of them.
        ("JOB_MAX_ATTEMPTS", "25".to_owned()),
        ("JOB_MAINTENANCE_INTERVAL", "500ms".to_owned()),
    ]
}

impl Bank {
    /// Starts every process and the in-process gateway in front of them (the fault run).
    pub async fn start() -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        let sandbox = crate::acquirer::spawn_sandbox(SLOW_ANSWER).await?;
        let payment = Replicas::start(
            "payment-svc",
            payment_env(&database, &sandbox.endpoint()),
            2,
        )
        .await?;
        let redis = PrivateRedis::start().await?;
        let ratelimit = Replicas::start(
            "ratelimit-svc",
            crate::gateway::ratelimit_rules_env(&redis.url()),
            1,
        )
        .await?;
        let gateway =
            crate::gateway::rate_limited(&payment.endpoints(), &ratelimit.endpoints(), |_| {})
                .await?;
        Ok(Self {
            database,
            sandbox,
            payment,
            redis,
            ratelimit,
            front: Front::InProcess(gateway),
        })
    }

    /// Starts two replicas of every service — payment-svc, ratelimit-svc and gateway-svc,
    /// all processes — for rolling restarts. Every process drains for [`DRAIN_TIMEOUT`]
    /// when stopped.
    pub async fn start_replicated() -> anyhow::Result<Self> {
        let drain = ("SHUTDOWN_DRAIN_TIMEOUT", DRAIN_TIMEOUT.to_owned());
        let database = TestDatabase::create().await?;
        let sandbox = crate::acquirer::spawn_sandbox(SLOW_ANSWER).await?;
        let mut env = payment_env(&database, &sandbox.endpoint());
        env.push(drain.clone());
        let payment = Replicas::start("payment-svc", env, 2).await?;
        let redis = PrivateRedis::start().await?;
        let mut env = crate::gateway::ratelimit_rules_env(&redis.url());
        env.push(drain.clone());
        let ratelimit = Replicas::start("ratelimit-svc", env, 2).await?;
        let dir = tempfile::tempdir()?;
        let mut env = crate::gateway::spawned_env(dir.path())?;
        let keys = KeysFile::create(&dir.path().join("api-keys.yaml"))?;
        env.extend([
            ("PAYMENT_SVC_ADDR", payment.endpoints()),
            ("RATELIMIT_SVC_ADDR", ratelimit.endpoints()),
            ("API_KEYS_FILE", keys.path().display().to_string()),
            ("API_KEYS_RELOAD_INTERVAL", "100ms".to_owned()),
            drain,
        ]);
        let gateways = Replicas::start("gateway-svc", env, 2).await?;
        Ok(Self {
            database,
            sandbox,
            payment,
            redis,
            ratelimit,
            front: Front::Spawned {
                gateways,
                keys,
                _dir: dir,
            },
        })
    }

    /// A channel to each gateway.
    async fn channels(&self) -> anyhow::Result<Vec<Channel>> {
        match &self.front {
            Front::InProcess(gateway) => Ok(vec![gateway.channel().await?]),
            Front::Spawned { gateways, .. } => gateways
                .addrs
                .iter()
                .map(|addr| Ok(Channel::from_shared(format!("http://{addr}"))?.connect_lazy()))
                .collect(),
        }
    }

    /// A payment-svc client through the (first) gateway.
    pub async fn client(&self) -> anyhow::Result<PaymentServiceClient<Channel>> {
        let channel = self.channels().await?.remove(0);
        Ok(PaymentServiceClient::new(channel))
    }

    /// A new API key of `principal` that every gateway knows.
    async fn add_key(&self, principal: &str) -> anyhow::Result<String> {
        let scopes = &crate::gateway::WRITE_SCOPES;
        let (keys, channels) = match &self.front {
            Front::InProcess(gateway) => {
                return gateway.add_key(principal, scopes, "premium").await;
            }
            Front::Spawned { keys, .. } => (keys, self.channels().await?),
        };
        let key = keys.add(principal, scopes, "premium")?;
        // Known once a call with it is answered by payment-svc rather than refused.
        for channel in channels {
            let mut client = PaymentServiceClient::new(channel);
            let started = tokio::time::Instant::now();
            loop {
                let request = with_key(
                    pb::GetPaymentRequest {
                        payment_id: "pay_00000000000000000000000000000000".to_owned(),
                    },
                    &key,
                )?;
                match client.get_payment(request).await {
                    Err(status)
                        if matches!(status.code(), Code::Unauthenticated | Code::Unavailable) =>
                    {
                        anyhow::ensure!(
                            started.elapsed() < crate::LIVENESS,
                            "a gateway did not load {principal}'s key: {status:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(key)
    }

    /// Opens `options.tenants` tenants, each with a merchant, customers funded with
    /// [`STARTING_BALANCE`] from an allow-negative funding account.
    pub async fn open_tenants(&self, options: &BankOptions) -> anyhow::Result<Vec<Tenant>> {
        let mut client = self.client().await?;
        let mut tenants = Vec::new();
        for index in 0..options.tenants {
            let principal = format!("bank-tenant-{index}");
            let key = self.add_key(&principal).await?;
            let open = |kind: pb::AccountKind, allow_negative: bool| pb::CreateAccountRequest {
                idempotency_key: uuid::Uuid::new_v4().to_string(),
                currency: CURRENCY.to_owned(),
                kind: kind as i32,
                allow_negative,
                ..Default::default()
            };
            let mut account = async |request: pb::CreateAccountRequest| -> anyhow::Result<String> {
                Ok(client
                    .create_account(with_key(request, &key)?)
                    .await?
                    .into_inner()
                    .account
                    .context("CreateAccount answered no account")?
                    .id)
            };
            let merchant = account(open(pb::AccountKind::Merchant, false)).await?;
            let funding = account(open(pb::AccountKind::Customer, true)).await?;
            let mut customers = Vec::new();
            for _ in 0..options.customers_per_tenant {
                customers.push(account(open(pb::AccountKind::Customer, false)).await?);
            }
            for customer in &customers {
                client
                    .create_transfer(with_key(
                        pb::CreateTransferRequest {
                            idempotency_key: uuid::Uuid::new_v4().to_string(),
                            from_account_id: funding.clone(),
                            to_account_id: customer.clone(),
                            amount: Some(pb::Money {
                                amount_minor: STARTING_BALANCE,
                                currency: CURRENCY.to_owned(),
                            }),
                            description: "starting balance".to_owned(),
                        },
                        &key,
                    )?)
                    .await?;
            }
            tenants.push(Tenant {
                principal,
                key,
                merchant,
                customers,
                funding,
            });
        }
        Ok(tenants)
    }

    /// Terminates every backend of payment-svc's role; how many.
    async fn terminate_backends(&self) -> anyhow::Result<u64> {
        let mut admin = PgConnection::connect(&self.database.superuser_url()?).await?;
        let terminated: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND usename = $2 AND pid <> pg_backend_pid()",
        )
        .bind(self.database.name())
        .bind(SERVICE_ROLE)
        .fetch_one(&mut admin)
        .await?;
        Ok(u64::try_from(terminated).unwrap_or_default())
    }

    /// Runs the workload (and the fault schedule when asked) for `options.duration`,
    /// settles every unknown outcome, waits for the system to come to rest, and checks.
    pub async fn run(&self, options: &BankOptions) -> anyhow::Result<(Figures, Vec<String>)> {
        let tenants = self.open_tenants(options).await?;
        let started = tokio::time::Instant::now();
        let shared = Arc::new(Shared::default());
        let mut figures = Figures::default();

        // One resuming event consumer per tenant, listening before any payment exists.
        let mut consumers = Vec::new();
        for (index, tenant) in tenants.iter().enumerate() {
            let consumer = EventConsumer::start(
                self.channels().await?,
                tenant.key.clone(),
                options.seed ^ (0xE7E7 + index as u64),
            )
            .await?;
            consumers.push((tenant.principal.clone(), consumer));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for (tenant_index, tenant) in tenants.iter().enumerate() {
            let pool = Arc::new(Mutex::new(PaymentPool::default()));
            for client_index in 0..options.clients_per_tenant {
                let gateways: Vec<_> = self
                    .channels()
                    .await?
                    .into_iter()
                    .map(PaymentServiceClient::new)
                    .collect();
                let client = Client {
                    // The clients spread over the gateways.
                    current: client_index % gateways.len(),
                    clients: gateways,
                    steady: options.disruption == Disruption::RollingRestarts,
                    tenant: tenant.clone(),
                    pool: pool.clone(),
                    shared: shared.clone(),
                    rng: StdRng::seed_from_u64(
                        options
                            .seed
                            .wrapping_add(1 + (tenant_index * 1_000 + client_index) as u64),
                    ),
                };
                clients.push(tokio::spawn(client.run(stop.clone())));
            }
        }

        let workload = async {
            tokio::time::sleep(options.duration).await;
            stop.store(true, Relaxed);
        };
        let mut violations = Vec::new();
        let injected: BTreeMap<String, u64> = match options.disruption {
            Disruption::Faults => {
                let (injected, ()) =
                    tokio::join!(self.fault_schedule(options.seed, &shared, &stop), workload);
                injected?
                    .into_iter()
                    .map(|(kind, count)| (format!("{kind:?}"), count))
                    .collect()
            }
            Disruption::RollingRestarts => {
                // The clients go on until both the roll and the duration are over.
                let roll = async {
                    let rolled = self.roll(&shared).await;
                    tokio::time::sleep(options.duration.saturating_sub(started.elapsed())).await;
                    stop.store(true, Relaxed);
                    rolled
                };
                let (rolled, unclean) = roll.await?;
                violations.extend(unclean);
                rolled
            }
            Disruption::None => {
                workload.await;
                BTreeMap::new()
            }
        };
        let mut operations = Vec::new();
        for client in clients {
            operations.extend(
                tokio::time::timeout(crate::LIVENESS * 2, client)
                    .await
                    .context("a client did not stop")???,
            );
        }
        figures.faults = injected;
        figures.backends_terminated = shared.backends_terminated.load(Relaxed);
        figures.attempted = operations.len() as u64;
        figures.calls = shared.calls.load(Relaxed);
        figures.expired_deadlines = shared.expired.load(Relaxed);
        figures.replays = shared.replays.load(Relaxed);
        figures.transient = shared
            .transient
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        figures.internal_samples = shared
            .internal_samples
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        // What payment-svc logged about each (the answer carries only a request id).
        for sample in &mut figures.internal_samples {
            let Some(request_id) = sample
                .split("request id ")
                .nth(1)
                .map(|rest| rest.trim_end_matches(')').to_owned())
            else {
                continue;
            };
            for line in self.payment.logged(&request_id, 5) {
                sample.push_str("\n    logged: ");
                sample.extend(line.chars().take(1_000));
            }
        }
        figures.acknowledged = operations.iter().filter(|op| op.answer.is_some()).count() as u64;
        figures.refused = operations
            .iter()
            .filter(|op| matches!(op.answer, Some(Answer::Refused(_))))
            .count() as u64;
        figures.unknown = operations.iter().filter(|op| op.gave_up).count() as u64;

        // Every process runs again; every unknown outcome is retried to completion.
        self.payment.restart_all().await?;
        self.ratelimit.restart_all().await?;
        if let Front::Spawned { gateways, .. } = &self.front {
            gateways.restart_all().await?;
        }
        let mut client = self.client().await?;
        let keys: BTreeMap<String, String> = tenants
            .iter()
            .map(|t| (t.principal.clone(), t.key.clone()))
            .collect();
        for operation in operations.iter_mut().filter(|op| op.answer.is_none()) {
            let key = &keys[&operation.principal];
            operation.answer = settle(&mut client, key, &operation.request).await;
            if operation.answer.is_some() {
                figures.unknown_settled += 1;
            }
        }

        violations.extend(self.wait_until_at_rest().await?);
        let mut events = BTreeMap::new();
        let mut database = PgConnection::connect(&self.database.owner_url()).await?;
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'dead'")
            .fetch_one(&mut database)
            .await?;
        figures.dead_jobs = u64::try_from(dead).unwrap_or_default();
        for (principal, consumer) in consumers {
            let expected: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payment_events WHERE owner_id = $1")
                    .bind(&principal)
                    .fetch_one(&mut database)
                    .await?;
            let received = consumer.finish(usize::try_from(expected)?).await;
            figures.events_received += received.events.len() as u64;
            figures.stream_resumes += received.resumes;
            events.insert(principal, received.events);
        }
        let acquirer = crate::acquirer::operations(&self.sandbox.endpoint(), "", 500).await?;
        violations.extend(
            check(
                &mut database,
                &CheckInput {
                    tenants: &tenants,
                    operations: &operations,
                    events: &events,
                    acquirer: &acquirer,
                },
            )
            .await?,
        );
        violations.extend(self.reconcile().await?);
        Ok((figures, violations))
    }

    /// The fault schedule: drawn from `seed`, each fault fires once the clients have
    /// issued a drawn number of operations more.
    async fn fault_schedule(
        &self,
        seed: u64,
        shared: &Shared,
        stop: &AtomicBool,
    ) -> anyhow::Result<BTreeMap<FaultKind, u64>> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xFA17);
        let mut injected = BTreeMap::new();
        let mut next_at = shared.issued.load(Relaxed) + rng.random_range(20..60);
        loop {
            // A fault waits for its operation count (bounded, so a stalled workload
            // does not hang the run: it is then reported by the checker).
            while shared.issued.load(Relaxed) < next_at {
                if stop.load(Relaxed) {
                    return Ok(injected);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let kind = FAULT_KINDS[rng.random_range(0..FAULT_KINDS.len())];
            // How many operations the fault lasts (for the ones that last).
            let span = rng.random_range(10..40);
            let replica = rng.random_range(0..self.payment.len());
            self.inject(kind, replica, span, shared, stop).await?;
            *injected.entry(kind).or_insert(0) += 1;
            next_at = shared.issued.load(Relaxed) + rng.random_range(20..80);
        }
    }

    async fn inject(
        &self,
        kind: FaultKind,
        replica: usize,
        span: u64,
        shared: &Shared,
        stop: &AtomicBool,
    ) -> anyhow::Result<()> {
        // Waits until `span` more operations were issued, the workload ended, or a
        // bound passed (a fault that stalls everything must still end).
        let hold = async || {
            let until = shared.issued.load(Relaxed) + span;
            let started = tokio::time::Instant::now();
            while shared.issued.load(Relaxed) < until
                && !stop.load(Relaxed)
                && started.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        match kind {
            FaultKind::KillReplica => {
                self.payment.end(replica, Signal::SIGKILL).await?;
                hold().await;
                self.payment.restart(replica).await?;
            }
            FaultKind::TerminateBackends => {
                let terminated = self.terminate_backends().await?;
                shared.backends_terminated.fetch_add(terminated, Relaxed);
            }
            FaultKind::FreezeRatelimit => {
                self.ratelimit.freeze(0).await?;
                hold().await;
                self.ratelimit.resume(0).await?;
            }
            FaultKind::FreezeRedis => {
                self.redis.freeze().await?;
                hold().await;
                self.redis.resume()?;
            }
            FaultKind::SlowAcquirer => {
                crate::acquirer::set_latency(&self.sandbox.endpoint(), Duration::from_millis(300))
                    .await?;
                hold().await;
                crate::acquirer::set_latency(&self.sandbox.endpoint(), Duration::ZERO).await?;
            }
            FaultKind::FailingAcquirer => {
                use proto::acquirer::v1::FailureMode;
                let mode = if span.is_multiple_of(2) {
                    FailureMode::Unavailable
                } else {
                    FailureMode::Timeout
                };
                crate::acquirer::set_faults(&self.sandbox.endpoint(), mode, 300_000).await?;
                hold().await;
                crate::acquirer::set_faults(&self.sandbox.endpoint(), FailureMode::None, 0).await?;
            }
        }
        Ok(())
    }

    /// Rolls every service in turn while the workload runs — payment-svc, ratelimit-svc,
    /// then the gateways when they are processes: each replica gets SIGTERM, must exit
    /// cleanly (a graceful drain; anything else is a violation), and a replacement starts
    /// on its address. The next replica waits until the clients issued [`ROLL_GAP`] more
    /// operations, so traffic flows through the replacement first. Restarts by service.
    async fn roll(&self, shared: &Shared) -> anyhow::Result<(BTreeMap<String, u64>, Vec<String>)> {
        let mut sets = vec![&self.payment, &self.ratelimit];
        if let Front::Spawned { gateways, .. } = &self.front {
            sets.push(gateways);
        }
        let mut rolled = BTreeMap::new();
        let mut violations = Vec::new();
        issued_more(shared, ROLL_GAP).await;
        for set in sets {
            for index in 0..set.len() {
                if let Some(status) = set.end(index, Signal::SIGTERM).await?
                    && !status.success()
                {
                    violations.push(format!(
                        "{} replica {index} ended with {status} on SIGTERM",
                        set.binary
                    ));
                }
                set.restart(index).await?;
                *rolled.entry(format!("restart {}", set.binary)).or_insert(0) += 1;
                issued_more(shared, ROLL_GAP).await;
            }
        }
        Ok((rolled, violations))
    }

    /// Waits until no job is due (the void timers of uncaptured authorizations are far
    /// off), no payment is pending or processing (but those whose job is dead, parked
    /// for an operator) and no refund pending; what is still not at rest after the bound
    /// is returned as violations.
    async fn wait_until_at_rest(&self) -> anyhow::Result<Vec<String>> {
        let mut database = PgConnection::connect(&self.database.owner_url()).await?;
        let started = tokio::time::Instant::now();
        loop {
            let busy: Vec<String> = sqlx::query_scalar(
                "SELECT 'job ' || id || ' (' || kind || ') ' || state || ' for payment ' || payment_id FROM jobs \
                 WHERE state IN ('available', 'executing', 'retryable') \
                    OR (state = 'scheduled' AND schedule_at < now() + interval '1 minute') \
                 UNION ALL \
                 SELECT 'payment ' || p.id || ' ' || p.status FROM payments p WHERE p.status IN ('pending', 'processing') \
                    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.payment_id = p.id AND j.state = 'dead') \
                 UNION ALL \
                 SELECT 'refund ' || id || ' pending' FROM refunds WHERE status = 'pending'",
            )
            .fetch_all(&mut database)
            .await?;
            if busy.is_empty() {
                return Ok(Vec::new());
            }
            if started.elapsed() > crate::LIVENESS * 4 {
                return Ok(busy
                    .into_iter()
                    .map(|what| format!("not at rest after {:?}: {what}", crate::LIVENESS * 4))
                    .collect());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `payment-svc reconcile` against the sandbox; its differences as violations.
    async fn reconcile(&self) -> anyhow::Result<Vec<String>> {
        let env = [
            ("DATABASE_URL", self.database.service_url()),
            ("ACQUIRER_URL", self.sandbox.endpoint()),
        ];
        let finished = crate::process::run_to_exit("payment-svc", &env, &["reconcile"]).await?;
        let mut violations: Vec<String> = finished
            .stdout
            .lines()
            .filter(|line| line.starts_with("difference:"))
            .map(|line| format!("reconcile: {line}"))
            .collect();
        // What the database says of each payment named, so a failing seed explains itself.
        let mut database = PgConnection::connect(&self.database.owner_url()).await?;
        for violation in &mut violations {
            let Some(payment) = violation
                .split_whitespace()
                .find(|word| word.starts_with("pay_"))
                .map(|word| word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_'))
            else {
                continue;
            };
            let facts: Vec<String> = sqlx::query_scalar(
                "SELECT 'payment ' || status || ' ' || mode || ' ' || capture_method FROM payments WHERE id = $1 \
                 UNION ALL SELECT 'attempt ' || id || ' ' || kind || ' ' || status || ' ' || result_code FROM attempts WHERE payment_id = $1 \
                 UNION ALL SELECT 'job ' || id || ' ' || kind || ' ' || state || ' attempt ' || attempt || ' ' || last_error FROM jobs WHERE payment_id = $1",
            )
            .bind(payment)
            .fetch_all(&mut database)
            .await?;
            violation.push_str(&format!(" [{}]", facts.join("; ")));
        }
        if !finished.stdout.contains(" 0 difference(s)") && violations.is_empty() {
            violations.push(format!(
                "reconcile did not report 0 differences: {}\n{}",
                finished.stdout, finished.stderr
            ));
        }
        Ok(violations)
    }
}

/// Waits until the clients issued `count` more operations (bounded: a stalled workload
/// shows in what the clients could not do).
async fn issued_more(shared: &Shared, count: u64) {
    let until = shared.issued.load(Relaxed) + count;
    let started = tokio::time::Instant::now();
    while shared.issued.load(Relaxed) < until && started.elapsed() < crate::LIVENESS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counters every client shares.
#[derive(Debug, Default)]
struct Shared {
    /// Operations issued so far (the fault schedule's clock).
    issued: AtomicU64,
    calls: AtomicU64,
    expired: AtomicU64,
    replays: AtomicU64,
    backends_terminated: AtomicU64,
    transient: Mutex<BTreeMap<String, u64>>,
    internal_samples: Mutex<Vec<String>>,
}

/// A tenant's payments its clients may capture, void or refund next.
#[derive(Debug, Default)]
struct PaymentPool {
    /// Manual-capture payments awaiting capture: id and authorized amount.
    authorized: Vec<(String, i64)>,
    /// Payments with money captured: id and captured amount.
    captured: Vec<(String, i64)>,
}

struct Client {
    /// One client per gateway; calls go to `current`.
    clients: Vec<PaymentServiceClient<Channel>>,
    current: usize,
    /// The normal retry policy ([`STEADY_ATTEMPTS`]) instead of the chaotic one.
    steady: bool,
    tenant: Tenant,
    pool: Arc<Mutex<PaymentPool>>,
    shared: Arc<Shared>,
    rng: StdRng,
}

fn money(amount_minor: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor,
        currency: CURRENCY.to_owned(),
    })
}

impl Client {
    async fn run(mut self, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Operation>> {
        let mut operations = Vec::new();
        while !stop.load(Relaxed) {
            let request = self.next_request();
            self.shared.issued.fetch_add(1, Relaxed);
            let operation = self.perform(request).await?;
            if let Some(Answer::Done { resource, payment }) = &operation.answer {
                self.remember(&operation.request, resource, payment.as_deref());
            }
            operations.push(operation);
        }
        Ok(operations)
    }

    fn next_request(&mut self) -> Request {
        let key = uuid::Uuid::new_v4().to_string();
        let roll = self.rng.random_range(0..100);
        let (authorized, captured) = self
            .pool
            .lock()
            .map(|pool| (pool.authorized.len(), pool.captured.len()))
            .unwrap_or_default();
        if roll < 15 && authorized > 0 {
            let (payment_id, amount) = self.take_authorized();
            if self.rng.random_bool(0.2) {
                return Request::Cancel(pb::CancelPaymentRequest {
                    idempotency_key: key,
                    payment_id,
                });
            }
            let partial = self.rng.random_bool(0.5);
            return Request::Capture(pb::CapturePaymentRequest {
                idempotency_key: key,
                payment_id,
                amount: partial.then(|| money(amount / 2 + 1)).flatten(),
            });
        }
        if roll < 30 && captured > 0 {
            let (payment_id, amount) = self.pick_captured();
            let refund = self.rng.random_range(1..=(amount / 2).max(1));
            return Request::Refund(pb::RefundPaymentRequest {
                reason: key.clone(),
                idempotency_key: key,
                payment_id,
                amount: money(refund),
            });
        }
        if roll < 60 {
            let from = self.rng.random_range(0..self.tenant.customers.len());
            let mut to = self.rng.random_range(0..self.tenant.customers.len() - 1);
            if to >= from {
                to += 1;
            }
            // Now and then more than any account holds: a refusal.
            let amount = self.rng.random_range(1..=STARTING_BALANCE / 4);
            return Request::Transfer(pb::CreateTransferRequest {
                description: key.clone(),
                idempotency_key: key,
                from_account_id: self.tenant.customers[from].clone(),
                to_account_id: self.tenant.customers[to].clone(),
                amount: money(amount),
            });
        }
        let card = match self.rng.random_range(0..100) {
            0..75 => cards::CARD_APPROVED,
            75..83 => cards::CARD_DECLINED,
            83..88 => cards::CARD_INSUFFICIENT_FUNDS,
            88..95 => cards::CARD_PROCESSING_ERROR,
            _ => cards::CARD_SLOW_APPROVED,
        };
        let mut request = crate::payments::payment_request(
            &key,
            &self.tenant.merchant,
            self.rng.random_range(100..5_000),
            card,
        );
        request.description = key.clone();
        if self.rng.random_bool(0.3) {
            request.capture_method = pb::CaptureMethod::Manual as i32;
        }
        if self.rng.random_bool(0.2) {
            request.mode = pb::PaymentMode::Async as i32;
        }
        Request::Pay(request)
    }

    fn take_authorized(&mut self) -> (String, i64) {
        let Ok(mut pool) = self.pool.lock() else {
            return (String::new(), 1);
        };
        let index = self.rng.random_range(0..pool.authorized.len());
        pool.authorized.swap_remove(index)
    }

    fn pick_captured(&mut self) -> (String, i64) {
        let Ok(pool) = self.pool.lock() else {
            return (String::new(), 1);
        };
        let index = self.rng.random_range(0..pool.captured.len());
        pool.captured[index].clone()
    }

    fn remember(&self, request: &Request, resource: &str, payment: Option<&pb::Payment>) {
        let Some(payment) = payment else { return };
        let Ok(mut pool) = self.pool.lock() else {
            return;
        };
        let captured = payment
            .amount_captured
            .as_ref()
            .map(|m| m.amount_minor)
            .unwrap_or_default();
        match (request, payment.status()) {
            (Request::Pay(_), pb::PaymentStatus::RequiresCapture) => {
                let amount = payment.amount.as_ref().map(|m| m.amount_minor).unwrap_or(1);
                pool.authorized.push((resource.to_owned(), amount));
            }
            (Request::Pay(_) | Request::Capture(_), pb::PaymentStatus::Succeeded)
                if captured > 0 =>
            {
                pool.captured.push((payment.id.clone(), captured));
            }
            _ => {}
        }
    }

    /// Sends `request` until it is answered definitively, by the client's policy, or
    /// gives up (an unknown outcome); now and then replays an answered one.
    async fn perform(&mut self, request: Request) -> anyhow::Result<Operation> {
        let mut operation = Operation {
            principal: self.tenant.principal.clone(),
            request,
            answer: None,
            gave_up: false,
            anomaly: None,
        };
        // The chaotic client: a drawn number of attempts, some with a deadline that
        // cannot be met, retrying whatever is transient. The steady one: the normal
        // deadline, retrying only UNAVAILABLE (on the next gateway) and ABORTED.
        let attempts = if self.steady {
            STEADY_ATTEMPTS
        } else {
            self.rng.random_range(1..=4)
        };
        for attempt in 0..attempts {
            let deadline = if !self.steady && self.rng.random_bool(0.1) {
                self.shared.expired.fetch_add(1, Relaxed);
                EXPIRED_DEADLINE
            } else {
                NORMAL_DEADLINE
            };
            self.shared.calls.fetch_add(1, Relaxed);
            match send(
                &mut self.clients[self.current],
                &self.tenant.key,
                &operation.request,
                deadline,
            )
            .await
            {
                Ok(answer) => {
                    operation.answer = Some(answer);
                    break;
                }
                Err(Failure::Anomaly(what)) => {
                    operation.anomaly = Some(what);
                    break;
                }
                Err(Failure::Transient(code, message)) => {
                    self.note_transient(code, &message, &operation.request);
                    if self.steady && !matches!(code, Code::Unavailable | Code::Aborted) {
                        break;
                    }
                    if self.steady && code == Code::Unavailable {
                        self.current = (self.current + 1) % self.clients.len();
                    }
                    if attempt + 1 < attempts {
                        let pause = self.rng.random_range(5..200);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            }
        }
        match &operation.answer {
            None => operation.gave_up = operation.anomaly.is_none(),
            // Now and then the same key once more: the answer must be the same.
            Some(first) if self.rng.random_bool(0.1) => {
                self.shared.replays.fetch_add(1, Relaxed);
                if let Ok(again) = send(
                    &mut self.clients[self.current],
                    &self.tenant.key,
                    &operation.request,
                    NORMAL_DEADLINE,
                )
                .await
                    && !same_outcome(first, &again)
                {
                    operation.anomaly = Some(format!(
                        "replay answered differently: first {first:?}, then {again:?}"
                    ));
                }
            }
            Some(_) => {}
        }
        Ok(operation)
    }

    /// Counts a transient failure by code, and keeps the first INTERNAL answers.
    fn note_transient(&self, code: Code, message: &str, request: &Request) {
        if let Ok(mut transient) = self.shared.transient.lock() {
            *transient.entry(format!("{code:?}")).or_insert(0) += 1;
        }
        if code == Code::Internal
            && let Ok(mut samples) = self.shared.internal_samples.lock()
            && samples.len() < 5
        {
            samples.push(format!("{} {message}", request.method()));
        }
    }
}

/// Whether a replayed answer is the same outcome as the first one (the same resource; a
/// payment's status may have moved on since, as later calls changed it).
fn same_outcome(first: &Answer, again: &Answer) -> bool {
    match (first, again) {
        (Answer::Done { resource: a, .. }, Answer::Done { resource: b, .. }) => a == b,
        (Answer::Refused(a), Answer::Refused(b)) => a == b,
        _ => false,
    }
}

/// Why a call gave no definitive answer.
enum Failure {
    /// Worth retrying with the same key (the code and message).
    Transient(Code, String),
    /// Must never happen to this workload.
    Anomaly(String),
}

fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => Failure::Transient(status.code(), status.message().to_owned()),
        code => Failure::Anomaly(format!(
            "{code:?} {:?}: {}",
            reason(status),
            status.message()
        )),
    }
}

async fn send(
    client: &mut PaymentServiceClient<Channel>,
    key: &str,
    request: &Request,
    deadline: Duration,
) -> Result<Answer, Failure> {
    fn with_deadline<T>(
        message: T,
        key: &str,
        deadline: Duration,
    ) -> Result<tonic::Request<T>, Failure> {
        let mut request =
            with_key(message, key).map_err(|err| Failure::Anomaly(err.to_string()))?;
        request.set_timeout(deadline);
        Ok(request)
    }
    let done = |resource: String, payment: Option<pb::Payment>| Answer::Done {
        resource,
        payment: payment.map(Box::new),
    };
    let result = match request {
        Request::Pay(r) => client
            .create_payment(with_deadline(r.clone(), key, deadline)?)
            .await
            .map(|response| {
                let payment = response.into_inner().payment;
                done(payment.clone().unwrap_or_default().id, payment)
            }),
        Request::Capture(r) => client
            .capture_payment(with_deadline(r.clone(), key, deadline)?)
            .await
            .map(|response| {
                let payment = response.into_inner().payment;
                done(payment.clone().unwrap_or_default().id, payment)
            }),
        Request::Cancel(r) => client
            .cancel_payment(with_deadline(r.clone(), key, deadline)?)
            .await
            .map(|response| {
                let payment = response.into_inner().payment;
                done(payment.clone().unwrap_or_default().id, payment)
            }),
        Request::Refund(r) => client
            .refund_payment(with_deadline(r.clone(), key, deadline)?)
            .await
            .map(|response| {
                let response = response.into_inner();
                done(response.refund.unwrap_or_default().id, response.payment)
            }),
        Request::Transfer(r) => client
            .create_transfer(with_deadline(r.clone(), key, deadline)?)
            .await
            .map(|response| done(response.into_inner().transfer.unwrap_or_default().id, None)),
    };
    match result {
        Ok(answer) => Ok(answer),
        Err(status) if status.code() == Code::FailedPrecondition => {
            Ok(Answer::Refused(reason(&status).unwrap_or_default()))
        }
        Err(status) => Err(classify(&status)),
    }
}

/// Retries `request` with its key until it is answered definitively (bounded).
async fn settle(
    client: &mut PaymentServiceClient<Channel>,
    key: &str,
    request: &Request,
) -> Option<Answer> {
    let started = tokio::time::Instant::now();
    while started.elapsed() < crate::LIVENESS * 2 {
        match send(client, key, request, NORMAL_DEADLINE).await {
            Ok(answer) => return Some(answer),
            Err(Failure::Anomaly(_)) => return None,
            Err(Failure::Transient(..)) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

/// What a resuming event consumer received.
#[derive(Debug, Default)]
pub struct Received {
    /// Event ids in the order received.
    pub events: Vec<i64>,
    /// How often it resumed from its cursor.
    pub resumes: u64,
}

/// A WatchPaymentEvents consumer through the gateway that drops its stream now and then
/// (and whenever the stream fails) and resumes from the last cursor it processed.
struct EventConsumer {
    task: tokio::task::JoinHandle<Received>,
    target: Arc<AtomicU64>,
}

impl EventConsumer {
    /// Opens the first stream through the first of `channels` (one per gateway); a
    /// failed stream or resume moves on to the next.
    async fn start(channels: Vec<Channel>, key: String, seed: u64) -> anyhow::Result<Self> {
        let mut clients: Vec<_> = channels
            .into_iter()
            .map(PaymentServiceClient::new)
            .collect();
        anyhow::ensure!(!clients.is_empty(), "no gateway to watch through");
        // The first stream is open (its "from now" fixed) before this returns.
        let first = clients[0]
            .watch_payment_events(with_key(pb::WatchPaymentEventsRequest::default(), &key)?)
            .await?;
        // Where it starts: a resume before the first event begins there, not "from now".
        let start = first
            .metadata()
            .get(payment_svc::START_CURSOR_HEADER)
            .context("WatchPaymentEvents sent no start cursor")?
            .to_str()?
            .to_owned();
        let first = first.into_inner();
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let wanted = target.clone();
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut received = Received::default();
            let mut cursor = start;
            let mut stream = Some(first);
            let mut current = 0;
            loop {
                if received.events.len() as u64 >= wanted.load(Relaxed) {
                    return received;
                }
                let mut current_stream = match stream.take() {
                    Some(current_stream) => current_stream,
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let Ok(request) = with_key(
                            pb::WatchPaymentEventsRequest {
                                cursor: cursor.clone(),
                            },
                            &key,
                        ) else {
                            return received;
                        };
                        received.resumes += 1;
                        match clients[current].watch_payment_events(request).await {
                            Ok(response) => response.into_inner(),
                            Err(_) => {
                                current = (current + 1) % clients.len();
                                continue;
                            }
                        }
                    }
                };
                // Drop the stream after a drawn number of events.
                let budget = rng.random_range(5..60);
                let mut taken = 0;
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(500), current_stream.next())
                            .await;
                    match next {
                        Ok(Some(Ok(message))) => {
                            if let Some(event) = message.event {
                                received.events.push(event.id);
                                cursor = event.cursor;
                            }
                            taken += 1;
                            if taken >= budget {
                                break;
                            }
                        }
                        // Idle: check whether everything arrived, keep the stream.
                        Err(_) => {
                            if received.events.len() as u64 >= wanted.load(Relaxed) {
                                return received;
                            }
                        }
                        // Broken (its gateway or replica stopped): resume through the
                        // next gateway.
                        Ok(Some(Err(_)) | None) => {
                            current = (current + 1) % clients.len();
                            break;
                        }
                    }
                }
            }
        });
        Ok(Self { task, target })
    }

    /// Waits (bounded) until `expected` events arrived; what was received.
    async fn finish(self, expected: usize) -> Received {
        self.target.store(expected as u64, Relaxed);
        let bound = crate::LIVENESS * 2;
        match tokio::time::timeout(bound, self.task).await {
            Ok(Ok(received)) => received,
            _ => Received::default(),
        }
    }
}

/// What the checker compares with the database.
#[derive(Debug)]
pub struct CheckInput<'a> {
    /// The tenants and their accounts.
    pub tenants: &'a [Tenant],
    /// Every operation the clients issued, with what they know of it.
    pub operations: &'a [Operation],
    /// Event ids each tenant's resuming consumer received, in order.
    pub events: &'a BTreeMap<String, Vec<i64>>,
    /// Every operation the acquirer holds.
    pub acquirer: &'a [proto::acquirer::v1::Operation],
}

/// The ledger's own invariants: per currency the balances sum to 0, no non-negative
/// account is below 0, and every account's balance equals the sum of its entries.
pub async fn check_ledger(database: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let balances = "SELECT a.id, a.currency, a.allow_negative, \
         (a.balance + coalesce((SELECT sum(d.amount) FROM balance_deltas d WHERE d.account_id = a.id), 0))::bigint AS balance, \
         coalesce((SELECT sum(e.amount) FROM ledger_entries e WHERE e.account_id = a.id), 0)::bigint AS entries \
         FROM accounts a";
    let rows = sqlx::query(balances).fetch_all(&mut *database).await?;
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        let currency: String = row.try_get("currency")?;
        let allow_negative: bool = row.try_get("allow_negative")?;
        let balance: i64 = row.try_get("balance")?;
        let entries: i64 = row.try_get("entries")?;
        *sums.entry(currency.clone()).or_insert(0) += balance;
        if !allow_negative && balance < 0 {
            violations.push(format!(
                "account {id} is non-negative but holds {balance} {currency}"
            ));
        }
        if balance != entries {
            violations.push(format!(
                "account {id} holds {balance} {currency} but its entries sum to {entries}"
            ));
        }
    }
    for (currency, sum) in sums {
        if sum != 0 {
            violations.push(format!("the {currency} balances sum to {sum}, not 0"));
        }
    }
    Ok(violations)
}

/// Every check of the bank's promises; the violations found.
pub async fn check(
    database: &mut PgConnection,
    input: &CheckInput<'_>,
) -> anyhow::Result<Vec<String>> {
    let mut violations = check_ledger(database).await?;
    violations.extend(check_operations(database, input.operations).await?);
    violations.extend(check_payments(database, input).await?);
    let executing: Vec<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'executing'")
        .fetch_all(&mut *database)
        .await?;
    for job in executing {
        violations.push(format!("job {job} left executing"));
    }
    for (principal, received) in input.events {
        let committed: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM payment_events WHERE owner_id = $1 ORDER BY xid, id",
        )
        .bind(principal)
        .fetch_all(&mut *database)
        .await?;
        if *received != committed {
            let got: BTreeSet<i64> = received.iter().copied().collect();
            let want: BTreeSet<i64> = committed.iter().copied().collect();
            let missing: Vec<_> = want.difference(&got).take(10).collect();
            let extra: Vec<_> = got.difference(&want).take(10).collect();
            violations.push(format!(
                "{principal}'s event consumer received {} events ({} distinct), {} committed; \
                 missing {missing:?}, unexpected {extra:?}, same order: {}",
                received.len(),
                got.len(),
                committed.len(),
                missing.is_empty() && extra.is_empty() && received.len() == got.len()
            ));
        }
    }
    Ok(violations)
}

/// Every acknowledged operation exists exactly once; every unknown one was settled.
async fn check_operations(
    database: &mut PgConnection,
    operations: &[Operation],
) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    for operation in operations {
        let key = operation.request.key();
        let method = operation.request.method();
        if let Some(anomaly) = &operation.anomaly {
            violations.push(format!("{method} {key}: {anomaly}"));
            continue;
        }
        let Some(answer) = &operation.answer else {
            violations.push(format!(
                "{method} {key}: the outcome is still unknown after retrying to completion"
            ));
            continue;
        };
        let stored: Vec<String> = sqlx::query_scalar(
            "SELECT recovery_point FROM idempotency_keys WHERE owner_id = $1 AND key = $2",
        )
        .bind(&operation.principal)
        .bind(key)
        .fetch_all(&mut *database)
        .await?;
        if stored != ["finished"] {
            violations.push(format!(
                "{method} {key}: answered, but its idempotency keys are {stored:?}"
            ));
        }
        // The key travels in a free-text field, so the rows it made can be counted.
        let (count_query, expected_resource) = match (&operation.request, answer) {
            (Request::Pay(_), Answer::Done { resource, .. }) => (
                Some("SELECT id FROM payments WHERE owner_id = $1 AND description = $2"),
                Some(resource),
            ),
            (Request::Pay(_), Answer::Refused(_)) => (
                Some("SELECT id FROM payments WHERE owner_id = $1 AND description = $2"),
                None,
            ),
            (Request::Transfer(_), Answer::Done { resource, .. }) => (
                Some(
                    "SELECT reference_id FROM movements WHERE owner_id = $1 AND kind = 'transfer' AND description = $2",
                ),
                Some(resource),
            ),
            (Request::Transfer(_), Answer::Refused(_)) => (
                Some(
                    "SELECT reference_id FROM movements WHERE owner_id = $1 AND kind = 'transfer' AND description = $2",
                ),
                None,
            ),
            (Request::Refund(_), Answer::Done { resource, .. }) => (
                Some("SELECT id FROM refunds WHERE owner_id = $1 AND reason = $2"),
                Some(resource),
            ),
            _ => (None, None),
        };
        if let Some(query) = count_query {
            let found: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
                .bind(&operation.principal)
                .bind(key)
                .fetch_all(&mut *database)
                .await?;
            match expected_resource {
                Some(resource) if found != [resource.clone()] => violations.push(format!(
                    "{method} {key}: answered {resource}, the database holds {found:?}"
                )),
                None if matches!(operation.request, Request::Transfer(_)) && !found.is_empty() => {
                    violations.push(format!(
                        "{method} {key}: refused, yet the database holds {found:?}"
                    ))
                }
                None if found.len() > 1 => violations.push(format!(
                    "{method} {key}: refused, the database holds {found:?}"
                )),
                _ => {}
            }
        }
    }
    Ok(violations)
}

/// Per payment: the ledger's captures and refunds match amount_captured and
/// amount_refunded, and so do the acquirer's approved operations; per merchant, the net
/// ledger movement is captured minus refunded; nothing is left in refunds_pending.
async fn check_payments(
    database: &mut PgConnection,
    input: &CheckInput<'_>,
) -> anyhow::Result<Vec<String>> {
    use proto::acquirer::v1::{OperationKind, OperationStatus};
    let mut violations = Vec::new();
    let rows = sqlx::query(
        "SELECT p.id, p.merchant_account_id, p.amount_captured, p.amount_refunded, \
         coalesce((SELECT sum(m.amount) FROM movements m WHERE m.kind = 'capture' AND m.reference_id = p.id), 0)::bigint AS ledger_captured, \
         coalesce((SELECT sum(CASE m.kind WHEN 'refund_hold' THEN m.amount ELSE -m.amount END) FROM movements m \
             JOIN refunds r ON r.id = m.reference_id \
             WHERE r.payment_id = p.id AND m.kind IN ('refund_hold', 'refund_reverse')), 0)::bigint AS ledger_refunded \
         FROM payments p",
    )
    .fetch_all(&mut *database)
    .await?;
    // The acquirer's approved captures and refunds per reference (the payment id).
    let by_id: BTreeMap<&str, &proto::acquirer::v1::Operation> = input
        .acquirer
        .iter()
        .map(|op| (op.operation_id.as_str(), op))
        .collect();
    // A capture or refund names its parent operation; the authorization names the payment.
    let payment_of = |operation: &proto::acquirer::v1::Operation| {
        let mut current = operation;
        for _ in 0..8 {
            if current.kind == OperationKind::Authorize as i32 || !current.reference.is_empty() {
                return current.reference.clone();
            }
            match by_id.get(current.parent_operation_id.as_str()) {
                Some(parent) => current = parent,
                None => break,
            }
        }
        current.reference.clone()
    };
    let mut acquired: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for operation in input.acquirer {
        if operation.status == OperationStatus::Approved as i32 {
            *acquired
                .entry((payment_of(operation), operation.kind))
                .or_insert(0) += operation
                .amount
                .as_ref()
                .map(|a| a.amount_minor)
                .unwrap_or_default();
        }
    }
    let mut per_merchant: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        let merchant: String = row.try_get("merchant_account_id")?;
        let captured: i64 = row.try_get("amount_captured")?;
        let refunded: i64 = row.try_get("amount_refunded")?;
        let ledger_captured: i64 = row.try_get("ledger_captured")?;
        let ledger_refunded: i64 = row.try_get("ledger_refunded")?;
        *per_merchant.entry(merchant).or_insert(0) += captured - refunded;
        if captured != ledger_captured {
            violations.push(format!(
                "payment {id}: amount_captured {captured}, the ledger captured {ledger_captured}"
            ));
        }
        if refunded != ledger_refunded {
            violations.push(format!(
                "payment {id}: amount_refunded {refunded}, the ledger refunded {ledger_refunded}"
            ));
        }
        let acquirer_captured = acquired
            .get(&(id.clone(), OperationKind::Capture as i32))
            .copied()
            .unwrap_or_default();
        let acquirer_refunded = acquired
            .get(&(id.clone(), OperationKind::Refund as i32))
            .copied()
            .unwrap_or_default();
        if acquirer_captured != captured {
            violations.push(format!(
                "payment {id}: amount_captured {captured}, the acquirer captured {acquirer_captured}"
            ));
        }
        if acquirer_refunded != refunded {
            violations.push(format!(
                "payment {id}: amount_refunded {refunded}, the acquirer refunded {acquirer_refunded}"
            ));
        }
    }
    for tenant in input.tenants {
        let expected = per_merchant
            .get(&tenant.merchant)
            .copied()
            .unwrap_or_default();
        let net: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account_id = $1",
        )
        .bind(&tenant.merchant)
        .fetch_one(&mut *database)
        .await?;
        if net != expected {
            violations.push(format!(
                "merchant {}: net ledger movement {net}, captured − refunded is {expected}",
                tenant.merchant
            ));
        }
    }
    let pending: Vec<(String, i64)> = sqlx::query_as(
        "SELECT a.id, (a.balance + coalesce((SELECT sum(d.amount) FROM balance_deltas d WHERE d.account_id = a.id), 0))::bigint \
         FROM accounts a WHERE a.system_key LIKE 'refunds_pending:%'",
    )
    .fetch_all(&mut *database)
    .await?;
    for (account, balance) in pending {
        if balance != 0 {
            violations.push(format!(
                "{account} holds {balance} once every refund settled"
            ));
        }
    }
    Ok(violations)
}

/// The control: a transfer that reads the balance, sleeps 50 ms and writes the movement
/// without locking or checking again — the race payment-svc's locking prevents. Runs as
/// the schema owner (`owner_url`), straight against the tables; `false` when it saw too
/// little money. With `after_read`, it waits there once it has read, so racing calls all
/// read before any writes (the race made deterministic).
pub async fn naive_transfer(
    owner_url: &str,
    from: &str,
    to: &str,
    amount: i64,
    after_read: Option<Arc<tokio::sync::Barrier>>,
) -> anyhow::Result<bool> {
    let mut connection = PgConnection::connect(owner_url).await?;
    let balance: i64 = sqlx::query_scalar(
        "SELECT (a.balance + coalesce((SELECT sum(d.amount) FROM balance_deltas d WHERE d.account_id = a.id), 0))::bigint \
         FROM accounts a WHERE a.id = $1",
    )
    .bind(from)
    .fetch_one(&mut connection)
    .await?;
    if let Some(barrier) = after_read {
        barrier.wait().await;
    }
    if balance < amount {
        return Ok(false);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut transaction = connection.begin().await?;
    let movement = format!("mv_naive_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(
        "INSERT INTO movements (id, owner_id, kind, reference_id, currency, amount, debit_account_id, credit_account_id) \
         SELECT $1, owner_id, 'transfer', $1, currency, $2, $3, $4 FROM accounts WHERE id = $3",
    )
    .bind(&movement)
    .bind(amount)
    .bind(from)
    .bind(to)
    .execute(&mut *transaction)
    .await?;
    for (account, signed) in [(from, -amount), (to, amount)] {
        sqlx::query(
            "WITH entry AS (INSERT INTO ledger_entries (movement_id, account_id, owner_id, currency, amount) \
             SELECT $1, id, owner_id, currency, $3 FROM accounts WHERE id = $2 RETURNING position) \
             INSERT INTO balance_deltas (position, account_id, amount) SELECT position, $2, $3 FROM entry",
        )
        .bind(&movement)
        .bind(account)
        .bind(signed)
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await?;
    Ok(true)
}
