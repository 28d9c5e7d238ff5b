//! Batched generation with an explicit KV cache, for rollouts and evaluation.
//!
//! Prompts arrive unpadded and stay so: the cached decoder (`kv_cache`) keeps each
//! row's own keys, so a row computes what it would alone and no FLOP is spent on
//! padding. Rows that finish (EOS, a stop string) are dropped from the batch and the
//! cache.
//! Sampling: greedy, or temperature with top-k / top-p, seeded with ChaCha8.

use super::causal_lm::CausalLm;
use super::kv_cache::{InferenceModel, KvCache};
use super::tokenizer::ModelTokenizer;
use super::{ModelError, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick tokens and when to stop.
#[derive(Clone, Debug)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep only the k most likely tokens (sampling only).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (sampling only).
    pub top_p: Option<f64>,
    /// A row stops after emitting one of these (the EOS token is kept in its output).
    pub eos_token_ids: Vec<u32>,
    /// A row stops once its decoded completion contains one of these (needs a tokenizer).
    pub stop_strings: Vec<String>,
    pub seed: u64,
    /// The padding id of callers' padded views (generation itself pads nothing).
    pub pad_token_id: u32,
}

impl GenerationSettings {
    pub fn greedy() -> Self {
        GenerationSettings {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
            pad_token_id: 0,
        }
    }
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    StopString,
    MaxNewTokens,
}

/// What [`generate`] returns, one entry per prompt, in prompt order.
#[derive(Clone, Debug, Default)]
pub struct GenerationOutput {
    /// The new tokens of each row (an EOS that ended it included).
    pub tokens: Vec<Vec<u32>>,
    /// log p of each sampled token under the (temperature-scaled, unfiltered) model
    /// distribution; for greedy, the plain log-softmax.
    pub logprobs: Vec<Vec<f32>>,
    pub finish_reasons: Vec<FinishReason>,
}

impl GenerationOutput {
    /// Right-padded tensors: (token ids (b, n) u32, log-probs (b, n) f32, mask (b, n) f32).
    pub fn padded(&self, pad_token_id: u32, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = self.tokens.len();
        let width = self.tokens.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (mut ids, mut logprobs, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (tokens, lps) in self.tokens.iter().zip(&self.logprobs) {
            for i in 0..width {
                ids.push(tokens.get(i).copied().unwrap_or(pad_token_id));
                logprobs.push(lps.get(i).copied().unwrap_or(0.0));
                mask.push(if i < tokens.len() { 1.0f32 } else { 0.0 });
            }
        }
        Ok((
            Tensor::from_vec(ids, (rows, width), device)?,
            Tensor::from_vec(logprobs, (rows, width), device)?,
            Tensor::from_vec(mask, (rows, width), device)?,
        ))
    }
}

/// Generates continuations of `prompts` (each unpadded, non-empty) in one batch. Row
/// `i` samples from its own random stream `i` of `settings.seed`, so what a row draws
/// does not depend on the other rows of the batch.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
    tokenizer: Option<&ModelTokenizer>,
) -> Result<GenerationOutput> {
    generate_rows(model, prompts, 0, settings, tokenizer)
}

/// As [`generate`] for rows `first_row..` of a larger batch: row `first_row + i` uses
/// stream `first_row + i`, so a batch cut into parts and generated part by part (or in
/// parallel) gives the same tokens as the whole batch at once.
pub fn generate_rows(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    first_row: usize,
    settings: &GenerationSettings,
    tokenizer: Option<&ModelTokenizer>,
) -> Result<GenerationOutput> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid(
            "generation needs a non-empty prompt for every row".into(),
        ));
    }
    if !settings.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ModelError::Invalid(
            "stop strings need a tokenizer to decode completions".into(),
        ));
    }
    let rows = prompts.len();
    let mut output = GenerationOutput {
        tokens: vec![Vec::new(); rows],
        logprobs: vec![Vec::new(); rows],
        finish_reasons: vec![FinishReason::MaxNewTokens; rows],
    };
    if rows == 0 || settings.max_new_tokens == 0 {
        return Ok(output);
    }
    let decoder = InferenceModel::new(model)?;
    let vocab = model.config.vocab_size;
    let mut rngs: Vec<ChaCha8Rng> = (0..rows)
        .map(|row| {
            let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
            rng.set_stream((first_row + row) as u64);
            rng
        })
        .collect();
    let mut state = DecodeState::prefill(&decoder, prompts, settings)?;
    let mut sampler = Sampler::new(vocab);
    for step in 0..settings.max_new_tokens {
        let mut finished = Vec::new();
        let mut next = Vec::with_capacity(state.active.len());
        for (slot, (&row, logits)) in state
            .active
            .iter()
            .zip(state.logits.chunks_exact(vocab))
            .enumerate()
        {
            let (token, logprob) = sampler.pick(logits, settings, &mut rngs[row]);
            output.tokens[row].push(token);
            output.logprobs[row].push(logprob);
            next.push(token);
            if settings.eos_token_ids.contains(&token) {
                output.finish_reasons[row] = FinishReason::Eos;
                finished.push(slot);
            } else if let Some(tokenizer) = tokenizer.filter(|_| !settings.stop_strings.is_empty())
            {
                let text = tokenizer.decode(&output.tokens[row], false)?;
                if settings
                    .stop_strings
                    .iter()
                    .any(|s| text.contains(s.as_str()))
                {
                    output.finish_reasons[row] = FinishReason::StopString;
                    finished.push(slot);
                }
            }
        }
        if step + 1 == settings.max_new_tokens || finished.len() == state.active.len() {
            break;
        }
        state.drop_slots(&finished, &mut next);
        state.step(&decoder, &next)?;
    }
    Ok(output)
}

/// The batch being decoded: which prompt rows are still active, their cache and logits.
struct DecodeState {
    /// Prompt index of each batch slot.
    active: Vec<usize>,
    cache: KvCache,
    /// (slots, vocab) logits for the next token, row-major.
    logits: Vec<f32>,
}

impl DecodeState {
    /// Runs the prompts through the model, unpadded: each row attends to its own
    /// tokens only, so it computes what it would alone. A prompt that several rows
    /// share (a GRPO group) runs once; its rows start from copies of its cache.
    fn prefill(
        decoder: &InferenceModel,
        prompts: &[Vec<u32>],
        settings: &GenerationSettings,
    ) -> Result<Self> {
        let mut distinct: Vec<&Vec<u32>> = Vec::new();
        let source: Vec<usize> = prompts
            .iter()
            .map(|prompt| match distinct.iter().position(|d| *d == prompt) {
                Some(i) => i,
                None => {
                    distinct.push(prompt);
                    distinct.len() - 1
                }
            })
            .collect();
        let counts: Vec<usize> = distinct.iter().map(|p| p.len()).collect();
        // The last sampled token is never fed back, hence the - 1.
        let room = settings.max_new_tokens.saturating_sub(1);
        let capacity: Vec<usize> = counts.iter().map(|c| c + room).collect();
        let mut cache = decoder.new_cache(&capacity);
        let distinct_ids: Vec<u32> = distinct.iter().flat_map(|p| p.iter().copied()).collect();
        let logits = decoder.forward(&distinct_ids, &counts, &mut cache)?;
        if distinct.len() == prompts.len() {
            return Ok(DecodeState {
                active: (0..prompts.len()).collect(),
                cache,
                logits,
            });
        }
        let vocab = logits.len() / distinct.len();
        Ok(DecodeState {
            active: (0..prompts.len()).collect(),
            cache: cache.copy_rows(&source, room),
            logits: source
                .iter()
                .flat_map(|&d| logits[d * vocab..(d + 1) * vocab].iter().copied())
                .collect(),
        })
    }

    /// Removes finished slots from the batch, the cache and `next`: they cost nothing
    /// from the next step on.
    fn drop_slots(&mut self, finished: &[usize], next: &mut Vec<u32>) {
        if finished.is_empty() {
            return;
        }
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|s| !finished.contains(s))
            .collect();
        self.cache.keep_rows(&keep);
        self.active = keep.iter().map(|&s| self.active[s]).collect();
        *next = keep.iter().map(|&s| next[s]).collect();
    }

    /// Feeds one token per slot and computes the next logits.
    fn step(&mut self, decoder: &InferenceModel, next: &[u32]) -> Result<()> {
        self.logits = decoder.forward(next, &vec![1; next.len()], &mut self.cache)?;
        Ok(())
    }
}

/// Picks tokens from logits rows, reusing its buffers from row to row.
struct Sampler {
    /// Temperature-scaled logits, then log-probs, in f64 for accuracy.
    logprobs: Vec<f64>,
    probs: Vec<f64>,
    /// Sort keys of [`descending_key`], then the token ids in that order.
    keys: Vec<u64>,
    order: Vec<usize>,
}

impl Sampler {
    fn new(vocab: usize) -> Self {
        Sampler {
            logprobs: Vec::with_capacity(vocab),
            probs: Vec::with_capacity(vocab),
            keys: Vec::with_capacity(vocab),
            order: Vec::with_capacity(vocab),
        }
    }

    /// Picks the next token of one row; returns it with its log-prob.
    fn pick(
        &mut self,
        logits: &[f32],
        settings: &GenerationSettings,
        rng: &mut ChaCha8Rng,
    ) -> (u32, f32) {
        let greedy = settings.temperature <= 0.0;
        let temperature = if greedy { 1.0 } else { settings.temperature };
        self.logprobs.clear();
        self.logprobs
            .extend(logits.iter().map(|&l| l as f64 / temperature));
        log_softmax_in_place(&mut self.logprobs);
        let logprobs = &self.logprobs;
        if greedy {
            // The first maximum, as torch.argmax picks it.
            let best = (0..logits.len())
                .fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
            return (best as u32, logprobs[best] as f32);
        }
        self.probs.clear();
        self.probs.extend(logprobs.iter().map(|lp| lp.exp()));
        let probs = &self.probs;
        // The order of the scaled logits (dividing f32 values by a positive temperature
        // in f64 neither merges nor swaps them), ties by id as a stable sort leaves
        // them; sorting plain integer keys is several times faster than comparing
        // through an index.
        self.keys.clear();
        self.keys.extend(
            logits
                .iter()
                .enumerate()
                .map(|(id, &l)| descending_key(l, id)),
        );
        self.keys.sort_unstable();
        self.order.clear();
        self.order
            .extend(self.keys.iter().map(|&key| (key & 0xffff_ffff) as usize));
        let order = &self.order;
        let mut keep = order.len();
        if let Some(k) = settings.top_k.filter(|&k| k > 0) {
            keep = keep.min(k);
        }
        if let Some(p) = settings.top_p.filter(|&p| p < 1.0) {
            let mut cumulative = 0.0;
            for (rank, &token) in order.iter().enumerate().take(keep) {
                cumulative += probs[token];
                if cumulative >= p {
                    keep = rank + 1;
                    break;
                }
            }
        }
        let kept = &order[..keep.max(1)];
        let total: f64 = kept.iter().map(|&t| probs[t]).sum();
        let mut draw = rng.random::<f64>() * total;
        for &token in kept {
            draw -= probs[token];
            if draw <= 0.0 {
                return (token as u32, logprobs[token] as f32);
            }
        }
        let last = kept[kept.len() - 1];
        (last as u32, logprobs[last] as f32)
    }
}

/// log-softmax in place.
fn log_softmax_in_place(values: &mut [f64]) {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = values.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    values.iter_mut().for_each(|v| *v -= log_sum);
}

/// A key whose ascending order is descending `logit` (in `f32::total_cmp`'s order),
/// then ascending `id`.
fn descending_key(logit: f32, id: usize) -> u64 {
    let bits = logit.to_bits();
    // total_cmp's order as unsigned integers: negatives have every bit flipped, the
    // rest only the sign bit.
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ascending) << 32) | id as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Trainability;
    use candle_core::DType;

    #[test]
    fn a_bf16_model_generates_exactly_as_its_weights_converted_to_f32() {
        let config = crate::model::tiny_test_config("llama", false);
        let device = Device::Cpu;
        let bf16 = CausalLm::random(
            config.clone(),
            5,
            DType::BF16,
            &device,
            Trainability::Frozen,
        )
        .unwrap();
        let converted = bf16
            .named_weights(false)
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name, t.to_dtype(DType::F32).unwrap()))
            .collect();
        let f32_model =
            CausalLm::from_tensors(config, converted, &device, Trainability::Frozen).unwrap();
        let prompts = vec![vec![1u32, 5, 9], vec![1, 40, 41, 42, 43]];
        let settings = GenerationSettings {
            max_new_tokens: 6,
            temperature: 0.7,
            seed: 9,
            ..GenerationSettings::greedy()
        };
        let from_bf16 = generate(&bf16, &prompts, &settings, None).unwrap();
        let from_f32 = generate(&f32_model, &prompts, &settings, None).unwrap();
        assert_eq!(from_bf16.tokens, from_f32.tokens);
        assert_eq!(from_bf16.logprobs, from_f32.logprobs);
    }

    #[test]
    fn descending_keys_sort_as_a_stable_sort_by_descending_logit() {
        let logits = [
            0.5f32,
            -1.0,
            f32::NEG_INFINITY,
            0.5,
            -0.0,
            0.0,
            3.0,
            -1.0,
            f32::INFINITY,
            1e-30,
            -1e-30,
        ];
        let mut stable: Vec<usize> = (0..logits.len()).collect();
        stable.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut keys: Vec<u64> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| descending_key(l, id))
            .collect();
        keys.sort_unstable();
        let by_key: Vec<usize> = keys.iter().map(|&k| (k & 0xffff_ffff) as usize).collect();
        assert_eq!(by_key, stable);
        assert_eq!(by_key[..3], [8, 6, 0]);
    }
}
