//! Reports: one markdown section per scenario, printed after the scenario and written into
//! `BENCHMARKS.md` between markers, so running one scenario replaces its section and keeps
//! the others'.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use super::pin::Pinning;
use super::protocol::{NOISY_SPREAD, Protocol, Results, Spread, median};
use crate::workspace_root;

/// What a scenario found, and what it compares.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scenario's command-line name (its BENCHMARKS.md marker).
    pub name: &'static str,
    pub title: String,
    /// What each target is and how it is driven, one bullet each.
    pub setup: Vec<String>,
    pub results: Results,
    /// Ratios reported for information.
    pub ratios: Vec<Ratio>,
    /// The DESIGN §9 targets, met or not.
    pub checks: Vec<Check>,
    /// Anything else a reader needs (counters proving the path, caveats).
    pub notes: Vec<String>,
    /// Set by [`ScenarioReport::finish`].
    pub context: Option<RunContext>,
}

/// A ratio between two targets over the rounds.
#[derive(Debug, Clone)]
pub struct Ratio {
    pub label: String,
    pub spread: Spread,
}

/// A target of DESIGN §9: a ratio and its bound.
#[derive(Debug, Clone)]
pub struct Check {
    pub label: String,
    pub spread: Spread,
    pub bound: Bound,
}

#[derive(Debug, Clone, Copy)]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Check {
    /// Whether the median ratio is within the bound.
    pub fn is_met(&self) -> bool {
        match self.bound {
            Bound::AtLeast(bound) => self.spread.median >= bound,
            Bound::AtMost(bound) => self.spread.median <= bound,
        }
    }
}

/// Where and how the scenario ran.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub machine: Machine,
    pub protocol: Protocol,
    pub pinning: Pinning,
    pub condition: Condition,
    pub finished_at: SystemTime,
}

impl ScenarioReport {
    /// Attaches the machine, protocol and the machine's condition during the run.
    pub fn finish(
        &mut self,
        machine: &Machine,
        protocol: &Protocol,
        pinning: Pinning,
        condition: Condition,
    ) {
        self.context = Some(RunContext {
            machine: machine.clone(),
            protocol: protocol.clone(),
            pinning,
            condition,
            finished_at: SystemTime::now(),
        });
    }

    /// The scenario's section: machine, protocol, per-target table, ratios, targets.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## `{}` — {}\n", self.name, self.title);
        if let Some(context) = &self.context {
            let machine = &context.machine;
            let _ = writeln!(
                out,
                "Run {} on commit `{}`; {} CPU(s), {}, Linux {}.  ",
                humantime::format_rfc3339_seconds(context.finished_at),
                machine.commit,
                machine.cpus,
                machine.cpu_model,
                machine.kernel
            );
            let _ = writeln!(out, "Protocol: {}.  ", context.protocol.describe());
            let _ = writeln!(out, "Pinning: {}.  ", context.pinning.describe());
            let _ = writeln!(out, "Machine condition: {}.", context.condition.describe());
            if !context.protocol.is_design_protocol() {
                let _ = writeln!(
                    out,
                    "\n**Quick check, not the DESIGN §9 protocol: do not quote these figures.**"
                );
            }
            out.push('\n');
        }
        for line in &self.setup {
            let _ = writeln!(out, "- {line}");
        }
        let _ = writeln!(
            out,
            "\n| target | throughput /s, median (min–max) | closed loop p50 / p99 µs | \
             open loop at {:.0}/s: p50 / p99 µs | CPU closed loop: generator / under test (per call) | errors |",
            self.results.rate
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for runs in &self.results.runs {
            let throughput = Spread::of(runs.throughput.iter().map(|m| m.throughput));
            let closed = format!(
                "{:.0} / {:.0}",
                median(runs.throughput.iter().map(|m| m.p50_us)),
                median(runs.throughput.iter().map(|m| m.p99_us))
            );
            let open = if runs.latency.is_empty() {
                "—".to_owned()
            } else {
                format!(
                    "{:.0} / {:.0}",
                    median(runs.latency.iter().map(|m| m.p50_us)),
                    median(runs.latency.iter().map(|m| m.p99_us))
                )
            };
            let all = runs.throughput.iter().chain(&runs.latency);
            let errors: u64 = all.clone().map(|m| m.errors).sum();
            let calls: u64 = all.clone().map(|m| m.ok + m.errors).sum();
            let failing = if all.clone().any(|m| m.is_failing()) {
                " (a run failed >1%)"
            } else {
                ""
            };
            let percent = |values: Vec<f64>| {
                if values.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:.0}%", median(values) * 100.0)
                }
            };
            // CPU time per call under test: the share of the core over the rate.
            let per_call: Vec<f64> = runs
                .throughput
                .iter()
                .filter(|m| m.throughput > 0.0)
                .filter_map(|m| m.subject_cpu.map(|cpu| cpu / m.throughput * 1e6))
                .collect();
            let per_call = if per_call.is_empty() {
                String::new()
            } else {
                format!(" ({:.0} µs/call)", median(per_call))
            };
            let generator_cpu = runs.throughput.iter().filter_map(|m| m.generator_cpu);
            let subject_cpu = runs.throughput.iter().filter_map(|m| m.subject_cpu);
            let cpu = format!(
                "{} / {}{per_call}",
                percent(generator_cpu.collect()),
                percent(subject_cpu.collect())
            );
            let _ = writeln!(
                out,
                "| {} | {:.0} ({:.0}–{:.0}) | {closed} | {open} | {cpu} | {errors} of {calls}{failing} |",
                runs.name, throughput.median, throughput.min, throughput.max
            );
        }
        if !self.ratios.is_empty() || !self.checks.is_empty() {
            let _ = writeln!(
                out,
                "\n| ratio (per round, paired) | median (min–max) | noisy (>±{:.0}%) | target | met |",
                NOISY_SPREAD * 100.0
            );
            let _ = writeln!(out, "|---|---|---|---|---|");
            for check in &self.checks {
                let bound = match check.bound {
                    Bound::AtLeast(bound) => format!("≥ {bound:.2}"),
                    Bound::AtMost(bound) => format!("≤ {bound:.2}"),
                };
                let met = if check.is_met() { "yes" } else { "**no**" };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {bound} | {met} |",
                    check.label,
                    ratio_text(&check.spread),
                    noisy_text(&check.spread)
                );
            }
            for ratio in &self.ratios {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | — | — |",
                    ratio.label,
                    ratio_text(&ratio.spread),
                    noisy_text(&ratio.spread)
                );
            }
        }
        let notes: Vec<String> = self
            .notes
            .iter()
            .cloned()
            .chain(self.generator_notes())
            .collect();
        if !notes.is_empty() {
            out.push('\n');
            for note in &notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// What the generator saw besides the figures: its punctuality in the open loop and
    /// the errors it counted, per target.
    fn generator_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let lags: Vec<String> = self
            .results
            .runs
            .iter()
            .filter(|runs| !runs.latency.is_empty())
            .map(|runs| {
                let lag = median(runs.latency.iter().filter_map(|m| m.send_lag_p99_us));
                format!("{} {lag:.0} µs", runs.name)
            })
            .collect();
        if !lags.is_empty() {
            notes.push(format!(
                "Open-loop punctuality (p99 of how late the generator sent a call after its \
                 scheduled time, median over rounds; counted in the latencies): {}.",
                lags.join(", ")
            ));
        }
        let overloaded: Vec<String> = self
            .results
            .runs
            .iter()
            .filter_map(|runs| {
                let short = runs
                    .latency
                    .iter()
                    .filter(|m| m.is_failing() || m.throughput < m.rate.unwrap_or(0.0) * 0.99)
                    .count();
                (short > 0)
                    .then(|| format!("{} ({short} of {} runs)", runs.name, runs.latency.len()))
            })
            .collect();
        if !overloaded.is_empty() {
            notes.push(format!(
                "Past capacity at the open-loop rate: {} completed fewer than 99% of the \
                 calls due (or failed more than 1%). Their open-loop latencies are those of \
                 a queue that grows for the whole run (calls time out after 5 s), not of a \
                 target keeping up, and latency ratios involving them compare overloads.",
                overloaded.join(", ")
            ));
        }
        let unsaturated: Vec<&str> = self
            .results
            .runs
            .iter()
            .filter(|runs| {
                let generator: Vec<f64> = runs
                    .throughput
                    .iter()
                    .filter_map(|m| m.generator_cpu)
                    .collect();
                let subject: Vec<f64> = runs
                    .throughput
                    .iter()
                    .filter_map(|m| m.subject_cpu)
                    .collect();
                !generator.is_empty()
                    && !subject.is_empty()
                    && median(generator) < SATURATED
                    && median(subject) < SATURATED
            })
            .map(|runs| runs.name.as_str())
            .collect();
        if !unsaturated.is_empty() {
            notes.push(format!(
                "In the closed loop of {}, neither the generator nor the processes under test \
                 used {:.0}% of their core: what limited the throughput was waiting for the \
                 CPUs, i.e. other processes sharing them (see the machine condition). The \
                 interleaved ratios are the figures to read, not the absolute rates; and as \
                 waiting costs a cheap call as much as a dear one, a throughput ratio \
                 measured this way flatters the dearer side — the CPU time per call shows \
                 what each call costs whatever the machine's load.",
                unsaturated.join(", "),
                SATURATED * 100.0
            ));
        }
        for runs in &self.results.runs {
            let mut kinds: std::collections::BTreeMap<&str, u64> = Default::default();
            for measurement in runs.throughput.iter().chain(&runs.latency) {
                for (kind, count) in &measurement.error_kinds {
                    *kinds.entry(kind.as_str()).or_default() += count;
                }
            }
            if !kinds.is_empty() {
                let kinds: Vec<String> = kinds
                    .iter()
                    .map(|(kind, count)| format!("{count} × `{kind}`"))
                    .collect();
                notes.push(format!("Errors of {}: {}.", runs.name, kinds.join("; ")));
            }
        }
        notes
    }
}

fn ratio_text(spread: &Spread) -> String {
    format!("{:.2} ({:.2}–{:.2})", spread.median, spread.min, spread.max)
}

fn noisy_text(spread: &Spread) -> &'static str {
    if spread.is_noisy() { "noisy" } else { "no" }
}

/// The machine the figures come from.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// `git rev-parse --short HEAD`, with `+dirty` when the work tree has changes.
    pub commit: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpus = cpuinfo
            .lines()
            .filter(|line| line.starts_with("processor"))
            .count();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or_else(
                || "unknown CPU".to_owned(),
                |(_, model)| model.trim().to_owned(),
            );
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |text| text.trim().to_owned());
        Self {
            cpus,
            cpu_model,
            kernel,
            commit: commit(),
        }
    }
}

fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // BENCHMARKS.md itself does not make the measured code dirty.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!BENCHMARKS.md",
    ])
    .is_some_and(|status| !status.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}

/// What else the machine was doing during a scenario: load average and other compilers
/// (this machine is shared with builds), sampled every few seconds.
#[derive(Debug, Clone, Default)]
pub struct Condition {
    pub samples: usize,
    pub load_mean: f64,
    pub load_max: f64,
    /// Samples that saw a rustc (or linker) process not started by the bench.
    pub samples_with_compilers: usize,
    pub note: Option<String>,
}

impl Condition {
    pub fn describe(&self) -> String {
        let mut text = format!(
            "1-minute load average {:.2} mean, {:.2} max over {} samples; other compilers \
             (rustc, cc, ld) running in {} of them",
            self.load_mean, self.load_max, self.samples, self.samples_with_compilers
        );
        if self.samples_with_compilers > 0 {
            text.push_str(
                " — the machine was shared with builds, which compete with the pinned CPUs",
            );
        }
        if let Some(note) = &self.note {
            let _ = write!(text, "; {note}");
        }
        text
    }
}

/// Samples [`Condition`] in a thread until stopped.
#[derive(Debug)]
pub struct ConditionSampler {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<(Vec<f64>, usize)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    note: Option<String>,
}

/// A process using this share of its core or more is taken as saturated.
const SATURATED: f64 = 0.8;

const SAMPLE_EVERY: Duration = Duration::from_secs(5);

impl ConditionSampler {
    pub fn start(note: Option<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new((Vec::new(), 0usize)));
        let thread = {
            let stop = Arc::clone(&stop);
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let load = std::fs::read_to_string("/proc/loadavg")
                        .ok()
                        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok());
                    let compilers = compilers_running();
                    {
                        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(load) = load {
                            state.0.push(load);
                        }
                        if compilers {
                            state.1 += 1;
                        }
                    }
                    // Sleep in short steps so stopping is prompt.
                    let mut slept = Duration::ZERO;
                    while slept < SAMPLE_EVERY && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                        slept += Duration::from_millis(100);
                    }
                }
            })
        };
        Self {
            stop,
            state,
            thread: Some(thread),
            note,
        }
    }

    pub fn finish(mut self) -> Condition {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let loads = &state.0;
        Condition {
            samples: loads.len(),
            load_mean: if loads.is_empty() {
                0.0
            } else {
                loads.iter().sum::<f64>() / loads.len() as f64
            },
            load_max: loads.iter().copied().fold(0.0, f64::max),
            samples_with_compilers: state.1,
            note: self.note.clone(),
        }
    }
}

/// Whether a compiler or linker is running anywhere on the machine (the bench itself
/// compiles nothing while it measures).
fn compilers_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|comm| {
            matches!(
                comm.trim(),
                "rustc" | "cc" | "cc1" | "ld" | "ld.lld" | "mold" | "clang"
            )
        })
    })
}

const HEADER: &str = "# Benchmarks

Generated by `cargo xtask bench` (DESIGN §9); do not edit by hand. Each scenario's section is
replaced when that scenario runs again (`cargo xtask bench <scenario>`); the others are kept.

How to read it: every figure is measured in the same run as its baseline, on the same
machine, with the load generator pinned to CPU 0 and everything under test pinned to CPU 1
(`taskset`). Ratios are computed per round (baseline and subject run back to back) and
reported as the median with min–max over the rounds; a ratio whose min or max lies more than
±10% from its median is marked noisy. Throughput is a closed loop with 64 calls in flight;
latency is an open loop at 50% of the baseline's peak, every target at that same rate, each
call timed from its scheduled send (so queueing is never hidden by a slow answer delaying the
next send). \"Met\" compares the median ratio with the target.
";

fn start_marker(name: &str) -> String {
    format!("<!-- bench:{name} -->")
}

fn end_marker(name: &str) -> String {
    format!("<!-- /bench:{name} -->")
}

/// Writes `path`: the header, then one section per scenario: those of `reports`, and the
/// sections of scenarios that did not run this time, kept from the existing file.
pub fn write_benchmarks_md(path: &Path, reports: &[ScenarioReport]) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mut sections: Vec<(String, String)> = existing_sections(&existing);
    for report in reports {
        let body = report.markdown();
        match sections.iter_mut().find(|(name, _)| name == report.name) {
            Some((_, section)) => *section = body,
            None => sections.push((report.name.to_owned(), body)),
        }
    }
    // Scenario order: the order of SCENARIOS, then any others as found.
    let order = |name: &str| {
        super::SCENARIOS
            .iter()
            .position(|scenario| scenario.name == name)
            .unwrap_or(usize::MAX)
    };
    sections.sort_by_key(|(name, _)| order(name));
    let mut text = String::from(HEADER);
    for (name, body) in sections {
        let _ = write!(
            text,
            "\n{}\n{}\n{}\n",
            start_marker(&name),
            body.trim_end(),
            end_marker(&name)
        );
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The `(name, body)` of every marked section of an existing BENCHMARKS.md.
fn existing_sections(text: &str) -> Vec<(String, String)> {
    let mut sections = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!-- bench:") {
        let after = &rest[start + "<!-- bench:".len()..];
        let Some(name_end) = after.find(" -->") else {
            break;
        };
        let name = &after[..name_end];
        let body_start = &after[name_end + " -->".len()..];
        let end = end_marker(name);
        let Some(body_end) = body_start.find(&end) else {
            break;
        };
        sections.push((name.to_owned(), body_start[..body_end].trim().to_owned()));
        rest = &body_start[body_end + end.len()..];
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_found_between_their_markers() {
        let text = format!(
            "{HEADER}\n<!-- bench:a -->\n## a\nfigures\n<!-- /bench:a -->\n\n\
             <!-- bench:b -->\n## b\n<!-- /bench:b -->\n"
        );
        let sections = existing_sections(&text);
        assert_eq!(
            sections,
            vec![
                ("a".to_owned(), "## a\nfigures".to_owned()),
                ("b".to_owned(), "## b".to_owned())
            ]
        );
    }

    #[test]
    fn a_check_compares_the_median_with_its_bound() {
        let spread = Spread {
            median: 0.6,
            min: 0.4,
            max: 0.7,
        };
        let at_least = |bound| Check {
            label: String::new(),
            spread,
            bound: Bound::AtLeast(bound),
        };
        assert!(at_least(0.5).is_met());
        assert!(!at_least(0.65).is_met());
        let at_most = Check {
            label: String::new(),
            spread,
            bound: Bound::AtMost(0.5),
        };
        assert!(!at_most.is_met());
    }
}
