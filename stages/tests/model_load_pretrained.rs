//! The `load_pretrained` stage kind: a local folder becomes a validated model artifact,
//! `init:` writes a seeded random model that loads back, and bad params or folders are
//! clear errors.

use candle_core::{DType, Device};
use rlhf_engine::{InputArtifact, Stage, StageContext};
use rlhf_stages::kinds::load_pretrained::{LoadPretrainedParams, LoadPretrainedStage};
use rlhf_stages::model::{CausalLm, Trainability};
use rlhf_stages::testing::shared_path;
use std::path::{Path, PathBuf};

fn params(yaml_like: serde_json::Value) -> LoadPretrainedParams {
    serde_json::from_value(yaml_like).unwrap()
}

fn run(
    params: &LoadPretrainedParams,
    input: Option<(&str, &Path)>,
    seed: u64,
) -> (tempfile::TempDir, Result<(), String>) {
    LoadPretrainedStage::ports(params).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::new(
        "base",
        "load_pretrained",
        seed,
        dir.path().join("scratch"),
        dir.path().join("log"),
    )
    .with_output("model", out);
    if let Some((name, path)) = input {
        let artifact = InputArtifact {
            path: path.to_path_buf(),
            kind: None,
            digest: "0".into(),
            reference: path.display().to_string(),
        };
        ctx = ctx.with_input(name, artifact);
    }
    let result = LoadPretrainedStage::run(params, &mut ctx)
        .map_err(|e| format!("{e} {}", e.hint().unwrap_or("")));
    (dir, result)
}

fn model_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

#[test]
fn local_folder_is_copied_byte_for_byte_after_validation() {
    let Some(folder) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let (dir, result) = run(
        &params(serde_json::json!({"model": folder})),
        Some(("model", &folder)),
        1,
    );
    result.unwrap();
    let out = dir.path().join("out");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(folder.join(file)).unwrap(),
            std::fs::read(out.join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(
        !out.join("reference.json").exists(),
        "only model files are copied"
    );
}

#[test]
fn bf16_dtype_converts_the_weights() {
    let Some(folder) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let (dir, result) = run(
        &params(serde_json::json!({"model": folder, "dtype": "bf16"})),
        Some(("model", &folder)),
        1,
    );
    result.unwrap();
    let tensors =
        candle_core::safetensors::load(dir.path().join("out/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::BF16));
}

#[test]
fn folder_without_tokenizer_is_an_error_naming_the_file() {
    let folder = model_fixture("qwen2-tiny");
    let (_dir, result) = run(
        &params(serde_json::json!({"model": folder})),
        Some(("model", &folder)),
        1,
    );
    let error = result.unwrap_err();
    assert!(
        error.contains("tokenizer.json") && error.contains("stage `base`"),
        "{error}"
    );
}

#[test]
fn unsupported_model_type_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(
            model_fixture("llama-nogqa").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    let config = std::fs::read_to_string(model_fixture("llama-nogqa").join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"llama\"", "\"mistral\""),
    )
    .unwrap();
    let (_out, result) = run(
        &params(serde_json::json!({"model": dir.path()})),
        Some(("model", dir.path())),
        1,
    );
    assert!(result.unwrap_err().contains("model_type `mistral`"));
}

fn init_params(tokenizer: Option<&Path>) -> LoadPretrainedParams {
    let mut init = serde_json::json!({
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64
    });
    match tokenizer {
        Some(path) => init["tokenizer"] = serde_json::json!(path),
        None => init["vocab_size"] = serde_json::json!(100),
    }
    params(serde_json::json!({ "init": init }))
}

#[test]
fn init_writes_a_seeded_random_model_with_the_tokenizer_vocabulary() {
    let Some(tokenizer) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let p = init_params(Some(&tokenizer));
    let (first, result) = run(&p, Some(("tokenizer", &tokenizer)), 7);
    result.unwrap();
    let (again, _) = run(&p, Some(("tokenizer", &tokenizer)), 7);
    let (other, _) = run(&p, Some(("tokenizer", &tokenizer)), 8);
    let bytes =
        |d: &tempfile::TempDir| std::fs::read(d.path().join("out/model.safetensors")).unwrap();
    assert_eq!(bytes(&first), bytes(&again), "same seed, same bytes");
    assert_ne!(bytes(&first), bytes(&other), "the seed matters");
    let out = first.path().join("out");
    assert!(out.join("tokenizer.json").exists() && out.join("generation_config.json").exists());
    let model = CausalLm::load(&out, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    assert_eq!(model.config.vocab_size, 512);
    assert_eq!(model.config.eos_token_ids(), vec![2]);
}

#[test]
fn init_with_vocab_size_and_no_tokenizer_loads_back() {
    let (dir, result) = run(&init_params(None), None, 3);
    result.unwrap();
    let model = CausalLm::load(
        &dir.path().join("out"),
        DType::F32,
        &Device::Cpu,
        Trainability::Frozen,
    )
    .unwrap();
    assert_eq!(
        model.num_parameters().unwrap(),
        2 * 100 * 32 + 2 * (4 * 32 * 32 / 4 * 3 + 3 * 32 * 64 + 2 * 32) + 32
    );
}

#[test]
fn params_need_exactly_one_of_model_and_init() {
    let both = params(
        serde_json::json!({"model": "x", "init": {"hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10}}),
    );
    assert!(LoadPretrainedStage::ports(&both)
        .unwrap_err()
        .message
        .contains("not both"));
    assert!(LoadPretrainedStage::ports(&params(serde_json::json!({}))).is_err());
    let bad_dtype = params(serde_json::json!({"model": "x", "dtype": "f8"}));
    assert_eq!(
        LoadPretrainedStage::ports(&bad_dtype)
            .unwrap_err()
            .param
            .as_deref(),
        Some("dtype")
    );
    let no_vocab = params(
        serde_json::json!({"init": {"hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8}}),
    );
    assert!(LoadPretrainedStage::ports(&no_vocab)
        .unwrap_err()
        .message
        .contains("vocab_size"));
}
