//! The training kinds (pretrain, sft, reward_model, reference_logprobs, dpo) driven
//! through the registry on a tiny random Llama (hidden 32, 2 layers) with the BENCH.md
//! tokenizer and a few dozen rows of the BENCH.md data, a handful of steps each.

use candle_core::{DType, Device};
use rlhf_engine::context::ArtifactLookup;
use rlhf_engine::metrics::MetricsSink;
use rlhf_engine::{ArtifactKind, InputArtifact, StageContext};
use rlhf_stages::data::row::{write_rows, Row};
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

/// Folders shared by a test: the tiny model, datasets, and everything written.
struct Workspace {
    dir: tempfile::TempDir,
    /// digest → artifact folder, for adapters' base lookups.
    artifacts: BTreeMap<String, PathBuf>,
}

#[derive(Debug)]
struct Ran {
    output: PathBuf,
    metrics: serde_json::Map<String, Value>,
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

impl Workspace {
    /// A tiny random model with the BENCH.md tokenizer and datasets `pretrain`, `sft`,
    /// `prefs`, `eval`, `eval_prefs`; `None` (skip) without ../shared.
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
            ("pretrain", "pretrain.jsonl", 64),
            ("sft", "sft.jsonl", 48),
            ("prefs", "prefs.jsonl", 32),
            ("eval", "eval.jsonl", 8),
            ("eval_prefs", "eval_prefs.jsonl", 8),
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

    /// Runs `kind` with `params`; inputs are (port, artifact folder, kind). `scratch`
    /// names the scratch dir (reuse it to resume); the output goes to `out/<name>`.
    fn run(
        &mut self,
        kind: &str,
        params: Value,
        inputs: &[(&str, PathBuf, ArtifactKind)],
        scratch: &str,
        name: &str,
    ) -> Result<Ran, String> {
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
            ctx = ctx.with_input(
                port,
                InputArtifact {
                    path: path.clone(),
                    kind: Some(*kind),
                    digest,
                    reference: port.to_string(),
                },
            );
        }
        let output = root.join("out").join(name);
        if output.exists() {
            std::fs::remove_dir_all(&output).unwrap();
        }
        std::fs::create_dir_all(&output).unwrap();
        let port = &configured.ports.outputs[0].name;
        ctx = ctx
            .with_output(port, output.clone())
            .with_metrics(MetricsSink::new(Some(output.clone()), None));
        stage
            .run(&configured.params, &mut ctx)
            .map_err(|e| format!("{e} (hint: {:?})", e.hint()))?;
        ctx.metrics.finish().unwrap();
        self.artifacts.insert(digest_of(name), output.clone());
        Ok(Ran {
            output,
            metrics: ctx.metrics.summary().clone(),
        })
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("base")
    }
}

/// A stand-in content digest (these tests do not hash folders).
fn digest_of(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex().to_string()
}

/// Every file of a folder with its bytes, sorted by name.
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

fn sft_params(max_steps: usize) -> Value {
    json!({ "model": "base", "data": "sft", "eval": "eval", "template": "{prompt}",
            "lora": { "r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear" },
            "learning_rate": 1e-3, "batch_size": 4, "max_steps": max_steps, "checkpoint_every": 2 })
}

fn sft_inputs(ws: &Workspace) -> Vec<(&'static str, PathBuf, ArtifactKind)> {
    vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("sft"), ArtifactKind::Dataset),
        ("eval", ws.data("eval"), ArtifactKind::Dataset),
    ]
}

#[test]
fn sft_resumed_from_a_checkpoint_writes_the_same_bytes_as_an_uninterrupted_run() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = sft_inputs(&ws);
    let straight = ws
        .run("sft", sft_params(5), &inputs, "straight", "a")
        .unwrap();
    // A first run leaves checkpoints (steps 2 and 4) in scratch `resumed`; the engine
    // would empty it after a commit, so a second run there resumes at step 4, as after a kill.
    ws.run("sft", sft_params(5), &inputs, "resumed", "b")
        .unwrap();
    let latest = ws.dir.path().join("scratch/resumed/checkpoints/latest");
    assert_eq!(std::fs::read_to_string(&latest).unwrap(), "step-00000004");
    let resumed = ws
        .run("sft", sft_params(5), &inputs, "resumed", "c")
        .unwrap();
    assert_eq!(
        folder_bytes(&straight.output),
        folder_bytes(&resumed.output)
    );
    let lines = std::fs::read_to_string(resumed.output.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("\"loss\"")).count(),
        5,
        "{lines}"
    );
}

#[test]
fn sft_writes_a_peft_adapter_that_names_its_base_by_digest() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = sft_inputs(&ws);
    let ran = ws.run("sft", sft_params(2), &inputs, "s", "sft").unwrap();
    let base: Value =
        serde_json::from_slice(&std::fs::read(ran.output.join("base.json")).unwrap()).unwrap();
    assert_eq!(base["base_model_digest"], digest_of("base"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(ran.output.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4);
    assert!(ran.output.join("adapter_model.safetensors").exists());
    assert!(ran.output.join("tokenizer.json").exists());
    assert!(ran.output.join("template.json").exists());
    for key in [
        "eval_accuracy",
        "eval_accuracy_start",
        "train_loss",
        "steps",
    ] {
        assert!(
            ran.metrics.contains_key(key),
            "{key} missing from {:?}",
            ran.metrics
        );
    }
    assert_eq!(ran.metrics["steps"], 2);
}

#[test]
fn sft_lowers_the_completion_loss_on_its_training_data() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = sft_inputs(&ws);
    let mut params = sft_params(12);
    params["lora"] = Value::Null; // full fine-tuning writes a model folder
    params["learning_rate"] = json!(3e-3);
    params["optimizer"] = json!({ "schedule": "constant" });
    let ran = ws.run("sft", params, &inputs, "s", "sft").unwrap();
    assert!(ran.output.join("model.safetensors").exists());
    let losses: Vec<f64> = std::fs::read_to_string(ran.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect();
    let (first, last) = (
        losses[..3].iter().sum::<f64>(),
        losses[losses.len() - 3..].iter().sum::<f64>(),
    );
    assert!(last < first * 0.92, "losses did not fall: {losses:?}");
}

#[test]
fn sharding_a_batch_leaves_the_losses_of_the_run_unchanged() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = sft_inputs(&ws);
    let losses = |ws: &mut Workspace, shards: usize, tag: &str| -> Vec<f64> {
        let mut params = sft_params(6);
        params["optimizer"] = json!({ "schedule": "constant", "shards": shards });
        // Dropout masks are drawn per shard, so only a dropout-free run is comparable.
        params["lora"]["dropout"] = json!(0.0);
        let ran = ws.run("sft", params, &inputs, tag, "sft").unwrap();
        std::fs::read_to_string(ran.output.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let whole = losses(&mut ws, 1, "one");
    // 3 shards of an odd batch: unequal sizes and token counts, weighted back together.
    let sharded = losses(&mut ws, 3, "three");
    assert_eq!(whole.len(), 6);
    assert_eq!(whole.len(), sharded.len());
    for (a, b) in whole.iter().zip(&sharded) {
        assert!(
            (a - b).abs() < 1e-4 * a.abs().max(1.0),
            "{whole:?} vs {sharded:?}"
        );
    }
    // The weights matter: the loss did move, so equal losses are not trivially equal.
    assert!((whole[0] - whole[5]).abs() > 1e-3, "{whole:?}");
}

#[test]
fn a_non_finite_loss_stops_the_stage_naming_the_step() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("pretrain"), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "base", "data": "pretrain", "learning_rate": 1e30,
                         "batch_size": 8, "max_steps": 6, "optimizer": { "max_grad_norm": null } });
    let error = ws
        .run("pretrain", params, &inputs, "p", "pretrain")
        .unwrap_err();
    assert!(error.contains("at step"), "{error}");
}

#[test]
fn pretrain_writes_a_model_folder_with_its_template() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("pretrain"), ArtifactKind::Dataset),
        ("eval", ws.data("eval"), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "base", "data": "pretrain", "eval": "eval", "template": "{prompt}",
                         "batch_size": 8, "max_steps": 3 });
    let ran = ws
        .run("pretrain", params, &inputs, "p", "pretrain")
        .unwrap();
    let reloaded =
        CausalLm::load(&ran.output, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    assert_eq!(reloaded.config.hidden_size, 32);
    let template = std::fs::read_to_string(ran.output.join("template.json")).unwrap();
    assert!(template.contains("{prompt}"), "{template}");
    assert_eq!(ran.metrics["steps"], 3);
}

#[test]
fn reward_model_folder_loads_as_sequence_classification_with_a_score_head() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("prefs"), ArtifactKind::Dataset),
        ("eval", ws.data("eval_prefs"), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "base", "data": "prefs", "eval": "eval_prefs", "template": "{prompt}",
                         "batch_size": 8, "max_steps": 3 });
    let ran = ws.run("reward_model", params, &inputs, "r", "rm").unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(ran.output.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(config["num_labels"], 1);
    let tensors =
        candle_core::safetensors::load(ran.output.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(tensors["score.weight"].dims(), &[1, 32]);
    // The default log-prob feature saves its learned weight beside the head.
    assert_eq!(tensors["score.logprob_weight"].dims(), &[1]);
    for key in [
        "eval_accuracy",
        "eval_margin",
        "eval_loss",
        "eval_policy_logprob_accuracy",
    ] {
        assert!(
            ran.metrics.contains_key(key),
            "{key} missing from {:?}",
            ran.metrics
        );
    }
}

#[test]
fn dpo_continues_the_sft_adapter_against_precomputed_reference_logprobs() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = sft_inputs(&ws);
    let sft = ws.run("sft", sft_params(2), &inputs, "s", "sft").unwrap();
    let reference = ws
        .run(
            "reference_logprobs",
            json!({ "model": "sft", "data": "prefs" }),
            &[
                ("model", sft.output.clone(), ArtifactKind::Adapter),
                ("data", ws.data("prefs"), ArtifactKind::Dataset),
            ],
            "ref",
            "ref",
        )
        .unwrap();
    assert_eq!(reference.metrics["pairs"], 32);
    let dpo_inputs = vec![
        ("model", sft.output.clone(), ArtifactKind::Adapter),
        ("reference", reference.output.clone(), ArtifactKind::Files),
        ("data", ws.data("prefs"), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "sft", "reference": "ref", "data": "prefs", "batch_size": 8, "max_steps": 2 });
    let dpo = ws.run("dpo", params, &dpo_inputs, "d", "dpo").unwrap();
    // At step 1 the policy is the reference: DPO's loss is log 2 (sigmoid, β h = 0).
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(dpo.output.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let loss = first["loss"].as_f64().unwrap();
    assert!(
        (loss - std::f64::consts::LN_2).abs() < 1e-3,
        "first DPO loss {loss}"
    );
    let base: Value =
        serde_json::from_slice(&std::fs::read(dpo.output.join("base.json")).unwrap()).unwrap();
    assert_eq!(base["base_model_digest"], digest_of("base"));
}

#[test]
fn dpo_refuses_reference_logprobs_of_other_data() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let reference = ws
        .run(
            "reference_logprobs",
            json!({ "model": "base", "data": "prefs" }),
            &[
                ("model", ws.base(), ArtifactKind::Model),
                ("data", ws.data("eval_prefs"), ArtifactKind::Dataset),
            ],
            "ref",
            "ref",
        )
        .unwrap();
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("reference", reference.output.clone(), ArtifactKind::Files),
        ("data", ws.data("prefs"), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "base", "reference": "ref", "data": "prefs", "max_steps": 1 });
    let error = ws.run("dpo", params, &inputs, "d", "dpo").unwrap_err();
    assert!(error.contains("other data"), "{error}");
}

#[test]
fn reward_model_learns_a_separable_preference() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    // Chosen replies are even answers, rejected odd: learnable from the last tokens alone.
    let rows: Vec<Row> = (0..64)
        .map(|i| Row {
            prompt: Some(format!("Q: {i}+{i}=\nA:")),
            chosen: Some(format!(" {}", 2 * i)),
            rejected: Some(format!(" {}", 2 * i + 1)),
            ..Row::default()
        })
        .collect();
    let dir = ws.dir.path().join("data/even");
    std::fs::create_dir_all(&dir).unwrap();
    write_rows(&dir, &rows).unwrap();
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", dir.clone(), ArtifactKind::Dataset),
        ("eval", dir.clone(), ArtifactKind::Dataset),
    ];
    let params = json!({ "model": "base", "data": "even", "eval": "even", "template": "{prompt}",
                         "learning_rate": 3e-3, "batch_size": 16, "epochs": 8 });
    let ran = ws.run("reward_model", params, &inputs, "r", "rm").unwrap();
    let accuracy = ran.metrics["eval_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.9, "{:?}", ran.metrics);
}

/// Mean log-prob of each pair's chosen reply under the model saved in `folder`.
fn chosen_mean_logprob(folder: &Path, rows: &[Row]) -> f32 {
    use rlhf_stages::model::{completion_logprobs, TokenBatch};
    let model = CausalLm::load(folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    let ids = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut total = 0.0;
    for row in rows {
        let prompt = ids(row.prompt.as_deref().unwrap());
        let reply = ids(row.chosen.as_deref().unwrap());
        let sequence = [prompt.as_slice(), reply.as_slice()].concat();
        let mask: Vec<u32> = (0..sequence.len())
            .map(|i| u32::from(i >= prompt.len()))
            .collect();
        let tensor = |v: Vec<u32>| {
            candle_core::Tensor::new(v, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        };
        let batch = TokenBatch {
            attention_mask: tensor(vec![1; sequence.len()]),
            completion_mask: tensor(mask),
            input_ids: tensor(sequence),
        };
        let scored = completion_logprobs(&model, &batch).unwrap();
        let sum: f32 = scored
            .sequence_logprobs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        total += sum / reply.len() as f32;
    }
    total / rows.len() as f32
}

#[test]
fn reward_model_lm_loss_keeps_the_chosen_replies_likely() {
    let Some(mut ws) = Workspace::new() else {
        return;
    };
    let inputs = vec![
        ("model", ws.base(), ArtifactKind::Model),
        ("data", ws.data("prefs"), ArtifactKind::Dataset),
    ];
    let params = |coef: f64| {
        json!({ "model": "base", "data": "prefs", "template": "{prompt}", "learning_rate": 3e-3,
                "batch_size": 8, "max_steps": 4, "lm_loss_coef": coef })
    };
    let plain = ws
        .run("reward_model", params(0.0), &inputs, "a", "rm_plain")
        .unwrap();
    let regularised = ws
        .run("reward_model", params(5.0), &inputs, "b", "rm_lm")
        .unwrap();
    let rows = bench_rows("prefs.jsonl", 32).unwrap();
    let (plain, regularised) = (
        chosen_mean_logprob(&plain.output, &rows),
        chosen_mean_logprob(&regularised.output, &rows),
    );
    let base = chosen_mean_logprob(&ws.base(), &rows);
    assert!(
        regularised > plain + 0.1,
        "{regularised} vs {plain}, base {base}"
    );
}

#[test]
fn reward_model_refuses_a_negative_lm_loss_coef() {
    let params: rlhf_stages::kinds::reward_model::RewardModelParams =
        serde_json::from_value(json!({ "model": "base", "data": "prefs", "lm_loss_coef": -1.0 }))
            .unwrap();
    let error =
        <rlhf_stages::kinds::reward_model::RewardModelStage as rlhf_engine::Stage>::ports(&params)
            .unwrap_err();
    assert_eq!(error.param.as_deref(), Some("lm_loss_coef"));
    assert!(error.message.contains("≥ 0"), "{}", error.message);
}
