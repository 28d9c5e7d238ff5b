//! The Dolly recipes (pipelines/dolly_{ppo,dpo,grpo}.yaml) end to end through the real
//! binary, offline: with nothing cached they fail at once and say how to point `--set` at
//! local folders; with `--set` aimed at a local tiny Llama (tinyllamas-stories260k) and a
//! Dolly-format sample, and step counts cut to a few, every stage runs and the evaluation
//! reports ROUGE, perplexity and reward for each model.

mod common;

use common::{Project, Run};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn recipe(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("pipelines")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/fixtures/recipes/dolly_sample.jsonl")
}

/// A project holding the recipe as `p.yaml` (so its lock file lands in the temp folder).
fn project(name: &str) -> Project {
    let project = Project::new();
    project.write("p.yaml", &recipe(name));
    project
}

/// `rlhf run p.yaml --json ARGS` offline, with an empty Hugging Face cache.
fn run_offline(project: &Project, args: &[&str]) -> Run {
    let mut full = vec!["run", "p.yaml", "--json"];
    full.extend_from_slice(args);
    let mut command = project.command(&full);
    command
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", project.path("hf-home"))
        .env_remove("HF_HUB_CACHE");
    project.rlhf_with(command)
}

/// Overrides shared by the three recipes: local model and data, tiny sizes everywhere.
fn common_overrides(model: &Path) -> Vec<String> {
    [
        format!("base.model={}", model.display()),
        format!("dolly.source={}", sample().display()),
        "dolly.split.train=32".into(),
        "dolly.split.eval=8".into(),
        "sft.max_steps=2".into(),
        "sft.batch_size=4".into(),
        // The length rule ties every completion of a prompt now and then: with 4 prompts
        // a change of sampling streams left no pair at all for the judge to train on.
        "rule_prefs.max_prompts=12".into(),
        "rule_prefs.max_new_tokens=8".into(),
        "judge.max_steps=1".into(),
        "judge.batch_size=4".into(),
        "prefs.max_prompts=4".into(),
        "prefs.max_new_tokens=8".into(),
        "rm.max_steps=1".into(),
        "rm.batch_size=4".into(),
        "eval.limit=4".into(),
        "eval.max_new_tokens=8".into(),
    ]
    .into_iter()
    .collect()
}

fn with_sets(overrides: &[String]) -> Vec<String> {
    overrides
        .iter()
        .flat_map(|o| ["--set".to_string(), o.clone()])
        .collect()
}

/// The evaluate stage's metrics line (from `--json`) for the recipe's `eval` stage.
fn eval_metrics(run: &Run) -> Json {
    run.stages()
        .into_iter()
        .find(|s| s["stage"] == "eval")
        .map(|s| s["metrics"].clone())
        .unwrap_or_else(|| panic!("no eval stage in\n{}", run.stdout))
}

/// Runs one recipe offline on the tiny local model and checks that every stage ran and
/// that `eval` has rouge, perplexity and reward numbers for base, sft and `trained`.
fn recipe_runs_offline_on_local_folders(name: &str, trained: &str, extra: &[&str]) {
    let Some(model) = rlhf_stages::testing::shared_path("models/tinyllamas-stories260k") else {
        return;
    };
    let project = project(name);
    let mut overrides = common_overrides(&model);
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let started = Instant::now();
    let run = run_offline(&project, &as_refs(&with_sets(&overrides)));
    run.assert_code(0);
    assert_eq!(
        run.with_status("cached"),
        Vec::<String>::new(),
        "{name}: a cold run runs everything"
    );
    assert!(run.with_status("ran").contains(&trained.to_string()));
    let metrics = eval_metrics(&run);
    let text = metrics.to_string();
    for model in ["base", "sft", trained] {
        assert!(
            text.contains(model),
            "{name}: no metrics for `{model}` in {text}"
        );
    }
    for metric in ["rouge", "perplexity", "reward"] {
        assert!(text.contains(metric), "{name}: no `{metric}` in {text}");
    }
    assert!(
        started.elapsed().as_secs() < 120,
        "{name}: the shortened recipe took {:?}",
        started.elapsed()
    );
}

fn as_refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn dolly_recipes_fail_at_once_offline_naming_the_set_to_use() {
    for name in ["dolly_ppo.yaml", "dolly_dpo.yaml", "dolly_grpo.yaml"] {
        let project = project(name);
        let started = Instant::now();
        let run = run_offline(&project, &[]);
        run.assert_code(1);
        assert!(
            started.elapsed().as_secs() < 5,
            "{name}: took {:?}",
            started.elapsed()
        );
        assert!(
            run.stderr.contains("hf://HuggingFaceTB/SmolLM2-135M")
                && run.stderr.contains("offline")
                && run
                    .stderr
                    .contains("--set STAGE.model=/path/to/local/folder"),
            "{name}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("stage `base`"),
            "{name}: {}",
            run.stderr
        );
    }
}

#[test]
fn dolly_dataset_offline_hint_names_the_source_param() {
    let Some(model) = rlhf_stages::testing::shared_path("models/tinyllamas-stories260k") else {
        return;
    };
    let project = project("dolly_ppo.yaml");
    let set = format!("base.model={}", model.display());
    let run = run_offline(&project, &["--set", &set]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("stage `dolly`")
            && run
                .stderr
                .contains("hf://datasets/databricks/databricks-dolly-15k")
            && run.stderr.contains("--set STAGE.source="),
        "{}",
        run.stderr
    );
}

#[test]
fn dolly_ppo_runs_offline_on_local_folders() {
    recipe_runs_offline_on_local_folders(
        "dolly_ppo.yaml",
        "ppo",
        &[
            "ppo.steps=1",
            "ppo.rollouts_per_step=4",
            "ppo.max_new_tokens=8",
            "ppo.ppo_epochs=1",
        ],
    );
}

#[test]
fn dolly_dpo_runs_offline_on_local_folders() {
    recipe_runs_offline_on_local_folders(
        "dolly_dpo.yaml",
        "dpo",
        &["dpo.max_steps=1", "dpo.batch_size=4"],
    );
}

#[test]
fn dolly_grpo_runs_offline_on_local_folders() {
    recipe_runs_offline_on_local_folders(
        "dolly_grpo.yaml",
        "grpo",
        &[
            "grpo.steps=1",
            "grpo.prompts_per_step=2",
            "grpo.group_size=2",
            "grpo.max_new_tokens=8",
        ],
    );
}
