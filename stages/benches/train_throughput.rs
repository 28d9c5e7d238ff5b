//! Throughput of the training hot loop on the BENCH.md model (Llama hidden 256, 4 layers,
//! 8/4 heads, intermediate 688, vocab 512): forward, backward and AdamW step timed apart,
//! for pretraining (full), SFT (LoRA r 8 all-linear) and pairs (DPO-style, 2B rows).
//!
//!     RAYON_NUM_THREADS=2 SHARDS=2 cargo bench -p rlhf-stages --bench train_throughput
//!
//! Prints tokens/s (real tokens, padding excluded) and the split of a step's time. The
//! step is the training loop's: the batch cut into SHARDS data-parallel shards.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rlhf_stages::algo::lm::masked_token_cross_entropy;
use rlhf_stages::algo::optim::{AdamW, AdamWConfig};
use rlhf_stages::data::batch::collate_texts;
use rlhf_stages::model::{CausalLm, LlamaConfig, LoraConfig, Trainability};
use rlhf_stages::parallel::{map_shards, split_into_shards, weighted_backward};
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

/// One shard of the batch, collated.
struct Shard {
    ids: Tensor,
    mask: Tensor,
    time: usize,
    real_tokens: usize,
}

fn run(name: &str, model: &CausalLm, varmap: &VarMap, rows: usize, steps: usize, shards: usize) {
    let mut optimizer = AdamW::from_var_map(varmap, AdamWConfig::default()).expect("optimiser");
    let vars = varmap.all_vars();
    let data = texts(rows);
    let parts: Vec<Shard> = split_into_shards(&data, shards)
        .into_iter()
        .map(|part| {
            let refs: Vec<&[u32]> = part.iter().map(Vec::as_slice).collect();
            let batch = collate_texts(&refs, 0);
            Shard {
                ids: batch.input_ids_tensor(&Device::Cpu).expect("ids"),
                mask: batch.attention_mask_tensor(&Device::Cpu).expect("mask"),
                time: batch.seq_len,
                real_tokens: batch.real_tokens(),
            }
        })
        .collect();
    let (mut passes, mut step) = (0.0, 0.0);
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        // As the training loop does: every shard's forward, then every shard's backward.
        let losses = map_shards(parts.len(), |k| {
            let shard = &parts[k];
            let t = shard.time;
            let logits = model
                .forward(&shard.ids, Some(&shard.mask), None)
                .expect("forward");
            let loss = masked_token_cross_entropy(
                &logits.narrow(1, 0, t - 1).expect("shift"),
                &shard.ids.narrow(1, 1, t - 1).expect("shift"),
                &shard.mask.narrow(1, 1, t - 1).expect("shift"),
            )
            .expect("loss");
            (loss, 1.0 / parts.len() as f64)
        });
        let grads = weighted_backward(&losses, &vars).expect("backward");
        let t1 = Instant::now();
        optimizer.step(&grads).expect("step");
        let t2 = Instant::now();
        if i > 0 {
            passes += (t1 - t0).as_secs_f64();
            step += (t2 - t1).as_secs_f64();
        }
    }
    let total = passes + step;
    let tokens = (parts.iter().map(|p| p.real_tokens).sum::<usize>() * steps) as f64;
    println!(
        "{name}: {:.0} tokens/s, {:.1} rows/s, {:.3} s/step (forward+backward {:.0}%, adamw {:.0}%), {} shard(s)",
        tokens / total,
        (rows * steps) as f64 / total,
        total / steps as f64,
        100.0 * passes / total,
        100.0 * step / total,
        parts.len()
    );
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // As `rlhf run` does: shards in parallel, candle's per-op threads off (see
    // rlhf_stages::parallel); RAYON_NUM_THREADS=1 measures one thread.
    let threads = env_number("RAYON_NUM_THREADS", 2);
    let shards = env_number("SHARDS", 2);
    rlhf_stages::parallel::use_data_parallel_threads(threads).expect("thread pool");
    println!("threads: {threads}, shards: {shards}");
    let steps = env_number("STEPS", 5);
    let varmap = VarMap::new();
    let full = CausalLm::random(
        bench_config(),
        0,
        DType::F32,
        &Device::Cpu,
        Trainability::Full(&varmap),
    )
    .expect("model");
    run(
        "pretrain (full, batch 32)",
        &full,
        &varmap,
        32,
        steps,
        shards,
    );
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
        shards,
    );
    run(
        "pairs (LoRA, 2x16 rows)",
        &lora,
        &lora_vars,
        32,
        steps,
        shards,
    );
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
