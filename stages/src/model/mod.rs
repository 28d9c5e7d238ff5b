//! Causal language models: Llama-family architectures (Llama, Qwen2) loaded from
//! Hugging Face folders, LoRA, scalar heads, teacher-forced log-probs and KV-cache
//! generation.
//!
//! Conventions used everywhere in this module:
//! - **Right padding** for training and scoring: a batch is `input_ids (b, t)` with
//!   real tokens first and pad tokens after them, `attention_mask (b, t)` 1 on real
//!   tokens. Generation takes unpadded prompts and pads internally (left) itself.
//! - Base weights are plain tensors (frozen by construction). Trainable tensors (LoRA
//!   A/B, heads, or every weight under full fine-tuning) are `Var`s of a
//!   [`candle_nn::VarMap`] that the caller hands to the optimiser.
//! - candle's fused ops drop gradients (../shared/NOTES.md), so every op here is either
//!   an explicit, differentiable composition or one of our own [`fused`] ops, which
//!   carry a hand-written backward (tested against the composition they replace).

pub mod causal_lm;
pub mod config;
pub mod folder;
pub mod fused;
pub mod generate;
pub mod heads;
pub mod kv_cache;
pub mod layers;
pub mod logprobs;
pub mod lora;
pub mod packing;
pub mod rope;
pub mod save;
pub mod tokenizer;
pub mod weight_grads;
pub mod weights;

pub use causal_lm::{CausalLm, Trainability};
pub use config::{GenerationDefaults, LlamaConfig, RopeScaling};
pub use folder::ModelFolder;
pub use generate::{generate, generate_rows, GenerationOutput, GenerationSettings};
pub use heads::{RewardHead, ScalarHead, ScalarHeadKind};
pub use logprobs::{
    completion_logprobs, token_entropy, token_logprobs, CompletionLogprobs, TokenBatch,
};
pub use lora::{LoraConfig, LoraTargets};
pub use packing::{hidden_states_sharing_prompts, packed_hidden_states};
pub use save::{load_lora_adapter, save_lora_adapter, save_model_folder};
pub use tokenizer::ModelTokenizer;

use std::path::{Path, PathBuf};

/// Everything that can go wrong loading, running or saving a model. Each variant
/// names the file, tensor or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is missing\nhint: {hint}")]
    MissingFile { path: PathBuf, hint: String },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A tiny config for the unit tests of this module: hidden 32, 2 layers, 4 query heads
/// sharing 2 KV heads, vocab 64; `model_type` "llama" or "qwen2" (q/k/v biases).
#[cfg(test)]
pub(crate) fn tiny_test_config(model_type: &str, tie_word_embeddings: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie_word_embeddings, "initializer_range": 0.3
    }))
    .expect("the tiny test config is valid")
}
