//! The `evaluate` stage kind on the tiny-llama fixture: perplexity through the stage's
//! own scoring path equals the transformers reference, and a full run over a base
//! model, a LoRA adapter and a reward model writes sane, deterministic metrics.
//!
//! ROUGE parity with rouge-score (60 pairs) is checked in algo_eval_rouge.rs; the
//! reference perplexities come from `../shared/fixtures/tiny-llama/reference.json`
//! (transformers, see the fixture's make_fixture.py).

use candle_core::{DType, Device, Tensor};
use rlhf_engine::context::ArtifactLookup;
use rlhf_engine::metrics::MetricsSink;
use rlhf_engine::progress::Progress;
use rlhf_engine::{InputArtifact, Stage, StageContext};
use rlhf_stages::data::batch::EncodedExample;
use rlhf_stages::data::template::PromptTemplate;
use rlhf_stages::kinds::evaluate::scoring::completion_nll;
use rlhf_stages::kinds::evaluate::{EvaluateParams, EvaluateStage};
use rlhf_stages::model::heads::SCORE_WEIGHT;
use rlhf_stages::model::{save_lora_adapter, CausalLm, LoraConfig, LoraTargets, Trainability};
use rlhf_stages::testing::shared_path;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn reference(folder: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap()).unwrap()
}

fn quiet_task() -> rlhf_engine::progress::Task {
    Progress::quiet().task("test", 0)
}

#[test]
fn completion_nll_of_fixture_texts_gives_the_transformers_perplexity() {
    let Some(folder) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let reference = reference(&folder);
    let model = CausalLm::load(&folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    let examples: Vec<EncodedExample> = texts
        .iter()
        .map(|t| {
            let ids: Vec<u32> = serde_json::from_value(t["token_ids"].clone()).unwrap();
            // The bos is the prompt: every later token is scored, as in the reference.
            EncodedExample {
                prompt: ids[..1].to_vec(),
                completion: ids[1..].to_vec(),
            }
        })
        .collect();
    let (mut total_nll, mut total_tokens) = (0.0, 0.0);
    for (text, example) in texts.iter().zip(&examples) {
        let single = completion_nll(
            &model,
            std::slice::from_ref(example),
            0,
            4,
            &mut quiet_task(),
        )
        .unwrap();
        let expected = text["perplexity"].as_f64().unwrap();
        let actual = single.perplexity().unwrap();
        assert!(
            (actual / expected - 1.0).abs() < 1e-4,
            "{actual} vs transformers {expected}"
        );
        total_nll += text["mean_nll"].as_f64().unwrap() * (example.completion.len() as f64);
        total_tokens += example.completion.len() as f64;
    }
    // All texts in right-padded batches of 3 (so one batch is ragged): the pooled value.
    let pooled = completion_nll(&model, &examples, 0, 3, &mut quiet_task()).unwrap();
    let expected = (total_nll / total_tokens).exp();
    assert_eq!(pooled.tokens, total_tokens);
    assert!((pooled.perplexity().unwrap() / expected - 1.0).abs() < 1e-4);
}

/// Maps digests to folders, as the cache does for the engine.
struct Lookup(HashMap<String, PathBuf>);

impl ArtifactLookup for Lookup {
    fn artifact_path(&self, digest: &str) -> Option<PathBuf> {
        self.0.get(digest).cloned()
    }
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "reference.json" && name != "make_fixture.py" {
            std::fs::copy(entry.path(), to.join(name)).unwrap();
        }
    }
}

/// A model artifact: the fixture with a chat template that puts bos before the text,
/// so a row `{prompt: "", completion: TEXT}` scores exactly the reference's tokens.
fn model_artifact(fixture: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("base");
    copy_folder(fixture, &out);
    PromptTemplate::Chat {
        chat_template: "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% else %}{{ m.content }}{% endif %}{% endfor %}".into(),
        bos_token: Some("<|bos|>".into()),
        eos_token: Some("<|eos|>".into()),
        system: None,
    }
    .save(&out)
    .unwrap();
    out
}

/// A LoRA adapter on `base` with fixed non-zero B, so it changes the model.
fn adapter_artifact(base: &Path, dir: &Path, base_digest: &str) -> PathBuf {
    let out = dir.join("sft");
    let mut model = CausalLm::load(base, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
    };
    model
        .add_lora(&config, &candle_nn::VarMap::new(), 3)
        .unwrap();
    save_lora_adapter(&model, &out, base_digest).unwrap();
    let path = out.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let perturbed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("lora_B") {
                // Fixed pseudo-random values in [-0.5, 0.5): the same adapter every run.
                let values: Vec<f32> = (0..t.elem_count())
                    .map(|i| ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5)
                    .collect();
                Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&perturbed, &path).unwrap();
    out
}

/// A reward model: the fixture's weights plus a `score.weight` head.
fn reward_artifact(fixture: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("rm");
    copy_folder(fixture, &out);
    let path = out.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let head: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.05)
        .collect();
    tensors.insert(
        SCORE_WEIGHT.into(),
        Tensor::from_vec(head, (1, 64), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    out
}

fn dataset(dir: &Path, rows: &[Value]) -> PathBuf {
    let out = dir.join("data");
    std::fs::create_dir_all(&out).unwrap();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(out.join("data.jsonl"), text).unwrap();
    out
}

fn input(path: &Path, digest: &str) -> InputArtifact {
    InputArtifact {
        path: path.to_path_buf(),
        kind: None,
        digest: digest.into(),
        reference: digest.into(),
    }
}

/// Runs the stage; returns metrics.json and predictions.jsonl as written.
fn run_stage(
    params: Value,
    inputs: &[(&str, &Path)],
    lookup: HashMap<String, PathBuf>,
) -> Result<(Value, String), String> {
    let params: EvaluateParams = serde_json::from_value(params).unwrap();
    EvaluateStage::ports(&params).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::new(
        "eval",
        "evaluate",
        7,
        dir.path().join("scratch"),
        dir.path().join("log"),
    )
    .with_output("metrics", out.clone())
    .with_metrics(MetricsSink::new(Some(out.clone()), None))
    .with_lookup(Box::new(Lookup(lookup)));
    for (name, path) in inputs {
        ctx = ctx.with_input(name, input(path, name));
    }
    EvaluateStage::run(&params, &mut ctx).map_err(|e| format!("{e} {}", e.hint().unwrap_or("")))?;
    ctx.metrics.finish().unwrap();
    let metrics =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap_or_default();
    Ok((metrics, predictions))
}

#[test]
fn perplexity_through_the_stage_equals_the_fixture_reference() {
    let Some(fixture) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let reference = reference(&fixture);
    let dir = tempfile::tempdir().unwrap();
    let base = model_artifact(&fixture, dir.path());
    let texts = reference["texts"].as_array().unwrap();
    let rows: Vec<Value> = texts
        .iter()
        .map(|t| json!({"prompt": "", "completion": t["text"]}))
        .collect();
    let data = dataset(dir.path(), &rows);
    let (metrics, _) = run_stage(
        json!({"models": ["base"], "data": "d", "metrics": ["perplexity"], "batch_size": 3}),
        &[("models.0", &base), ("data", &data)],
        HashMap::new(),
    )
    .unwrap();
    let (mut nll, mut tokens) = (0.0, 0.0);
    for text in texts {
        let n = text["next_token_logprobs"].as_array().unwrap().len() as f64;
        nll += text["mean_nll"].as_f64().unwrap() * n;
        tokens += n;
    }
    let expected = (nll / tokens).exp();
    let actual = metrics["base"]["perplexity"].as_f64().unwrap();
    assert!(
        (actual / expected - 1.0).abs() < 1e-4,
        "{actual} vs transformers {expected}"
    );
    assert_eq!(metrics["base"]["n"], json!(texts.len()));
}

fn arithmetic_rows() -> Vec<Value> {
    [
        ("12+7", "19"),
        ("3+4", "7"),
        ("20-5", "15"),
        ("8+8", "16"),
        ("9-2", "7"),
    ]
    .iter()
    .map(|(q, a)| json!({"prompt": format!("Q: {q}=\nA: "), "completion": a, "answer": a}))
    .collect()
}

#[test]
fn every_metric_for_base_adapter_and_reward_model_is_sane_and_deterministic() {
    let Some(fixture) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = model_artifact(&fixture, dir.path());
    let sft = adapter_artifact(&base, dir.path(), "digest-of-base");
    let rm = reward_artifact(&fixture, dir.path());
    let rows = arithmetic_rows();
    let data = dataset(dir.path(), &rows);
    let params = json!({
        "models": ["base", "sft"], "data": "d", "reward": "rm", "reference": "base", "baseline": "base",
        "metrics": ["rouge", "perplexity", "reward", "accuracy", "kl", "win_rate"],
        "max_new_tokens": 6, "batch_size": 2,
    });
    let inputs: Vec<(&str, &Path)> = vec![
        ("models.0", &base),
        ("models.1", &sft),
        ("data", &data),
        ("reward", &rm),
        ("reference", &base),
        ("baseline", &base),
    ];
    let lookup = HashMap::from([("digest-of-base".to_string(), base.clone())]);
    let (metrics, predictions) = run_stage(params.clone(), &inputs, lookup.clone()).unwrap();

    let keys = [
        "accuracy",
        "kl",
        "n",
        "perplexity",
        "reward_mean",
        "rouge1",
        "rouge2",
        "rougeL",
        "win_rate",
    ];
    for model in ["base", "sft"] {
        let m = metrics[model].as_object().unwrap();
        assert_eq!(
            m.keys().map(String::as_str).collect::<Vec<_>>(),
            keys,
            "{model}"
        );
        assert_eq!(m["n"], json!(rows.len()));
        assert!(m["perplexity"].as_f64().unwrap() > 1.0);
        for unit in ["accuracy", "rouge1", "rouge2", "rougeL", "win_rate"] {
            let v = m[unit].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{model}.{unit} = {v}");
        }
        assert!(m["reward_mean"].as_f64().unwrap().is_finite());
    }
    // The base model against itself: identical log-probs and rewards.
    assert_eq!(metrics["base"]["kl"], json!(0.0));
    assert_eq!(metrics["base"]["win_rate"], json!(0.5));
    // The adapter changes the model, so its perplexity and KL differ from the base's.
    assert_ne!(metrics["sft"]["kl"], json!(0.0));
    assert_ne!(metrics["sft"]["perplexity"], metrics["base"]["perplexity"]);
    assert_eq!(predictions.lines().count(), 2 * rows.len());
    let first: Value = serde_json::from_str(predictions.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["model"].as_str(), first["index"].as_u64()),
        (Some("base"), Some(0))
    );
    assert!(first["reward"].as_f64().is_some() && first["prediction"].is_string());

    let (again, predictions_again) = run_stage(params, &inputs, lookup).unwrap();
    assert_eq!(metrics, again, "metrics must not change between runs");
    assert_eq!(predictions, predictions_again);
}

#[test]
fn adapter_whose_base_is_not_cached_fails_with_a_hint() {
    let Some(fixture) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = model_artifact(&fixture, dir.path());
    let sft = adapter_artifact(&base, dir.path(), "missing-digest");
    let data = dataset(dir.path(), &arithmetic_rows());
    let error = run_stage(
        json!({"models": ["sft"], "data": "d", "metrics": ["rouge"], "max_new_tokens": 2}),
        &[("models.0", &sft), ("data", &data)],
        HashMap::new(),
    )
    .unwrap_err();
    assert!(
        error.contains("missing-digest")
            && error.contains("stage `eval`")
            && error.contains("rlhf run"),
        "{error}"
    );
}

#[test]
fn predictions_file_is_scored_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("preds.jsonl");
    let lines = [
        json!({"prediction": "The cat sat on the mat.", "reference": "the cat sat on the mat", "answer": "The cat sat on the mat."}),
        json!({"prediction": "dogs bark", "reference": "birds sing", "answer": "no"}),
        json!({"prediction": "42\nbecause", "reference": "42", "answer": "42"}),
    ];
    std::fs::write(
        &file,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let (metrics, _) = run_stage(
        json!({"predictions": "preds.jsonl", "metrics": ["rouge", "accuracy"]}),
        &[("predictions", &file)],
        HashMap::new(),
    )
    .unwrap();
    let m = &metrics["predictions"];
    // Row 1 matches exactly (case and punctuation are dropped), row 2 shares nothing,
    // row 3 has recall 1 and precision 1/2 ("42", "because"): F = 2/3.
    let expected = (1.0 + 0.0 + 2.0 / 3.0) / 3.0;
    assert!((m["rouge1"].as_f64().unwrap() - expected).abs() < 1e-12);
    assert!((m["rougeL"].as_f64().unwrap() - expected).abs() < 1e-12);
    assert!(
        (m["rouge2"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12,
        "only row 1 has bigrams in common"
    );
    assert!(
        (m["accuracy"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12,
        "rows 1 and 3 match their answers"
    );
    assert_eq!(m["n"], json!(3));
}

#[test]
fn metrics_that_need_an_input_are_refused_before_running() {
    let check = |params: Value| {
        let params: EvaluateParams = serde_json::from_value(params).unwrap();
        EvaluateStage::ports(&params)
            .map(|_| ())
            .map_err(|e| (e.param.clone(), e.to_string()))
    };
    let (param, message) =
        check(json!({"models": ["sft"], "data": "d", "metrics": ["kl"]})).unwrap_err();
    assert_eq!(param.as_deref(), Some("reference"), "{message}");
    let (param, _) =
        check(json!({"models": ["sft"], "data": "d", "metrics": ["win_rate"], "reward": "rm"}))
            .unwrap_err();
    assert_eq!(param.as_deref(), Some("baseline"));
    let (param, _) =
        check(json!({"predictions": "p.jsonl", "metrics": ["perplexity"]})).unwrap_err();
    assert_eq!(param.as_deref(), Some("metrics"));
    let (param, _) = check(json!({"models": ["a", "a"], "data": "d"})).unwrap_err();
    assert_eq!(param.as_deref(), Some("models"));
    assert!(
        check(json!({"models": ["sft"], "data": "d", "metrics": ["kl"], "reference": "base"}))
            .is_ok()
    );
}

#[test]
fn win_rate_against_a_baseline_outside_models_equals_the_in_list_result() {
    let Some(fixture) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = model_artifact(&fixture, dir.path());
    let sft = adapter_artifact(&base, dir.path(), "digest-of-base");
    let rm = reward_artifact(&fixture, dir.path());
    let data = dataset(dir.path(), &arithmetic_rows());
    let lookup = HashMap::from([("digest-of-base".to_string(), base.clone())]);
    let common = json!({"data": "d", "reward": "rm", "baseline": "base", "metrics": ["reward", "win_rate"], "max_new_tokens": 6, "batch_size": 2});
    let with = |models: Value| {
        let mut params = common.clone();
        params["models"] = models;
        params
    };
    // The baseline evaluated alongside (its rewards reused) ...
    let (both, _) = run_stage(
        with(json!(["base", "sft"])),
        &[
            ("models.0", &base),
            ("models.1", &sft),
            ("data", &data),
            ("reward", &rm),
            ("baseline", &base),
        ],
        lookup.clone(),
    )
    .unwrap();
    // ... or only as a baseline (generated and judged separately): the same win rate.
    let (alone, predictions) = run_stage(
        with(json!(["sft"])),
        &[
            ("models.0", &sft),
            ("data", &data),
            ("reward", &rm),
            ("baseline", &base),
        ],
        lookup,
    )
    .unwrap();
    assert_eq!(alone["sft"]["win_rate"], both["sft"]["win_rate"]);
    assert_eq!(alone["sft"]["reward_mean"], both["sft"]["reward_mean"]);
    assert!(
        alone.get("base").is_none(),
        "the baseline is not an evaluated model"
    );
    assert_eq!(
        predictions.lines().count(),
        5,
        "predictions only for evaluated models"
    );
    let wins = both["sft"]["win_rate"].as_f64().unwrap();
    assert!(
        wins > 0.0 && wins < 1.0,
        "the adapter wins some rows and loses others: {wins}"
    );
}

#[test]
fn template_param_overrides_the_models_template_for_generation() {
    let Some(fixture) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = model_artifact(&fixture, dir.path());
    let data = dataset(dir.path(), &arithmetic_rows());
    let predictions = |template: Option<&str>| {
        let mut params =
            json!({"models": ["base"], "data": "d", "metrics": ["rouge"], "max_new_tokens": 5});
        if let Some(template) = template {
            params["template"] = json!(template);
        }
        let (_, predictions) = run_stage(
            params,
            &[("models.0", &base), ("data", &data)],
            HashMap::new(),
        )
        .unwrap();
        predictions
    };
    let own = predictions(None);
    let plain = predictions(Some("{prompt}"));
    let other = predictions(Some("Question: {prompt}"));
    assert_ne!(
        own, plain,
        "the artifact's chat template (bos first) is replaced"
    );
    assert_ne!(plain, other);
    assert_eq!(plain, predictions(Some("{prompt}")));

    let params: EvaluateParams = serde_json::from_value(
        json!({"models": ["base"], "data": "d", "template": "no placeholder"}),
    )
    .unwrap();
    assert_eq!(
        EvaluateStage::ports(&params).unwrap_err().param.as_deref(),
        Some("template")
    );
}
