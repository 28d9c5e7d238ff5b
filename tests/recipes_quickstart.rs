//! pipelines/quickstart.yaml end to end through the real binary, shortened with `--set`
//! (a smaller data set, a few steps of every stage): every stage runs offline from an
//! empty cache, the evaluation table is printed with an accuracy for SFT, PPO, GRPO and
//! DPO, a rerun is fully cached, a changed PPO param reruns PPO and the evaluation only,
//! and a second cold run in another cache produces the same digests for every stage.

mod common;

use common::{Project, Run};
use std::collections::BTreeMap;
use std::path::Path;

/// Small enough for seconds: 600 problems, a few steps of every training stage.
const SHORT: &[&str] = &[
    "arithmetic.source.synthetic.count=600",
    "arithmetic.split.train=560",
    "arithmetic.split.eval=40",
    "tokenizer.vocab_size=300",
    "pretrain.epochs=1",
    "pretrain.max_steps=6",
    "sft.max_steps=4",
    "prefs.max_prompts=16",
    // An untrained policy is never right, so exact match alone ties every pair: a length
    // bound separates its samples.
    "prefs.judge.max_chars=3",
    "rm.epochs=1",
    "rm.max_steps=2",
    "ppo.steps=2",
    "ppo.rollouts_per_step=8",
    "ppo.ppo_epochs=1",
    "grpo.steps=2",
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "dpo.max_steps=2",
];

fn project() -> Project {
    let project = Project::new();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quickstart.yaml");
    project.write("p.yaml", &std::fs::read_to_string(path).unwrap());
    project
}

fn run_short(project: &Project, cache: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["run", "p.yaml", "--json"];
    for set in SHORT.iter().chain(extra) {
        args.push("--set");
        args.push(set);
    }
    let mut command = project.command_with_cache(&args, cache);
    command.env("HF_HUB_OFFLINE", "1");
    project.rlhf_with(command)
}

/// Stage name → digests of its outputs, from the `--json` lines.
fn digests(run: &Run) -> BTreeMap<String, Vec<String>> {
    run.stages()
        .into_iter()
        .map(|stage| {
            let outputs = stage["outputs"].as_object().cloned().unwrap_or_default();
            let digests = outputs
                .values()
                .map(|o| o["digest"].as_str().unwrap_or("").to_string())
                .collect();
            (stage["stage"].as_str().unwrap().to_string(), digests)
        })
        .collect()
}

#[test]
fn shortened_quickstart_runs_offline_prints_the_table_and_reruns_only_what_changed() {
    let project = project();
    let cold = run_short(&project, &project.cache(), &[]);
    cold.assert_code(0);
    assert_eq!(
        cold.with_status("cached"),
        Vec::<String>::new(),
        "{}",
        cold.stderr
    );
    assert_eq!(cold.stages().len(), 12, "{}", cold.stdout);
    let eval = cold
        .stages()
        .into_iter()
        .find(|s| s["stage"] == "eval")
        .unwrap();
    for model in ["sft", "ppo", "grpo", "dpo"] {
        let accuracy = eval["metrics"][model]["accuracy"].as_f64();
        assert!(
            accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)),
            "no accuracy for {model}: {}",
            eval["metrics"]
        );
    }
    assert!(
        cold.stderr.contains("evaluation `eval`"),
        "no table: {}",
        cold.stderr
    );
    assert!(cold.stderr.contains("accuracy"), "{}", cold.stderr);

    let warm = run_short(&project, &project.cache(), &[]);
    warm.assert_code(0);
    assert_eq!(
        warm.with_status("ran"),
        Vec::<String>::new(),
        "a rerun is fully cached"
    );
    assert!(
        warm.stderr.contains("evaluation `eval`"),
        "the table is printed from the cache too"
    );

    let changed = run_short(&project, &project.cache(), &["ppo.kl.coef=0.1"]);
    changed.assert_code(0);
    assert_eq!(
        changed.with_status("ran"),
        vec!["eval".to_string(), "ppo".to_string()]
    );
}

#[test]
fn two_cold_runs_of_the_shortened_quickstart_give_identical_digests() {
    let project = project();
    let first = run_short(&project, &project.path("cache-a"), &[]);
    first.assert_code(0);
    let second = run_short(&project, &project.path("cache-b"), &[]);
    second.assert_code(0);
    assert_eq!(second.with_status("cached"), Vec::<String>::new());
    assert_eq!(digests(&first), digests(&second));
}
