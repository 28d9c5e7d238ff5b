//! The model-side measurements of the `evaluate` stage, each over a list of rows in
//! batches: greedy/sampled completions, the NLL of given completions (perplexity),
//! sequence rewards under a reward head, and per-sequence KL to a reference model.
//!
//! Sequences are `(prompt ids, completion ids)` pairs, right-padded into one batch as
//! training does ([`collate_examples`]): the completion tokens are the ones scored.

use super::models::{LoadedModel, LoadedRewardModel};
use super::EvalError;
use crate::algo::kl::{kl_estimate, KlEstimator};
use crate::algo::lm::token_logprobs;
use crate::data::batch::{collate_examples, EncodedExample};
use crate::eval::metrics::PerplexityAccumulator;
use crate::model::{generate, CausalLm, GenerationSettings};
use candle_core::{DType, Tensor, D};
use rlhf_engine::progress::Task;

/// Generates a completion for every prompt, `batch_size` prompts at a time. The seed of
/// batch `i` is `settings.seed + i`, so results do not depend on anything but the
/// settings. Returns the new tokens of each row (a final eos included).
pub fn generate_completions(
    loaded: &LoadedModel,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
    batch_size: usize,
    task: &mut Task,
) -> Result<Vec<Vec<u32>>, EvalError> {
    let mut completions = Vec::with_capacity(prompts.len());
    for (index, chunk) in prompts.chunks(batch_size.max(1)).enumerate() {
        let mut batch_settings = settings.clone();
        batch_settings.seed = settings.seed.wrapping_add(index as u64);
        let output = generate(&loaded.model, chunk, &batch_settings, None)?;
        completions.extend(output.tokens);
        task.inc(chunk.len() as u64);
    }
    Ok(completions)
}

/// Token log-probs of the completion tokens of `examples` under `model`:
/// returns `(logprobs (b, t-1), mask (b, t-1))`, column i scoring token i+1.
fn completion_token_logprobs(
    model: &CausalLm,
    examples: &[&EncodedExample],
    pad: u32,
) -> Result<(Tensor, Tensor), EvalError> {
    let batch = collate_examples(examples, pad);
    let device = model.device();
    let input_ids = batch.input_ids_tensor(device)?; // (b, t)
    let attention_mask = batch.attention_mask_tensor(device)?; // (b, t)
    let loss_mask = batch.loss_mask_tensor(device)?; // (b, t)
    let time = batch.seq_len;
    let logits = model.forward(&input_ids, Some(&attention_mask), None)?; // (b, t, v)
    let predicting = logits.narrow(1, 0, time - 1)?; // position i predicts token i+1
    let targets = input_ids.narrow(1, 1, time - 1)?.contiguous()?; // (b, t-1)
    let logprobs = token_logprobs(&predicting, &targets)?; // (b, t-1)
    let mask = loss_mask.narrow(1, 1, time - 1)?; // (b, t-1)
    Ok((logprobs, mask))
}

/// Sums the NLL of every completion token of `examples` (perplexity = exp of the mean
/// over all tokens of all rows, each token weighing the same).
pub fn completion_nll(
    model: &CausalLm,
    examples: &[EncodedExample],
    pad: u32,
    batch_size: usize,
    task: &mut Task,
) -> Result<PerplexityAccumulator, EvalError> {
    let mut accumulator = PerplexityAccumulator::default();
    for chunk in scorable(examples).chunks(batch_size.max(1)) {
        let (logprobs, mask) = completion_token_logprobs(model, chunk, pad)?;
        accumulator.add(&logprobs.neg()?, &mask)?;
        task.inc(chunk.len() as u64);
    }
    Ok(accumulator)
}

/// Examples with at least one completion token and one token before it (a one-token
/// sequence predicts nothing).
fn scorable(examples: &[EncodedExample]) -> Vec<&EncodedExample> {
    examples
        .iter()
        .filter(|e| !e.completion.is_empty() && e.prompt.len() + e.completion.len() >= 2)
        .collect()
}

/// One reward per example: the head's score at the last token of prompt + completion.
pub fn sequence_rewards(
    reward_model: &LoadedRewardModel,
    examples: &[EncodedExample],
    batch_size: usize,
    task: &mut Task,
) -> Result<Vec<f64>, EvalError> {
    let model = &reward_model.loaded.model;
    let pad = reward_model.loaded.special.pad;
    let mut rewards = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = collate_examples(&refs, pad);
        let device = model.device();
        let input_ids = batch.input_ids_tensor(device)?; // (b, t)
        let attention_mask = batch.attention_mask_tensor(device)?; // (b, t)
        let hidden = model.hidden_states(&input_ids, Some(&attention_mask), None)?; // (b, t, d)
        let scores = reward_model.head.rewards(&hidden, &attention_mask)?; // (b,)
        rewards.extend(scores.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        task.inc(chunk.len() as u64);
    }
    Ok(rewards)
}

/// Per example, Σ over completion tokens of the KL estimate between `policy` and
/// `reference` on those tokens (TRL's `objective/kl` before the mean over rows).
pub fn sequence_kl(
    policy: &CausalLm,
    reference: &CausalLm,
    examples: &[EncodedExample],
    pad: u32,
    estimator: KlEstimator,
    batch_size: usize,
    task: &mut Task,
) -> Result<Vec<f64>, EvalError> {
    if policy.config.vocab_size != reference.config.vocab_size {
        return Err(EvalError::invalid(
            format!(
                "the reference model's vocabulary ({}) differs from the evaluated model's ({})",
                reference.config.vocab_size, policy.config.vocab_size
            ),
            Some("KL needs both models to share a tokenizer: use the evaluated model's base as `reference`"),
        ));
    }
    let mut kls = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        // An empty completion has no tokens to compare: its KL is 0.
        let refs: Vec<&EncodedExample> =
            chunk.iter().filter(|e| !e.completion.is_empty()).collect();
        let mut row_kls = if refs.is_empty() {
            Vec::new()
        } else {
            let (logprobs, mask) = completion_token_logprobs(policy, &refs, pad)?; // (b, t-1)
            let (reference_logprobs, _) = completion_token_logprobs(reference, &refs, pad)?; // (b, t-1)
            let per_token = kl_estimate(&logprobs, &reference_logprobs, estimator)?; // (b, t-1)
            let per_row = (per_token * mask)?.sum(D::Minus1)?; // (b,)
            per_row.to_dtype(DType::F64)?.to_vec1::<f64>()?
        }
        .into_iter();
        for example in chunk {
            let kl = if example.completion.is_empty() {
                Some(0.0)
            } else {
                row_kls.next()
            };
            kls.push(kl.unwrap_or(0.0));
        }
        task.inc(chunk.len() as u64);
    }
    Ok(kls)
}

/// One completion of a raw prompt through the model's template (for `rlhf generate`).
pub fn complete_prompt(
    loaded: &LoadedModel,
    prompt: &str,
    settings: &GenerationSettings,
) -> Result<String, EvalError> {
    let row = crate::data::Row {
        prompt: Some(prompt.to_string()),
        ..crate::data::Row::default()
    };
    let ids = loaded.encoder().encode_prompt(&row)?;
    if ids.is_empty() {
        return Err(EvalError::invalid(
            "the prompt renders to no tokens",
            Some("give a non-empty prompt"),
        ));
    }
    let output = generate(&loaded.model, &[ids], settings, None)?;
    let tokens = output.tokens.into_iter().next().unwrap_or_default();
    loaded.decode(&tokens)
}
