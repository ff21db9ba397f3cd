//! Scenario `limiter`: ratelimit-svc (release build, Redis store) against the gRPC floor,
//! a no-op tonic service answering the same RPC ([`super::noop`]), with the Redis ceiling
//! reported alongside: `redis-benchmark` running the limiter's own sliding-window script.
//!
//! Every call is `paysuite.ratelimit.v1.RateLimitService/Check` with cost 1 on a key drawn
//! from a large key space ([`KEY_SPACE`]) under a sliding window of [`LIMIT`] per
//! [`WINDOW`], so calls are admitted and every one runs the whole script on Redis. Redis
//! is flushed before each run of ratelimit-svc and of the ceiling, so each starts from the
//! same empty store; its EVALSHA counter (`INFO commandstats`, reset before each run)
//! proves the calls reached Redis. Targets (DESIGN §9): ratelimit-svc throughput ≥ 50% of
//! the no-op's, and its p99 ≤ 2× the no-op's at the same rate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::ratelimit::v1 as pb;
use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
use service_kit::identity::SigningKey;
use tonic::transport::{Channel, Endpoint};

use super::load::{CallFuture, LoadRun, Measurement, Workload};
use super::pin::{self, PinnedProcess};
use super::protocol::{self, Protocol, Target};
use super::report::{Bound, Check, Ratio, ScenarioReport};
use super::{Context, Scenario};
use crate::process::run_captured;
use crate::redis::Redis;
use crate::{Interrupted, ports, tools, workspace_root};

/// The scenario's entry in [`super::SCENARIOS`].
pub const SCENARIO: Scenario = Scenario {
    name: "limiter",
    summary: "ratelimit-svc (Redis store) vs a no-op tonic service, with the redis-benchmark ceiling",
    packages: &["ratelimit-svc"],
    run,
};

/// The workload: one Check per call.
pub const CHECK_WORKLOAD: &str = "ratelimit-check";

/// Keys are drawn from this many (as redis-benchmark's `-r`).
const KEY_SPACE: u64 = 1_000_000;
/// The sliding-window limit per key: far above what a key sees, so calls are admitted.
const LIMIT: u64 = 1_000;
/// The sliding window.
const WINDOW: Duration = Duration::from_secs(60);

const NOOP: &str = "no-op tonic service";
const SUBJECT: &str = "ratelimit-svc";
const CEILING: &str = "redis-benchmark (sliding.lua)";

/// The environment variable carrying the identity token to the generator.
const ENV_TOKEN: &str = "BENCH_IDENTITY_TOKEN";

fn run(context: &Context<'_>) -> anyhow::Result<ScenarioReport> {
    if std::env::var_os("REDIS_URL").is_some_and(|url| !url.is_empty()) {
        bail!(
            "REDIS_URL is set: the bench starts its own Redis pinned to CPU {}; unset it",
            pin::SUBJECT_CPU
        );
    }
    let interrupted = context.interrupted;
    let redis = Redis::provision(interrupted).context("starting Redis")?;
    let redis = RedisControl::new(redis)?;
    context.pinning.adopt(redis.pid)?;
    let script =
        std::fs::read_to_string(workspace_root().join("ratelimit-svc/src/lua/sliding.lua"))
            .context("reading ratelimit-svc/src/lua/sliding.lua")?;
    let sha = redis.cli(&["SCRIPT", "LOAD", &script])?;

    let signing_key = crate::identity::dev_key()?;
    let public_keys = signing_key.public_key().to_string();

    let noop_address = format!("127.0.0.1:{}", ports::free_port()?);
    let pinning = context.pinning;
    let mut noop_command = pinning.command(pin::SUBJECT_CPU, &context.xtask());
    noop_command.args(["bench-noop-server", "--listen", &noop_address]);
    let mut noop = PinnedProcess::start(NOOP, noop_command, context.run_dir.join("noop.log"))?;
    let subject_address = format!("127.0.0.1:{}", ports::free_port()?);
    let mut subject_command =
        pinning.command(pin::SUBJECT_CPU, &context.release_dir.join("ratelimit-svc"));
    subject_command.envs([
        ("LISTEN_ADDR", subject_address.as_str()),
        ("REDIS_URL", redis.url()),
        ("IDENTITY_PUBLIC_KEYS", &public_keys),
        ("RUST_LOG", "info"),
    ]);
    let mut subject = PinnedProcess::start(
        SUBJECT,
        subject_command,
        context.run_dir.join("ratelimit-svc.log"),
    )?;
    pinning.ensure(NOOP, noop.pid())?;
    pinning.ensure(SUBJECT, subject.pid())?;
    pinning.ensure("redis-server", redis.pid)?;

    let load = |address: &str, expect: &str| LoadRun {
        workload: CHECK_WORKLOAD.to_owned(),
        params: vec![("expect".to_owned(), expect.to_owned())],
        env: Vec::new(),
        address: format!("http://{address}"),
        connections: context.protocol.connections,
        concurrency: context.protocol.concurrency,
    };
    let mut noop_target = GeneratorTarget {
        name: NOOP,
        xtask: context.xtask(),
        pinning,
        load: load(&noop_address, "any"),
        redis: None,
        signing_key: None,
        pids: vec![noop.pid()],
        evalsha_calls: Vec::new(),
    };
    let mut subject_target = GeneratorTarget {
        name: SUBJECT,
        xtask: context.xtask(),
        pinning,
        load: load(&subject_address, "store"),
        redis: Some(&redis),
        signing_key: Some(signing_key),
        pids: vec![subject.pid(), redis.pid],
        evalsha_calls: Vec::new(),
    };
    let mut ceiling = CeilingTarget {
        redis: &redis,
        pinning,
        sha: sha.clone(),
        benchmark: redis_benchmark()?,
        evalsha_calls: Vec::new(),
    };
    let results = protocol::run(
        &mut [&mut noop_target, &mut subject_target, &mut ceiling],
        &context.protocol,
        interrupted,
    )?;
    noop.check_alive()?;
    subject.check_alive()?;

    let (Some(noop_runs), Some(subject_runs), Some(ceiling_runs)) =
        (results.of(NOOP), results.of(SUBJECT), results.of(CEILING))
    else {
        bail!("a target has no runs");
    };
    let checks = vec![
        Check {
            label: format!("{SUBJECT} / {NOOP}: throughput"),
            spread: protocol::ratio(&subject_runs.throughput, &noop_runs.throughput, |m| {
                m.throughput
            }),
            bound: Bound::AtLeast(0.5),
        },
        Check {
            label: format!("{SUBJECT} / {NOOP}: open-loop p99 at the same rate"),
            spread: protocol::ratio(&subject_runs.latency, &noop_runs.latency, |m| m.p99_us),
            bound: Bound::AtMost(2.0),
        },
    ];
    let ratios = vec![
        Ratio {
            label: format!("{SUBJECT} / {CEILING}: throughput"),
            spread: protocol::ratio(&subject_runs.throughput, &ceiling_runs.throughput, |m| {
                m.throughput
            }),
        },
        Ratio {
            label: format!("{SUBJECT} / {NOOP}: open-loop p50 at the same rate"),
            spread: protocol::ratio(&subject_runs.latency, &noop_runs.latency, |m| m.p50_us),
        },
        Ratio {
            label: format!(
                "{SUBJECT} (with Redis) / {NOOP}: CPU time per call under test, closed loop \
                 (its inverse is the throughput ratio once both are CPU-bound)"
            ),
            spread: protocol::ratio(
                &subject_runs.throughput,
                &noop_runs.throughput,
                cpu_per_call,
            ),
        },
    ];
    let subject_calls: u64 = subject_runs
        .throughput
        .iter()
        .chain(&subject_runs.latency)
        .map(|m| m.ok)
        .sum();
    let notes = vec![
        format!(
            "Proof of path: Redis counted {} EVALSHA calls during the {SUBJECT} runs (warm-ups \
             included) for {subject_calls} measured successful Checks, each answered with \
             `allowed` and source STORE (any other answer counts as an error); the ceiling runs \
             counted {} EVALSHA calls.",
            subject_target.evalsha_calls.iter().sum::<u64>(),
            ceiling.evalsha_calls.iter().sum::<u64>()
        ),
        format!(
            "The no-op service does no validation, identity check or store call; ratelimit-svc \
             checks the identity token on every call (its Ed25519 signature once, then from \
             the cache of verified tokens; the generator reuses one token as the gateway \
             does), validates, and runs the \
             sliding-window script (script SHA `{sha}`) through its guard (deadline, breaker, \
             over-limit cache)."
        ),
        format!(
            "Generator: our own (`xtask bench-load`, one tokio thread on CPU {}), tonic client; \
             the ceiling is redis-benchmark on CPU {} with 64 connections, no pipelining.",
            pin::GENERATOR_CPU,
            pin::GENERATOR_CPU
        ),
    ];
    let report = ScenarioReport {
        name: SCENARIO.name,
        title: "ratelimit-svc vs the gRPC floor, with the Redis ceiling".to_owned(),
        setup: vec![
            format!(
                "Call: `RateLimitService/Check`, cost 1, key drawn from {KEY_SPACE} keys, exact \
                 sliding window of {LIMIT} per {}s (calls are admitted).",
                WINDOW.as_secs()
            ),
            format!(
                "Baseline, {NOOP}: plain tonic (`xtask bench-noop-server`), a fixed decision, \
                 no store."
            ),
            format!(
                "Subject, {SUBJECT}: the release binary with `REDIS_URL` (a throwaway \
                 redis-server, no persistence), default settings, identity tokens from the \
                 development key."
            ),
            format!(
                "Ceiling, {CEILING}: `redis-benchmark -c 64 -r {KEY_SPACE} EVALSHA <sha> 1 \
                 key__rand_int__ {LIMIT} {} 1` against the same Redis (closed loop only).",
                WINDOW.as_micros()
            ),
            format!(
                "Under test on CPU {}: the no-op service, ratelimit-svc and redis-server; \
                 on CPU {}: our generator and redis-benchmark.",
                pin::SUBJECT_CPU,
                pin::GENERATOR_CPU
            ),
        ],
        results,
        ratios,
        checks,
        notes,
        context: None,
    };
    Ok(report)
    // `subject`, `noop`, then Redis stop here (and on every early return).
}

/// Seconds of CPU under test per successful call (0 when unknown).
fn cpu_per_call(measurement: &Measurement) -> f64 {
    match measurement.subject_cpu {
        Some(cpu) if measurement.throughput > 0.0 => cpu / measurement.throughput,
        _ => 0.0,
    }
}

/// A service driven by our generator.
struct GeneratorTarget<'a> {
    name: &'static str,
    xtask: PathBuf,
    pinning: pin::Pinning,
    load: LoadRun,
    /// Redis to flush (and whose EVALSHA counter to read) around each run.
    redis: Option<&'a RedisControl>,
    /// Mints a fresh identity token for each run (so no run outlives its token).
    signing_key: Option<SigningKey>,
    /// The processes under test, whose CPU use each run reports.
    pids: Vec<u32>,
    evalsha_calls: Vec<u64>,
}

impl GeneratorTarget<'_> {
    fn measure(
        &mut self,
        rate: Option<f64>,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement> {
        if let Some(redis) = self.redis {
            redis.reset()?;
        }
        let mut load = self.load.clone();
        if let Some(key) = &self.signing_key {
            let lifetime = protocol.warmup + protocol.duration + Duration::from_secs(120);
            let token = key.mint(
                "bench",
                &[proto::api::v1::SCOPE_RATELIMIT_CHECK.to_owned()],
                "ratelimit-svc",
                lifetime,
            );
            load.env.push((ENV_TOKEN.to_owned(), token));
        }
        let (mut measurement, cpu) = pin::measure_cpu(&self.pids, || {
            load.run(
                &self.xtask,
                &self.pinning,
                rate,
                protocol.warmup,
                protocol.duration,
                interrupted,
            )
        })?;
        measurement.subject_cpu = Some(cpu);
        if let Some(redis) = self.redis {
            self.evalsha_calls.push(redis.evalsha_calls()?);
        }
        Ok(measurement)
    }
}

impl Target for GeneratorTarget<'_> {
    fn name(&self) -> &str {
        self.name
    }

    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement> {
        self.measure(None, protocol, interrupted)
    }

    fn latency(
        &mut self,
        rate: f64,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Option<Measurement>> {
        self.measure(Some(rate), protocol, interrupted).map(Some)
    }
}

/// redis-benchmark running the limiter's script: what Redis alone can do.
struct CeilingTarget<'a> {
    redis: &'a RedisControl,
    pinning: pin::Pinning,
    sha: String,
    benchmark: PathBuf,
    evalsha_calls: Vec<u64>,
}

impl CeilingTarget<'_> {
    /// One redis-benchmark run of `requests` calls; its CSV line parsed.
    fn bench(&self, requests: u64, concurrency: usize) -> anyhow::Result<Measurement> {
        let mut command = self.pinning.command(pin::GENERATOR_CPU, &self.benchmark);
        command
            .args(["-h", &self.redis.host, "-p", &self.redis.port.to_string()])
            .args(["-c", &concurrency.to_string(), "-n", &requests.to_string()])
            .args(["-r", &KEY_SPACE.to_string(), "--csv"])
            .args(["EVALSHA", &self.sha, "1", "key__rand_int__"])
            .args([
                LIMIT.to_string(),
                WINDOW.as_micros().to_string(),
                "1".to_owned(),
            ]);
        let output = run_captured(command, "redis-benchmark")?;
        parse_redis_benchmark_csv(&String::from_utf8_lossy(&output.stdout), requests)
    }
}

impl Target for CeilingTarget<'_> {
    fn name(&self) -> &str {
        CEILING
    }

    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement> {
        self.redis.reset()?;
        // redis-benchmark counts requests, not seconds: a warm-up run sizes the measured
        // one to last about the protocol's duration.
        let warmup = self.bench(20_000, protocol.concurrency)?;
        let per_second = warmup.throughput.max(1_000.0);
        let warmup_left = protocol.warmup.as_secs_f64() - warmup.seconds;
        if warmup_left > 0.5 {
            let requests = (per_second * warmup_left) as u64;
            self.bench(requests.max(1_000), protocol.concurrency)?;
        }
        interrupted.check()?;
        let requests = (per_second * protocol.duration.as_secs_f64()) as u64;
        self.redis.reset()?;
        let (mut measurement, cpu) = pin::measure_cpu(&[self.redis.pid], || {
            self.bench(requests.max(1_000), protocol.concurrency)
        })?;
        measurement.subject_cpu = Some(cpu);
        let calls = self.redis.evalsha_calls()?;
        if calls < measurement.ok {
            bail!(
                "redis-benchmark reported {} calls but Redis counted {calls} EVALSHA",
                measurement.ok
            );
        }
        self.evalsha_calls.push(calls);
        Ok(measurement)
    }

    fn latency(
        &mut self,
        _rate: f64,
        _protocol: &Protocol,
        _interrupted: &Interrupted,
    ) -> anyhow::Result<Option<Measurement>> {
        // redis-benchmark has no open loop.
        Ok(None)
    }
}

/// redis-benchmark's `--csv` output: a header naming the columns, then one line per test.
fn parse_redis_benchmark_csv(text: &str, requests: u64) -> anyhow::Result<Measurement> {
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|line| line.starts_with('"'))
        .map(|line| {
            line.split("\",\"")
                .map(|field| field.trim_matches('"').to_owned())
                .collect()
        })
        .collect();
    let (Some(header), Some(values)) = (rows.first(), rows.get(1)) else {
        bail!("redis-benchmark printed no CSV result: {text}");
    };
    let column = |name: &str| -> anyhow::Result<f64> {
        let index = header
            .iter()
            .position(|column| column == name)
            .with_context(|| format!("redis-benchmark's CSV has no `{name}` column"))?;
        values
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .with_context(|| format!("redis-benchmark's `{name}` is not a number"))
    };
    let throughput = column("rps")?;
    Ok(Measurement {
        ok: requests,
        errors: 0,
        error_kinds: BTreeMap::new(),
        seconds: requests as f64 / throughput.max(f64::MIN_POSITIVE),
        throughput,
        p50_us: column("p50_latency_ms")? * 1_000.0,
        p90_us: column("p95_latency_ms")? * 1_000.0,
        p99_us: column("p99_latency_ms")? * 1_000.0,
        max_us: column("max_latency_ms")? * 1_000.0,
        rate: None,
        send_lag_p99_us: None,
        generator_cpu: None,
        subject_cpu: None,
    })
}

/// redis-benchmark, from Debian's redis-tools (which redis-server depends on).
fn redis_benchmark() -> anyhow::Result<PathBuf> {
    tools::which("redis-benchmark").context(
        "redis-benchmark is missing: it ships in Debian's redis-tools (apt-get install redis-tools)",
    )
}

/// The throwaway Redis and the redis-cli commands the scenario sends it.
struct RedisControl {
    redis: Redis,
    cli: PathBuf,
    host: String,
    port: u16,
    pid: u32,
}

impl RedisControl {
    fn new(redis: Redis) -> anyhow::Result<Self> {
        let address = redis
            .url()
            .strip_prefix("redis://")
            .context("the throwaway Redis has no redis:// URL")?;
        let (host, port) = address
            .rsplit_once(':')
            .context("the Redis URL has no port")?;
        let cli = tools::which("redis-cli").context(
            "redis-cli is missing: it ships in Debian's redis-tools (apt-get install redis-tools)",
        )?;
        let mut control = Self {
            host: host.to_owned(),
            port: port.parse().context("the Redis URL's port")?,
            redis,
            cli,
            pid: 0,
        };
        control.pid = info_field(&control.cli(&["INFO", "server"])?, "process_id")?;
        Ok(control)
    }

    fn url(&self) -> &str {
        self.redis.url()
    }

    /// `redis-cli -h … -p … args`, its output trimmed.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(&self.cli);
        command
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(args);
        let output = run_captured(command, &format!("redis-cli {}", args[0]))?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if text.starts_with("ERR") || text.starts_with("(error)") {
            bail!("redis-cli {}: {text}", args[0]);
        }
        Ok(text)
    }

    /// An empty keyspace and zeroed command counters (scripts stay loaded).
    fn reset(&self) -> anyhow::Result<()> {
        self.cli(&["FLUSHALL"])?;
        self.cli(&["CONFIG", "RESETSTAT"])?;
        Ok(())
    }

    /// EVALSHA calls since the last [`RedisControl::reset`].
    fn evalsha_calls(&self) -> anyhow::Result<u64> {
        let stats = self.cli(&["INFO", "commandstats"])?;
        let Some(line) = stats
            .lines()
            .find(|line| line.starts_with("cmdstat_evalsha:"))
        else {
            return Ok(0);
        };
        line.split([':', ','])
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|calls| calls.parse().ok())
            .context("INFO commandstats: no EVALSHA calls= field")
    }
}

/// `name:value` from an INFO section.
fn info_field<T: std::str::FromStr>(info: &str, name: &str) -> anyhow::Result<T> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("INFO has no {name}"))
}

/// The generator's side: Check calls over several connections.
#[derive(Debug)]
pub struct CheckWorkload {
    channels: Vec<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Whether the answer must come from the store (ratelimit-svc) or may be any
    /// successful answer (the no-op).
    expect_store: bool,
}

impl CheckWorkload {
    /// Parameters: `expect=store|any`; the token comes from `BENCH_IDENTITY_TOKEN`.
    pub fn from_params(params: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let expect_store = match params.get("expect").map(String::as_str) {
            Some("store") => true,
            Some("any") | None => false,
            Some(other) => bail!("expect={other}: takes store or any"),
        };
        let token = match std::env::var(ENV_TOKEN) {
            Ok(token) if !token.is_empty() => Some(
                token
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{ENV_TOKEN} is not a valid header value"))?,
            ),
            _ => None,
        };
        Ok(Self {
            channels: Vec::new(),
            token,
            expect_store,
        })
    }

    fn request(&self, sequence: u64) -> tonic::Request<pb::CheckRequest> {
        let mut request = tonic::Request::new(pb::CheckRequest {
            key: format!("bench-{}", spread_key(sequence) % KEY_SPACE),
            limit: Some(pb::Limit {
                limit: LIMIT,
                window: Some(prost_types::Duration {
                    seconds: i64::try_from(WINDOW.as_secs()).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                algorithm: pb::Algorithm::SlidingWindow.into(),
            }),
            cost: 1,
        });
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert(service_kit::identity::IDENTITY_HEADER, token.clone());
        }
        request
    }
}

/// A well-mixed 64-bit value of `sequence` (SplitMix64's finaliser): consecutive calls
/// land on unrelated keys.
fn spread_key(sequence: u64) -> u64 {
    let mut z = sequence.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Workload for CheckWorkload {
    fn connect(&mut self, address: &str, connections: usize) -> CallFuture {
        let endpoint = Endpoint::from_shared(address.to_owned()).map(|endpoint| {
            endpoint
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
        });
        let channels = &mut self.channels;
        // Each `connect` is its own HTTP/2 connection.
        let connected: Result<Vec<Channel>, String> = match endpoint {
            Err(err) => Err(err.to_string()),
            Ok(endpoint) => Ok((0..connections).map(|_| endpoint.connect_lazy()).collect()),
        };
        match connected {
            Ok(list) => {
                *channels = list;
                Box::pin(async { Ok(()) })
            }
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }

    fn call(&self, sequence: u64) -> CallFuture {
        let Some(channel) = self
            .channels
            .get(usize::try_from(sequence).unwrap_or(0) % self.channels.len().max(1))
            .cloned()
        else {
            return Box::pin(async { Err("not connected".to_owned()) });
        };
        let request = self.request(sequence);
        let expect_store = self.expect_store;
        Box::pin(async move {
            let response = RateLimitServiceClient::new(channel)
                .check(request)
                .await
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
            let decision = response
                .into_inner()
                .decision
                .ok_or_else(|| "an answer without a decision".to_owned())?;
            if !decision.allowed {
                return Err("refused".to_owned());
            }
            if expect_store && decision.source != i32::from(pb::DecisionSource::Store) {
                return Err(format!(
                    "decided by {:?}, not the store",
                    pb::DecisionSource::try_from(decision.source)
                ));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_csv_is_read_by_column_name() -> anyhow::Result<()> {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                    \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"EVALSHA f06 1 key__rand_int__ 1000 60000000 1\",\"7751.94\",\"7.375\",\
                    \"0.320\",\"6.751\",\"15.631\",\"19.567\",\"24.639\"\n";
        let measurement = parse_redis_benchmark_csv(text, 20_000)?;
        assert_eq!(measurement.throughput, 7751.94);
        assert_eq!(measurement.p50_us, 6751.0);
        assert_eq!(measurement.p99_us, 19567.0);
        assert_eq!(measurement.ok, 20_000);
        Ok(())
    }

    #[test]
    fn keys_spread_over_the_key_space() {
        let keys: std::collections::BTreeSet<u64> =
            (0..10_000).map(|n| spread_key(n) % KEY_SPACE).collect();
        // 10,000 draws from a million keys: collisions are rare, never most of them.
        assert!(keys.len() > 9_900, "only {} distinct keys", keys.len());
    }
}
