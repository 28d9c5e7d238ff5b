//! Batched generation with an explicit KV cache, for rollouts and evaluation.
//!
//! Prompts arrive unpadded; they are left-padded here (and only here) so that every row's
//! next token sits in the same column: pads get attention-mask 0, and each row's
//! positions count its own real tokens, so a row computes what it would alone. Rows
//! that finish (EOS, a stop string) are dropped from the batch and the cache.
//! Sampling: greedy, or temperature with top-k / top-p, seeded with ChaCha8.

use super::causal_lm::CausalLm;
use super::kv_cache::LayerCache;
use super::tokenizer::ModelTokenizer;
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
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
    /// Fed in the internal left padding and for finished rows; never attended to.
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
#[derive(Clone, Debug)]
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

/// Generates continuations of `prompts` (each unpadded, non-empty) in one batch.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
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
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let mut state = DecodeState::prefill(model, prompts, settings.pad_token_id)?;
    for step in 0..settings.max_new_tokens {
        let logits: Vec<Vec<f32>> = state.logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut finished = Vec::new();
        let mut next = Vec::with_capacity(state.active.len());
        for (slot, &row) in state.active.iter().enumerate() {
            let (token, logprob) = pick_token(&logits[slot], settings, &mut rng);
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
        state.drop_slots(&finished, &mut next)?;
        state.step(model, &next)?;
    }
    Ok(output)
}

/// The batch being decoded: which prompt rows are still active, their cache and masks.
struct DecodeState {
    /// Prompt index of each batch slot.
    active: Vec<usize>,
    /// Real tokens so far per slot (the next position id).
    lengths: Vec<u32>,
    /// (slots, keys) 1 on real keys, the internal left padding 0.
    key_mask: Vec<Vec<f32>>,
    caches: Vec<LayerCache>,
    /// (slots, vocab) logits for the next token.
    logits: Tensor,
}

impl DecodeState {
    fn prefill(model: &CausalLm, prompts: &[Vec<u32>], pad: u32) -> Result<Self> {
        let device = model.device();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut positions, mut key_mask) = (Vec::new(), Vec::new(), Vec::new());
        for prompt in prompts {
            let padding = width - prompt.len();
            ids.extend(std::iter::repeat_n(pad, padding).chain(prompt.iter().copied()));
            positions.extend(std::iter::repeat_n(0u32, padding).chain(0..prompt.len() as u32));
            key_mask.push([vec![0.0f32; padding], vec![1.0; prompt.len()]].concat());
        }
        let rows = prompts.len();
        let ids = Tensor::from_vec(ids, (rows, width), device)?;
        let positions = Tensor::from_vec(positions, (rows, width), device)?;
        let mut caches = vec![LayerCache::default(); model.layers.len()];
        let hidden = model.run_layers(
            &ids,
            &positions,
            None,
            Some((&mut caches, &key_mask)),
            &mut None,
        )?; // (b, t, d)
        let logits = model.logits(&hidden.narrow(1, width - 1, 1)?.squeeze(1)?)?; // (b, vocab)
        Ok(DecodeState {
            active: (0..rows).collect(),
            lengths: prompts.iter().map(|p| p.len() as u32).collect(),
            key_mask,
            caches,
            logits,
        })
    }

    /// Removes finished slots from the batch, the cache and `next`.
    fn drop_slots(&mut self, finished: &[usize], next: &mut Vec<u32>) -> Result<()> {
        if finished.is_empty() {
            return Ok(());
        }
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|s| !finished.contains(s))
            .collect();
        for cache in self.caches.iter_mut() {
            cache.select_rows(&keep);
        }
        self.active = keep.iter().map(|&s| self.active[s]).collect();
        self.lengths = keep.iter().map(|&s| self.lengths[s]).collect();
        self.key_mask = keep.iter().map(|&s| self.key_mask[s].clone()).collect();
        *next = keep.iter().map(|&s| next[s]).collect();
        Ok(())
    }

    /// Feeds one token per slot and computes the next logits.
    fn step(&mut self, model: &CausalLm, next: &[u32]) -> Result<()> {
        let device = model.device();
        let slots = next.len();
        for row in self.key_mask.iter_mut() {
            row.push(1.0);
        }
        let ids = Tensor::from_vec(next.to_vec(), (slots, 1), device)?;
        let positions = Tensor::from_vec(self.lengths.clone(), (slots, 1), device)?;
        self.lengths.iter_mut().for_each(|l| *l += 1);
        let hidden = model.run_layers(
            &ids,
            &positions,
            None,
            Some((&mut self.caches, &self.key_mask)),
            &mut None,
        )?; // (b, 1, d)
        self.logits = model.logits(&hidden.squeeze(1)?)?; // (b, vocab)
        Ok(())
    }
}

/// log-softmax in f64 for accuracy.
fn log_softmax(values: &[f64]) -> Vec<f64> {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = values.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    values.iter().map(|v| v - log_sum).collect()
}

/// Picks the next token of one row; returns it with its log-prob.
fn pick_token(logits: &[f32], settings: &GenerationSettings, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let greedy = settings.temperature <= 0.0;
    let temperature = if greedy { 1.0 } else { settings.temperature };
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let logprobs = log_softmax(&scaled);
    if greedy {
        // The first maximum, as torch.argmax picks it.
        let best =
            (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
        return (best as u32, logprobs[best] as f32);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    let mut keep = order.len();
    if let Some(k) = settings.top_k.filter(|&k| k > 0) {
        keep = keep.min(k);
    }
    if let Some(p) = settings.top_p.filter(|&p| p < 1.0) {
        let mut cumulative = 0.0;
        for (rank, &token) in order.iter().enumerate().take(keep) {
            cumulative += logprobs[token].exp();
            if cumulative >= p {
                keep = rank + 1;
                break;
            }
        }
    }
    let kept = &order[..keep.max(1)];
    let total: f64 = kept.iter().map(|&t| logprobs[t].exp()).sum();
    let mut draw = rng.random::<f64>() * total;
    for &token in kept {
        draw -= logprobs[token].exp();
        if draw <= 0.0 {
            return (token as u32, logprobs[token] as f32);
        }
    }
    let last = kept[kept.len() - 1];
    (last as u32, logprobs[last] as f32)
}
