//! The load generator: closed loop (a fixed number of calls in flight) and open loop (calls
//! sent on a schedule, each timed from its scheduled send, so a slow answer never delays
//! the next send and no coordinated omission hides queueing).
//!
//! It runs in its own process (`xtask bench-load`, a release build, pinned to the
//! generator's CPU by the caller), on one single-threaded tokio runtime: one core, no
//! cross-thread wake-ups. Calls spread round-robin over several HTTP/2 connections. What a
//! call is comes from a [`Workload`] named on the command line (one per scenario, see
//! [`super::workload`]); the result is one JSON line on stdout ([`Measurement`]).
//!
//! The orchestrating side, [`LoadRun`], starts that process under `taskset` and reads the
//! line back.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::pin::{GENERATOR_CPU, Pinning, measure_cpu};
use super::protocol::{Protocol, Target};

/// How long one call may take before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a target has to answer its first call successfully.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many distinct error messages are kept (with their counts).
const MAX_ERROR_KINDS: usize = 8;
/// Latencies are recorded in nanoseconds up to a minute, to 3 significant digits.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// What one call returns: `Ok` when the target answered what the workload expects.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// One kind of call against one target, spread over its connections.
pub trait Workload {
    /// Opens the connections (one HTTP/2 connection each).
    fn connect(&mut self, address: &str, connections: usize) -> CallFuture;
    /// Call number `sequence` (on connection `sequence % connections`); the workload
    /// checks the answer, so a wrong answer is an error, not a success.
    fn call(&self, sequence: u64) -> CallFuture;
}

/// `xtask bench-load`: what to run against which target.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The workload (see `bench::workload`).
    #[arg(long)]
    pub workload: String,
    /// Workload parameters, `name=value`, repeatable.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// The target, e.g. http://127.0.0.1:50053.
    #[arg(long)]
    pub address: String,
    /// HTTP/2 connections to spread calls over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Closed loop: calls in flight. Open loop: ignored.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop at this many calls per second; closed loop when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Load before measuring, on the same connections.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// How long to measure.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("`{text}` is not name=value"))
}

/// What one measured run saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Calls that completed successfully inside the measured window.
    pub ok: u64,
    /// Calls that failed (or answered wrongly) inside the measured window.
    pub errors: u64,
    /// Error messages and their counts (the first few kinds).
    pub error_kinds: BTreeMap<String, u64>,
    /// The measured window, in seconds.
    pub seconds: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency percentiles of successful calls, in microseconds (open loop: from the
    /// scheduled send).
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Open loop only: the rate asked for, and the 99th percentile of how late the
    /// generator sent a call after its scheduled time (its own health: a large value
    /// means the generator, not the target, was the bottleneck).
    pub rate: Option<f64>,
    pub send_lag_p99_us: Option<f64>,
    /// Closed loop only: the generator's CPU time over the window, as a fraction of its
    /// core (near 1: the generator, not the target, may be what limits the throughput).
    #[serde(default)]
    pub generator_cpu: Option<f64>,
    /// The processes under test: their CPU time over the whole run, warm-up included, as
    /// a fraction of their one core (set by the orchestrator, which knows their pids).
    #[serde(default)]
    pub subject_cpu: Option<f64>,
}

impl Measurement {
    /// Whether more than 1% of calls failed: the run measured failures, not the service.
    pub fn is_failing(&self) -> bool {
        self.errors * 100 > self.ok + self.errors
    }

    /// Seconds of CPU under test per successful call (0 when unknown).
    pub fn cpu_per_call(&self) -> f64 {
        match self.subject_cpu {
            Some(cpu) if self.throughput > 0.0 => cpu / self.throughput,
            _ => 0.0,
        }
    }
}

/// `xtask bench-load`: runs the load and prints one [`Measurement`] as JSON on stdout.
pub fn main(args: &LoadArgs) -> anyhow::Result<()> {
    let params: BTreeMap<String, String> = args.params.iter().cloned().collect();
    let workload = super::workload(&args.workload, &params)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the load generator's runtime")?;
    let local = tokio::task::LocalSet::new();
    let measurement = local.block_on(&runtime, drive(workload, args))?;
    println!("{}", serde_json::to_string(&measurement)?);
    Ok(())
}

async fn drive(mut workload: Box<dyn Workload>, args: &LoadArgs) -> anyhow::Result<Measurement> {
    if args.connections == 0 || args.concurrency == 0 {
        bail!("--connections and --concurrency must be at least 1");
    }
    workload
        .connect(&args.address, args.connections)
        .await
        .map_err(|err| anyhow::anyhow!("connecting to {}: {err}", args.address))?;
    let workload: Rc<dyn Workload> = Rc::from(workload);
    wait_ready(&*workload, &args.address).await?;
    match args.rate {
        None => closed_loop(workload, args).await,
        Some(rate) if rate.is_finite() && rate > 0.0 => open_loop(workload, args, rate).await,
        Some(rate) => bail!("--rate must be a positive number of calls per second, not {rate}"),
    }
}

/// Retries one call until it succeeds: the target is up and answers what the workload
/// expects before anything is measured.
async fn wait_ready(workload: &dyn Workload, address: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let error = match tokio::time::timeout(CALL_TIMEOUT, workload.call(0)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => err,
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() > deadline {
            bail!(
                "{address} did not answer a call successfully within {}s: {error}",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the calls of one run record into (shared by the tasks of one single-threaded
/// runtime, hence `Rc`/`RefCell`).
#[derive(Debug)]
struct Recorder {
    count_by_due: bool,
    window_start: Instant,
    window_end: Instant,
    latencies: RefCell<Histogram<u64>>,
    send_lags: RefCell<Histogram<u64>>,
    ok: Cell<u64>,
    errors: Cell<u64>,
    error_kinds: RefCell<BTreeMap<String, u64>>,
}

impl Recorder {
    fn new(count_by_due: bool, window_start: Instant, window_end: Instant) -> anyhow::Result<Self> {
        let histogram =
            || Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("creating a histogram");
        Ok(Self {
            count_by_due,
            window_start,
            window_end,
            latencies: RefCell::new(histogram()?),
            send_lags: RefCell::new(histogram()?),
            ok: Cell::new(0),
            errors: Cell::new(0),
            error_kinds: RefCell::new(BTreeMap::new()),
        })
    }

    /// Records a call that was due at `due` and finished at `done`. The closed loop counts
    /// calls that finished inside the window (its throughput); the open loop counts calls
    /// that were due inside it, however late they finish (so the slowest are never left
    /// out).
    fn record(&self, due: Instant, done: Instant, outcome: Result<(), String>) {
        let at = if self.count_by_due { due } else { done };
        if at < self.window_start || at > self.window_end {
            return;
        }
        match outcome {
            Ok(()) => {
                self.ok.set(self.ok.get() + 1);
                let nanos = u64::try_from(done.duration_since(due).as_nanos()).unwrap_or(u64::MAX);
                self.latencies
                    .borrow_mut()
                    .saturating_record(nanos.clamp(1, MAX_LATENCY_NS));
            }
            Err(message) => {
                self.errors.set(self.errors.get() + 1);
                let mut kinds = self.error_kinds.borrow_mut();
                if let Some(count) = kinds.get_mut(&message) {
                    *count += 1;
                } else if kinds.len() < MAX_ERROR_KINDS {
                    kinds.insert(message, 1);
                }
            }
        }
    }

    fn record_send_lag(&self, due: Instant, sent: Instant) {
        if due >= self.window_start && due <= self.window_end {
            let nanos = u64::try_from(sent.duration_since(due).as_nanos()).unwrap_or(u64::MAX);
            self.send_lags
                .borrow_mut()
                .saturating_record(nanos.clamp(1, MAX_LATENCY_NS));
        }
    }

    fn measurement(&self, rate: Option<f64>) -> Measurement {
        let seconds = self
            .window_end
            .duration_since(self.window_start)
            .as_secs_f64();
        let latencies = self.latencies.borrow();
        let micros = |nanos: u64| nanos as f64 / 1_000.0;
        let ok = self.ok.get();
        Measurement {
            ok,
            errors: self.errors.get(),
            error_kinds: self.error_kinds.borrow().clone(),
            seconds,
            throughput: ok as f64 / seconds,
            p50_us: micros(latencies.value_at_quantile(0.50)),
            p90_us: micros(latencies.value_at_quantile(0.90)),
            p99_us: micros(latencies.value_at_quantile(0.99)),
            max_us: micros(latencies.max()),
            rate,
            send_lag_p99_us: rate.map(|_| micros(self.send_lags.borrow().value_at_quantile(0.99))),
            generator_cpu: None,
            subject_cpu: None,
        }
    }
}

/// One call, bounded by [`CALL_TIMEOUT`].
async fn timed_call(workload: &dyn Workload, sequence: u64) -> Result<(), String> {
    match tokio::time::timeout(CALL_TIMEOUT, workload.call(sequence)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// `concurrency` tasks, each sending its next call as soon as the previous one answered,
/// from the start of the warm-up to the end of the window; only calls that finish inside
/// the window count (so the window sees a steady state, never a ramp).
async fn closed_loop(workload: Rc<dyn Workload>, args: &LoadArgs) -> anyhow::Result<Measurement> {
    let window_start = Instant::now() + args.warmup;
    let recorder = Rc::new(Recorder::new(
        false,
        window_start,
        window_start + args.duration,
    )?);
    let sequence = Rc::new(Cell::new(1u64));
    let cpu = tokio::task::spawn_local(cpu_share(window_start, recorder.window_end));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let workload = Rc::clone(&workload);
            let recorder = Rc::clone(&recorder);
            let sequence = Rc::clone(&sequence);
            tokio::task::spawn_local(async move {
                while Instant::now() < recorder.window_end {
                    let number = sequence.get();
                    sequence.set(number + 1);
                    let started = Instant::now();
                    let outcome = timed_call(&*workload, number).await;
                    recorder.record(started, Instant::now(), outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        // A worker only ends by leaving its loop; a panic would be a bug in the generator.
        let _ = worker.await;
    }
    let mut measurement = recorder.measurement(None);
    measurement.generator_cpu = cpu.await.ok().flatten();
    Ok(measurement)
}

/// The share of one core this process used between `start` and `end`.
async fn cpu_share(start: Instant, end: Instant) -> Option<f64> {
    fn cpu_seconds() -> Option<f64> {
        use nix::sys::resource::{UsageWho, getrusage};
        let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let seconds = |time: nix::sys::time::TimeVal| {
            time.tv_sec() as f64 + time.tv_usec() as f64 / 1_000_000.0
        };
        Some(seconds(usage.user_time()) + seconds(usage.system_time()))
    }
    tokio::time::sleep_until(start).await;
    let (started, used_before) = (Instant::now(), cpu_seconds()?);
    tokio::time::sleep_until(end).await;
    let used = cpu_seconds()? - used_before;
    Some(used / started.elapsed().as_secs_f64())
}

/// Calls sent at `rate` per second on a fixed schedule, whatever the answers do; each is
/// timed from its scheduled send. The dispatcher sleeps on tokio's (millisecond) timer
/// until shortly before the next send, then yields to the runtime until it is due, so
/// sends are punctual to well under a millisecond while answers keep being read.
async fn open_loop(
    workload: Rc<dyn Workload>,
    args: &LoadArgs,
    rate: f64,
) -> anyhow::Result<Measurement> {
    let first = Instant::now() + Duration::from_millis(10);
    let window_start = first + args.warmup;
    let window_end = window_start + args.duration;
    let recorder = Rc::new(Recorder::new(true, window_start, window_end)?);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Rc::new(Cell::new(0usize));
    let mut sequence: u64 = 1;
    loop {
        // Computed from the start, never accumulated, so rounding does not drift.
        let due = first + interval.mul_f64(sequence as f64 - 1.0);
        if due >= window_end {
            break;
        }
        let mut now = Instant::now();
        if due > now + Duration::from_millis(2) {
            tokio::time::sleep_until(due - Duration::from_millis(1)).await;
            now = Instant::now();
        }
        while now < due {
            tokio::task::yield_now().await;
            now = Instant::now();
        }
        recorder.record_send_lag(due, now);
        let workload = Rc::clone(&workload);
        let recorder_for_call = Rc::clone(&recorder);
        let in_flight_for_call = Rc::clone(&in_flight);
        in_flight.set(in_flight.get() + 1);
        tokio::task::spawn_local(async move {
            let outcome = timed_call(&*workload, sequence).await;
            recorder_for_call.record(due, Instant::now(), outcome);
            in_flight_for_call.set(in_flight_for_call.get() - 1);
        });
        sequence += 1;
    }
    // Calls still in flight finish (or time out, an error) before the result is read.
    let drain_deadline = Instant::now() + CALL_TIMEOUT + Duration::from_secs(1);
    while in_flight.get() > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(recorder.measurement(Some(rate)))
}

/// The orchestrator's side: one `xtask bench-load` run, pinned to [`GENERATOR_CPU`].
#[derive(Debug, Clone)]
pub struct LoadRun {
    /// The workload and its parameters.
    pub workload: String,
    pub params: Vec<(String, String)>,
    /// Environment for the generator (e.g. the identity token, kept out of `ps`).
    pub env: Vec<(String, String)>,
    pub address: String,
    pub connections: usize,
    pub concurrency: usize,
}

impl LoadRun {
    /// Runs the generator (the release xtask binary `xtask_binary`) and returns what it
    /// measured. `rate` None is the closed loop.
    pub fn run(
        &self,
        xtask_binary: &std::path::Path,
        pinning: &Pinning,
        rate: Option<f64>,
        warmup: Duration,
        duration: Duration,
        interrupted: &crate::Interrupted,
    ) -> anyhow::Result<Measurement> {
        let mut command = pinning.command(GENERATOR_CPU, xtask_binary);
        command
            .args(["bench-load", "--workload", &self.workload])
            .args(["--address", &self.address])
            .args(["--connections", &self.connections.to_string()])
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["--warmup", &humantime::format_duration(warmup).to_string()])
            .args([
                "--duration",
                &humantime::format_duration(duration).to_string(),
            ]);
        for (name, value) in &self.params {
            command.arg("--param").arg(format!("{name}={value}"));
        }
        if let Some(rate) = rate {
            command.args(["--rate", &format!("{rate:.1}")]);
        }
        command
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = command
            .spawn()
            .context("starting the load generator (taskset from util-linux is needed)")?;
        let output = wait_output(child, interrupted)?;
        if !output.status.success() {
            bail!("the load generator failed ({})", output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|line| line.starts_with('{'))
            .context("the load generator printed no result")?;
        serde_json::from_str(line).context("reading the load generator's result")
    }
}

/// Waits for `child` (its stdout piped), stopping it on Ctrl-C.
fn wait_output(
    mut child: std::process::Child,
    interrupted: &crate::Interrupted,
) -> anyhow::Result<std::process::Output> {
    use std::io::Read as _;
    let mut stdout = child.stdout.take().context("the generator's stdout")?;
    // The result is one line: reading it in a thread lets this one watch for Ctrl-C.
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        stdout.read_to_end(&mut text).map(|_| text)
    });
    let status = crate::process::wait_interruptible(&mut child, interrupted)?;
    let stdout = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the generator's output reader panicked"))??;
    Ok(std::process::Output {
        status,
        stdout,
        stderr: Vec::new(),
    })
}

/// What a scenario does around each run of a [`GeneratorTarget`]: reset a store, hand
/// the generator fresh credentials, read a counter proving the calls took the path
/// under test.
pub trait RunHooks {
    /// Before the run (warm-up included); `load` is this run's copy of the target's.
    fn before(&mut self, _load: &mut LoadRun, _protocol: &Protocol) -> anyhow::Result<()> {
        Ok(())
    }
    /// After the run, with what it measured.
    fn after(&mut self, _measurement: &Measurement) -> anyhow::Result<()> {
        Ok(())
    }
}

/// No hooks.
impl RunHooks for () {}

/// A service driven by our generator: a [`Target`] whose closed and open loops are
/// `bench-load` runs, with the CPU use of the processes under test measured around each.
pub struct GeneratorTarget<H> {
    pub name: &'static str,
    /// The release xtask (the generator).
    pub xtask: PathBuf,
    pub pinning: Pinning,
    pub load: LoadRun,
    /// The processes under test, whose CPU use each run reports.
    pub pids: Vec<u32>,
    pub hooks: H,
}

impl<H: RunHooks> GeneratorTarget<H> {
    fn measure(
        &mut self,
        rate: Option<f64>,
        protocol: &Protocol,
        interrupted: &crate::Interrupted,
    ) -> anyhow::Result<Measurement> {
        let mut load = self.load.clone();
        self.hooks.before(&mut load, protocol)?;
        let (mut measurement, cpu) = measure_cpu(&self.pids, || {
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
        self.hooks.after(&measurement)?;
        Ok(measurement)
    }
}

impl<H: RunHooks> Target for GeneratorTarget<H> {
    fn name(&self) -> &str {
        self.name
    }

    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &crate::Interrupted,
    ) -> anyhow::Result<Measurement> {
        self.measure(None, protocol, interrupted)
    }

    fn latency(
        &mut self,
        rate: f64,
        protocol: &Protocol,
        interrupted: &crate::Interrupted,
    ) -> anyhow::Result<Option<Measurement>> {
        self.measure(Some(rate), protocol, interrupted).map(Some)
    }
}
