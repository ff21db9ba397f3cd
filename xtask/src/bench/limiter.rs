//! Scenario `limiter`: ratelimit-svc (release build, Redis store) against the gRPC floor,
//! a no-op tonic service answering the same RPC ([`super::noop`]), with the Redis ceiling
//! reported alongside: `redis-benchmark` running the limiter's own sliding-window script.
//!
//! Every call is `paysuite.ratelimit.v1.RateLimitService/Check` with cost 1 on a key drawn
//! from a large key space ([`KEY_SPACE`]) under a sliding window of [`LIMIT`] per
//! [`WINDOW`] (the [`super::check`] workload), so calls are admitted and every one runs
//! the whole script on Redis. Redis is flushed before each run of ratelimit-svc and of the
//! ceiling, so each starts from the same empty store; its EVALSHA counter (`INFO
//! commandstats`, reset before each run) proves the calls reached Redis. Targets (DESIGN
//! §9): ratelimit-svc throughput ≥ 50% of the no-op's, and its p99 ≤ 2× the no-op's at the
//! same rate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use service_kit::identity::SigningKey;

use super::check::{CHECK_WORKLOAD, ENV_TOKEN, KEY_SPACE, LIMIT, WINDOW};
use super::load::{GeneratorTarget, LoadRun, Measurement, RunHooks};
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

const NOOP: &str = "no-op tonic service";
const SUBJECT: &str = "ratelimit-svc";
const CEILING: &str = "redis-benchmark (sliding.lua)";

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
        pids: vec![noop.pid()],
        hooks: (),
    };
    let mut subject_target = GeneratorTarget {
        name: SUBJECT,
        xtask: context.xtask(),
        pinning,
        load: load(&subject_address, "store"),
        pids: vec![subject.pid(), redis.pid],
        hooks: SubjectHooks {
            redis: &redis,
            signing_key,
            evalsha_calls: Vec::new(),
        },
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
                Measurement::cpu_per_call,
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
            subject_target.hooks.evalsha_calls.iter().sum::<u64>(),
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

/// Around each run of ratelimit-svc: an empty store, a fresh identity token (so no run
/// outlives its token), and Redis's EVALSHA counter afterwards.
struct SubjectHooks<'a> {
    redis: &'a RedisControl,
    signing_key: SigningKey,
    evalsha_calls: Vec<u64>,
}

impl RunHooks for SubjectHooks<'_> {
    fn before(&mut self, load: &mut LoadRun, protocol: &Protocol) -> anyhow::Result<()> {
        self.redis.reset()?;
        let lifetime = protocol.warmup + protocol.duration + Duration::from_secs(120);
        let token = self.signing_key.mint(
            "bench",
            &[proto::api::v1::SCOPE_RATELIMIT_CHECK.to_owned()],
            "ratelimit-svc",
            lifetime,
        );
        load.env.push((ENV_TOKEN.to_owned(), token));
        Ok(())
    }

    fn after(&mut self, _measurement: &Measurement) -> anyhow::Result<()> {
        self.evalsha_calls.push(self.redis.evalsha_calls()?);
        Ok(())
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
}
