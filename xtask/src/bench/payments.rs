//! Scenario `payments`: CreatePayment (SYNC, automatic capture, the sandbox's approved test
//! card) through gateway-svc in front of payment-svc, against `pgbench` running exactly
//! the statements payment-svc issues for one such payment (DESIGN §9), each with uniform
//! traffic over [`MERCHANTS`] merchant accounts and with one hot merchant account.
//!
//! Set-up, all on a throwaway PostgreSQL the project's tooling starts (pinned, with its
//! backends, to the CPU under test): the database and roles as `cargo xtask up` makes
//! them, payment-svc (release, default settings, in-process sandbox acquirer, migrating on
//! start) and gateway-svc (release, API key authentication on, `RATELIMIT_ENABLED=false`),
//! both pinned. [`MERCHANTS`] merchant accounts are created through the gateway
//! (CreateAccount); pgbench gets as many of its own, copies of the first one's row under
//! ids it can compute (`acct_pgbench_<n>`).
//!
//! The pgbench script is `xtask/bench/create_payment.pgbench`, made by
//! [`super::pgbench::capture`]: `log_statement = all` around one CreatePayment sent
//! through the gateway, its statements turned into a script ([`super::pgbench::script`]).
//! Every run captures again and fails if the committed script drifted from what
//! payment-svc now issues (`--recapture` rewrites it instead).
//!
//! Targets (DESIGN §9): the subject's throughput ≥ 40% of pgbench's (uniform vs uniform,
//! hot vs hot), and the subject's hot-merchant throughput ≥ 80% of its uniform one;
//! pgbench's own hot/uniform ratio is reported without a target. Throughput only: the
//! §9 targets of this scenario are throughput ratios, and an open loop at half of
//! pgbench's peak would be past the subject's capacity, so no target has an open loop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use secrecy::ExposeSecret as _;
use tonic::transport::{Channel, Endpoint};

use super::check::ENV_API_KEY;
use super::create_payment::{self, CREATE_PAYMENT_WORKLOAD, CURRENCY};
use super::gateway::Credentials;
use super::load::{GeneratorTarget, LoadRun, Measurement, RunHooks};
use super::pgbench::{self, PgbenchTarget, Variant};
use super::pin::{self, PinnedProcess};
use super::protocol::{self, Protocol, Target};
use super::report::{Bound, Check, Ratio, ScenarioReport};
use super::{Context, Scenario};
use crate::postgres::Postgres;
use crate::{Interrupted, ports, random_hex};

/// The scenario's entry in [`super::SCENARIOS`].
pub const SCENARIO: Scenario = Scenario {
    name: "payments",
    summary: "CreatePayment through gateway-svc and payment-svc vs pgbench running the \
              statements of one payment, uniform and single hot merchant",
    packages: &["payment-svc", "gateway-svc"],
    run,
};

/// Merchant accounts of the uniform variant (each side has its own).
pub const MERCHANTS: usize = 1000;

const PGBENCH_UNIFORM: &str = "pgbench, uniform";
const SUBJECT_UNIFORM: &str = "gateway-svc → payment-svc, uniform";
const PGBENCH_HOT: &str = "pgbench, one hot merchant";
const SUBJECT_HOT: &str = "gateway-svc → payment-svc, one hot merchant";

/// The role payment-svc runs as (see `up::create_database`).
pub const SERVICE_ROLE: &str = "paysuite_app";
/// The application database.
pub const DATABASE: &str = "paysuite";

fn run(context: &Context<'_>) -> anyhow::Result<ScenarioReport> {
    if std::env::var_os("DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        bail!(
            "DATABASE_URL is set: the bench starts its own PostgreSQL pinned to CPU {}; unset it",
            pin::SUBJECT_CPU
        );
    }
    let interrupted = context.interrupted;
    let pinning = context.pinning;
    let postgres = Postgres::provision(interrupted).context("starting PostgreSQL")?;
    let postmaster = postgres.postmaster_pid()?;
    // Backends forked later inherit the postmaster's CPU and priority.
    pinning.adopt(postmaster)?;
    for child in pin::children(postmaster)? {
        pinning.adopt(child)?;
    }
    let database = crate::up::create_database(&postgres, interrupted)?;

    let identity_key = crate::identity::dev_key()?;
    let (card_encryption_keys, card_fingerprint_key) = crate::identity::dev_card_keys()?;
    let payment_address = format!("127.0.0.1:{}", ports::free_port()?);
    let mut payment_command =
        pinning.command(pin::SUBJECT_CPU, &context.release_dir.join("payment-svc"));
    payment_command
        .envs([
            ("LISTEN_ADDR", payment_address.as_str()),
            ("DATABASE_URL", &database.service_url),
            ("DATABASE_MIGRATION_URL", &database.owner_url),
            (
                "IDENTITY_PUBLIC_KEYS",
                &identity_key.public_key().to_string(),
            ),
            ("CARD_ENCRYPTION_KEYS", &card_encryption_keys),
            ("CARD_FINGERPRINT_KEY", &card_fingerprint_key),
            ("RUST_LOG", "info"),
        ])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("ACQUIRER_URL");
    let mut payment_svc = PinnedProcess::start(
        "payment-svc",
        payment_command,
        context.run_dir.join("payment-svc.log"),
    )?;

    let gateway_binary = context.release_dir.join("gateway-svc");
    let scopes = format!(
        "{},{}",
        proto::api::v1::SCOPE_PAYMENTS_READ,
        proto::api::v1::SCOPE_PAYMENTS_WRITE
    );
    let credentials = Credentials::generate(&gateway_binary, &context.run_dir, &scopes)?;
    let gateway_address = format!("127.0.0.1:{}", ports::free_port()?);
    let mut gateway_command = pinning.command(pin::SUBJECT_CPU, &gateway_binary);
    gateway_command
        .envs([
            ("LISTEN_ADDR", gateway_address.as_str()),
            ("TLS_PLAINTEXT", "true"),
            ("PAYMENT_SVC_ADDR", &format!("http://{payment_address}")),
            ("API_KEYS_FILE", &credentials.keys_file.to_string_lossy()),
            ("API_KEY_PEPPER", &credentials.pepper),
            (
                "IDENTITY_SIGNING_KEY",
                identity_key.to_secret_string().expose_secret(),
            ),
            ("RATELIMIT_ENABLED", "false"),
            ("RUST_LOG", "info"),
        ])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RATELIMIT_SVC_ADDR")
        .env_remove("ROUTES_FILE");
    let mut gateway = PinnedProcess::start(
        "gateway-svc",
        gateway_command,
        context.run_dir.join("gateway-svc.log"),
    )?;
    pinning.ensure("payment-svc", payment_svc.pid())?;
    pinning.ensure("gateway-svc", gateway.pid())?;
    pinning.ensure("postgres (postmaster)", postmaster)?;

    let client = Client::new(&gateway_address, &credentials.key)?;
    let merchants = client.create_merchants(MERCHANTS, &mut payment_svc, interrupted)?;
    let uniform_file = context.run_dir.join("merchants-uniform.txt");
    let hot_file = context.run_dir.join("merchants-hot.txt");
    std::fs::write(&uniform_file, merchants.join("\n") + "\n")
        .with_context(|| format!("writing {}", uniform_file.display()))?;
    std::fs::write(&hot_file, format!("{}\n", merchants[0]))
        .with_context(|| format!("writing {}", hot_file.display()))?;
    postgres.query(
        DATABASE,
        &format!(
            "INSERT INTO accounts (id, owner_id, currency, kind, allow_negative, display_name, labels) \
             SELECT '{prefix}' || n, owner_id, currency, kind, allow_negative, display_name, labels \
               FROM accounts, generate_series(1, {MERCHANTS}) AS n WHERE id = '{first}'",
            prefix = pgbench::MERCHANT_PREFIX,
            first = merchants[0]
        ),
        interrupted,
    )?;

    let script = pgbench::capture(
        &postgres,
        &|key: String| client.create_payment(key, &merchants[0]),
        &merchants[0],
        &context.run_dir,
        interrupted,
    )?;
    // pgbench runs this run's capture (its literals, e.g. the system accounts' ids, are
    // this database's); the committed script must have the same statements.
    let script_path = context.run_dir.join("create_payment.pgbench");
    std::fs::write(&script_path, &script.text)
        .with_context(|| format!("writing {}", script_path.display()))?;
    let committed_path = pgbench::committed_script_path();
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    let drift = if pgbench::same_statements(&committed, &script.text) {
        format!(
            "this run's capture has the committed `{}`'s statements, literal values aside",
            pgbench::SCRIPT
        )
    } else if context.recapture {
        std::fs::write(&committed_path, &script.text)
            .with_context(|| format!("writing {}", committed_path.display()))?;
        println!("xtask: wrote {}", committed_path.display());
        format!(
            "`{}` was re-captured in this run (`--recapture`)",
            pgbench::SCRIPT
        )
    } else {
        bail!(
            "the committed {} does not have the statements payment-svc issues now (this \
             run's capture is in {}; `diff` them). Re-capture with `cargo xtask bench \
             payments --recapture` and commit the script.",
            pgbench::SCRIPT,
            script_path.display()
        );
    };
    println!("xtask: {drift}");

    let run_tag = random_hex(4)?;
    let pgbench_binary = postgres.bin_dir(interrupted)?.join("pgbench");
    let pgbench_target = |name, variant, offset| PgbenchTarget {
        name,
        binary: pgbench_binary.clone(),
        pinning,
        postgres: &postgres,
        url: database.service_url.clone(),
        script: script_path.clone(),
        variant,
        run_dir: context.run_dir.clone(),
        postmaster,
        offset,
        runs: 0,
        interrupted,
        counted: Vec::new(),
    };
    let mut pgbench_uniform = pgbench_target(PGBENCH_UNIFORM, Variant::Uniform(MERCHANTS), 1);
    let mut pgbench_hot = pgbench_target(PGBENCH_HOT, Variant::Hot, 2);
    let load = |file: &Path, run: &str| LoadRun {
        workload: CREATE_PAYMENT_WORKLOAD.to_owned(),
        params: vec![
            ("merchants".to_owned(), file.display().to_string()),
            ("run".to_owned(), run.to_owned()),
        ],
        env: vec![(ENV_API_KEY.to_owned(), credentials.key.clone())],
        address: format!("http://{gateway_address}"),
        connections: context.protocol.connections,
        concurrency: context.protocol.concurrency,
    };
    let subject = |name, file: &PathBuf, run: String| WithDatabaseCpu {
        inner: GeneratorTarget {
            name,
            xtask: context.xtask(),
            pinning,
            load: load(file, &run),
            pids: vec![gateway.pid(), payment_svc.pid()],
            hooks: PaymentCount::new(&postgres, name, interrupted),
        },
        postmaster,
    };
    let mut subject_uniform = subject(SUBJECT_UNIFORM, &uniform_file, format!("{run_tag}u"));
    let mut subject_hot = subject(SUBJECT_HOT, &hot_file, format!("{run_tag}h"));
    let results = protocol::run(
        &mut [
            &mut pgbench_uniform,
            &mut subject_uniform,
            &mut pgbench_hot,
            &mut subject_hot,
        ],
        &context.protocol,
        interrupted,
    )?;
    payment_svc.check_alive()?;
    gateway.check_alive()?;

    let (Some(pg_uniform), Some(sub_uniform), Some(pg_hot), Some(sub_hot)) = (
        results.of(PGBENCH_UNIFORM),
        results.of(SUBJECT_UNIFORM),
        results.of(PGBENCH_HOT),
        results.of(SUBJECT_HOT),
    ) else {
        bail!("a target has no runs");
    };
    let throughput = |m: &Measurement| m.throughput;
    let checks = vec![
        Check {
            label: format!("{SUBJECT_UNIFORM} / {PGBENCH_UNIFORM}: throughput"),
            spread: protocol::ratio(&sub_uniform.throughput, &pg_uniform.throughput, throughput),
            bound: Bound::AtLeast(0.4),
        },
        Check {
            label: format!("{SUBJECT_HOT} / {PGBENCH_HOT}: throughput"),
            spread: protocol::ratio(&sub_hot.throughput, &pg_hot.throughput, throughput),
            bound: Bound::AtLeast(0.4),
        },
        Check {
            label: format!("{SUBJECT_HOT} / {SUBJECT_UNIFORM}: throughput"),
            spread: protocol::ratio(&sub_hot.throughput, &sub_uniform.throughput, throughput),
            bound: Bound::AtLeast(0.8),
        },
    ];
    let ratios = vec![
        Ratio {
            label: format!("{PGBENCH_HOT} / {PGBENCH_UNIFORM}: throughput"),
            spread: protocol::ratio(&pg_hot.throughput, &pg_uniform.throughput, throughput),
        },
        Ratio {
            label: format!(
                "{SUBJECT_UNIFORM} / {PGBENCH_UNIFORM}: CPU time per payment under test, closed loop"
            ),
            spread: protocol::ratio(
                &sub_uniform.throughput,
                &pg_uniform.throughput,
                Measurement::cpu_per_call,
            ),
        },
    ];
    let proof = |hooks: &PaymentCount<'_>| {
        format!(
            "{}: {} payments SUCCEEDED, {} ledger entries and {} balance deltas written, for \
             {} measured successful calls ({} errors)",
            hooks.name,
            hooks.seen.payments,
            hooks.seen.ledger_entries,
            hooks.seen.balance_deltas,
            hooks.measured_ok,
            hooks.measured_errors
        )
    };
    let pgbench_proof = |target: &PgbenchTarget| {
        let total = target
            .counted
            .iter()
            .fold(pgbench::Counted::default(), |sum, run| sum + *run);
        format!(
            "{}: {} payments, {} ledger entries and {} balance deltas written for {} \
             transactions pgbench reported ({} failed)",
            target.name,
            total.payments,
            total.ledger_entries,
            total.balance_deltas,
            total.transactions,
            total.failed
        )
    };
    let notes = vec![
        format!(
            "Proof of path (rows counted in PostgreSQL around every run, warm-ups included): \
             {}; {}; {}; {}. A run fails unless every successful call and every pgbench \
             transaction left its payment row (a call counts as successful only when it \
             answers a SUCCEEDED, fully captured payment for the merchant asked).",
            proof(&subject_uniform.inner.hooks),
            proof(&subject_hot.inner.hooks),
            pgbench_proof(&pgbench_uniform),
            pgbench_proof(&pgbench_hot)
        ),
        format!(
            "The baseline script: {} statements in {} transactions per payment; {drift}.",
            script.statements, script.transactions
        ),
        format!(
            "Generators on CPU {}: our own (`xtask bench-load`, one tokio thread, tonic \
             client, plaintext HTTP/2 to the gateway) and pgbench (one thread, {} \
             connections, `-M prepared`, no vacuum).",
            pin::GENERATOR_CPU,
            context.protocol.concurrency
        ),
    ];
    Ok(ScenarioReport {
        name: SCENARIO.name,
        title: "CreatePayment through the gateway vs pgbench running its statements".to_owned(),
        setup: vec![
            format!(
                "Call: `PaymentService/CreatePayment`, SYNC, automatic capture, {} {CURRENCY} \
                 minor units, card {} (the in-process sandbox acquirer approves it), a unique \
                 idempotency key per call; uniform: a merchant drawn from {MERCHANTS} \
                 merchant accounts; hot: every payment to one merchant account.",
                create_payment::AMOUNT_MINOR,
                create_payment::CARD_NUMBER
            ),
            format!(
                "Baseline, pgbench: `{}` — the statements payment-svc issued for one such \
                 payment (`log_statement = all`), its transactions as payment-svc opens them, \
                 ids, idempotency key and merchant account as pgbench variables; uniform: \
                 `{}1`…`{MERCHANTS}`, copies of a real merchant account's row; hot: `{}1`.",
                pgbench::SCRIPT,
                pgbench::MERCHANT_PREFIX,
                pgbench::MERCHANT_PREFIX
            ),
            "Subject: gateway-svc (release, plaintext, API key authentication on, \
             `RATELIMIT_ENABLED=false`) in front of payment-svc (release, default settings, \
             in-process sandbox acquirer), on the same PostgreSQL 15 (a throwaway cluster: \
             fsync, synchronous_commit and full_page_writes off)."
                .to_owned(),
            format!(
                "Under test on CPU {}: PostgreSQL (postmaster and every backend), payment-svc, \
                 gateway-svc; on CPU {}: our generator and pgbench. CPU under test counts \
                 PostgreSQL's whole process tree (the postmaster, its live backends and \
                 those that exited during the run), plus gateway-svc and payment-svc for the \
                 subject.",
                pin::SUBJECT_CPU,
                pin::GENERATOR_CPU
            ),
        ],
        results,
        ratios,
        checks,
        notes,
        context: None,
    })
    // gateway-svc, payment-svc, then PostgreSQL stop here (and on every early return).
}

/// A gRPC client of the gateway for the set-up and the capture (not measured).
struct Client {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Client {
    fn new(address: &str, key: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a runtime")?;
        let channel = {
            let _guard = runtime.enter();
            Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy()
        };
        Ok(Self {
            runtime,
            channel,
            authorization: format!("Bearer {key}")
                .parse()
                .context("the API key is not a header value")?,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }

    /// `count` merchant accounts, created through the gateway (once it answers).
    fn create_merchants(
        &self,
        count: usize,
        payment_svc: &mut PinnedProcess,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Vec<String>> {
        let create = |index: usize| {
            let mut client = PaymentServiceClient::new(self.channel.clone());
            let request = self.request(pb::CreateAccountRequest {
                idempotency_key: format!("bench-merchant-{index}"),
                currency: CURRENCY.to_owned(),
                kind: pb::AccountKind::Merchant.into(),
                allow_negative: false,
                display_name: format!("bench merchant {index}"),
                labels: Default::default(),
            });
            async move {
                client
                    .create_account(request)
                    .await
                    .map_err(|status| anyhow::anyhow!("CreateAccount: {status}"))?
                    .into_inner()
                    .account
                    .map(|account| account.id)
                    .context("CreateAccount answered no account")
            }
        };
        // payment-svc migrates before serving: the first account waits for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let first = loop {
            interrupted.check()?;
            payment_svc.check_alive()?;
            match self.runtime.block_on(create(0)) {
                Ok(id) => break id,
                Err(err) if std::time::Instant::now() > deadline => {
                    return Err(err.context("payment-svc did not serve within 120s"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        };
        println!("xtask: creating {count} merchant accounts through the gateway");
        let mut merchants = vec![first];
        for index in 1..count {
            interrupted.check()?;
            merchants.push(self.runtime.block_on(create(index))?);
        }
        Ok(merchants)
    }

    /// One CreatePayment to `merchant` with idempotency key `key`, its answer checked.
    fn create_payment(&self, key: String, merchant: &str) -> anyhow::Result<String> {
        let mut client = PaymentServiceClient::new(self.channel.clone());
        let request = self.request(create_payment::request(key, merchant.to_owned()));
        let payment = self
            .runtime
            .block_on(client.create_payment(request))
            .map_err(|status| anyhow::anyhow!("CreatePayment: {status}"))?
            .into_inner()
            .payment;
        create_payment::check_answer(payment.as_ref(), merchant).map_err(anyhow::Error::msg)?;
        payment
            .map(|payment| payment.id)
            .context("CreatePayment answered no payment")
    }
}

/// A generator target whose CPU under test also counts PostgreSQL's process tree.
struct WithDatabaseCpu<H> {
    inner: GeneratorTarget<H>,
    postmaster: u32,
}

impl<H: RunHooks> WithDatabaseCpu<H> {
    fn measure(
        &mut self,
        run: impl FnOnce(&mut GeneratorTarget<H>) -> anyhow::Result<Option<Measurement>>,
    ) -> anyhow::Result<Option<Measurement>> {
        let before = pin::cpu_seconds_of_tree(self.postmaster)?;
        let started = std::time::Instant::now();
        let mut measurement = run(&mut self.inner)?;
        let used = pin::cpu_seconds_of_tree(self.postmaster)? - before;
        if let Some(measurement) = &mut measurement {
            let share = used / started.elapsed().as_secs_f64();
            measurement.subject_cpu = Some(measurement.subject_cpu.unwrap_or(0.0) + share);
        }
        Ok(measurement)
    }
}

impl<H: RunHooks> Target for WithDatabaseCpu<H> {
    fn name(&self) -> &str {
        self.inner.name
    }

    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement> {
        self.measure(|inner| inner.throughput(protocol, interrupted).map(Some))?
            .context("a closed loop without a measurement")
    }

    fn latency(
        &mut self,
        _rate: f64,
        _protocol: &Protocol,
        _interrupted: &Interrupted,
    ) -> anyhow::Result<Option<Measurement>> {
        // Throughput only (see the module documentation).
        Ok(None)
    }
}

/// Rows counted around each run of the subject.
#[derive(Debug, Clone, Copy, Default)]
struct Rows {
    payments: u64,
    ledger_entries: u64,
    balance_deltas: u64,
}

/// Around each run of the subject: the payments, ledger entries and balance deltas it
/// created, checked against the calls the generator counted as successful.
struct PaymentCount<'a> {
    postgres: &'a Postgres,
    name: &'static str,
    interrupted: &'a Interrupted,
    before: Rows,
    seen: Rows,
    measured_ok: u64,
    measured_errors: u64,
}

impl<'a> PaymentCount<'a> {
    fn new(postgres: &'a Postgres, name: &'static str, interrupted: &'a Interrupted) -> Self {
        Self {
            postgres,
            name,
            interrupted,
            before: Rows::default(),
            seen: Rows::default(),
            measured_ok: 0,
            measured_errors: 0,
        }
    }

    fn rows(&self) -> anyhow::Result<Rows> {
        let counted = pgbench::count_rows(self.postgres, self.interrupted)?;
        Ok(Rows {
            payments: counted.payments,
            ledger_entries: counted.ledger_entries,
            balance_deltas: counted.balance_deltas,
        })
    }
}

impl RunHooks for PaymentCount<'_> {
    fn before(&mut self, load: &mut LoadRun, _protocol: &Protocol) -> anyhow::Result<()> {
        // The generator numbers its calls from 1 in every run: a fresh tag keeps the
        // idempotency keys unique across runs (a repeated key would replay the stored
        // payment instead of creating one).
        let tag = random_hex(4)?;
        for (name, value) in &mut load.params {
            if name == "run" {
                value.push('-');
                value.push_str(&tag);
            }
        }
        self.before = self.rows()?;
        Ok(())
    }

    fn after(&mut self, measurement: &Measurement) -> anyhow::Result<()> {
        let after = self.rows()?;
        let payments = after.payments - self.before.payments;
        if payments < measurement.ok {
            bail!(
                "{}: {payments} payments were created, fewer than the {} calls the generator \
                 counted as successful",
                self.name,
                measurement.ok
            );
        }
        self.seen.payments += payments;
        self.seen.ledger_entries += after.ledger_entries - self.before.ledger_entries;
        self.seen.balance_deltas += after.balance_deltas - self.before.balance_deltas;
        self.measured_ok += measurement.ok;
        self.measured_errors += measurement.errors;
        Ok(())
    }
}
