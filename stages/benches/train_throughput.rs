//! Throughput of the training hot loop on the BENCH.md model (Llama hidden 256, 4 layers,
//! 8/4 heads, intermediate 688, vocab 512): forward, backward and AdamW step timed apart,
//! for pretraining (full), SFT (LoRA r 8 all-linear) and pairs (DPO-style, 2B rows).
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p rlhf-stages --bench train_throughput
//!
//! Prints tokens/s (real tokens, padding excluded) and the split of a step's time.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rlhf_stages::algo::lm::masked_token_cross_entropy;
use rlhf_stages::algo::optim::{AdamW, AdamWConfig};
use rlhf_stages::data::batch::collate_texts;
use rlhf_stages::model::{CausalLm, LlamaConfig, LoraConfig, Trainability};
use std::time::Instant;

fn bench_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "vocab_size": 512, "max_position_embeddings": 256
    }))
    .expect("config")
}

/// `rows` sequences of lengths spread like the pretraining lines (12..=40 tokens).
fn texts(rows: usize) -> Vec<Vec<u32>> {
    (0..rows)
        .map(|i| {
            (0..(12 + (i * 7) % 29))
                .map(|t| ((i * 31 + t * 17) % 509 + 3) as u32)
                .collect()
        })
        .collect()
}

fn run(name: &str, model: &CausalLm, varmap: &VarMap, rows: usize, steps: usize) {
    let mut optimizer = AdamW::from_var_map(varmap, AdamWConfig::default()).expect("optimiser");
    let data = texts(rows);
    let refs: Vec<&[u32]> = data.iter().map(Vec::as_slice).collect();
    let batch = collate_texts(&refs, 0);
    let ids = batch.input_ids_tensor(&Device::Cpu).expect("ids");
    let mask = batch.attention_mask_tensor(&Device::Cpu).expect("mask");
    let time = batch.seq_len;
    let (mut forward, mut backward, mut step) = (0.0, 0.0, 0.0);
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        let logits = model.forward(&ids, Some(&mask), None).expect("forward"); // (b, t, v)
        let loss = masked_token_cross_entropy(
            &logits.narrow(1, 0, time - 1).expect("shift"),
            &ids.narrow(1, 1, time - 1).expect("shift"),
            &mask.narrow(1, 1, time - 1).expect("shift"),
        )
        .expect("loss");
        let _ = loss.to_scalar::<f32>().expect("loss");
        let t1 = Instant::now();
        let grads = loss.backward().expect("backward");
        let t2 = Instant::now();
        optimizer.step(&grads).expect("step");
        let t3 = Instant::now();
        if i > 0 {
            forward += (t1 - t0).as_secs_f64();
            backward += (t2 - t1).as_secs_f64();
            step += (t3 - t2).as_secs_f64();
        }
    }
    let total = forward + backward + step;
    let tokens = (batch.real_tokens() * steps) as f64;
    println!(
        "{name}: {:.0} tokens/s, {:.1} rows/s, {:.3} s/step (forward {:.0}%, backward {:.0}%, adamw {:.0}%), batch {rows}x{time}",
        tokens / total,
        (rows * steps) as f64 / total,
        total / steps as f64,
        100.0 * forward / total,
        100.0 * backward / total,
        100.0 * step / total
    );
}

fn main() {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "(all)".into());
    println!("threads: {threads}");
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let varmap = VarMap::new();
    let full = CausalLm::random(
        bench_config(),
        0,
        DType::F32,
        &Device::Cpu,
        Trainability::Full(&varmap),
    )
    .expect("model");
    run("pretrain (full, batch 32)", &full, &varmap, 32, steps);
    let lora_vars = VarMap::new();
    let mut lora = CausalLm::random(
        bench_config(),
        0,
        DType::F32,
        &Device::Cpu,
        Trainability::Frozen,
    )
    .expect("model");
    let config = LoraConfig {
        r: 8,
        alpha: 16.0,
        ..LoraConfig::default()
    };
    lora.add_lora(&config, &lora_vars, 0).expect("lora");
    run(
        "sft (LoRA r8 all-linear, batch 16)",
        &lora,
        &lora_vars,
        16,
        steps,
    );
    run("pairs (LoRA, 2x16 rows)", &lora, &lora_vars, 32, steps);
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
