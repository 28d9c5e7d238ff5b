//! The RL kinds (collect_preferences, grpo, ppo) driven through the registry on a tiny
//! random Llama (hidden 32, 2 layers) with the BENCH.md tokenizer and a few rows of the
//! BENCH.md data: a couple of steps each, checking what the stage promises (pair
//! ordering and tie counting, on-policy invariants, resume = straight run, determinism).

use candle_core::{DType, Device};
use rlhf_engine::context::ArtifactLookup;
use rlhf_engine::metrics::MetricsSink;
use rlhf_engine::{ArtifactKind, InputArtifact, StageContext};
use rlhf_stages::data::row::{read_rows, write_rows, Row, RowShape};
use rlhf_stages::model::{save_model_folder, CausalLm, LlamaConfig, Trainability};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Lookup(BTreeMap<String, PathBuf>);

impl ArtifactLookup for Lookup {
    fn artifact_path(&self, digest: &str) -> Option<PathBuf> {
        self.0.get(digest).cloned()
    }
}

struct Workspace {
    dir: tempfile::TempDir,
    artifacts: BTreeMap<String, PathBuf>,
}

fn bench_rows(file: &str, count: usize) -> Option<Vec<Row>> {
    let path = rlhf_stages::testing::shared_path(&format!("bench/trl/data/{file}"))?;
    let text = std::fs::read_to_string(path).unwrap();
    Some(
        text.lines()
            .take(count)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

fn digest_of(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex().to_string()
}

impl Workspace {
    /// A tiny random model with the BENCH.md tokenizer and datasets `prompts` (grpo.jsonl),
    /// `prefs`, `eval`; `None` (skip) without ../shared.
    fn new() -> Option<Workspace> {
        let tokenizer = rlhf_stages::testing::shared_path("bench/trl/tokenizer")?;
        let dir = tempfile::tempdir().unwrap();
        let config: LlamaConfig = serde_json::from_value(json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 64,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
        }))
        .unwrap();
        let model =
            CausalLm::random(config, 7, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
        let model_dir = dir.path().join("base");
        save_model_folder(
            &model,
            &model_dir,
            Some(&tokenizer),
            &[],
            &Default::default(),
        )
        .unwrap();
        for (name, file, count) in [
            ("prompts", "grpo.jsonl", 16),
            ("prefs", "prefs.jsonl", 16),
            ("eval", "eval.jsonl", 8),
        ] {
            let rows = bench_rows(file, count)?;
            let out = dir.path().join("data").join(name);
            std::fs::create_dir_all(&out).unwrap();
            write_rows(&out, &rows).unwrap();
        }
        let mut artifacts = BTreeMap::new();
        artifacts.insert(digest_of("base"), model_dir);
        Some(Workspace { dir, artifacts })
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(name)
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("base")
    }

    /// Runs `kind`; inputs are (port, folder, kind); `scratch` names the scratch dir
    /// (reuse it to resume); the output goes to `out/<name>`.
    fn run(
        &mut self,
        kind: &str,
        params: Value,
        inputs: &[(&str, PathBuf, ArtifactKind)],
        scratch: &str,
        name: &str,
    ) -> Result<PathBuf, String> {
        let registry = rlhf_stages::registry();
        let stage = registry.get(kind).unwrap();
        let configured = stage.configure(&params).map_err(|e| format!("{e:?}"))?;
        let root = self.dir.path();
        let mut ctx = StageContext::new(
            name,
            kind,
            42,
            root.join("scratch").join(scratch),
            root.join("logs"),
        )
        .with_lookup(Box::new(Lookup(self.artifacts.clone())));
        for (port, path, kind) in inputs {
            let digest = self
                .artifacts
                .iter()
                .find(|(_, p)| *p == path)
                .map(|(d, _)| d.clone())
                .unwrap_or_else(|| digest_of(&path.display().to_string()));
            let input = InputArtifact {
                path: path.clone(),
                kind: Some(*kind),
                digest,
                reference: port.to_string(),
            };
            ctx = ctx.with_input(port, input);
        }
        let output = root.join("out").join(name);
        if output.exists() {
            std::fs::remove_dir_all(&output).unwrap();
        }
        std::fs::create_dir_all(&output).unwrap();
        let port = &configured.ports.outputs[0].name;
        ctx = ctx
            .with_output(port, output.clone())
            .with_metrics(MetricsSink::new(
                Some(output.clone()),
                Some(root.join("logs").join(format!("{name}.timings"))),
            ));
        std::fs::create_dir_all(root.join("logs")).unwrap();
        stage
            .run(&configured.params, &mut ctx)
            .map_err(|e| format!("{e} (hint: {:?})", e.hint()))?;
        ctx.metrics.finish().unwrap();
        self.artifacts.insert(digest_of(name), output.clone());
        Ok(output)
    }
}

fn folder_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn metric_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
}

fn pairs_of(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn policy_inputs(ws: &Workspace) -> Vec<(&'static str, PathBuf, ArtifactKind)> {
    vec![
        ("policy", ws.base(), ArtifactKind::Model),
        ("prompts", ws.data("prompts"), ArtifactKind::Dataset),
    ]
}

#[test]
fn collect_preferences_orders_every_pair_by_score_and_counts_ties() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    // A random model never answers right, so exact match alone ties everything; the
    // length bound separates completions.
    let params = json!({ "policy": "base", "prompts": "prompts", "template": "{prompt}",
        "judge": { "kind": "rule", "exact_match": true, "max_chars": 10 },
        "completions_per_prompt": 4, "pairing": "best_vs_worst", "max_new_tokens": 6 });
    let out = ws
        .run(
            "collect_preferences",
            params,
            &policy_inputs(&ws),
            "p",
            "prefs",
        )
        .unwrap();
    let pairs = pairs_of(&out);
    let metrics = summary(&out);
    let ties = metrics["ties_dropped"].as_u64().unwrap() as usize;
    assert_eq!(
        pairs.len() + ties,
        16,
        "best_vs_worst gives one pair or one tie per prompt"
    );
    assert!(
        !pairs.is_empty(),
        "the length bound must separate some completions"
    );
    for pair in &pairs {
        assert!(pair["chosen_score"].as_f64().unwrap() > pair["rejected_score"].as_f64().unwrap());
        assert_eq!(pair["judge"], "rule");
    }
    let rows = read_rows(&out).unwrap();
    assert_eq!(rows.len(), pairs.len());
    assert!(rows.iter().all(|r| r.has_shape(RowShape::Preference)));
}

#[test]
fn collect_preferences_is_byte_identical_run_to_run() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let params = json!({ "policy": "base", "prompts": "prompts", "template": "{prompt}",
        "judge": { "kind": "rule", "max_chars": 2 }, "pairing": "all_pairs", "max_new_tokens": 4 });
    let a = ws
        .run(
            "collect_preferences",
            params.clone(),
            &policy_inputs(&ws),
            "a",
            "a",
        )
        .unwrap();
    let b = ws
        .run("collect_preferences", params, &policy_inputs(&ws), "b", "b")
        .unwrap();
    assert_eq!(folder_bytes(&a), folder_bytes(&b));
}

#[test]
fn collect_preferences_from_file_labels_pairs_best_against_worst_and_drops_ties() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let labels = ws.dir.path().join("labels.jsonl");
    let prompt = "Q: 86-85=\nA:";
    let lines = [
        json!({ "prompt": prompt, "completion": " 1", "score": 2.0 }),
        json!({ "prompt": prompt, "completion": " 2", "score": -1.0 }),
        json!({ "prompt": prompt, "completion": " 3", "score": 0.5 }),
        json!({ "prompt": "Q: 88+32=\nA:", "completion": " 120", "score": 1.0 }),
        json!({ "prompt": "Q: 88+32=\nA:", "completion": " 121", "score": 1.0 }),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&labels, text).unwrap();
    let params =
        json!({ "prompts": "prompts", "judge": { "kind": "file", "labels": "labels.jsonl" } });
    let inputs = vec![
        ("prompts", ws.data("prompts"), ArtifactKind::Dataset),
        ("labels", labels, ArtifactKind::Files),
    ];
    let out = ws
        .run("collect_preferences", params, &inputs, "f", "f")
        .unwrap();
    let pairs = pairs_of(&out);
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0]["chosen"], " 1");
    assert_eq!(pairs[0]["rejected"], " 2");
    assert_eq!(summary(&out)["ties_dropped"], 1);
    assert_eq!(read_rows(&out).unwrap()[0].margin, Some(3.0));
}

#[test]
fn preferences_artifact_is_a_data_input_of_the_reward_model_stage() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let params = json!({ "policy": "base", "prompts": "prompts", "template": "{prompt}",
        "judge": { "kind": "rule", "max_chars": 10 }, "pairing": "all_pairs", "max_new_tokens": 6 });
    let prefs = ws
        .run(
            "collect_preferences",
            params,
            &policy_inputs(&ws),
            "p",
            "prefs",
        )
        .unwrap();
    let rm_params = json!({ "model": "base", "data": "prefs", "template": "{prompt}", "max_steps": 1, "batch_size": 4 });
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", prefs, ArtifactKind::Preferences),
    ];
    let rm = ws
        .run("reward_model", rm_params, &inputs, "rm", "rm")
        .unwrap();
    assert!(rm.join("model.safetensors").exists());
}

fn grpo_params(steps: usize) -> Value {
    json!({ "policy": "base", "prompts": "prompts", "eval": "eval", "template": "{prompt}",
            "rule": { "exact_match": true, "max_chars": 10 },
            "steps": steps, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6,
            "lora": { "r": 4, "alpha": 8 }, "learning_rate": 1e-2, "checkpoint_every": 1 })
}

fn grpo_inputs(ws: &Workspace) -> Vec<(&'static str, PathBuf, ArtifactKind)> {
    let mut inputs = policy_inputs(ws);
    inputs.push(("eval", ws.data("eval"), ArtifactKind::Dataset));
    inputs
}

#[test]
fn grpo_first_update_is_on_policy_with_no_kl_and_no_clipping() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let out = ws
        .run("grpo", grpo_params(2), &grpo_inputs(&ws), "g", "g")
        .unwrap();
    let lines = metric_lines(&out);
    let step1 = lines
        .iter()
        .find(|l| l["step"] == 1 && l.get("reward").is_some())
        .unwrap();
    // LoRA B starts at zero, so the policy is the reference: k3 = 0; one pass per batch
    // makes the ratio exactly 1, so nothing is clipped.
    assert!(step1["kl"].as_f64().unwrap().abs() < 1e-7, "{step1}");
    assert_eq!(step1["clip_ratio"].as_f64().unwrap(), 0.0);
    let step2 = lines
        .iter()
        .find(|l| l["step"] == 2 && l.get("reward").is_some())
        .unwrap();
    assert!(
        step2["kl"].as_f64().unwrap() > 0.0,
        "after an update the policy moved: {step2}"
    );
    assert!(out.join("adapter_model.safetensors").exists() && out.join("base.json").exists());
    let metrics = summary(&out);
    assert!(metrics.get("eval_accuracy").is_some() && metrics.get("eval_accuracy_start").is_some());
}

#[test]
fn grpo_resumed_from_a_checkpoint_writes_the_same_bytes_as_an_uninterrupted_run() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = grpo_inputs(&ws);
    let straight = ws
        .run("grpo", grpo_params(3), &inputs, "straight", "a")
        .unwrap();
    // The first run leaves checkpoints (steps 1, 2) in scratch `resumed`; running there
    // again resumes at step 2, as after a kill.
    ws.run("grpo", grpo_params(3), &inputs, "resumed", "b")
        .unwrap();
    let checkpoint = ws.dir.path().join("scratch/resumed/checkpoints/latest");
    assert_eq!(
        std::fs::read_to_string(checkpoint).unwrap(),
        "step-00000002"
    );
    let resumed = ws
        .run("grpo", grpo_params(3), &inputs, "resumed", "c")
        .unwrap();
    assert_eq!(folder_bytes(&straight), folder_bytes(&resumed));
}

#[test]
fn grpo_needs_a_reward_source() {
    let registry = rlhf_stages::registry();
    let stage = registry.get("grpo").unwrap();
    let error = stage
        .configure(&json!({ "policy": "sft", "prompts": "p" }))
        .err()
        .map(|e| format!("{e:?}"))
        .unwrap();
    assert!(
        error.contains("rule") && error.contains("reward_model"),
        "{error}"
    );
}

/// A reward model from one step of the reward_model stage on the tiny model.
fn tiny_reward_model(ws: &mut Workspace) -> PathBuf {
    let params = json!({ "model": "base", "data": "prefs", "template": "{prompt}", "max_steps": 1, "batch_size": 4 });
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("prefs"), ArtifactKind::Dataset),
    ];
    ws.run("reward_model", params, &inputs, "rm", "rm").unwrap()
}

fn ppo_params(steps: usize, epochs: usize) -> Value {
    json!({ "policy": "base", "prompts": "prompts", "eval": "eval", "template": "{prompt}",
            "reward_model": "rm", "steps": steps, "rollouts_per_step": 6, "max_new_tokens": 5,
            "ppo_epochs": epochs, "mini_batches": 2, "missing_eos_penalty": 1.0, "score_clip": 5.0,
            "lora": { "r": 4, "alpha": 8 }, "learning_rate": 1e-2, "checkpoint_every": 1 })
}

fn ppo_inputs(ws: &Workspace, rm: PathBuf) -> Vec<(&'static str, PathBuf, ArtifactKind)> {
    let mut inputs = grpo_inputs(ws);
    inputs.push(("reward_model", rm, ArtifactKind::RewardModel));
    inputs
}

#[test]
fn ppo_first_update_is_on_policy_with_no_kl_and_no_clipping() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let rm = tiny_reward_model(&mut ws);
    let mut params = ppo_params(2, 1);
    params["mini_batches"] = json!(1);
    let out = ws
        .run("ppo", params, &ppo_inputs(&ws, rm), "p", "p")
        .unwrap();
    let lines = metric_lines(&out);
    let step1 = lines
        .iter()
        .find(|l| l["step"] == 1 && l.get("reward").is_some())
        .unwrap();
    // Before the first update the policy (LoRA B = 0) is the reference and the sampler:
    // KL 0, ratio 1 (approx_kl 0, nothing clipped).
    assert_eq!(step1["kl"].as_f64().unwrap(), 0.0, "{step1}");
    assert_eq!(step1["approx_kl"].as_f64().unwrap(), 0.0, "{step1}");
    assert_eq!(step1["clip_fraction"].as_f64().unwrap(), 0.0, "{step1}");
    // Every completion runs to max_new_tokens on a random model: the EOS penalty applies.
    assert_eq!(step1["eos_fraction"].as_f64().unwrap(), 0.0);
    let step2 = lines
        .iter()
        .find(|l| l["step"] == 2 && l.get("reward").is_some())
        .unwrap();
    assert!(
        step2["kl"].as_f64().unwrap() != 0.0,
        "the policy moved: {step2}"
    );
    for name in [
        "value_loss",
        "explained_variance",
        "entropy",
        "response_length",
        "non_score_reward",
    ] {
        assert!(step2[name].is_number(), "{name} missing in {step2}");
    }
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn rl_updates_cut_into_shards_give_the_same_run_as_whole_minibatches() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let rm = tiny_reward_model(&mut ws);
    let cases = [
        ("grpo", grpo_params(3), grpo_inputs(&ws), "loss"),
        ("ppo", ppo_params(3, 2), ppo_inputs(&ws, rm), "value_loss"),
    ];
    let values = |lines: &[Value], name: &str| -> Vec<f64> {
        lines.iter().filter_map(|l| l[name].as_f64()).collect()
    };
    for (kind, params, inputs, loss) in cases {
        let mut lines = Vec::new();
        for shards in [1, 3] {
            let mut params = params.clone();
            params["optimizer"] = json!({ "shards": shards });
            let tag = format!("{kind}{shards}");
            lines.push(metric_lines(
                &ws.run(kind, params, &inputs, &tag, &tag).unwrap(),
            ));
        }
        let (whole, sharded) = (&lines[0], &lines[1]);
        for name in [loss, "kl", "entropy", "reward"] {
            let (a, b) = (values(whole, name), values(sharded, name));
            assert_eq!(a.len(), 3, "{kind} {name}: {a:?}");
            assert_eq!(a.len(), b.len(), "{kind} {name}: {a:?} vs {b:?}");
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() < 1e-4 * x.abs().max(1.0),
                    "{kind} {name}: {a:?} vs {b:?}"
                );
            }
        }
        // The policy moved between steps, so equal KLs are not trivially zero.
        assert!(
            values(whole, "kl").iter().any(|k| *k != 0.0),
            "{kind}: {whole:?}"
        );
    }
}

#[test]
fn ppo_resumed_from_a_checkpoint_writes_the_same_bytes_as_an_uninterrupted_run() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let rm = tiny_reward_model(&mut ws);
    let inputs = ppo_inputs(&ws, rm);
    let straight = ws
        .run("ppo", ppo_params(3, 2), &inputs, "straight", "a")
        .unwrap();
    ws.run("ppo", ppo_params(3, 2), &inputs, "resumed", "b")
        .unwrap();
    let resumed = ws
        .run("ppo", ppo_params(3, 2), &inputs, "resumed", "c")
        .unwrap();
    assert_eq!(folder_bytes(&straight), folder_bytes(&resumed));
    let lines = metric_lines(&straight);
    let step3 = lines
        .iter()
        .find(|l| l["step"] == 3 && l.get("reward").is_some())
        .unwrap();
    assert!(
        step3["approx_kl"].as_f64().unwrap() > 0.0,
        "later epochs are off-policy: {step3}"
    );
}

#[test]
fn collect_preferences_with_a_reward_model_judge_pairs_every_prompt_by_its_scores() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let rm = tiny_reward_model(&mut ws);
    let params = json!({ "policy": "base", "prompts": "prompts", "template": "{prompt}",
        "judge": { "kind": "reward_model", "model": "rm" }, "completions_per_prompt": 3,
        "max_new_tokens": 4, "batch_prompts": 5 });
    let mut inputs = policy_inputs(&ws);
    inputs.push(("judge_model", rm.clone(), ArtifactKind::RewardModel));
    let out = ws
        .run("collect_preferences", params, &inputs, "p", "prefs")
        .unwrap();
    let pairs = pairs_of(&out);
    assert_eq!(pairs.len(), 16, "continuous scores never tie");
    // The recorded scores are the reward model's: rescoring chosen must give the same number.
    let scorer = rlhf_stages::rl::judge::RewardScorer::load(&rm, 0).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(ws.base().join("tokenizer.json")).unwrap();
    let ids = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    // Text with a replacement character (a sampled token that splits a UTF-8 sequence)
    // does not re-encode to the sampled tokens, so rescore a pair that round-trips.
    let first = pairs
        .iter()
        .find(|p| !p["chosen"].as_str().unwrap().contains('\u{fffd}'))
        .expect("a pair with valid UTF-8");
    let prompt = first["prompt"].as_str().unwrap();
    let chosen = first["chosen"].as_str().unwrap();
    let (prompt_ids, chosen_ids) = (ids(prompt), ids(chosen));
    let rescored = scorer.score(&[(&prompt_ids, &chosen_ids)]).unwrap()[0];
    let recorded = first["chosen_score"].as_f64().unwrap();
    for pair in &pairs {
        assert!(pair["chosen_score"].as_f64().unwrap() > pair["rejected_score"].as_f64().unwrap());
        assert_eq!(pair["judge"], "reward_model:rm");
    }
    assert!(
        (rescored - recorded).abs() < 1e-4,
        "{rescored} vs {recorded}"
    );
}
