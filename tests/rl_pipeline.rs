//! The RL loop end to end through the real binary on a tiny random Llama: sample and judge
//! preferences, train a reward model on them, then PPO (reward model) and GRPO (rule
//! judge) from the same policy — a cold run runs everything, a rerun is fully cached, and a
//! changed GRPO param reruns GRPO alone.

mod common;

use common::Project;
use std::path::Path;

fn pipeline(tokenizer: &Path) -> String {
    format!(
        r#"name: rl
seed: 5
stages:
  prompts: {{ kind: dataset, source: data/prompts.jsonl }}
  base:
    kind: load_pretrained
    init: {{ hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
            intermediate_size: 64, max_position_embeddings: 64, tokenizer: "{}" }}
  prefs:
    kind: collect_preferences
    policy: base
    prompts: prompts
    template: "{{prompt}}"
    judge: {{ kind: rule, max_chars: 10 }}
    pairing: all_pairs
    max_new_tokens: 6
  rm:
    kind: reward_model
    model: base
    data: prefs
    template: "{{prompt}}"
    batch_size: 8
    max_steps: 2
  ppo:
    kind: ppo
    policy: base
    prompts: prompts
    reward_model: rm
    template: "{{prompt}}"
    steps: 2
    rollouts_per_step: 8
    max_new_tokens: 4
    ppo_epochs: 2
  grpo:
    kind: grpo
    policy: base
    prompts: prompts
    eval: prompts
    template: "{{prompt}}"
    rule: {{ exact_match: true, max_chars: 10 }}
    steps: 2
    prompts_per_step: 2
    group_size: 4
    max_new_tokens: 6
"#,
        tokenizer.display()
    )
}

fn project() -> Option<Project> {
    let tokenizer = rlhf_stages::testing::shared_path("bench/trl/tokenizer")?;
    let data = rlhf_stages::testing::shared_path("bench/trl/data/grpo.jsonl")?;
    let project = Project::new();
    let text = std::fs::read_to_string(data).unwrap();
    let rows: Vec<&str> = text.lines().take(16).collect();
    project.write("data/prompts.jsonl", &(rows.join("\n") + "\n"));
    project.write("p.yaml", &pipeline(&tokenizer));
    Some(project)
}

fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn rl_pipeline_runs_cold_then_is_cached_and_a_grpo_param_reruns_grpo_only() {
    let Some(project) = project() else { return };
    let cold = project.run(&[]);
    cold.assert_code(0);
    assert_eq!(cold.with_status("cached"), Vec::<String>::new());
    let prefs = cold.output_dir("prefs");
    assert!(prefs.join("pairs.jsonl").exists() && prefs.join("data.jsonl").exists());
    assert!(metrics(&prefs)["pairs"].as_u64().unwrap() > 0);
    for stage in ["ppo", "grpo"] {
        let dir = cold.output_dir(stage);
        assert!(
            dir.join("adapter_model.safetensors").exists(),
            "{stage} wrote no adapter"
        );
        assert_eq!(metrics(&dir)["steps"], 2, "{stage}");
        assert!(std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .contains("\"reward\""));
    }

    let warm = project.run(&[]);
    warm.assert_code(0);
    assert_eq!(
        warm.with_status("ran"),
        Vec::<String>::new(),
        "a rerun must be fully cached"
    );

    let changed = project.run(&["--set", "grpo.beta=0.0"]);
    changed.assert_code(0);
    assert_eq!(changed.with_status("ran"), vec!["grpo".to_string()]);
}

/// Stage name → output digests, from `--json`.
fn output_digests(run: &common::Run) -> Vec<(String, String)> {
    let mut digests: Vec<(String, String)> = run
        .stages()
        .iter()
        .flat_map(|s| {
            let stage = s["stage"].as_str().unwrap().to_string();
            s["outputs"]
                .as_object()
                .unwrap()
                .values()
                .map(move |o| (stage.clone(), o["digest"].as_str().unwrap().to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    digests.sort();
    digests
}

#[test]
fn the_artifacts_do_not_depend_on_the_thread_count() {
    let Some(project) = project() else { return };
    // Shards, generation streams and candle's single-threaded ops are fixed by the
    // recipe, so one thread and two threads must write the same bytes.
    let run = |threads: &str, cache: &str| {
        let mut command = project.command_with_cache(
            &["run", "p.yaml", "--json", "--threads", threads],
            &project.path(cache),
        );
        command.env_remove("RAYON_NUM_THREADS");
        let run = project.rlhf_with(command);
        run.assert_code(0);
        run
    };
    let one = output_digests(&run("1", "cache1"));
    let two = output_digests(&run("2", "cache2"));
    assert!(one.iter().any(|(stage, _)| stage == "grpo"), "{one:?}");
    assert_eq!(one, two);
}
