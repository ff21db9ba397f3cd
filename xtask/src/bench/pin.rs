//! CPU pinning (DESIGN §9): the load generators on [`GENERATOR_CPU`], everything under
//! test (services, Redis, proxies, databases) on [`SUBJECT_CPU`], with `taskset`, so the
//! two never compete for a core and every process under test gets the same single core.
//!
//! Pinning keeps our processes apart from each other, not from the rest of the machine:
//! on a machine shared with builds, [`Pinning::nice`] (default -10, `nice`/`renice`)
//! gives every generator and every process under test the same raised priority, so they
//! take the pinned CPUs ahead of other work and the figures measure the software rather
//! than the scheduler's share of a busy core.

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

/// Where and at which priority the bench runs its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinning {
    /// The nice value of every generator and process under test (0: unchanged).
    pub nice: i32,
}

impl Pinning {
    /// Fails unless this machine has both CPUs, `taskset` works, and the priority can be
    /// had (a negative nice value needs root or CAP_SYS_NICE).
    pub fn check(&self) -> anyhow::Result<()> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus <= SUBJECT_CPU {
            bail!(
                "the benchmarks pin the generator to CPU {GENERATOR_CPU} and the subject to \
                 CPU {SUBJECT_CPU}; this process may use only {cpus} CPU(s)"
            );
        }
        if !(-20..=19).contains(&self.nice) {
            bail!("--nice takes -20..19, not {}", self.nice);
        }
        let mut probe = self.command(SUBJECT_CPU, Path::new("true"));
        probe.stdin(Stdio::null());
        run_captured(probe, "taskset (util-linux) under nice").with_context(|| {
            format!(
                "cannot run at nice {} (a negative value needs root; --nice 0 keeps the \
                 default priority)",
                self.nice
            )
        })?;
        Ok(())
    }

    /// `program` to run on `cpu` at this priority: `[nice -n N] taskset -c CPU program`
    /// (each execs the next, so the child's pid is the program's).
    pub fn command(&self, cpu: usize, program: &Path) -> Command {
        let mut command = if self.nice == 0 {
            Command::new("taskset")
        } else {
            let mut nice = Command::new("nice");
            nice.args(["-n", &self.nice.to_string(), "taskset"]);
            nice
        };
        command.args(["-c", &cpu.to_string()]).arg(program);
        command
    }

    /// Moves every thread of the running process `pid` to [`SUBJECT_CPU`] at this
    /// priority (for servers that xtask's shared provisioning started, like Redis).
    pub fn adopt(&self, pid: u32) -> anyhow::Result<()> {
        let mut taskset = Command::new("taskset");
        taskset.args(["-a", "-p", "-c", &SUBJECT_CPU.to_string(), &pid.to_string()]);
        run_captured(taskset, &format!("taskset -a -p (pid {pid})"))?;
        if self.nice != 0 {
            // A nice value belongs to a thread: renice each of them.
            let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("listing the threads of pid {pid}"))?
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            let mut renice = Command::new("renice");
            renice
                .args(["-n", &self.nice.to_string(), "-p"])
                .args(&threads);
            run_captured(renice, &format!("renice (pid {pid})"))?;
        }
        Ok(())
    }

    /// Fails unless `pid` may run only on [`SUBJECT_CPU`], at this priority. A process
    /// just started under `taskset` is pinned once taskset has set the mask and exec'd
    /// the program, so this waits a little for that.
    pub fn ensure(&self, what: &str, pid: u32) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let allowed = allowed_cpus(pid)?;
            let nice = nice_of(pid)?;
            if allowed == SUBJECT_CPU.to_string() && nice == self.nice {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{what} (pid {pid}) may run on CPUs {allowed} at nice {nice}, not only on \
                     CPU {SUBJECT_CPU} at nice {}",
                    self.nice
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// For reports.
    pub fn describe(&self) -> String {
        let priority = if self.nice == 0 {
            "at the default priority".to_owned()
        } else {
            format!("all at nice {}", self.nice)
        };
        format!(
            "generators on CPU {GENERATOR_CPU}, everything under test on CPU {SUBJECT_CPU}, \
             {priority} (checked in /proc)"
        )
    }
}

/// A process under test, started by a [`Pinning::command`], in its own process group (a
/// terminal's Ctrl-C reaches xtask only), output to a log file; stopped on drop.
#[derive(Debug)]
pub struct PinnedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl PinnedProcess {
    /// Starts `command` (from [`Pinning::command`]) logging to `log`.
    pub fn start(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} under taskset"))?;
        println!("xtask: started {name} (pid {})", child.id());
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Fails with the end of its log if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); {}", self.name, tail(&self.log, 30));
        }
        Ok(())
    }

    /// Its process id (nice and taskset exec the program, so it is the program's).
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

/// The nice value of `pid` (field 19 of /proc/<pid>/stat).
fn nice_of(pid: u32) -> anyhow::Result<i32> {
    stat_fields(pid)?
        .get(16)
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("/proc/{pid}/stat has no nice field"))
}

/// The fields of /proc/<pid>/stat after the command (in parentheses, and it may hold
/// spaces): index 0 is field 3 (state).
fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let after_command = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} has no command field"))?;
    Ok(after_command
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// The processes whose parent is `pid` (e.g. nginx's workers under its master).
pub fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(child) = entry
            .ok()
            .and_then(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: skip it.
        let Ok(fields) = stat_fields(child) else {
            continue;
        };
        // The parent's pid is field 4.
        if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid) {
            children.push(child);
        }
    }
    Ok(children)
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

/// The CPU time (user + system) `pids` have used so far, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    // /proc/<pid>/stat counts in USER_HZ ticks, 100 per second on Linux.
    const TICKS_PER_SECOND: f64 = 100.0;
    let mut ticks = 0u64;
    for pid in pids {
        let fields = stat_fields(*pid)?;
        // utime and stime are fields 14 and 15.
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
                .with_context(|| format!("/proc/{pid}/stat has no utime/stime"))?;
        }
    }
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// The CPU time (user + system) `pid` and its children have used so far, in seconds:
/// its own, its live children's, and what its exited children used (`cutime`/`cstime`,
/// counted once it has reaped them). Differences of two readings count every child's
/// time inside the interval, also of children born or gone in between (PostgreSQL's
/// backends under the postmaster).
pub fn cpu_seconds_of_tree(pid: u32) -> anyhow::Result<f64> {
    const TICKS_PER_SECOND: f64 = 100.0;
    let fields = stat_fields(pid)?;
    let mut ticks = 0u64;
    // utime, stime, cutime, cstime are fields 14 to 17.
    for index in [11, 12, 13, 14] {
        ticks += fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
            .with_context(|| format!("/proc/{pid}/stat has no utime/stime/cutime/cstime"))?;
    }
    let mut seconds = ticks as f64 / TICKS_PER_SECOND;
    for child in children(pid)? {
        // A child may exit between the listing and the read: its time is then the
        // parent's cutime on the next reading.
        if let Ok(child_seconds) = cpu_seconds(&[child]) {
            seconds += child_seconds;
        }
    }
    Ok(seconds)
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
