//! The `payments` scenario's baseline: pgbench running the statements payment-svc issues
//! for one SYNC CreatePayment.
//!
//! [`capture`] sets `log_statement = all` (and a log line prefix the parser recognises,
//! [`super::capture::LOG_LINE_PREFIX`]), sends CreatePayments through the gateway until
//! two in a row issue the same statements, and turns the last one's statements into a
//! pgbench script with [`script`]:
//! - every statement as payment-svc sent it, its `$n` parameters inlined as literals
//!   (`E'…'` with `:` escaped when the value holds one, since pgbench reads `:name` as a
//!   variable even inside quotes), BEGIN/COMMIT where payment-svc issued them;
//! - what must differ per transaction as pgbench variables: the idempotency key, the
//!   merchant account (`acct_pgbench_<m>`, `m` random in 1..`merchants`), and every id
//!   the payment created (ids `<prefix>_<UUIDv7>` whose timestamp is not older than the
//!   capture), each `<prefix>_pgb<id>_<k>` with `id` unique across the run's clients and
//!   increasing like payment-svc's time-ordered ids;
//! - the positions the ledger reads back from `INSERT INTO ledger_entries … RETURNING
//!   position` and writes into `balance_deltas`, through `\gset` (they are found by
//!   reading the captured payment's ledger entries afterwards).
//!
//! [`PgbenchTarget`] runs this run's capture (its literals are this database's, e.g. the
//! system accounts' ids; the committed script must have the same statements, see
//! [`same_statements`]) (`-M prepared`, one thread, the protocol's concurrency in
//! clients, `-l` for the latencies), pinned to the generator's CPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};

use super::capture::{self, LOG_LINE_PREFIX, Statement};
use super::load::Measurement;
use super::pin::{self, Pinning};
use super::protocol::{Protocol, Target};
use crate::postgres::Postgres;
use crate::process::run_captured;
use crate::{Interrupted, workspace_root};

/// The committed script, relative to the workspace root.
pub const SCRIPT: &str = "xtask/bench/create_payment.pgbench";
/// pgbench's merchant accounts: `acct_pgbench_1` … `acct_pgbench_<merchants>`.
pub const MERCHANT_PREFIX: &str = "acct_pgbench_";
/// The capture's idempotency keys start with this; pgbench's are `pgbench-<id>`.
const CAPTURE_KEY_PREFIX: &str = "capture-";
/// Appended to the channels pgbench's copies of `pg_notify` notify.
const PGBENCH_CHANNEL_SUFFIX: &str = "_pgbench";
/// At most this many payments are captured looking for two alike in a row.
const CAPTURE_ATTEMPTS: usize = 6;

/// The committed script's path.
pub fn committed_script_path() -> PathBuf {
    workspace_root().join(SCRIPT)
}

/// Whether two scripts hold the same statements, literal values aside (ids of the
/// database's system accounts, nonces, timestamps and stored answers differ per capture).
pub fn same_statements(a: &str, b: &str) -> bool {
    let shape = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| !line.starts_with("--"))
            .map(strip_literals)
            .collect()
    };
    shape(a) == shape(b)
}

/// `line` with every quoted literal (`'…'`, `E'…'`) replaced by `?`.
fn strip_literals(line: &str) -> String {
    let mut out = String::new();
    let mut in_quote = false;
    let mut escapes = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quote {
            if c == '\\' && escapes {
                chars.next();
            } else if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                } else {
                    in_quote = false;
                    out.push('?');
                }
            }
        } else if c == '\'' {
            in_quote = true;
            escapes = out.ends_with('E');
            if escapes {
                out.pop();
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A script made by [`capture`].
#[derive(Debug, Clone)]
pub struct Script {
    pub text: String,
    pub statements: usize,
    pub transactions: usize,
}

/// Captures the statements of one CreatePayment (`create_payment(key)`, to `merchant`,
/// returning the payment's id) and makes the pgbench script of them; each capture's
/// statements go to `log_dir/capture-<n>.txt`.
pub fn capture(
    postgres: &Postgres,
    create_payment: &dyn Fn(String) -> anyhow::Result<String>,
    merchant: &str,
    log_dir: &std::path::Path,
    interrupted: &Interrupted,
) -> anyhow::Result<Script> {
    let log_path = postgres
        .log_file()
        .context("the capture reads the server log of a PostgreSQL xtask started")?
        .to_owned();
    postgres.psql(
        &format!(
            "ALTER SYSTEM SET log_statement = 'all';\n\
             ALTER SYSTEM SET log_line_prefix = '{LOG_LINE_PREFIX}';\n\
             SELECT pg_reload_conf();\n"
        ),
        interrupted,
    )?;
    let outcome = capture_logged(
        postgres,
        create_payment,
        merchant,
        &log_path,
        log_dir,
        interrupted,
    );
    let reset = postgres.psql(
        "ALTER SYSTEM RESET log_statement;\nALTER SYSTEM RESET log_line_prefix;\n\
         SELECT pg_reload_conf();\n",
        interrupted,
    );
    let script = outcome?;
    reset?;
    Ok(script)
}

fn capture_logged(
    postgres: &Postgres,
    create_payment: &dyn Fn(String) -> anyhow::Result<String>,
    merchant: &str,
    log_path: &std::path::Path,
    log_dir: &std::path::Path,
    interrupted: &Interrupted,
) -> anyhow::Result<Script> {
    // Every backend reads the new settings before its next statement.
    std::thread::sleep(Duration::from_millis(500));
    let run = crate::random_hex(4)?;
    let mut previous: Option<Vec<String>> = None;
    for attempt in 1..=CAPTURE_ATTEMPTS {
        interrupted.check()?;
        let start = std::fs::metadata(log_path)
            .with_context(|| format!("reading {}", log_path.display()))?
            .len();
        let started = SystemTime::now();
        let key = format!("{CAPTURE_KEY_PREFIX}{run}-{attempt}");
        let payment_id = create_payment(key.clone())?;
        // Anything the payment set off after answering is logged too.
        std::thread::sleep(Duration::from_millis(300));
        let log = read_from(log_path, start)?;
        let logged = capture::statements(&log, super::payments::SERVICE_ROLE)?;
        let statements = payment_statements(&logged, &key, &payment_id)?;
        let shape: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
        let dump: String = statements
            .iter()
            .map(|s| format!("[{}] {} -- {:?}\n", s.pid, s.sql, s.params))
            .collect();
        let dump_path = log_dir.join(format!("capture-{attempt}.txt"));
        std::fs::write(&dump_path, dump)
            .with_context(|| format!("writing {}", dump_path.display()))?;
        println!(
            "xtask: capture {attempt}: {} statements for payment {payment_id}",
            statements.len()
        );
        if previous.as_ref() == Some(&shape) {
            let positions = postgres.query(
                super::payments::DATABASE,
                &format!(
                    "SELECT e.position FROM ledger_entries e JOIN movements m ON m.id = \
                     e.movement_id WHERE m.reference_id = '{payment_id}' ORDER BY e.position"
                ),
                interrupted,
            )?;
            let positions: Vec<String> = positions
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect();
            let captured = Captured {
                statements,
                key,
                merchant: merchant.to_owned(),
                started,
                positions,
            };
            return script(&captured);
        }
        previous = Some(shape);
    }
    bail!(
        "{CAPTURE_ATTEMPTS} CreatePayments never issued the same statements twice in a row \
         (the capture needs a quiet service)"
    )
}

/// The statements of the payment among everything logged: from the transaction that
/// claims the idempotency key `key` to the COMMIT of the one that stores its answer
/// (`recovery_point = 'finished'`), leaving out the job runner's polls of the `jobs` table
/// that other connections ran meanwhile (woken by the payment's notifications, they
/// belong to no payment; a statement about this payment's job would stay).
pub fn payment_statements(
    logged: &[Statement],
    key: &str,
    payment_id: &str,
) -> anyhow::Result<Vec<Statement>> {
    let holds = |statement: &Statement, text: &str| {
        statement
            .params
            .iter()
            .flatten()
            .any(|value| value.contains(text))
    };
    let first = logged
        .iter()
        .position(|statement| holds(statement, key))
        .context("no logged statement holds the capture's idempotency key")?;
    let start = match first.checked_sub(1) {
        Some(before)
            if logged[before].pid == logged[first].pid
                && logged[before].sql.eq_ignore_ascii_case("BEGIN") =>
        {
            before
        }
        _ => first,
    };
    let finished = logged
        .iter()
        .rposition(|statement| {
            holds(statement, key) && statement.sql.contains("recovery_point = 'finished'")
        })
        .context("no logged statement stores the capture's answer")?;
    let pid = logged[finished].pid;
    let end = logged[finished..]
        .iter()
        .position(|statement| statement.pid == pid && statement.sql.eq_ignore_ascii_case("COMMIT"))
        .map(|offset| finished + offset)
        .context("the transaction storing the capture's answer never committed")?;
    Ok(logged[start..=end]
        .iter()
        .filter(|statement| !touches_jobs(&statement.sql) || holds(statement, payment_id))
        .cloned()
        .collect())
}

fn touches_jobs(sql: &str) -> bool {
    ["FROM jobs", "UPDATE jobs", "INTO jobs"]
        .iter()
        .any(|table| sql.contains(table))
}

fn read_from(path: &std::path::Path, offset: u64) -> anyhow::Result<String> {
    use std::io::{Read as _, Seek as _};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What one captured payment issued, and what in it must vary per transaction.
#[derive(Debug, Clone)]
pub struct Captured {
    pub statements: Vec<Statement>,
    /// The idempotency key sent.
    pub key: String,
    /// The merchant account paid.
    pub merchant: String,
    /// When the capture started: ids minted since then belong to this payment.
    pub started: SystemTime,
    /// The positions of the payment's ledger entries, in order.
    pub positions: Vec<String>,
}

/// The pgbench script of a capture (see the module documentation).
pub fn script(captured: &Captured) -> anyhow::Result<Script> {
    let started_ms = captured
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis())
        // The clock of the ids and ours may differ by a little.
        .saturating_sub(2_000);
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut per_prefix: BTreeMap<String, usize> = BTreeMap::new();
    let mut replacements: Vec<(String, String)> = vec![
        (captured.key.clone(), "('pgbench-' || :id::text)".to_owned()),
        (
            captured.merchant.clone(),
            format!("('{MERCHANT_PREFIX}' || :m::text)"),
        ),
    ];
    for statement in &captured.statements {
        for value in statement.params.iter().flatten() {
            for id in minted_ids(value, started_ms) {
                if id == captured.merchant || ids.contains_key(&id) {
                    continue;
                }
                let (prefix, _) = id.split_once('_').unwrap_or(("id", ""));
                let count = per_prefix.entry(prefix.to_owned()).or_default();
                *count += 1;
                let expression = format!("('{prefix}_pgb' || :id::text || '_{count}')");
                ids.insert(id.clone(), expression.clone());
                replacements.push((id, expression));
            }
        }
    }

    let mut body = String::new();
    let mut ledger_inserts = 0usize;
    let mut transactions = 0usize;
    let mut statements = 0usize;
    for statement in &captured.statements {
        let mut params: Vec<String> = Vec::new();
        let notifies = statement.sql.contains("pg_notify($1");
        for (param, value) in statement.params.iter().enumerate() {
            if notifies && param == 0 {
                // pgbench notifies a channel nobody listens on: payment-svc, listening
                // on the real one, would otherwise wake and poll on the CPU under test
                // while the baseline runs.
                if let Some(channel) = value {
                    params.push(literal(&format!("{channel}{PGBENCH_CHANNEL_SUFFIX}")));
                    continue;
                }
            }
            let rendered = match value {
                None => "NULL".to_owned(),
                Some(value) => match captured.positions.iter().position(|p| p == value) {
                    Some(index) if param == 0 && is_balance_delta(&statement.sql) => {
                        format!(":le{}_position", index + 1)
                    }
                    _ => render(value, &replacements),
                },
            };
            params.push(rendered);
        }
        let mut sql = inline(&statement.sql, &params)?;
        if sql.trim().eq_ignore_ascii_case("BEGIN") {
            transactions += 1;
        }
        statements += 1;
        if is_ledger_insert(&statement.sql) {
            ledger_inserts += 1;
            write!(sql, "\n\\gset le{ledger_inserts}_").ok();
            body.push_str(&sql);
            body.push('\n');
        } else {
            body.push_str(&sql);
            body.push_str(";\n");
        }
    }
    if ledger_inserts != captured.positions.len() {
        bail!(
            "the capture inserted {ledger_inserts} ledger entries but the payment has {}",
            captured.positions.len()
        );
    }
    let mut text = String::new();
    text.push_str(HEADER);
    let _ = writeln!(
        text,
        "-- {statements} statements, {transactions} transactions.\n\
         \\set seq :seq + 1\n\
         \\set id :base + :seq * :clients + :client_id\n\
         \\set m random(1, :merchants)"
    );
    text.push_str(&body);
    Ok(Script {
        text,
        statements,
        transactions,
    })
}

const HEADER: &str = "\
-- The statements payment-svc issues for ONE CreatePayment (SYNC, automatic capture,
-- card 4242424242424242, the in-process sandbox acquirer), as captured by
-- cargo xtask bench payments with log_statement = all on payment-svc's role; made by
-- xtask/src/bench/pgbench.rs. Do not edit it by hand, every run of the scenario captures
-- again and fails when this file differs; cargo xtask bench payments --recapture
-- rewrites it.
--
-- Parameters are inlined as literals. Per transaction, the variable id makes the
-- idempotency key and every id the payment creates unique, the variable m picks the
-- merchant account (acct_pgbench_1 to acct_pgbench_N), and gset carries the ledger
-- positions into balance_deltas. pg_notify goes to the channel with _pgbench appended,
-- which nobody listens on. Run with -M prepared, -D base=(10^15 + a run offset),
-- -D seq=0, -D clients=(clients), -D merchants=(1 or N).
-- (No colon or backslash in these comments, pgbench would read them.)
";

fn is_ledger_insert(sql: &str) -> bool {
    sql.starts_with("INSERT INTO ledger_entries") && sql.contains("RETURNING position")
}

fn is_balance_delta(sql: &str) -> bool {
    sql.starts_with("INSERT INTO balance_deltas")
}

/// The ids `<prefix>_<32 hex digits of a UUIDv7>` in `value` minted at or after
/// `since_ms` (milliseconds since the epoch).
pub fn minted_ids(value: &str, since_ms: u128) -> Vec<String> {
    let bytes = value.as_bytes();
    let mut ids = Vec::new();
    let mut index = 0;
    while let Some(offset) = value[index..].find('_') {
        let underscore = index + offset;
        let prefix_start = value[..underscore]
            .rfind(|c: char| !c.is_ascii_lowercase())
            .map_or(0, |at| at + 1);
        let hex_end = underscore + 1 + 32;
        if underscore > prefix_start
            && hex_end <= bytes.len()
            && bytes[underscore + 1..hex_end]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && !bytes.get(hex_end).is_some_and(u8::is_ascii_hexdigit)
            && bytes[underscore + 13] == b'7'
        {
            let millis = u128::from_str_radix(&value[underscore + 1..underscore + 13], 16)
                .unwrap_or_default();
            if millis >= since_ms {
                ids.push(value[prefix_start..hex_end].to_owned());
            }
            index = hex_end;
        } else {
            index = underscore + 1;
        }
    }
    ids
}

/// A parameter value as SQL: a literal, or, when it holds values that vary per
/// transaction, a concatenation of literals and their expressions (an array literal
/// keeps its type with `::text[]`).
pub fn render(value: &str, replacements: &[(String, String)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut rest = value;
    let mut varied = false;
    'outer: while !rest.is_empty() {
        let found = replacements
            .iter()
            .filter_map(|(from, to)| rest.find(from.as_str()).map(|at| (at, from, to)))
            .min_by_key(|(at, from, _)| (*at, usize::MAX - from.len()));
        match found {
            Some((at, from, to)) => {
                varied = true;
                if at > 0 {
                    parts.push(literal(&rest[..at]));
                }
                parts.push(to.clone());
                rest = &rest[at + from.len()..];
            }
            None => {
                parts.push(literal(rest));
                break 'outer;
            }
        }
    }
    if !varied {
        return literal(value);
    }
    let joined = parts.join(" || ");
    let joined = if parts.len() == 1 {
        joined
    } else {
        format!("({joined})")
    };
    if value.starts_with('{') && value.ends_with('}') {
        if value.contains("\":") {
            // A JSON object (jsonb columns take no text expression).
            format!("{joined}::jsonb")
        } else {
            format!("{joined}::text[]")
        }
    } else {
        joined
    }
}

/// A string literal pgbench leaves alone: `'…'`, or `E'…'` with `:` as `\x3a` when the
/// value holds a colon (pgbench would take `:name` for a variable).
pub fn literal(value: &str) -> String {
    if value.contains(':') {
        let escaped = value
            .replace('\\', "\\\\")
            .replace('\'', "''")
            .replace(':', "\\x3a");
        format!("E'{escaped}'")
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// `sql` with `$1`, `$2`, … replaced by `params` (outside quoted literals).
pub fn inline(sql: &str, params: &[String]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.char_indices().peekable();
    let mut in_quote = false;
    while let Some((index, c)) = chars.next() {
        if c == '\'' {
            in_quote = !in_quote;
            out.push(c);
        } else if c == '$' && !in_quote {
            let digits: String = sql[index + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.is_empty() {
                out.push(c);
                continue;
            }
            let number: usize = digits.parse()?;
            let param = params
                .get(number.wrapping_sub(1))
                .with_context(|| format!("${number} has no captured value in: {sql}"))?;
            out.push_str(param);
            for _ in 0..digits.len() {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    if has_variable_colon(sql) {
        // pgbench would take it for a variable: none of payment-svc's statements has
        // one today.
        bail!("a statement with a `:name` pgbench would misread: {sql}");
    }
    Ok(out)
}

/// Whether `sql` holds a `:` followed by a name that is not a `::` cast.
fn has_variable_colon(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    bytes.iter().enumerate().any(|(index, byte)| {
        *byte == b':'
            && index
                .checked_sub(1)
                .is_none_or(|before| bytes[before] != b':')
            && bytes
                .get(index + 1)
                .is_some_and(|next| next.is_ascii_alphanumeric() || *next == b'_')
    })
}

/// What to drive: uniform over `n` merchant accounts, or one hot merchant account.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    Uniform(usize),
    Hot,
}

impl Variant {
    fn merchants(self) -> usize {
        match self {
            Self::Uniform(count) => count,
            Self::Hot => 1,
        }
    }
}

/// Rows of the payment tables, counted by [`count_rows`], and per pgbench run what it
/// reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted {
    pub payments: u64,
    pub ledger_entries: u64,
    pub balance_deltas: u64,
    pub transactions: u64,
    pub failed: u64,
}

impl std::ops::Add for Counted {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            payments: self.payments + other.payments,
            ledger_entries: self.ledger_entries + other.ledger_entries,
            balance_deltas: self.balance_deltas + other.balance_deltas,
            transactions: self.transactions + other.transactions,
            failed: self.failed + other.failed,
        }
    }
}

/// Succeeded payments, ledger entries and balance deltas in the database now.
pub fn count_rows(postgres: &Postgres, interrupted: &Interrupted) -> anyhow::Result<Counted> {
    let row = postgres.query(
        super::payments::DATABASE,
        "SELECT (SELECT count(*) FROM payments WHERE status = 'succeeded'), \
                (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM balance_deltas)",
        interrupted,
    )?;
    let fields: Vec<u64> = row
        .trim()
        .split('|')
        .map(|field| field.parse().context("a row count"))
        .collect::<anyhow::Result<_>>()?;
    let [payments, ledger_entries, balance_deltas] = fields[..] else {
        bail!("the row counts came back as `{row}`");
    };
    Ok(Counted {
        payments,
        ledger_entries,
        balance_deltas,
        ..Counted::default()
    })
}

/// pgbench running this run's capture against the bench's database.
pub struct PgbenchTarget<'a> {
    pub name: &'static str,
    pub binary: PathBuf,
    pub pinning: Pinning,
    pub postgres: &'a Postgres,
    /// payment-svc's role URL (pgbench runs as payment-svc does).
    pub url: String,
    pub script: PathBuf,
    pub variant: Variant,
    pub run_dir: PathBuf,
    pub postmaster: u32,
    /// Distinguishes this target's ids from the other pgbench target's.
    pub offset: u64,
    pub runs: u64,
    pub interrupted: &'a Interrupted,
    /// Per measured run: rows created and what pgbench reported.
    pub counted: Vec<Counted>,
}

impl PgbenchTarget<'_> {
    /// One pgbench run of `seconds`; its transactions' latencies when `log` is set (the
    /// measured run; the warm-up's summary is not read: its 64 connections may take
    /// most of a short warm-up to open).
    fn pgbench(&mut self, seconds: u64, clients: usize, log: bool) -> anyhow::Result<Measurement> {
        self.runs += 1;
        let base = 1_000_000_000_000_000u64 + (self.offset * 1_000 + self.runs) * 1_000_000_000;
        let log_prefix = self
            .run_dir
            .join(format!("pgbench-{}-{}", self.offset, self.runs));
        let mut command = self.pinning.command(pin::GENERATOR_CPU, &self.binary);
        command
            .args(["-n", "-M", "prepared", "-j", "1"])
            .args(["-c", &clients.to_string(), "-T", &seconds.to_string()])
            .arg("-f")
            .arg(&self.script)
            .args(["-D", &format!("base={base}"), "-D", "seq=0"])
            .args(["-D", &format!("clients={clients}")])
            .args(["-D", &format!("merchants={}", self.variant.merchants())]);
        if log {
            command
                .arg("-l")
                .arg(format!("--log-prefix={}", log_prefix.display()));
        }
        command.arg(&self.url);
        let output = run_captured(command, "pgbench")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors = || {
            let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
            format!("pgbench's errors, last lines first: {}", tail.join(" | "))
        };
        if !log {
            return Ok(Measurement {
                ok: 0,
                errors: 0,
                error_kinds: BTreeMap::new(),
                seconds: seconds as f64,
                throughput: 0.0,
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                max_us: 0.0,
                rate: None,
                send_lag_p99_us: None,
                generator_cpu: None,
                subject_cpu: None,
            });
        }
        let summary = parse_summary(&stdout).with_context(errors)?;
        if summary.transactions == 0 || stderr.contains("aborted") {
            bail!(
                "pgbench: {} transactions; {}",
                summary.transactions,
                errors()
            );
        }
        let mut measurement = Measurement {
            ok: summary.transactions,
            errors: summary.failed,
            error_kinds: BTreeMap::new(),
            seconds: seconds as f64,
            throughput: summary.tps,
            p50_us: 0.0,
            p90_us: 0.0,
            p99_us: 0.0,
            max_us: 0.0,
            rate: None,
            send_lag_p99_us: None,
            generator_cpu: None,
            subject_cpu: None,
        };
        if log {
            let latencies = read_latency_logs(&self.run_dir, &log_prefix)?;
            measurement.p50_us = latencies.value_at_quantile(0.50) as f64;
            measurement.p90_us = latencies.value_at_quantile(0.90) as f64;
            measurement.p99_us = latencies.value_at_quantile(0.99) as f64;
            measurement.max_us = latencies.max() as f64;
        }
        if summary.failed > 0 {
            measurement
                .error_kinds
                .insert("pgbench: failed transactions".to_owned(), summary.failed);
        }
        Ok(measurement)
    }
}

impl Target for PgbenchTarget<'_> {
    fn name(&self) -> &str {
        self.name
    }

    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement> {
        let before = count_rows(self.postgres, self.interrupted)?;
        let cpu_before = pin::cpu_seconds_of_tree(self.postmaster)?;
        let started = std::time::Instant::now();
        let warmup = protocol.warmup.as_secs();
        if warmup > 0 {
            self.pgbench(warmup, protocol.concurrency, false)?;
        }
        interrupted.check()?;
        let mut measurement = self.pgbench(
            protocol.duration.as_secs().max(1),
            protocol.concurrency,
            true,
        )?;
        let cpu = pin::cpu_seconds_of_tree(self.postmaster)? - cpu_before;
        measurement.subject_cpu = Some(cpu / started.elapsed().as_secs_f64());
        let after = count_rows(self.postgres, self.interrupted)?;
        let payments = after.payments - before.payments;
        if payments < measurement.ok {
            bail!(
                "{}: {payments} payments were created, fewer than the {} transactions pgbench \
                 reported",
                self.name,
                measurement.ok
            );
        }
        self.counted.push(Counted {
            payments,
            ledger_entries: after.ledger_entries - before.ledger_entries,
            balance_deltas: after.balance_deltas - before.balance_deltas,
            transactions: measurement.ok,
            failed: measurement.errors,
        });
        Ok(measurement)
    }

    fn latency(
        &mut self,
        _rate: f64,
        _protocol: &Protocol,
        _interrupted: &Interrupted,
    ) -> anyhow::Result<Option<Measurement>> {
        Ok(None)
    }
}

/// What pgbench prints at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub transactions: u64,
    pub failed: u64,
    pub tps: f64,
}

/// pgbench's summary: `number of transactions actually processed: N`, `number of failed
/// transactions: N (…)`, `tps = X (without initial connection time)`.
pub fn parse_summary(text: &str) -> anyhow::Result<Summary> {
    let after = |label: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(|rest| rest.trim().to_owned())
    };
    let first_number = |text: String| {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|part| !part.is_empty())
            .map(str::to_owned)
    };
    let transactions = after("number of transactions actually processed:")
        .and_then(first_number)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("pgbench printed no transaction count: {text}"))?;
    let failed = after("number of failed transactions:")
        .and_then(first_number)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let tps = text
        .lines()
        .find(|line| line.starts_with("tps = ") && line.contains("without initial connection"))
        .and_then(|line| first_number(line.trim_start_matches("tps = ").to_owned()))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("pgbench printed no tps: {text}"))?;
    Ok(Summary {
        transactions,
        failed,
        tps,
    })
}

/// The latencies (µs, the third field) of every `<prefix>.<pid>[.<thread>]` log file;
/// the files are removed once read.
fn read_latency_logs(
    dir: &std::path::Path,
    prefix: &std::path::Path,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .context("creating a histogram")?;
    let stem = prefix
        .file_name()
        .map(|name| format!("{}.", name.to_string_lossy()))
        .unwrap_or_default();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&stem) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        for latency in latencies(&text) {
            histogram.saturating_record(latency.clamp(1, 60_000_000));
        }
        std::fs::remove_file(entry.path())?;
    }
    if histogram.is_empty() {
        bail!(
            "pgbench wrote no transaction log under {}",
            prefix.display()
        );
    }
    Ok(histogram)
}

/// The latency field of pgbench's per-transaction log lines (`client_id transaction_no
/// time script_no time_epoch time_us`); failed transactions (`failed`) are skipped.
pub fn latencies(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_hide_colons_from_pgbench() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("12:30 \\x"), "E'12\\x3a30 \\\\x'");
    }

    #[test]
    fn inlining_replaces_placeholders_outside_quotes() -> anyhow::Result<()> {
        let params = ["'a'".to_owned(), "NULL".to_owned()];
        assert_eq!(
            inline("SELECT '$1', $1, $2::text WHERE x = $1", &params)?,
            "SELECT '$1', 'a', NULL::text WHERE x = 'a'"
        );
        assert!(inline("SELECT $3", &params).is_err());
        Ok(())
    }

    #[test]
    fn ids_minted_since_the_capture_are_found_older_ones_are_not() {
        // 0x0193… ms is in 2024; 0x019a… later.
        let old = "acct_01930000000070008000000000000000";
        let new = "pay_019dd8a6a7c47000800000000000abcd";
        let since = 0x019d_0000_0000u128;
        let text = format!("{{{old},{new}}} and x_123");
        assert_eq!(minted_ids(&text, since), [new]);
        assert!(minted_ids(old, 0).len() == 1);
    }

    #[test]
    fn values_holding_varying_ids_become_expressions() {
        let replacements = vec![
            ("pay_1".to_owned(), "('pay_pgb' || :id || '_1')".to_owned()),
            ("acct_m".to_owned(), "('acct_pgbench_' || :m)".to_owned()),
        ];
        assert_eq!(render("pay_1", &replacements), "('pay_pgb' || :id || '_1')");
        assert_eq!(render("1999", &replacements), "'1999'");
        assert_eq!(
            render("{acct_m,acct_sys}", &replacements),
            "('{' || ('acct_pgbench_' || :m) || ',acct_sys}')::text[]"
        );
        assert_eq!(
            render("{\"a\": \"acct_m\"}", &replacements),
            "(E'{\"a\"\\x3a \"' || ('acct_pgbench_' || :m) || '\"}')::jsonb"
        );
    }

    fn statement(sql: &str, params: &[Option<&str>]) -> Statement {
        Statement {
            pid: 1,
            sql: sql.to_owned(),
            params: params.iter().map(|p| p.map(str::to_owned)).collect(),
        }
    }

    #[test]
    fn a_capture_becomes_a_script_with_variables_and_gset() -> anyhow::Result<()> {
        let id = "pay_019dd8a6a7c47000800000000000abcd";
        let captured = Captured {
            statements: vec![
                statement("BEGIN", &[]),
                statement(
                    "INSERT INTO payments (id, merchant, key) VALUES ($1, $2, $3)",
                    &[Some(id), Some("acct_m"), Some("capture-k")],
                ),
                statement(
                    "INSERT INTO ledger_entries (movement_id) VALUES ($1) RETURNING position",
                    &[Some(id)],
                ),
                statement(
                    "INSERT INTO balance_deltas (position, account_id, amount) VALUES ($1, $2, $3)",
                    &[Some("42"), Some("acct_m"), Some("1999")],
                ),
                statement("COMMIT", &[]),
            ],
            key: "capture-k".to_owned(),
            merchant: "acct_m".to_owned(),
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(0x019d_0000_0000),
            positions: vec!["42".to_owned()],
        };
        let script = script(&captured)?;
        assert_eq!((script.statements, script.transactions), (5, 1));
        let text = script.text;
        assert!(text.contains(
            "INSERT INTO payments (id, merchant, key) VALUES (('pay_pgb' || :id::text || '_1'), \
             ('acct_pgbench_' || :m::text), ('pgbench-' || :id::text));"
        ), "{text}");
        assert!(text.contains("RETURNING position\n\\gset le1_\n"), "{text}");
        assert!(
            text.contains("VALUES (:le1_position, ('acct_pgbench_' || :m::text), '1999');"),
            "{text}"
        );
        assert!(text.contains("\\set m random(1, :merchants)"), "{text}");
        Ok(())
    }

    #[test]
    fn scripts_compare_by_statements_not_literals() {
        let a = "-- header 1\nSELECT 'x', E'a\\x3ab''c' FROM t;\n";
        let b = "-- header 2\nSELECT 'y', E'zz' FROM t;\n";
        assert!(same_statements(a, b));
        assert!(!same_statements(a, "SELECT 'x' FROM u;\n"));
    }

    #[test]
    fn pgbench_summaries_are_read() -> anyhow::Result<()> {
        let text = "\
transaction type: create_payment.pgbench
number of clients: 64
number of transactions actually processed: 12345
number of failed transactions: 2 (0.016%)
latency average = 10.3 ms
initial connection time = 80.1 ms
tps = 617.25 (without initial connection time)
";
        assert_eq!(
            parse_summary(text)?,
            Summary {
                transactions: 12345,
                failed: 2,
                tps: 617.25
            }
        );
        assert_eq!(
            latencies("0 1 1503 0 1700000000 1\n3 7 88 0 1 2\n").collect::<Vec<_>>(),
            [1503, 88]
        );
        Ok(())
    }
}
