//! Throughput of the model core on the BENCH.md model shape (hidden 256, 4 layers,
//! 8 heads, 4 kv heads, intermediate 688, vocab 512; random init): KV-cache generation
//! at batch 1 and 32, and forward+backward (full fine-tuning and LoRA r 8 on all
//! linears). Run with
//!
//!     RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=1 cargo bench -p rlhf-stages --bench model_throughput
//!
//! CANDLE_NUM_THREADS=1 keeps candle's elementwise ops on the calling thread: its
//! worker pool spins at a barrier after every op, and on a shared, busy 2-core machine
//! that spinning took over half the time (measured with perf: 3.7x slower
//! forward+backward). gemm still uses RAYON_NUM_THREADS threads.
//!
//! Tokens count real tokens only (no padding). Each figure is the best of 7 runs
//! (generation) or 3 (forward+backward): the machine is shared, and the best run is
//! the one least disturbed.
//! A filter argument runs only the matching group: `-- generate` or `-- fwd+bwd`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rlhf_stages::model::{
    completion_logprobs, generate, CausalLm, GenerationSettings, LlamaConfig, LoraConfig,
    LoraTargets, TokenBatch, Trainability,
};
use std::time::Instant;

fn bench_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
    }))
    .expect("valid config")
}

fn best_of<T>(runs: usize, mut work: impl FnMut() -> T) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(work());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Prompts shaped like the arithmetic task: 9 to 12 tokens.
fn prompts(batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|i| {
            (0..9 + (i % 4) as u32)
                .map(|j| 3 + (i as u32 * 7 + j * 13) % 500)
                .collect()
        })
        .collect()
}

fn generation(model: &CausalLm, batch: usize, new_tokens: usize) -> f64 {
    let settings = GenerationSettings {
        max_new_tokens: new_tokens,
        temperature: 1.0,
        seed: 1,
        ..GenerationSettings::greedy()
    };
    let prompts = prompts(batch);
    let output = generate(model, &prompts, &settings, None).expect("generate");
    let seconds = best_of(7, || {
        generate(model, &prompts, &settings, None).expect("generate")
    });
    let tokens = (batch * new_tokens) as f64;
    // A digest of the sampled tokens: an optimisation that changes what a seed
    // produces shows here.
    let digest = output
        .tokens
        .iter()
        .flatten()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
            (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3)
        });
    println!(
        "generate  batch {batch:>2}, {new_tokens} new tokens: {:>8.0} tokens/s ({seconds:.3} s), tokens digest {digest:016x}",
        tokens / seconds
    );
    seconds
}

fn training_batch(batch: usize, time: usize) -> TokenBatch {
    let ids: Vec<u32> = (0..batch * time)
        .map(|i| 3 + (i as u32 * 31) % 500)
        .collect();
    let device = Device::Cpu;
    TokenBatch {
        input_ids: Tensor::from_vec(ids, (batch, time), &device).expect("ids"),
        attention_mask: Tensor::ones((batch, time), DType::U32, &device).expect("mask"),
        completion_mask: Tensor::ones((batch, time), DType::U32, &device).expect("mask"),
    }
}

fn forward_backward(label: &str, model: &CausalLm, batch: &TokenBatch) {
    let step = || {
        let loss = completion_logprobs(model, batch)
            .expect("logprobs")
            .mean_logprob()
            .expect("mean")
            .neg()
            .expect("neg");
        loss.backward().expect("backward")
    };
    step();
    let seconds = best_of(3, step);
    let tokens = batch.input_ids.elem_count() as f64;
    println!(
        "fwd+bwd   {label}: {:>8.0} tokens/s ({seconds:.3} s for {tokens} tokens)",
        tokens / seconds
    );
}

fn main() {
    let device = Device::Cpu;
    let frozen = CausalLm::random(bench_config(), 0, DType::F32, &device, Trainability::Frozen)
        .expect("model");
    let env = |name: &str| std::env::var(name).ok();
    println!(
        "model: {} parameters, RAYON_NUM_THREADS={:?} CANDLE_NUM_THREADS={:?}",
        frozen.num_parameters().expect("count"),
        env("RAYON_NUM_THREADS"),
        env("CANDLE_NUM_THREADS")
    );
    // cargo bench passes `--bench`; any other argument is a filter on the group names.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |group: &str| filter.as_deref().is_none_or(|f| group.contains(f));
    if wanted("generate") {
        generation_ratio(&frozen);
    }
    if wanted("fwd+bwd") {
        training(&frozen, &device);
    }
}

/// Generation at batch 1 and 32, and what the batch costs relative to one row.
fn generation_ratio(frozen: &CausalLm) {
    let single = generation(frozen, 1, 32);
    let batched = generation(frozen, 32, 32);
    println!(
        "batch 32 costs {:.1}x one row (32 single runs would cost 32x)",
        batched / single
    );
}

/// Forward+backward of full fine-tuning and of LoRA.
fn training(frozen: &CausalLm, device: &Device) {
    let batch = training_batch(32, 32);
    let varmap = VarMap::new();
    let full = CausalLm::random(
        bench_config(),
        0,
        DType::F32,
        device,
        Trainability::Full(&varmap),
    )
    .expect("model");
    forward_backward("full fine-tune, batch 32 x 32", &full, &batch);
    let mut lora = frozen.clone();
    let lora_config = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::All("all-linear".into()),
        use_rslora: false,
    };
    lora.add_lora(&lora_config, &VarMap::new(), 0)
        .expect("lora");
    forward_backward("LoRA r8 all-linear, batch 32 x 32", &lora, &batch);
}
