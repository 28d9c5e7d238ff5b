//! Small helpers shared by the model tests: a tiny random Llama and batches for it.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rlhf_stages::model::{CausalLm, LlamaConfig, Trainability};

/// A tiny config; `init_std` large enough that logits are far from uniform.
pub fn tiny_config(model_type: &str, heads: usize, kv_heads: usize, tie: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 64,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "initializer_range": 0.3
    }))
    .unwrap()
}

pub fn tiny_model(seed: u64) -> CausalLm {
    CausalLm::random(
        tiny_config("llama", 4, 2, false),
        seed,
        DType::F32,
        &Device::Cpu,
        Trainability::Frozen,
    )
    .unwrap()
}

/// A right-padded batch: rows of different lengths, pad id 0.
pub fn padded_batch(rows: &[Vec<u32>]) -> (Tensor, Tensor) {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for row in rows {
        for i in 0..width {
            ids.push(row.get(i).copied().unwrap_or(0));
            mask.push(u32::from(i < row.len()));
        }
    }
    let shape = (rows.len(), width);
    (
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, shape, &Device::Cpu).unwrap(),
    )
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn sample_rows() -> Vec<Vec<u32>> {
    vec![
        vec![1, 5, 9, 13, 2, 7, 30],
        vec![1, 40, 41],
        vec![1, 3, 3, 3, 60, 61, 62, 63, 17],
    ]
}
