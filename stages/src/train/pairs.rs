//! Scoring preference pairs with a causal LM: the summed log-probability of each reply
//! given its prompt, for DPO (policy and reference) and for the "policy ranks by its own
//! log-probs" baseline a reward model must beat.

use super::StageResultExt;
use crate::algo::lm::{sequence_logprobs, token_logprobs};
use crate::data::batch::{collate_pairs, Batch, EncodedPair};
use crate::model::CausalLm;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rlhf_engine::StageError;

/// Summed reply log-probs of a [`collate_pairs`] batch, (2B,): rows 0..B chosen, B..2B
/// rejected. With `rng`, LoRA dropout is on (training); differentiable either way.
pub fn reply_logprobs(
    model: &CausalLm,
    batch: &Batch,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<Tensor, StageError> {
    let device = Device::Cpu;
    let ids = batch.input_ids_tensor(&device).or_fail("batch")?; // (2b, t)
    let loss_mask = batch.loss_mask_tensor(&device).or_fail("batch")?; // (2b, t)
    let hidden = super::batch_hidden_states(model, batch, rng)?; // (2b, t, d)
    let logits = model.logits(&hidden).or_fail("forward pass")?; // (2b, t, v)
    let time = batch.seq_len;
    let per_token = token_logprobs(
        &logits.narrow(1, 0, time - 1).or_fail("shift")?,
        &ids.narrow(1, 1, time - 1).or_fail("shift")?,
    )
    .or_fail("token log-probs")?; // (2b, t-1)
    sequence_logprobs(
        &per_token,
        &loss_mask.narrow(1, 1, time - 1).or_fail("shift")?,
    )
    .or_fail("sequence log-probs")
}

/// Reply token counts of a [`collate_pairs`] batch, (2B,) like [`reply_logprobs`].
pub fn reply_token_counts(batch: &Batch) -> Vec<f32> {
    batch
        .lengths
        .iter()
        .zip(&batch.prompt_lengths)
        .map(|(length, prompt)| (length - prompt) as f32)
        .collect()
}

/// Summed log-probs of every pair's chosen and rejected reply, in pair order, computed
/// without gradients in batches of `batch_size`: (chosen, rejected, chosen_tokens,
/// rejected_tokens).
pub fn score_pairs(
    model: &CausalLm,
    pairs: &[EncodedPair],
    pad: u32,
    batch_size: usize,
) -> Result<[Vec<f32>; 4], StageError> {
    let mut out: [Vec<f32>; 4] = Default::default();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let batch = collate_pairs(&refs, pad);
        let scores: Vec<f32> = reply_logprobs(model, &batch, None)?
            .detach()
            .to_vec1()
            .or_fail("reading log-probs")?;
        let counts = reply_token_counts(&batch);
        let n = chunk.len();
        out[0].extend_from_slice(&scores[..n]);
        out[1].extend_from_slice(&scores[n..]);
        out[2].extend_from_slice(&counts[..n]);
        out[3].extend_from_slice(&counts[n..]);
    }
    Ok(out)
}

/// Encodes every preference row; rows whose prompt leaves no room are dropped.
pub fn encode_pairs(
    encoder: &crate::data::batch::Encoder,
    rows: &[crate::data::row::Row],
) -> Result<Vec<EncodedPair>, StageError> {
    let mut pairs = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        if let Some(pair) = encoder
            .encode_pair(row)
            .or_fail(&format!("encoding preference row {}", index + 1))?
        {
            pairs.push(pair);
        }
    }
    Ok(pairs)
}

/// Length used to group pairs into batches: prompt plus the longer reply.
pub fn pair_length(pair: &EncodedPair) -> usize {
    pair.prompt.len() + pair.chosen.len().max(pair.rejected.len())
}
