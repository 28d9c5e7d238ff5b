//! The TRL benchmark harness: runs bench/bench_trl.yaml (the stages of ../shared/BENCH.md
//! at TRL's settings) with the release `rlhf` binary in a fresh cache, reads each stage's
//! training-loop timings from the run log (`CACHE/v1/logs/KEY/timings.jsonl`), and prints
//! them in TRL's units beside TRL's figures from ../shared/bench/trl/results/*.json, with
//! the ratio (ours / TRL; higher is better for rates, lower for s/step).
//!
//!   cargo build --release && cargo run --release --example bench_trl [-- --quick] [-- --keep]
//!
//! `--quick` cuts every stage to a few steps (per-step rates stay comparable; the first
//! steps of pretraining include warm-up). `--trl DIR` reads TRL's results elsewhere;
//! `--cache DIR` reuses a cache (cached stages keep the timings of the run that built them).

use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Overrides for `--quick`: enough steps for steady per-step rates, a few minutes in all.
const QUICK: &[&str] = &[
    "pretrain.max_steps=60",
    "sft.max_steps=40",
    "rm.max_steps=40",
    "dpo.max_steps=40",
    "grpo.steps=8",
    "ppo.steps=3",
];

struct Options {
    quick: bool,
    trl: PathBuf,
    cache: Option<PathBuf>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        trl: PathBuf::from("../shared/bench/trl/results"),
        cache: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--trl" => options.trl = args.next().ok_or("--trl needs a folder")?.into(),
            "--cache" => options.cache = Some(args.next().ok_or("--cache needs a folder")?.into()),
            other => {
                return Err(format!(
                    "unknown argument `{other}` (expected --quick, --trl DIR, --cache DIR)"
                ))
            }
        }
    }
    Ok(options)
}

/// `target/release/rlhf`, beside `target/release/examples/bench_trl`.
fn rlhf_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate target dir")?;
    let binary = dir.join("rlhf");
    binary.exists().then_some(binary.clone()).ok_or(format!(
        "{} not found; run `cargo build --release` first",
        binary.display()
    ))
}

/// Runs the pipeline; returns the `--json` stage lines.
fn run_pipeline(options: &Options, cache: &Path) -> Result<Vec<Json>, String> {
    let mut command = Command::new(rlhf_binary()?);
    command
        .args(["run", "bench/bench_trl.yaml", "--json", "--cache-dir"])
        .arg(cache);
    if options.quick {
        for set in QUICK {
            command.args(["--set", set]);
        }
    }
    // Same thread count as TRL (torch_threads 2) unless the caller chose one.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        command.env("RAYON_NUM_THREADS", "2");
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!("rlhf run failed ({})", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).map_err(|e| format!("bad --json line: {e}")))
        .collect()
}

/// The timing lines of a stage's run log.
fn timings(cache: &Path, key: &str) -> Vec<Json> {
    let path = cache.join("v1/logs").join(key).join("timings.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn number(value: &Json, name: &str) -> f64 {
    value.get(name).and_then(Json::as_f64).unwrap_or(f64::NAN)
}

fn trl(options: &Options, step: &str) -> Json {
    let path = options.trl.join(format!("{step}.json"));
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Json::Null)
}

/// One printed row: stage, unit, ours, TRL, and whether higher is better.
struct Figure {
    stage: &'static str,
    unit: &'static str,
    ours: f64,
    trl: f64,
    higher_is_better: bool,
}

/// Training stages: the summary line (`train_seconds`, `train_*_per_second`) at the end.
fn train_figures(
    lines: &[Json],
    stage: &'static str,
    trl_json: &Json,
    unit: &'static str,
) -> Vec<Figure> {
    let Some(summary) = lines
        .iter()
        .rev()
        .find(|l| l.get("train_seconds").is_some())
    else {
        return Vec::new();
    };
    let steps = number(summary, "step");
    let seconds = number(summary, "train_seconds");
    let mut figures = vec![Figure {
        stage,
        unit: "s/step",
        ours: seconds / steps,
        trl: number(trl_json, "seconds_per_step"),
        higher_is_better: false,
    }];
    let trl_rate = |name: &str| number(trl_json, name);
    let (ours_rate, trl_rate_value) = match unit {
        "tokens/s" => (
            number(summary, "train_tokens_per_second"),
            trl_rate("tokens_per_second"),
        ),
        "examples/s" => (
            number(summary, "train_examples_per_second"),
            trl_rate("examples_per_second"),
        ),
        _ => (
            number(summary, "train_examples_per_second"),
            trl_rate("pairs_per_second"),
        ),
    };
    figures.push(Figure {
        stage,
        unit,
        ours: ours_rate,
        trl: trl_rate_value,
        higher_is_better: true,
    });
    if unit != "tokens/s" {
        figures.push(Figure {
            stage,
            unit: "tokens/s",
            ours: number(summary, "train_tokens_per_second"),
            trl: trl_rate("tokens_per_second"),
            higher_is_better: true,
        });
    }
    figures
}

/// RL stages: per-step lines with `seconds`, `generation_seconds`, `generated_tokens_per_second`.
fn rl_figures(
    lines: &[Json],
    stage: &'static str,
    trl_json: &Json,
    rollouts_per_step: f64,
) -> Vec<Figure> {
    let steps: Vec<&Json> = lines
        .iter()
        .filter(|l| l.get("generation_seconds").is_some())
        .collect();
    if steps.is_empty() {
        return Vec::new();
    }
    let seconds: f64 = steps.iter().map(|l| number(l, "seconds")).sum();
    let generated: f64 = steps
        .iter()
        .map(|l| number(l, "generated_tokens_per_second") * number(l, "generation_seconds"))
        .sum();
    let per_step = seconds / steps.len() as f64;
    let mut figures = vec![Figure {
        stage,
        unit: "s/step",
        ours: per_step,
        trl: number(trl_json, "seconds_per_step"),
        higher_is_better: false,
    }];
    if stage == "ppo" {
        figures.push(Figure {
            stage,
            unit: "rollouts/s",
            ours: rollouts_per_step / per_step,
            trl: number(trl_json, "rollouts_per_second"),
            higher_is_better: true,
        });
    } else {
        figures.push(Figure {
            stage,
            unit: "generated tokens/s",
            ours: generated / seconds,
            trl: number(trl_json, "generated_tokens_per_second_overall"),
            higher_is_better: true,
        });
        // The sampler alone: tokens over the time spent generating.
        let generating: f64 = steps.iter().map(|l| number(l, "generation_seconds")).sum();
        figures.push(Figure {
            stage,
            unit: "tokens/s while generating",
            ours: generated / generating,
            trl: number(trl_json, "generated_tokens_per_second_in_generation"),
            higher_is_better: true,
        });
    }
    figures
}

fn print_table(figures: &[Figure]) {
    println!("| stage | unit | rlhf | TRL | speed-up |");
    println!("|---|---|---:|---:|---:|");
    for f in figures {
        let ratio = if f.higher_is_better {
            f.ours / f.trl
        } else {
            f.trl / f.ours
        };
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.2}× |",
            f.stage, f.unit, f.ours, f.trl, ratio
        );
    }
}

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let options = options()?;
    let temporary = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cache = options
        .cache
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let stages = run_pipeline(&options, &cache)?;
    let key_of = |name: &str| {
        stages
            .iter()
            .find(|s| s["stage"] == name)
            .and_then(|s| s["key"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let lines = |name: &str| timings(&cache, &key_of(name));
    let mut figures = Vec::new();
    figures.extend(train_figures(
        &lines("pretrain"),
        "pretrain",
        &trl(&options, "step1_pretrain"),
        "tokens/s",
    ));
    figures.extend(train_figures(
        &lines("sft"),
        "sft",
        &trl(&options, "step2_sft"),
        "examples/s",
    ));
    figures.extend(train_figures(
        &lines("rm"),
        "reward_model",
        &trl(&options, "step3_reward"),
        "pairs/s",
    ));
    figures.extend(train_figures(
        &lines("dpo"),
        "dpo",
        &trl(&options, "step4_dpo"),
        "pairs/s",
    ));
    figures.extend(rl_figures(
        &lines("grpo"),
        "grpo",
        &trl(&options, "step5_grpo"),
        64.0,
    ));
    figures.extend(rl_figures(
        &lines("ppo"),
        "ppo",
        &trl(&options, "step6_ppo"),
        64.0,
    ));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "rlhf vs TRL on BENCH.md ({}; load average now {})",
        if options.quick {
            "--quick: fewer steps"
        } else {
            "full settings"
        },
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    print_table(&figures);
    Ok(())
}
