//! Model folder metadata deserialised straight from the Hugging Face files, with HF
//! field names: `config.json` (Llama and Qwen2), `tokenizer_config.json` and
//! `generation_config.json`. Unknown fields are kept so a saved folder round-trips.

use super::ModelError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `config.json` of a Llama-family causal LM. Field names are transformers' own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama` or `qwen2` (Qwen2 always has q/k/v biases).
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouped-query attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 write RoPE's base here; transformers 5 in `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Llama: bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Qwen2: a sliding window is not supported; `true` here is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<serde_json::Value>,
    /// Every other field, written back unchanged on save.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

/// How RoPE frequencies are rescaled (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::io(path, source))?;
        let config: LlamaConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias (always for Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether o_proj carries a bias (Llama's `attention_bias`; never for Qwen2).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// RoPE base: top-level `rope_theta` or `rope_parameters.rope_theta`; 10000 otherwise.
    pub fn rope_theta(&self) -> f64 {
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64);
        self.rope_theta.or(nested).unwrap_or(10000.0)
    }

    /// The RoPE scaling in force; an unsupported variant is an error naming it.
    pub fn rope_scaling(&self) -> Result<RopeScaling, ModelError> {
        let spec = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(v), _) if !v.is_null() => v,
            (_, Some(v)) if !v.is_null() => v,
            _ => return Ok(RopeScaling::Default),
        };
        let kind = spec
            .get("rope_type")
            .or_else(|| spec.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> Result<f64, ModelError> {
            spec.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| {
                    ModelError::Unsupported(format!(
                        "rope scaling `{kind}` needs a numeric `{key}`"
                    ))
                })
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: number("factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            }),
            other => Err(ModelError::Unsupported(format!(
                "rope scaling type `{other}` (supported: default, linear, llama3)"
            ))),
        }
    }

    /// Rejects configurations this implementation would compute wrongly.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.model_type != "llama" && self.model_type != "qwen2" {
            return Err(ModelError::Unsupported(format!(
                "model_type `{}` (supported: llama, qwen2)",
                self.model_type
            )));
        }
        if self.hidden_act != "silu" {
            return Err(ModelError::Unsupported(format!(
                "hidden_act `{}` (supported: silu)",
                self.hidden_act
            )));
        }
        if self.use_sliding_window == Some(true) {
            return Err(ModelError::Unsupported(
                "use_sliding_window: true (sliding-window attention)".into(),
            ));
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_kv_heads();
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::Unsupported(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            )));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(ModelError::Unsupported(format!(
                "head_dim {} must be even and positive",
                self.head_dim()
            )));
        }
        if let Some(parameters) = &self.rope_parameters {
            if parameters
                .get("partial_rotary_factor")
                .and_then(serde_json::Value::as_f64)
                .is_some_and(|f| f != 1.0)
            {
                return Err(ModelError::Unsupported(
                    "rope partial_rotary_factor other than 1".into(),
                ));
            }
        }
        self.rope_scaling()?;
        Ok(())
    }

    /// The token ids listed under `eos_token_id` (a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        token_id_list(self.eos_token_id.as_ref())
    }
}

/// A config value that is a token id or a list of them.
pub(crate) fn token_id_list(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|id| vec![id as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|id| id as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// `generation_config.json`: the defaults transformers would use for `generate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl GenerationDefaults {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::io(path, source))?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        token_id_list(self.eos_token_id.as_ref())
    }
}
