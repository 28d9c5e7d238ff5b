//! Saving: a full model folder reloads to the same logits; a LoRA adapter written in
//! PEFT's layout reloads here and, checked once with peft (scripts/fixtures/
//! check_peft_adapter.py → stages/tests/fixtures/model/qwen2-tiny-lora/peft_reference.json),
//! gives peft's logits.

#[path = "model_common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use rlhf_stages::model::save::read_adapter_config;
use rlhf_stages::model::{
    load_lora_adapter, save_lora_adapter, save_model_folder, token_logprobs, CausalLm, LoraConfig,
    LoraTargets, Trainability,
};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

fn load(folder: &std::path::Path) -> CausalLm {
    CausalLm::load(folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap()
}

/// The adapter of the PEFT fixture: seeded PEFT-style A, and B set to a fixed pattern
/// (a zero B would make the check vacuous).
fn adapted_qwen2(varmap: &VarMap) -> CausalLm {
    let mut model = load(&fixtures().join("qwen2-tiny"));
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: LoraTargets::All("all-linear".into()),
        use_rslora: false,
    };
    model.add_lora(&config, varmap, 42).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            let count = var.elem_count() as u32;
            let pattern = ((Tensor::arange(0u32, count, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                * 0.37)
                .unwrap()
                .sin()
                .unwrap()
                * 0.3)
                .unwrap();
            var.set(&pattern.reshape(var.shape()).unwrap()).unwrap();
        }
    }
    model
}

fn logits(model: &CausalLm) -> Tensor {
    let (ids, mask) = padded_batch(&sample_rows());
    model.forward(&ids, Some(&mask), None).unwrap()
}

#[test]
fn saved_model_folder_reloads_with_identical_logits_and_merged_lora() {
    let varmap = VarMap::new();
    let model = adapted_qwen2(&varmap);
    let dir = tempfile::tempdir().unwrap();
    save_model_folder(
        &model,
        dir.path(),
        Some(&fixtures().join("qwen2-tiny")),
        &[],
        &Default::default(),
    )
    .unwrap();
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
    let names =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.contains_key("model.layers.1.self_attn.q_proj.bias"));
    assert!(
        !names.contains_key("lm_head.weight"),
        "tied head is not written"
    );
    assert!(!names.keys().any(|n| n.contains("lora")));
    assert!(max_abs_diff(&logits(&model), &logits(&load(dir.path()))) < 1e-5);
}

#[test]
fn peft_adapter_round_trips_through_its_folder() {
    let varmap = VarMap::new();
    let model = adapted_qwen2(&varmap);
    let dir = tempfile::tempdir().unwrap();
    save_lora_adapter(&model, dir.path(), "qwen2-tiny").unwrap();
    let config = read_adapter_config(dir.path()).unwrap();
    assert_eq!(
        config,
        model
            .lora
            .clone()
            .unwrap_or_default()
            .clone_with_listed_targets()
    );
    let mut reloaded = load(&fixtures().join("qwen2-tiny"));
    let trainable = VarMap::new();
    load_lora_adapter(&mut reloaded, dir.path(), Some(&trainable)).unwrap();
    assert_eq!(trainable.all_vars().len(), varmap.all_vars().len());
    assert_eq!(max_abs_diff(&logits(&model), &logits(&reloaded)), 0.0);
}

trait ListedTargets {
    fn clone_with_listed_targets(&self) -> LoraConfig;
}

impl ListedTargets for LoraConfig {
    /// adapter_config.json lists modules explicitly, as PEFT saves them.
    fn clone_with_listed_targets(&self) -> LoraConfig {
        LoraConfig {
            targets: LoraTargets::Modules(self.targets.modules().unwrap()),
            ..self.clone()
        }
    }
}

#[test]
fn adapter_written_by_rlhf_gives_the_logits_peft_computed_from_it() {
    let varmap = VarMap::new();
    let model = adapted_qwen2(&varmap);
    let committed = fixtures().join("qwen2-tiny-lora");
    if let Ok(out) = std::env::var("RLHF_WRITE_PEFT_FIXTURE") {
        save_lora_adapter(&model, std::path::Path::new(&out), "qwen2-tiny").unwrap();
    }
    // The committed adapter is exactly what the writer produces today.
    let dir = tempfile::tempdir().unwrap();
    save_lora_adapter(&model, dir.path(), "qwen2-tiny").unwrap();
    let ours =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs =
        candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (name, tensor) in &ours {
        assert_eq!(max_abs_diff(tensor, &theirs[name]), 0.0, "{name}");
    }
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(committed.join("peft_reference.json")).unwrap(),
    )
    .unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let tokens: Vec<u32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = tokens.len();
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = model.forward(&input, None, None).unwrap();
        let lp = token_logprobs(
            &out.narrow(1, 0, n - 1).unwrap(),
            &input.narrow(1, 1, n - 1).unwrap(),
        )
        .unwrap();
        let expected: Vec<f32> = case["peft_next_token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let expected = Tensor::new(expected.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert!(max_abs_diff(&lp, &expected) < 1e-4, "peft log-probs");
        let base: Vec<f32> = case["base_next_token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let base = Tensor::new(base.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert!(
            max_abs_diff(&lp, &base) > 1e-2,
            "the adapter must change the model"
        );
    }
}
