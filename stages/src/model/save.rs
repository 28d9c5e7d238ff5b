//! Writing models out in the layouts the Python ecosystem reads: a full model as a
//! Hugging Face folder (config.json, model.safetensors with HF names, tokenizer files
//! copied from the source folder) and a LoRA adapter in PEFT's layout
//! (adapter_config.json + adapter_model.safetensors). Also reads a PEFT adapter back.

use super::causal_lm::CausalLm;
use super::folder::SIDE_FILES;
use super::lora::{LoraConfig, LoraTargets};
use super::{ModelError, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` (LoRA merged in) plus `extra_tensors` (e.g. a head's `score.weight`)
/// as an HF folder in `dest`, copying tokenizer and side files from `tokenizer_source`.
/// `config_overrides` are merged into config.json (e.g. `architectures`, `num_labels`).
pub fn save_model_folder(
    model: &CausalLm,
    dest: &Path,
    tokenizer_source: Option<&Path>,
    extra_tensors: &[(String, Tensor)],
    config_overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| ModelError::io(dest, e))?;
    let mut config = serde_json::to_value(&model.config)
        .map_err(|e| ModelError::Invalid(format!("config: {e}")))?;
    if let serde_json::Value::Object(map) = &mut config {
        for (key, value) in config_overrides {
            map.insert(key.clone(), value.clone());
        }
    }
    write_json(&dest.join("config.json"), &config)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, tensor) in model
        .named_weights(true)?
        .into_iter()
        .chain(extra_tensors.iter().cloned())
    {
        tensors.insert(name, tensor.to_device(&Device::Cpu)?.contiguous()?);
    }
    let weights_path = dest.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path).map_err(|e| {
        ModelError::Invalid(format!("{}: cannot write: {e}", weights_path.display()))
    })?;
    if let Some(source) = tokenizer_source {
        for name in SIDE_FILES {
            let from = source.join(name);
            if from.exists() {
                std::fs::copy(&from, dest.join(name)).map_err(|e| ModelError::io(&from, e))?;
            }
        }
    }
    Ok(())
}

/// Writes the model's LoRA adapters in PEFT's layout. `base_model` goes into
/// `base_model_name_or_path` (rlhf writes the base model's artifact digest there).
pub fn save_lora_adapter(model: &CausalLm, dest: &Path, base_model: &str) -> Result<()> {
    let config = model
        .lora
        .as_ref()
        .ok_or_else(|| ModelError::Invalid("the model has no LoRA adapters to save".into()))?;
    std::fs::create_dir_all(dest).map_err(|e| ModelError::io(dest, e))?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets.modules()?,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    write_json(&dest.join("adapter_config.json"), &adapter_config)?;
    let mut tensors = HashMap::new();
    for (name, tensor) in model.lora_tensors() {
        tensors.insert(name, tensor.to_device(&Device::Cpu)?.contiguous()?);
    }
    let path = dest.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| ModelError::Invalid(format!("{}: cannot write: {e}", path.display())))
}

/// Reads a PEFT adapter folder's config as a [`LoraConfig`].
pub fn read_adapter_config(folder: &Path) -> Result<LoraConfig> {
    let path = folder.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
    let peft_type = value
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(ModelError::Unsupported(format!(
            "{}: peft_type `{peft_type}` (only LORA)",
            path.display()
        )));
    }
    let targets = match value.get("target_modules") {
        Some(serde_json::Value::String(s)) => LoraTargets::All(s.clone()),
        Some(serde_json::Value::Array(items)) => LoraTargets::Modules(
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        _ => {
            return Err(ModelError::Invalid(format!(
                "{}: `target_modules` is missing",
                path.display()
            )))
        }
    };
    let rank = value.get("r").and_then(|v| v.as_u64()).unwrap_or(8) as usize;
    Ok(LoraConfig {
        r: rank,
        alpha: value
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .unwrap_or(8.0),
        dropout: value
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        targets,
        use_rslora: value
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
    })
}

/// Attaches the PEFT adapter in `folder` to `model` (trainable when `varmap` is given).
pub fn load_lora_adapter(
    model: &mut CausalLm,
    folder: &Path,
    varmap: Option<&VarMap>,
) -> Result<()> {
    let config = read_adapter_config(folder)?;
    let path = folder.join("adapter_model.safetensors");
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path,
            hint: "a PEFT adapter folder needs adapter_model.safetensors".into(),
        });
    }
    let tensors = candle_core::safetensors::load(&path, model.device()).map_err(|e| {
        ModelError::Invalid(format!("{}: cannot read safetensors: {e}", path.display()))
    })?;
    model.attach_lora_tensors(&config, &tensors, varmap)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::Invalid(format!("{e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}
