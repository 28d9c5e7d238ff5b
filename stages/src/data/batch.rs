//! From rows to training batches: tokenising through the prompt template, padding,
//! loss masks, epoch order (plain or length-grouped) and packing.
//!
//! Conventions every training stage relies on:
//! - Prompt and completion are tokenised separately and concatenated, so the prompt
//!   tokens are exactly what generation starts from. No special tokens are added by the
//!   tokenizer; `<eos>` is appended to every completion (and to pretraining texts) when
//!   the template is plain, and `<bos>` is prepended only when asked ([`Encoder::with_bos`]).
//! - RIGHT padding with the tokenizer's pad id. `attention_mask[i][t] = 1` for real tokens.
//! - `loss_mask[i][t] = 1` when token `t` is a training target, i.e. the logits at
//!   position `t − 1` are scored against it. A consumer takes logits `[:, :-1]`, targets
//!   `input_ids[:, 1:]` and mask `loss_mask[:, 1:]`.
//! - Masks and ids are plain row-major `Vec`s of shape (batch_size, seq_len); the
//!   `*_tensor` methods turn them into candle tensors.

use super::error::DataError;
use super::row::{Message, Row};
use super::template::Renderer;
use super::tokenizer::SpecialTokens;
use candle_core::{Device, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

/// Token ids of one prompt/completion example (`completion` ends with eos when added).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// Token ids of one preference pair; both replies follow the same prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Tokenises rows the same way for every stage.
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    renderer: &'a Renderer,
    special: SpecialTokens,
    add_bos: bool,
    max_length: Option<usize>,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, renderer: &'a Renderer, special: SpecialTokens) -> Self {
        Encoder {
            tokenizer,
            renderer,
            special,
            add_bos: false,
            max_length: None,
        }
    }

    /// Prepend the bos token to every prompt and pretraining text (Llama-style models).
    pub fn with_bos(mut self, add_bos: bool) -> Self {
        self.add_bos = add_bos;
        self
    }

    /// Longest prompt + completion: completions are cut to fit; an example whose prompt
    /// alone fills it is dropped (it would train on nothing).
    pub fn with_max_length(mut self, max_length: usize) -> Self {
        self.max_length = Some(max_length);
        self
    }

    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| DataError::tokenizer("(encode)", e.to_string()))
    }

    fn with_optional_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.add_bos, self.special.bos) {
            ids.insert(0, bos);
        }
        ids
    }

    /// The prompt as the model sees it, for generation.
    pub fn encode_prompt(&self, row: &Row) -> Result<Vec<u32>, DataError> {
        let rendered = self.renderer.render_row(row)?;
        Ok(self.with_optional_bos(self.encode_text(&rendered.prompt)?))
    }

    /// Prompt and completion ids; `None` when the prompt leaves no room under max_length.
    pub fn encode_example(&self, row: &Row) -> Result<Option<EncodedExample>, DataError> {
        let (prompt, completion) = render_for_training(self.renderer, row)?;
        let prompt = self.encode_text(&prompt)?;
        let completion = self.encode_text(&completion)?;
        Ok(self.assemble(prompt, completion))
    }

    /// [`Encoder::encode_example`] for many rows at once: the tokenizer spreads the rows
    /// over its thread pool; the result is the same as row by row, in row order.
    pub fn encode_examples(&self, rows: &[Row]) -> Result<Vec<Option<EncodedExample>>, DataError> {
        let rendered: Vec<(String, String)> = rows
            .iter()
            .map(|row| render_for_training(self.renderer, row))
            .collect::<Result<_, _>>()?;
        let (prompts, completions): (Vec<String>, Vec<String>) = rendered.into_iter().unzip();
        let prompts = self.encode_texts(prompts)?;
        let completions = self.encode_texts(completions)?;
        Ok(prompts
            .into_iter()
            .zip(completions)
            .map(|(p, c)| self.assemble(p, c))
            .collect())
    }

    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>, DataError> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts, false)
            .map_err(|e| DataError::tokenizer("(encode)", e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Adds bos and eos as configured and applies max_length.
    fn assemble(&self, prompt: Vec<u32>, mut completion: Vec<u32>) -> Option<EncodedExample> {
        let prompt = self.with_optional_bos(prompt);
        if self.renderer.template().appends_eos() {
            completion.push(self.special.eos);
        }
        if let Some(room) = self.room_after(&prompt) {
            if room == 0 {
                return None;
            }
            completion.truncate(room);
        }
        Some(EncodedExample { prompt, completion })
    }

    /// A preference pair's ids; `None` when the prompt leaves no room under max_length.
    /// Each reply is rendered as the template renders an assistant turn (so a chat
    /// template closes it), exactly like an SFT completion.
    pub fn encode_pair(&self, row: &Row) -> Result<Option<EncodedPair>, DataError> {
        let (Some(chosen), Some(rejected)) = (&row.chosen, &row.rejected) else {
            return Err(DataError::template(
                "the row has no `chosen` and `rejected`",
            ));
        };
        let turns = match (&row.messages, &row.prompt) {
            (Some(messages), _) => messages.clone(),
            (None, Some(prompt)) => vec![Message::new("user", prompt)],
            (None, None) => {
                return Err(DataError::template(
                    "the preference row has no `prompt` or `messages`",
                ))
            }
        };
        let chosen = self.renderer.render_turns(&turns, Some(chosen))?;
        let rejected = self.renderer.render_turns(&turns, Some(rejected))?;
        let prompt = self.encode_text(&chosen.prompt)?;
        let chosen = self.encode_text(chosen.completion.as_deref().unwrap_or_default())?;
        let rejected = self.encode_text(rejected.completion.as_deref().unwrap_or_default())?;
        let (Some(chosen), Some(rejected)) = (
            self.assemble(prompt.clone(), chosen),
            self.assemble(prompt, rejected),
        ) else {
            return Ok(None);
        };
        Ok(Some(EncodedPair {
            prompt: chosen.prompt,
            chosen: chosen.completion,
            rejected: rejected.completion,
        }))
    }

    /// Pretraining ids: the row's text (or prompt + completion, untemplated) plus eos,
    /// cut to max_length.
    pub fn encode_lm_text(&self, row: &Row) -> Result<Vec<u32>, DataError> {
        let text = row.lm_text().ok_or_else(|| {
            DataError::template("the row has no `text` (or `prompt` and `completion`)")
        })?;
        let mut ids = self.with_optional_bos(self.encode_text(&text)?);
        ids.push(self.special.eos);
        if let Some(max_length) = self.max_length {
            ids.truncate(max_length);
        }
        Ok(ids)
    }

    fn room_after(&self, prompt: &[u32]) -> Option<usize> {
        self.max_length.map(|max| max.saturating_sub(prompt.len()))
    }
}

fn render_for_training(renderer: &Renderer, row: &Row) -> Result<(String, String), DataError> {
    let rendered = renderer.render_row(row)?;
    let completion = rendered.completion.ok_or_else(|| {
        DataError::template("the row has no completion (or final assistant turn) to train on")
    })?;
    Ok((rendered.prompt, completion))
}

/// A right-padded batch; every `Vec` is row-major (batch_size, seq_len).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    pub loss_mask: Vec<u8>,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
    /// Prompt tokens per row (0 for pretraining text).
    pub prompt_lengths: Vec<usize>,
}

impl Batch {
    /// Each row's `(prompt, target)` tokens, padding dropped.
    pub fn rows(&self) -> Vec<(&[u32], &[u32])> {
        (0..self.batch_size)
            .map(|r| {
                let row = &self.input_ids[r * self.seq_len..][..self.lengths[r]];
                row.split_at(self.prompt_lengths[r])
            })
            .collect()
    }

    /// Pads `(prompt, target)` sequences; the loss covers the target tokens.
    pub fn from_parts(parts: &[(&[u32], &[u32])], pad: u32) -> Batch {
        let batch_size = parts.len();
        let seq_len = parts
            .iter()
            .map(|(p, t)| p.len() + t.len())
            .max()
            .unwrap_or(0);
        let mut batch = Batch {
            batch_size,
            seq_len,
            input_ids: vec![pad; batch_size * seq_len],
            attention_mask: vec![0; batch_size * seq_len],
            loss_mask: vec![0; batch_size * seq_len],
            lengths: Vec::with_capacity(batch_size),
            prompt_lengths: Vec::with_capacity(batch_size),
        };
        for (i, (prompt, target)) in parts.iter().enumerate() {
            let row = i * seq_len;
            let length = prompt.len() + target.len();
            batch.input_ids[row..row + prompt.len()].copy_from_slice(prompt);
            batch.input_ids[row + prompt.len()..row + length].copy_from_slice(target);
            batch.attention_mask[row..row + length].fill(1);
            batch.loss_mask[row + prompt.len()..row + length].fill(1);
            batch.lengths.push(length);
            batch.prompt_lengths.push(prompt.len());
        }
        batch
    }

    /// Real (non-padding) tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Token ids as a u32 tensor (b, t).
    pub fn input_ids_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.input_ids, (self.batch_size, self.seq_len), device)
    }

    /// Attention mask as an f32 tensor of 0/1 (b, t).
    pub fn attention_mask_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        mask_tensor(&self.attention_mask, self.batch_size, self.seq_len, device)
    }

    /// Loss mask as an f32 tensor of 0/1 (b, t).
    pub fn loss_mask_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        mask_tensor(&self.loss_mask, self.batch_size, self.seq_len, device)
    }
}

fn mask_tensor(
    mask: &[u8],
    rows: usize,
    columns: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = mask.iter().map(|&m| f32::from(m)).collect();
    Tensor::from_vec(values, (rows, columns), device) // (b, t)
}

/// SFT batch: loss on completion tokens only.
pub fn collate_examples(examples: &[&EncodedExample], pad: u32) -> Batch {
    let parts: Vec<(&[u32], &[u32])> = examples
        .iter()
        .map(|e| (&e.prompt[..], &e.completion[..]))
        .collect();
    Batch::from_parts(&parts, pad)
}

/// Pretraining batch: loss on every real token.
pub fn collate_texts(texts: &[&[u32]], pad: u32) -> Batch {
    let parts: Vec<(&[u32], &[u32])> = texts.iter().map(|t| (&[][..], *t)).collect();
    Batch::from_parts(&parts, pad)
}

/// Preference batch of 2·B rows: rows 0..B are prompt+chosen, rows B..2B prompt+rejected
/// (one forward pass scores both); the loss mask covers the replies.
pub fn collate_pairs(pairs: &[&EncodedPair], pad: u32) -> Batch {
    let chosen = pairs.iter().map(|p| (&p.prompt[..], &p.chosen[..]));
    let rejected = pairs.iter().map(|p| (&p.prompt[..], &p.rejected[..]));
    let parts: Vec<(&[u32], &[u32])> = chosen.chain(rejected).collect();
    Batch::from_parts(&parts, pad)
}

/// Prompts for generation, right-padded (no loss).
pub fn collate_prompts(prompts: &[&[u32]], pad: u32) -> Batch {
    let mut batch = collate_texts(prompts, pad);
    batch.loss_mask.fill(0);
    batch.prompt_lengths.clone_from(&batch.lengths);
    batch
}

/// Batches of example indices for one epoch, seeded by (seed, epoch): a shuffle, then
/// either plain chunks or — with `group_by_length` — chunks of similar length (within
/// mega-batches of 50 batches, sorted by length, the batch order shuffled again), which
/// cuts padding the way transformers' `group_by_length` does. The last batch may be short.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in order.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

/// Fisher–Yates with a fixed draw (u64 modulo), so orders never change with rand versions.
pub fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Packs token sequences (each already ending with eos) end to end into blocks of
/// `block_size` tokens for pretraining; the last block may be shorter. Attention then
/// spans document boundaries, as in GPT-style packing.
pub fn pack_sequences(sequences: &[Vec<u32>], block_size: usize) -> Vec<Vec<u32>> {
    let block_size = block_size.max(1);
    let stream: Vec<u32> = sequences.iter().flatten().copied().collect();
    stream.chunks(block_size).map(<[u32]>::to_vec).collect()
}
