//! One GRPO and one PPO update on a tiny random Llama with LoRA move the policy the way
//! the objective says: completions with positive advantage gain log-probability relative
//! to those with negative advantage (Σ A_i · Δ log π(y_i) > 0), and the first update of a
//! fresh batch is on-policy (ratio 1, nothing clipped).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rlhf_stages::algo::grpo::{group_advantages, grpo_loss, GrpoLossConfig, LossAggregation};
use rlhf_stages::algo::optim::{AdamW, AdamWConfig};
use rlhf_stages::algo::ppo::ppo_policy_loss;
use rlhf_stages::model::{CausalLm, LlamaConfig, LoraConfig, Trainability};
use rlhf_stages::rl::rollout::{token_stats, Rollouts, SequenceBatch};
use serde_json::json;

fn tiny_policy(varmap: &VarMap) -> CausalLm {
    let config: LlamaConfig = serde_json::from_value(json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 32
    }))
    .unwrap();
    let mut model =
        CausalLm::random(config, 3, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    model.add_lora(&LoraConfig::default(), varmap, 5).unwrap();
    // PEFT starts B at zero; give it a small seeded value so A also receives gradient.
    for var in varmap.all_vars() {
        let noise = Tensor::randn(0f32, 0.01, var.shape(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    model
}

/// Two prompts × 4 completions of different lengths, completions of a prompt adjacent.
fn rollouts() -> Rollouts {
    let prompts = [vec![1u32, 5, 6], vec![1, 7]];
    let completions = vec![
        vec![10u32, 11, 2],
        vec![12, 2],
        vec![13, 14, 15],
        vec![16, 2],
        vec![20, 21, 2],
        vec![22, 23, 24, 2],
        vec![25, 2],
        vec![26, 27],
    ];
    Rollouts {
        row_index: vec![0, 0, 0, 0, 1, 1, 1, 1],
        prompts: (0..8).map(|i| prompts[i / 4].clone()).collect(),
        has_eos: completions.iter().map(|c| c.last() == Some(&2)).collect(),
        texts: vec![String::new(); 8],
        completions,
        seconds: 0.0,
    }
}

fn sequence_logprobs(model: &CausalLm, batch: &SequenceBatch) -> Vec<f32> {
    let stats = token_stats(model, batch, 1.0, None, None).unwrap();
    (stats.logprobs * &batch.response_mask)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn optimizer(varmap: &VarMap) -> AdamW {
    let config = AdamWConfig {
        learning_rate: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    AdamW::from_var_map(varmap, config).unwrap()
}

fn weighted_change(advantages: &[f32], before: &[f32], after: &[f32]) -> f32 {
    advantages
        .iter()
        .zip(before.iter().zip(after))
        .map(|(a, (b, c))| a * (c - b))
        .sum()
}

#[test]
fn one_grpo_update_raises_the_log_probability_of_better_completions() {
    let varmap = VarMap::new();
    let model = tiny_policy(&varmap);
    let batch = SequenceBatch::new(&rollouts(), 0).unwrap();
    let rewards = Tensor::new(&[1f32, 0., 0., 0.5, 0., 1., 1., 0.], &Device::Cpu).unwrap();
    let advantages = group_advantages(&rewards, 4, true, 1e-4).unwrap();
    let before = sequence_logprobs(&model, &batch);
    let stats = token_stats(&model, &batch, 1.0, None, None).unwrap();
    let config = GrpoLossConfig {
        clip_epsilon: 0.2,
        beta: 0.0,
        aggregation: LossAggregation::Token,
    };
    let output = grpo_loss(
        &stats.logprobs,
        &stats.logprobs.detach(),
        None,
        &advantages,
        &batch.response_mask,
        config,
    )
    .unwrap();
    assert_eq!(
        output.clip_ratio.to_scalar::<f32>().unwrap(),
        0.0,
        "on-policy: nothing clipped"
    );
    let grads = output.loss.backward().unwrap();
    optimizer(&varmap).step(&grads).unwrap();
    let after = sequence_logprobs(&model, &batch);
    let advantages: Vec<f32> = advantages.to_vec1().unwrap();
    let change = weighted_change(&advantages, &before, &after);
    assert!(
        change > 0.0,
        "Σ A·Δlogπ = {change}: the update went against the advantages"
    );
}

#[test]
fn one_ppo_update_raises_the_log_probability_of_tokens_with_positive_advantage() {
    let varmap = VarMap::new();
    let model = tiny_policy(&varmap);
    let batch = SequenceBatch::new(&rollouts(), 0).unwrap();
    let stats = token_stats(&model, &batch, 1.0, None, None).unwrap();
    let old = stats.logprobs.detach();
    // Per-sequence advantages broadcast over each completion's tokens.
    let per_row = [1f32, -1., 0.5, -0.5, -1., 1., 0.25, -0.25];
    let width = batch.response_mask.dims()[1];
    let advantages = Tensor::from_vec(
        per_row
            .iter()
            .flat_map(|a| vec![*a; width])
            .collect::<Vec<_>>(),
        (8, width),
        &Device::Cpu,
    )
    .unwrap()
    .mul(&batch.response_mask)
    .unwrap();
    let before = sequence_logprobs(&model, &batch);
    let output = ppo_policy_loss(
        &stats.logprobs,
        &old,
        &advantages,
        &batch.response_mask,
        0.2,
    )
    .unwrap();
    assert_eq!(output.clip_fraction.to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(output.approx_kl.to_scalar::<f32>().unwrap(), 0.0);
    let grads = output.loss.backward().unwrap();
    optimizer(&varmap).step(&grads).unwrap();
    let after = sequence_logprobs(&model, &batch);
    let change = weighted_change(&per_row, &before, &after);
    assert!(
        change > 0.0,
        "Σ A·Δlogπ = {change}: the update went against the advantages"
    );
}
