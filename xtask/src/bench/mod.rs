//! `cargo xtask bench`: the measurements of DESIGN §9. Every figure is a ratio against a
//! baseline measured in the same run, on the same pinned CPUs.
//!
//! Modules:
//! - [`protocol`]: the §9 protocol (warm-up, interleaved rounds, closed then open loop at
//!   a rate derived from the baseline) over any list of [`protocol::Target`]s, and the
//!   ratio statistics (median, min–max, noisy);
//! - [`load`]: our load generator (`xtask bench-load`, closed and open loop, HDR
//!   histograms) and the [`load::Workload`] trait a scenario implements;
//! - [`pin`]: `taskset` pinning and the guard of a pinned process under test;
//! - [`report`]: the terminal table and `BENCHMARKS.md` (one section per scenario, so a
//!   run of one scenario keeps the others' figures);
//! - one file per scenario: [`limiter`] (ratelimit-svc vs a no-op tonic service, with the
//!   Redis ceiling from `redis-benchmark`), [`gateway`] (the no-op service called
//!   directly, through gateway-svc and through nginx `grpc_pass`); [`noop`], that no-op
//!   service, and [`check`], the Check workload both scenarios drive.
//!
//! A scenario is a function from a [`Context`] to a [`report::ScenarioReport`]; adding
//! one is a file here, a line in [`SCENARIOS`], and, when it brings its own kind of call,
//! a line in [`workload`].
//!
//! The services, the no-op server and the generator are release builds: `cargo xtask`
//! itself is a debug build, so it builds `--release` first and runs the release xtask for
//! everything that is measured or measures.

pub mod capture;
pub mod check;
pub mod create_payment;
pub mod gateway;
pub mod limiter;
pub mod load;
pub mod noop;
pub mod payments;
pub mod pgbench;
pub mod pin;
pub mod protocol;
pub mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{cargo, step};
use crate::{Interrupted, target_dir, workspace_root};
use protocol::Protocol;
use report::ScenarioReport;

/// A scenario: its name on the command line, what it compares, and how to run it.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    /// The packages whose release binaries it runs (xtask is always built).
    pub packages: &'static [&'static str],
    pub run: fn(&Context<'_>) -> anyhow::Result<ScenarioReport>,
}

/// Every scenario, in the order `cargo xtask bench` runs them.
pub const SCENARIOS: &[Scenario] = &[limiter::SCENARIO, gateway::SCENARIO, payments::SCENARIO];

/// The workload a `bench-load` process runs, by name.
pub fn workload(
    name: &str,
    params: &BTreeMap<String, String>,
) -> anyhow::Result<Box<dyn load::Workload>> {
    match name {
        check::CHECK_WORKLOAD => Ok(Box::new(check::CheckWorkload::from_params(params)?)),
        create_payment::CREATE_PAYMENT_WORKLOAD => Ok(Box::new(
            create_payment::CreatePaymentWorkload::from_params(params)?,
        )),
        other => bail!("no workload named `{other}`"),
    }
}

/// `cargo xtask bench [SCENARIO…]`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (all when none): limiter, gateway, payments.
    pub scenarios: Vec<String>,
    /// A quick check to iterate with: 1 s warm-up, 3 s runs, 1 round (BENCHMARKS.md is
    /// not written unless --write).
    #[arg(long, conflicts_with_all = ["duration", "warmup", "rounds"])]
    pub quick: bool,
    /// Measured time of each run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before each measured run, on the same connections.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Interleaved (baseline, subject) rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Closed loop: calls in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the generator spreads calls over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Write BENCHMARKS.md even when the protocol is not §9's (shorter runs, fewer rounds).
    #[arg(long)]
    pub write: bool,
    /// The nice value of every generator and process under test (same for all, so the
    /// comparison stays fair); below 0 they take the pinned CPUs ahead of other work on a
    /// shared machine. Needs root; `--nice 0` keeps the default priority.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    pub nice: i32,
    /// A note on the machine's condition for BENCHMARKS.md (e.g. other builds running).
    #[arg(long)]
    pub note: Option<String>,
    /// payments: rewrite xtask/bench/create_payment.pgbench from this run's capture of
    /// payment-svc's statements instead of failing when the committed script drifted.
    #[arg(long)]
    pub recapture: bool,
}

/// What a scenario gets: the protocol, where the release binaries are, where to log.
#[derive(Debug)]
pub struct Context<'a> {
    pub protocol: Protocol,
    /// Where and at which priority processes run.
    pub pinning: pin::Pinning,
    pub interrupted: &'a Interrupted,
    /// `target/release`.
    pub release_dir: PathBuf,
    /// Logs of the processes under test: `.paysuite/bench/<scenario>/`.
    pub run_dir: PathBuf,
    /// `--recapture` (the `payments` scenario's pgbench script).
    pub recapture: bool,
}

impl Context<'_> {
    /// The release xtask (the generator and the no-op server).
    pub fn xtask(&self) -> PathBuf {
        self.release_dir.join("xtask")
    }
}

/// Runs the chosen scenarios, prints their tables and writes BENCHMARKS.md.
pub fn run(args: &BenchArgs, interrupted: &Interrupted) -> anyhow::Result<()> {
    let scenarios = choose(&args.scenarios)?;
    let protocol = if args.quick {
        Protocol {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(3),
            rounds: 1,
            concurrency: args.concurrency,
            connections: args.connections,
        }
    } else {
        Protocol {
            warmup: args.warmup,
            duration: args.duration,
            rounds: args.rounds,
            concurrency: args.concurrency,
            connections: args.connections,
        }
    };
    protocol.validate()?;
    let pinning = pin::Pinning { nice: args.nice };
    pinning.check()?;

    let mut build = vec!["build", "--release", "--package", "xtask"];
    for scenario in &scenarios {
        for package in scenario.packages {
            build.extend(["--package", package]);
        }
    }
    step("cargo build --release", cargo(&build), interrupted)?;

    let machine = report::Machine::probe();
    let mut reports = Vec::new();
    for scenario in scenarios {
        interrupted.check()?;
        println!("xtask: ── bench {}: {}", scenario.name, scenario.summary);
        let run_dir = workspace_root().join(".paysuite/bench").join(scenario.name);
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let context = Context {
            protocol: protocol.clone(),
            pinning,
            interrupted,
            release_dir: target_dir().join("release"),
            run_dir,
            recapture: args.recapture,
        };
        let sampler = report::ConditionSampler::start(args.note.clone());
        let outcome = (scenario.run)(&context);
        let condition = sampler.finish();
        let mut scenario_report =
            outcome.with_context(|| format!("bench scenario `{}`", scenario.name))?;
        scenario_report.finish(&machine, &protocol, pinning, condition);
        println!("\n{}", scenario_report.markdown());
        reports.push(scenario_report);
    }

    let path = workspace_root().join("BENCHMARKS.md");
    if protocol.is_design_protocol() || args.write {
        report::write_benchmarks_md(&path, &reports)?;
        println!("xtask: wrote {}", path.display());
    } else {
        println!(
            "xtask: {} not written: this run's protocol is not DESIGN §9's \
             (pass --write to write it anyway)",
            path.display()
        );
    }
    Ok(())
}

fn choose(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(SCENARIOS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            SCENARIOS
                .iter()
                .find(|scenario| scenario.name == name)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                    format!("no scenario `{name}` (known: {})", known.join(", "))
                })
        })
        .collect()
}
