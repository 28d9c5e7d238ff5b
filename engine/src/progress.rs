//! Progress reporting for stages: indicatif bars on a terminal, plain periodic lines
//! on stderr otherwise (CI logs, `--json` runs), nothing when quiet.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressStyleKind {
    Bars,
    Lines,
    Quiet,
}

impl ProgressStyleKind {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            ProgressStyleKind::Bars
        } else {
            ProgressStyleKind::Lines
        }
    }
}

/// Hands out progress tasks for one stage.
#[derive(Clone, Debug)]
pub struct Progress {
    stage: String,
    style: ProgressStyleKind,
}

impl Progress {
    pub fn new(stage: &str, style: ProgressStyleKind) -> Self {
        Progress {
            stage: stage.to_string(),
            style,
        }
    }

    pub fn quiet() -> Self {
        Progress::new("", ProgressStyleKind::Quiet)
    }

    /// A task of `total` units (steps, rows, tokens), e.g. `progress.task("train", 500)`.
    pub fn task(&self, what: &str, total: u64) -> Task {
        let bar = match self.style {
            ProgressStyleKind::Bars => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{prefix:>12} {msg:<10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(self.stage.clone());
                bar.set_message(what.to_string());
                Some(bar)
            }
            _ => None,
        };
        Task {
            stage: self.stage.clone(),
            what: what.to_string(),
            total,
            done: 0,
            lines: self.style == ProgressStyleKind::Lines,
            last_line: Instant::now(),
            started: Instant::now(),
            bar,
        }
    }
}

pub struct Task {
    stage: String,
    what: String,
    total: u64,
    done: u64,
    lines: bool,
    last_line: Instant,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Task {
    pub fn inc(&mut self, n: u64) {
        self.set_position(self.done + n);
    }

    pub fn set_position(&mut self, done: u64) {
        self.done = done;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
        if self.lines && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!(
                "{}: {} {}/{} ({:.0}s)",
                self.stage,
                self.what,
                self.done,
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// A short status after the counter, e.g. `loss 1.234`.
    pub fn set_message(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} {}", self.what, message));
        }
    }

    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
