//! The §9 protocol, shared by every scenario: each target warmed up before each measured
//! run; rounds interleaved across targets (baseline, subject, … × rounds) so slow drift of
//! the machine hits every target alike; throughput in a closed loop, then latency in an
//! open loop at [`LATENCY_RATE_FRACTION`] of the baseline's median peak, every target at
//! that same rate; per-round ratios summarised as median with min–max, marked noisy when
//! the spread leaves ±[`NOISY_SPREAD`] of the median.

use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use super::load::Measurement;
use crate::Interrupted;

/// The open loop runs at this fraction of the baseline's closed-loop peak.
pub const LATENCY_RATE_FRACTION: f64 = 0.5;
/// A ratio whose min or max lies further than this from its median is noisy.
pub const NOISY_SPREAD: f64 = 0.10;

/// How each target is measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Protocol {
    pub warmup: Duration,
    pub duration: Duration,
    pub rounds: usize,
    /// Closed loop: calls in flight.
    pub concurrency: usize,
    /// HTTP/2 connections of the generator.
    pub connections: usize,
}

impl Protocol {
    /// DESIGN §9: 5 s warm-up, 20 s runs, 3 rounds, 64 in flight.
    pub fn design() -> Self {
        Self {
            warmup: Duration::from_secs(5),
            duration: Duration::from_secs(20),
            rounds: 3,
            concurrency: 64,
            connections: 4,
        }
    }

    /// Whether this is the protocol BENCHMARKS.md reports (DESIGN §9).
    pub fn is_design_protocol(&self) -> bool {
        *self == Self::design()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.rounds == 0 || self.concurrency == 0 || self.connections == 0 {
            bail!("--rounds, --concurrency and --connections must be at least 1");
        }
        if self.duration < Duration::from_secs(1) {
            bail!("--duration must be at least 1s");
        }
        Ok(())
    }

    /// One line for reports, e.g. "5s warm-up, 20s × 3 rounds, 64 in flight over 4 connections".
    pub fn describe(&self) -> String {
        format!(
            "{} warm-up before each run, {} runs × {} interleaved round(s), closed loop with {} \
             in flight over {} HTTP/2 connection(s), open loop at {:.0}% of the baseline's peak",
            humantime::format_duration(self.warmup),
            humantime::format_duration(self.duration),
            self.rounds,
            self.concurrency,
            self.connections,
            LATENCY_RATE_FRACTION * 100.0
        )
    }
}

/// Something measured: a service behind our generator, or a ceiling measured by another
/// tool (which may have no open loop).
pub trait Target {
    /// Its name in tables.
    fn name(&self) -> &str;
    /// Closed-loop peak.
    fn throughput(
        &mut self,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Measurement>;
    /// Open loop at `rate` calls per second; `None` when the target has no open loop.
    fn latency(
        &mut self,
        rate: f64,
        protocol: &Protocol,
        interrupted: &Interrupted,
    ) -> anyhow::Result<Option<Measurement>>;
}

/// Every run of one target.
#[derive(Debug, Clone)]
pub struct Runs {
    pub name: String,
    /// Closed loop, one per round.
    pub throughput: Vec<Measurement>,
    /// Open loop, one per round (empty when the target has none).
    pub latency: Vec<Measurement>,
}

/// The result of [`run`]: every target's runs and the open-loop rate.
#[derive(Debug, Clone)]
pub struct Results {
    pub runs: Vec<Runs>,
    /// The open-loop rate: [`LATENCY_RATE_FRACTION`] × the baseline's median throughput.
    pub rate: f64,
}

impl Results {
    /// The runs of the target named `name`.
    pub fn of(&self, name: &str) -> Option<&Runs> {
        self.runs.iter().find(|runs| runs.name == name)
    }
}

/// Runs the protocol over `targets`; `targets[0]` is the baseline whose peak sets the
/// open-loop rate.
pub fn run(
    targets: &mut [&mut dyn Target],
    protocol: &Protocol,
    interrupted: &Interrupted,
) -> anyhow::Result<Results> {
    let mut runs: Vec<Runs> = targets
        .iter()
        .map(|target| Runs {
            name: target.name().to_owned(),
            throughput: Vec::new(),
            latency: Vec::new(),
        })
        .collect();
    for round in 1..=protocol.rounds {
        for (target, runs) in targets.iter_mut().zip(&mut runs) {
            interrupted.check()?;
            println!(
                "xtask: round {round}/{}: {} closed loop",
                protocol.rounds,
                target.name()
            );
            let measurement = target.throughput(protocol, interrupted)?;
            println!("xtask:   {}", one_line(&measurement));
            runs.throughput.push(measurement);
        }
    }
    let baseline_peak = runs
        .first()
        .map(|baseline| median(baseline.throughput.iter().map(|m| m.throughput)))
        .unwrap_or_default();
    if baseline_peak <= 0.0 {
        bail!("the baseline completed no call: nothing to derive the open-loop rate from");
    }
    let rate = baseline_peak * LATENCY_RATE_FRACTION;
    for round in 1..=protocol.rounds {
        for (target, runs) in targets.iter_mut().zip(&mut runs) {
            interrupted.check()?;
            println!(
                "xtask: round {round}/{}: {} open loop at {rate:.0}/s",
                protocol.rounds,
                target.name()
            );
            if let Some(measurement) = target.latency(rate, protocol, interrupted)? {
                println!("xtask:   {}", one_line(&measurement));
                runs.latency.push(measurement);
            }
        }
    }
    Ok(Results { runs, rate })
}

fn one_line(measurement: &Measurement) -> String {
    let mut line = format!(
        "{:.0}/s, p50 {:.0} µs, p99 {:.0} µs, {} ok, {} errors",
        measurement.throughput,
        measurement.p50_us,
        measurement.p99_us,
        measurement.ok,
        measurement.errors,
    );
    if let Some(lag) = measurement.send_lag_p99_us {
        line.push_str(&format!(", generator send lag p99 {lag:.0} µs"));
    }
    if let Some(cpu) = measurement.generator_cpu {
        line.push_str(&format!(", generator CPU {:.0}%", cpu * 100.0));
    }
    if let Some(cpu) = measurement.subject_cpu {
        line.push_str(&format!(", under test CPU {:.0}%", cpu * 100.0));
    }
    for (error, count) in &measurement.error_kinds {
        line.push_str(&format!("\nxtask:     {count} × {error}"));
    }
    line
}

/// The median of `values` (mean of the middle two for an even count; 0 when empty).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let count = values.len();
    match count {
        0 => 0.0,
        _ if count % 2 == 1 => values[count / 2],
        _ => (values[count / 2 - 1] + values[count / 2]) / 2.0,
    }
}

/// A statistic over rounds: median with min and max.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Over `values` (all zero when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let values: Vec<f64> = values.into_iter().collect();
        Self {
            median: median(values.iter().copied()),
            min: values.iter().copied().reduce(f64::min).unwrap_or_default(),
            max: values.iter().copied().reduce(f64::max).unwrap_or_default(),
        }
    }

    /// Whether min or max lies more than [`NOISY_SPREAD`] away from the median.
    pub fn is_noisy(&self) -> bool {
        self.median > 0.0
            && (self.max > self.median * (1.0 + NOISY_SPREAD)
                || self.min < self.median * (1.0 - NOISY_SPREAD))
    }
}

/// Per-round ratios `subject / baseline` of `metric`, paired by round.
pub fn ratio(
    subject: &[Measurement],
    baseline: &[Measurement],
    metric: impl Fn(&Measurement) -> f64,
) -> Spread {
    Spread::of(
        subject
            .iter()
            .zip(baseline)
            .filter(|(_, base)| metric(base) > 0.0)
            .map(|(subject, base)| metric(subject) / metric(base)),
    )
}

/// Per-round differences `subject − baseline` of `metric`, paired by round: what the
/// subject adds over the baseline (e.g. a proxy in front of the service).
pub fn added(
    subject: &[Measurement],
    baseline: &[Measurement],
    metric: impl Fn(&Measurement) -> f64,
) -> Vec<f64> {
    subject
        .iter()
        .zip(baseline)
        .map(|(subject, base)| metric(subject) - metric(base))
        .collect()
}

/// Per-round ratios of what `subject` and `reference` add over `baseline`:
/// `(subject − baseline) / (reference − baseline)` of `metric`, paired by round. Rounds in
/// which the reference adds nothing (a difference ≤ 0, within the noise) have no ratio
/// and are left out.
pub fn added_ratio(
    subject: &[Measurement],
    reference: &[Measurement],
    baseline: &[Measurement],
    metric: impl Fn(&Measurement) -> f64,
) -> Spread {
    let subject = added(subject, baseline, &metric);
    let reference = added(reference, baseline, &metric);
    Spread::of(
        subject
            .iter()
            .zip(&reference)
            .filter(|(_, reference)| **reference > 0.0)
            .map(|(subject, reference)| subject / reference),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn a_spread_beyond_ten_percent_of_the_median_is_noisy() {
        assert!(!Spread::of([0.95, 1.0, 1.05]).is_noisy());
        assert!(Spread::of([0.85, 1.0, 1.0]).is_noisy());
        assert!(Spread::of([1.0, 1.0, 1.2]).is_noisy());
    }

    fn run(throughput: f64) -> Measurement {
        Measurement {
            ok: 1,
            errors: 0,
            error_kinds: Default::default(),
            seconds: 1.0,
            throughput,
            p50_us: 1.0,
            p90_us: 1.0,
            p99_us: 1.0,
            max_us: 1.0,
            rate: None,
            send_lag_p99_us: None,
            generator_cpu: None,
            subject_cpu: None,
        }
    }

    #[test]
    fn added_ratios_pair_rounds_and_skip_rounds_where_the_reference_adds_nothing() {
        let baseline = [run(100.0), run(100.0), run(100.0)];
        let reference = [run(200.0), run(150.0), run(90.0)];
        let subject = [run(150.0), run(200.0), run(500.0)];
        assert_eq!(
            added(&subject, &baseline, |m| m.throughput),
            [50.0, 100.0, 400.0]
        );
        let spread = added_ratio(&subject, &reference, &baseline, |m| m.throughput);
        // 50/100 and 100/50; the third round's reference is below the baseline.
        assert_eq!((spread.min, spread.max), (0.5, 2.0));
        assert_eq!(spread.median, 1.25);
    }

    #[test]
    fn ratios_pair_rounds() {
        let baseline = [run(100.0), run(200.0), run(100.0)];
        let subject = [run(50.0), run(50.0), run(60.0)];
        let spread = ratio(&subject, &baseline, |m| m.throughput);
        assert_eq!(spread.median, 0.5);
        assert_eq!(spread.min, 0.25);
        assert_eq!(spread.max, 0.6);
        assert!(spread.is_noisy());
    }
}
