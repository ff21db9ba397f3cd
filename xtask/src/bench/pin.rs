//! CPU pinning (DESIGN §9): the load generators on [`GENERATOR_CPU`], everything under
//! test (services, Redis, proxies, databases) on [`SUBJECT_CPU`], with `taskset`, so the
//! two never compete for a core and every process under test gets the same single core.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{run_captured, stop, tail};

/// The CPU of the load generators.
pub const GENERATOR_CPU: usize = 0;
/// The CPU of everything under test.
pub const SUBJECT_CPU: usize = 1;

/// How long a process under test gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Fails unless this machine has both CPUs and `taskset` works.
pub fn check_machine() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus <= SUBJECT_CPU {
        bail!(
            "the benchmarks pin the generator to CPU {GENERATOR_CPU} and the subject to CPU \
             {SUBJECT_CPU}; this process may use only {cpus} CPU(s)"
        );
    }
    let mut probe = Command::new("taskset");
    probe.args(["-c", &SUBJECT_CPU.to_string(), "true"]);
    run_captured(probe, "taskset (util-linux)")?;
    Ok(())
}

/// A process under test, started with `taskset -c SUBJECT_CPU`, in its own process group
/// (a terminal's Ctrl-C reaches xtask only), output to a log file; stopped on drop.
#[derive(Debug)]
pub struct PinnedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl PinnedProcess {
    /// Starts `program args` with `envs` on [`SUBJECT_CPU`], logging to `log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("taskset")
            .args(["-c", &SUBJECT_CPU.to_string()])
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} under taskset", program.display()))?;
        let process = Self {
            name: name.to_owned(),
            child,
            log,
        };
        // taskset execs the program: the pid is the program's.
        println!(
            "xtask: started {name} (pid {}) on CPU {SUBJECT_CPU}",
            process.child.id()
        );
        Ok(process)
    }

    /// Fails with the end of its log if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); {}", self.name, tail(&self.log, 30));
        }
        Ok(())
    }

    /// Its process id (taskset execs the program, so it is the program's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PinnedProcess {
    fn drop(&mut self) {
        stop(&mut self.child, STOP_GRACE);
        println!("xtask: {} stopped", self.name);
    }
}

/// Moves every thread of the running process `pid` to [`SUBJECT_CPU`] (for servers that
/// xtask's shared provisioning started, like Redis).
pub fn pin_running(pid: u32) -> anyhow::Result<()> {
    let mut command = Command::new("taskset");
    command.args(["-a", "-p", "-c", &SUBJECT_CPU.to_string(), &pid.to_string()]);
    run_captured(command, &format!("taskset -a -p (pid {pid})"))?;
    Ok(())
}

/// `Cpus_allowed_list` of `pid` from /proc.
pub fn allowed_cpus(pid: u32) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|list| list.trim().to_owned())
        .with_context(|| format!("{path} has no Cpus_allowed_list"))
}

/// Fails unless `pid` may run only on [`SUBJECT_CPU`]. A process just started under
/// `taskset` is pinned once taskset has set the mask and exec'd the program, so this
/// waits a little for that.
pub fn ensure_pinned(what: &str, pid: u32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let allowed = allowed_cpus(pid)?;
        if allowed == SUBJECT_CPU.to_string() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{what} (pid {pid}) may run on CPUs {allowed}, not only CPU {SUBJECT_CPU}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CPU time (user + system) `pids` have used so far, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    // /proc/<pid>/stat counts in USER_HZ ticks, 100 per second on Linux.
    const TICKS_PER_SECOND: f64 = 100.0;
    let mut ticks = 0u64;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the command (in parentheses, may hold spaces): state is field 3,
        // utime 14 and stime 15.
        let after_command = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("{path} has no command field"))?;
        let fields: Vec<&str> = after_command.split_whitespace().collect();
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
                .with_context(|| format!("{path}: no utime/stime"))?;
        }
    }
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// The share of one core `pids` used while `work` ran, and what `work` returned.
pub fn measure_cpu<T>(
    pids: &[u32],
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64)> {
    let before = cpu_seconds(pids)?;
    let started = std::time::Instant::now();
    let result = work()?;
    let used = cpu_seconds(pids)? - before;
    Ok((result, used / started.elapsed().as_secs_f64()))
}
