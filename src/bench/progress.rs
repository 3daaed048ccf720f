//! The progress line on stderr, drawn by the main thread from the workers' relaxed counters.
//! On a terminal it is one line redrawn in place a few times a second; otherwise (a log, CI)
//! a plain line every few seconds. It never touches the workers beyond reading counters.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::driver::{Plan, Shared, Stop};

const TTY_PERIOD: Duration = Duration::from_millis(250);
const LOG_PERIOD: Duration = Duration::from_secs(5);
const BAR_CELLS: usize = 24;

pub(super) struct Progress {
    enabled: bool,
    tty: bool,
    labels: Vec<String>,
    stop: Stop,
    warmup: Duration,
    clients: usize,
    /// Counts and time at the previous draw, for the current rate.
    last: Option<(Instant, Vec<u64>)>,
    last_log: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(plan: &Plan, enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            labels: plan.targets.iter().map(|t| t.label.clone()).collect(),
            stop: plan.stop,
            warmup: plan.warmup,
            clients: plan.clients,
            last: None,
            last_log: None,
        }
    }

    /// How long the caller sleeps between ticks.
    pub(crate) fn period(&self) -> Duration {
        // Short even when not drawing: the caller also uses it to notice the workers ending.
        TTY_PERIOD
    }

    pub(crate) fn tick(&mut self, shared: &Shared) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !self.tty {
            if self.last_log.is_some_and(|at| now - at < LOG_PERIOD) {
                return;
            }
            if self.last_log.is_none() {
                // The first plain line comes after one period, not at once.
                self.last_log = Some(now);
                return;
            }
            self.last_log = Some(now);
        }
        let line = self.line(shared, now);
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// Clears the in-place line so the summary starts on a clean line.
    pub(crate) fn finish(&mut self, _shared: &Shared) {
        if self.enabled && self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }

    fn line(&mut self, shared: &Shared, now: Instant) -> String {
        let Some(&start) = shared.start.get() else {
            return format!(
                "connecting {} clients to {} target(s)...",
                self.clients * self.labels.len(),
                self.labels.len()
            );
        };
        let counts: Vec<(u64, u64)> = (0..self.labels.len()).map(|t| shared.totals(t)).collect();
        let done: Vec<u64> = counts.iter().map(|c| c.0).collect();
        let since_start = now.saturating_duration_since(start);
        let (fraction, phase) = if since_start < self.warmup {
            (0.0, format!("warm-up {:.1}s", since_start.as_secs_f64()))
        } else {
            let measured = since_start - self.warmup;
            match self.stop {
                Stop::Duration(d) => (
                    measured.as_secs_f64() / d.as_secs_f64(),
                    format!("{:.1}s/{:.1}s", measured.as_secs_f64(), d.as_secs_f64()),
                ),
                Stop::Transactions(n) => {
                    let total = n * self.labels.len() as u64;
                    let finished: u64 = counts.iter().map(|(d, f)| d + f).sum();
                    (
                        finished as f64 / total as f64,
                        format!("{:.1}s", measured.as_secs_f64()),
                    )
                }
            }
        };
        let fraction = fraction.clamp(0.0, 1.0);
        let filled = (fraction * BAR_CELLS as f64).round() as usize;
        let mut line = format!(
            "[{}{}] {:>3.0}% {phase}",
            "#".repeat(filled),
            "-".repeat(BAR_CELLS - filled),
            fraction * 100.0
        );
        let rates: Vec<f64> = match &self.last {
            Some((at, before)) if now > *at => done
                .iter()
                .zip(before)
                .map(|(d, b)| d.saturating_sub(*b) as f64 / (now - *at).as_secs_f64())
                .collect(),
            // First line: the average since measuring began.
            _ => {
                let measured = since_start.saturating_sub(self.warmup).as_secs_f64();
                done.iter()
                    .map(|d| {
                        if measured > 0.0 {
                            *d as f64 / measured
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        };
        for ((label, (ok, failed)), rate) in self.labels.iter().zip(&counts).zip(&rates) {
            line.push_str(&format!("  {label}: {ok} tx {rate:.0} tx/s"));
            if *failed > 0 {
                line.push_str(&format!(" {failed} errors"));
            }
        }
        self.last = Some((now, done));
        line
    }
}
