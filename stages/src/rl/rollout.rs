//! Rollouts: completions sampled from the policy with the KV-cache generator, and the
//! right-padded prompt+completion batches every RL loss is computed on.
//!
//! Layout of a [`SequenceBatch`]: row `i` is `prompt_i ++ completion_i`, right-padded to
//! `t`; per-token tensors are *shifted*, `(b, t-1)`, column `j` scoring token `j+1`
//! (logits `[:, :-1]` against ids `[:, 1:]`), and `response_mask` is 1 where token `j+1`
//! is a completion token. Keeping the prompt columns (masked) instead of gathering the
//! completions into their own tensor costs a few logits and keeps everything a plain
//! masked mean; GAE's mask factor keeps the prompt columns at zero.

use crate::data::batch::{collate_examples, EncodedExample};
use crate::model::generate::{FinishReason, GenerationOutput};
use crate::model::{
    generate_rows, hidden_states_sharing_prompts, token_entropy, token_logprobs, CausalLm,
    GenerationSettings, ScalarHead,
};
use crate::parallel::{map_shards, split_into_shards};
use crate::train::StageResultExt;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rlhf_engine::StageError;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Completions of a step: `group` per prompt, completions of one prompt adjacent.
#[derive(Clone, Debug)]
pub struct Rollouts {
    /// Index (into the prompt rows) of each completion's prompt.
    pub row_index: Vec<usize>,
    pub prompts: Vec<Vec<u32>>,
    /// New tokens of each completion (the EOS that ended it included).
    pub completions: Vec<Vec<u32>>,
    /// Whether each completion ended with EOS.
    pub has_eos: Vec<bool>,
    /// Decoded completions, special tokens skipped.
    pub texts: Vec<String>,
    /// Wall-clock seconds spent generating (never in artifacts).
    pub seconds: f64,
}

impl Rollouts {
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// Generated tokens in total.
    pub fn generated_tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
    }

    pub fn mean_length(&self) -> f64 {
        self.generated_tokens() as f64 / self.len().max(1) as f64
    }
}

/// Samples `group` completions of each of `prompts` (token ids; `row_index` says which
/// row each came from), the rows cut into one generation batch per thread: each row
/// has its own random stream, so the completions do not depend on the cut.
pub fn sample_rollouts(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    row_index: &[usize],
    group: usize,
    settings: &GenerationSettings,
    tokenizer: &Tokenizer,
) -> Result<Rollouts, StageError> {
    let started = Instant::now();
    let mut repeated = Vec::with_capacity(prompts.len() * group);
    let mut rows = Vec::with_capacity(prompts.len() * group);
    for (prompt, &row) in prompts.iter().zip(row_index) {
        for _ in 0..group {
            repeated.push(prompt.clone());
            rows.push(row);
        }
    }
    let parts = split_into_shards(&repeated, rayon::current_num_threads());
    let starts: Vec<usize> = parts
        .iter()
        .scan(0, |start, part| {
            let first = *start;
            *start += part.len();
            Some(first)
        })
        .collect();
    let mut output = GenerationOutput::default();
    for part in map_shards(parts.len(), |k| {
        generate_rows(model, parts[k], starts[k], settings, None)
    }) {
        let part = part.or_fail("sampling completions")?;
        output.tokens.extend(part.tokens);
        output.logprobs.extend(part.logprobs);
        output.finish_reasons.extend(part.finish_reasons);
    }
    let texts = output
        .tokens
        .iter()
        .map(|tokens| tokenizer.decode(tokens, true))
        .collect::<Result<Vec<_>, _>>()
        .or_fail("decoding completions")?;
    Ok(Rollouts {
        row_index: rows,
        prompts: repeated,
        has_eos: output
            .finish_reasons
            .iter()
            .map(|r| *r == FinishReason::Eos)
            .collect(),
        completions: output.tokens,
        texts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A right-padded batch of prompt+completion rows (see the module docs for the layout).
#[derive(Clone, Debug)]
pub struct SequenceBatch {
    /// (b, t) u32
    pub input_ids: Tensor,
    /// (b, t) f32, 1 on real tokens
    pub attention_mask: Tensor,
    /// (b, t-1) f32, 1 where token j+1 is a completion token
    pub response_mask: Tensor,
}

impl SequenceBatch {
    /// Builds the batch of `rollouts`' rows `indices` (all rows when `None`).
    pub fn new(rollouts: &Rollouts, pad: u32) -> Result<Self, StageError> {
        let examples: Vec<EncodedExample> = rollouts
            .prompts
            .iter()
            .zip(&rollouts.completions)
            .map(|(prompt, completion)| EncodedExample {
                prompt: prompt.clone(),
                completion: completion.clone(),
            })
            .collect();
        let refs: Vec<&EncodedExample> = examples.iter().collect();
        let batch = collate_examples(&refs, pad);
        let device = Device::Cpu;
        let time = batch.seq_len;
        let input_ids = batch.input_ids_tensor(&device).or_fail("batch")?;
        let attention_mask = batch.attention_mask_tensor(&device).or_fail("batch")?;
        let response_mask = batch
            .loss_mask_tensor(&device)
            .and_then(|m| m.narrow(1, 1, time - 1)?.contiguous())
            .or_fail("batch")?;
        Ok(SequenceBatch {
            input_ids,
            attention_mask,
            response_mask,
        })
    }

    /// The rows `indices` of this batch (same width).
    pub fn select(&self, indices: &Tensor) -> Result<Self, StageError> {
        let pick = |t: &Tensor| {
            t.contiguous()
                .and_then(|t| t.index_select(indices, 0))
                .or_fail("selecting a minibatch")
        };
        Ok(SequenceBatch {
            input_ids: pick(&self.input_ids)?,
            attention_mask: pick(&self.attention_mask)?,
            response_mask: pick(&self.response_mask)?,
        })
    }

    pub fn rows(&self) -> usize {
        self.input_ids.dims()[0]
    }
}

/// Per-token quantities of a forward pass over a [`SequenceBatch`], all (b, t-1).
pub struct TokenStats {
    /// log π(token j+1 | ..j) under logits / temperature; differentiable.
    pub logprobs: Tensor,
    /// Entropy of the same distributions; differentiable.
    pub entropy: Tensor,
    /// V(state before token j+1) from the value head, when one is given.
    pub values: Option<Tensor>,
}

/// Runs `model` on `batch`: log-probs (at `temperature`, as sampled), entropies and
/// optionally a value head on the same hidden states. `rng` turns LoRA dropout on.
pub fn token_stats(
    model: &CausalLm,
    batch: &SequenceBatch,
    temperature: f64,
    value_head: Option<&ScalarHead>,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<TokenStats, StageError> {
    let mut rng = rng;
    let hidden = model
        .hidden_states_with(
            &batch.input_ids,
            Some(&batch.attention_mask),
            None,
            &mut rng,
        )
        .or_fail("policy forward pass")?; // (b, t, d)
    stats_from_hidden(model, &hidden, batch, temperature, value_head)
}

/// [`TokenStats`] from final hidden states (b, t, d) of `batch`.
fn stats_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    batch: &SequenceBatch,
    temperature: f64,
    value_head: Option<&ScalarHead>,
) -> Result<TokenStats, StageError> {
    let time = batch.input_ids.dims()[1];
    let mut logits = model.logits(hidden).or_fail("policy forward pass")?; // (b, t, v)
    if temperature > 0.0 && temperature != 1.0 {
        logits = logits
            .affine(1.0 / temperature, 0.0)
            .or_fail("temperature")?;
    }
    let predicting = logits.narrow(1, 0, time - 1).or_fail("shift")?; // (b, t-1, v)
    let targets = batch.input_ids.narrow(1, 1, time - 1).or_fail("shift")?; // (b, t-1)
    let logprobs = token_logprobs(&predicting, &targets).or_fail("token log-probs")?;
    let entropy = token_entropy(&predicting).or_fail("token entropy")?;
    let values = match value_head {
        Some(head) => Some(
            head.values(hidden)
                .and_then(|v| Ok(v.narrow(1, 0, time - 1)?))
                .or_fail("value head")?,
        ), // (b, t-1)
        None => None,
    };
    Ok(TokenStats {
        logprobs,
        entropy,
        values,
    })
}

/// [`token_stats`] without values for the rows `prompt ++ completion` of `batch`
/// (`rows` lists them, in its row order), each shared prompt run once
/// ([`hidden_states_sharing_prompts`]): the same numbers, on far fewer tokens when rows
/// share prompts, as a GRPO group does.
pub fn shared_prompt_token_stats(
    model: &CausalLm,
    rows: &[(&[u32], &[u32])],
    batch: &SequenceBatch,
    temperature: f64,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<TokenStats, StageError> {
    let mut rng = rng;
    let hidden = hidden_states_sharing_prompts(
        model,
        rows,
        &batch.input_ids,
        &batch.attention_mask,
        &mut rng,
    )
    .or_fail("policy forward pass")?; // (b, t, d)
    stats_from_hidden(model, &hidden, batch, temperature, None)
}

/// Rows per forward pass of [`frozen_logprobs`] in the RL stages: small enough that a
/// BENCH.md rollout batch (64 rows) keeps every thread busy.
pub const FROZEN_CHUNK_ROWS: usize = 16;

/// Per-token log-probs of a frozen model (reference, or the policy before an update),
/// computed without a graph in chunks of `chunk` rows, spread over the compute threads.
/// The chunks are fixed by `chunk` alone, so the numbers do not depend on the thread
/// count.
pub fn frozen_logprobs(
    model: &CausalLm,
    batch: &SequenceBatch,
    temperature: f64,
    value_head: Option<&ScalarHead>,
    chunk: usize,
) -> Result<(Tensor, Option<Tensor>), StageError> {
    let rows = batch.rows();
    let starts: Vec<usize> = (0..rows).step_by(chunk.max(1)).collect();
    let parts = map_shards(starts.len(), |k| {
        let (start, length) = (starts[k], chunk.min(rows - starts[k]));
        let part = SequenceBatch {
            input_ids: batch.input_ids.narrow(0, start, length).or_fail("chunk")?,
            attention_mask: batch
                .attention_mask
                .narrow(0, start, length)
                .or_fail("chunk")?,
            response_mask: batch
                .response_mask
                .narrow(0, start, length)
                .or_fail("chunk")?,
        };
        let stats = token_stats(model, &part, temperature, value_head, None)?;
        Ok::<_, StageError>((stats.logprobs.detach(), stats.values.map(|v| v.detach())))
    });
    let (mut logprobs, mut values) = (Vec::new(), Vec::new());
    for part in parts {
        let (part_logprobs, part_values) = part?;
        logprobs.push(part_logprobs);
        values.extend(part_values);
    }
    let logprobs = Tensor::cat(&logprobs, 0).or_fail("concatenating log-probs")?;
    let values = if values.is_empty() {
        None
    } else {
        Some(Tensor::cat(&values, 0).or_fail("concatenating values")?)
    };
    Ok((logprobs, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ScalarHeadKind, Trainability};
    use candle_core::DType;
    use candle_nn::VarMap;

    #[test]
    fn frozen_passes_in_chunks_match_one_pass_row_for_row() {
        let config = crate::model::tiny_test_config("llama", false);
        let model = CausalLm::random(config, 3, DType::F32, &Device::Cpu, Trainability::Frozen)
            .expect("model");
        let varmap = VarMap::new();
        let head = ScalarHead::new(
            ScalarHeadKind::Value,
            32,
            &varmap,
            "value.",
            5,
            DType::F32,
            &Device::Cpu,
        )
        .expect("head");
        let rows = 7;
        let rollouts = Rollouts {
            row_index: (0..rows).collect(),
            prompts: (0..rows)
                .map(|i| (0..2 + i % 3).map(|t| (3 + i + t) as u32).collect())
                .collect(),
            completions: (0..rows)
                .map(|i| {
                    (0..1 + i % 4)
                        .map(|t| (7 + 2 * i + t) as u32 % 40)
                        .collect()
                })
                .collect(),
            has_eos: vec![false; rows],
            texts: vec![String::new(); rows],
            seconds: 0.0,
        };
        let batch = SequenceBatch::new(&rollouts, 0).expect("batch");
        let (whole, whole_values) =
            frozen_logprobs(&model, &batch, 1.0, Some(&head), rows).expect("whole");
        let (chunked, chunked_values) =
            frozen_logprobs(&model, &batch, 1.0, Some(&head), 3).expect("chunked");
        let close = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims());
            let diff = (a - b)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>());
            assert!(diff.expect("diff") < 1e-5);
        };
        close(&whole, &chunked);
        close(
            &whole_values.expect("values"),
            &chunked_values.expect("values"),
        );
        // Not all zero: the comparison has something to compare.
        let total =
            (whole * &batch.response_mask).and_then(|t| t.abs()?.sum_all()?.to_scalar::<f32>());
        assert!(total.expect("sum") > 1.0);
    }

    #[test]
    fn shared_prompt_packing_matches_one_row_per_completion_in_values_and_gradients() {
        let config = crate::model::tiny_test_config("llama", false);
        let mut model =
            CausalLm::random(config, 11, DType::F32, &Device::Cpu, Trainability::Frozen)
                .expect("model");
        let varmap = VarMap::new();
        let lora = crate::model::LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            ..crate::model::LoraConfig::default()
        };
        model.add_lora(&lora, &varmap, 2).expect("lora");
        // B starts at zero in LoRA; move it so the adapters matter.
        for var in varmap.all_vars() {
            let moved = (var.as_tensor().ones_like().expect("ones") * 0.05).expect("scale");
            var.set(&(var.as_tensor() + moved).expect("add"))
                .expect("set");
        }
        // Two groups sharing prompts, a lone prompt, completions of 1 to 5 tokens.
        let (p1, p2, p3): (Vec<u32>, Vec<u32>, Vec<u32>) =
            (vec![3, 9, 4, 7], vec![5, 6], vec![8, 1, 2, 3, 4, 5]);
        let rows: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (p1.clone(), vec![10, 11, 12]),
            (p2.clone(), vec![20]),
            (p1.clone(), vec![13, 14, 15, 16, 17]),
            (p3.clone(), vec![30, 31]),
            (p2.clone(), vec![21, 22, 23, 24]),
            (p1.clone(), vec![18]),
        ];
        let rollouts = Rollouts {
            row_index: (0..rows.len()).collect(),
            prompts: rows.iter().map(|r| r.0.clone()).collect(),
            completions: rows.iter().map(|r| r.1.clone()).collect(),
            has_eos: vec![false; rows.len()],
            texts: vec![String::new(); rows.len()],
            seconds: 0.0,
        };
        let batch = SequenceBatch::new(&rollouts, 0).expect("batch");
        let mask = &batch.response_mask;
        let objective = |stats: &TokenStats| {
            let lp = (&stats.logprobs * mask)?.sum_all()?;
            let ent = (&stats.entropy * mask)?.sum_all()?;
            lp + ent
        };
        let plain = token_stats(&model, &batch, 0.7, None, None).expect("plain");
        let parts: Vec<(&[u32], &[u32])> = rows.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let packed = shared_prompt_token_stats(&model, &parts, &batch, 0.7, None).expect("packed");
        let masked = |t: &Tensor| (t * mask).expect("mask");
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff")
        };
        assert_eq!(packed.logprobs.dims(), plain.logprobs.dims());
        assert!(max_diff(&masked(&packed.logprobs), &masked(&plain.logprobs)) < 1e-5);
        assert!(max_diff(&masked(&packed.entropy), &masked(&plain.entropy)) < 1e-5);
        let plain_grads = objective(&plain).and_then(|o| o.backward()).expect("grads");
        let packed_grads = objective(&packed)
            .and_then(|o| o.backward())
            .expect("grads");
        let mut compared = 0;
        for var in varmap.all_vars() {
            let (a, b) = (
                plain_grads.get(var.as_tensor()).expect("plain grad"),
                packed_grads.get(var.as_tensor()).expect("packed grad"),
            );
            let scale = a
                .abs()
                .and_then(|t| t.max_all()?.to_scalar::<f32>())
                .expect("max");
            assert!(max_diff(a, b) <= 1e-4 * scale.max(1.0), "gradient differs");
            compared += 1;
        }
        assert!(compared > 0);
        // The log-probs are real ones: the packed path did not just return zeros.
        let total = masked(&packed.logprobs)
            .abs()
            .and_then(|t| t.sum_all()?.to_scalar::<f32>());
        assert!(total.expect("sum") > 1.0);
    }
}
