//! Benchmark: `rlhf status` on a generated 200-stage pipeline with everything cached
//! (a chain of 100 `command` stages, each with one fan-out stage reading it), and a
//! fully cached `rlhf run` of it. Prints the median of several timed invocations.
//!
//!     cargo bench --profile dev --bench status_200        # the debug binary
//!     cargo bench --bench status_200                       # a release build
//!
//! `RLHF_BIN=path/to/rlhf` times another binary instead of the one cargo built.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const CHAIN: usize = 100;
const RUNS: usize = 9;

fn pipeline() -> String {
    let mut text = String::from("name: status-200\nseed: 1\nstages:\n");
    for i in 0..CHAIN {
        let (inputs, script) = if i == 0 {
            ("{}".to_string(), "echo 0 > {out}/f".to_string())
        } else {
            (
                format!("{{ up: s{} }}", i - 1),
                format!("cat {{inputs.up}}/f > {{out}}/f; echo {i} >> {{out}}/f"),
            )
        };
        text.push_str(&format!(
            "  s{i}: {{ kind: command, run: [sh, -c, '{script}'], inputs: {inputs}, params: {{ i: {i} }}, outputs: [f] }}\n"
        ));
        text.push_str(&format!(
            "  f{i}: {{ kind: command, run: [sh, -c, 'wc -l {{inputs.s}}/f > {{out}}/f'], inputs: {{ s: s{i} }}, outputs: [f] }}\n"
        ));
    }
    text
}

fn rlhf(bin: &str, dir: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let output = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_remove("RLHF_LOG")
        .output()
        .expect("run rlhf");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "rlhf {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn median(bin: &str, dir: &Path, args: &[&str]) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS).map(|_| rlhf(bin, dir, args)).collect();
    times.sort();
    times[RUNS / 2]
}

fn main() {
    let bin = std::env::var("RLHF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlhf").to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("p.yaml"), pipeline()).expect("write pipeline");
    let first = rlhf(&bin, dir.path(), &["run", "p.yaml"]);
    println!("binary: {bin}");
    println!(
        "first run, 200 stages executed:      {:>9.1} ms",
        first.as_secs_f64() * 1e3
    );
    let status = median(&bin, dir.path(), &["status", "p.yaml"]);
    println!(
        "rlhf status, all 200 cached (median of {RUNS}): {:>9.1} ms",
        status.as_secs_f64() * 1e3
    );
    let rerun = median(&bin, dir.path(), &["run", "p.yaml"]);
    println!(
        "rlhf run, all 200 cached (median of {RUNS}):    {:>9.1} ms",
        rerun.as_secs_f64() * 1e3
    );
    let validate = median(&bin, dir.path(), &["validate", "p.yaml"]);
    println!(
        "rlhf validate (parse + check, no cache):  {:>9.1} ms",
        validate.as_secs_f64() * 1e3
    );
}
