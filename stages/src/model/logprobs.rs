//! Teacher-forced log-probabilities and entropies of given tokens under a model, the
//! building block of SFT (negative log-likelihood), DPO (sequence log-ratios), PPO and
//! GRPO (per-token ratios) and KL penalties.

use super::causal_lm::CausalLm;
use super::fused;
use super::Result;
use candle_core::{DType, Tensor, D};

/// `log_softmax(logits)[targets]`: logits (b, t, vocab), targets (b, t) u32 → (b, t) f32.
/// One fused pass per direction for f32 on the CPU (`fused::token_logprobs`).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    fused::token_logprobs(logits, targets)
}

/// Entropy of each next-token distribution, `-Σ p log p`: logits (b, t, vocab) → (b, t).
pub fn token_entropy(logits: &Tensor) -> Result<Tensor> {
    fused::token_entropy(logits)
}

/// A right-padded batch of prompt+completion sequences.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// (b, t) u32
    pub input_ids: Tensor,
    /// (b, t), 1 on real tokens
    pub attention_mask: Tensor,
    /// (b, t), 1 on completion tokens (the ones scored)
    pub completion_mask: Tensor,
}

/// Per-token log-probs of a batch's tokens, shifted: column i scores token i+1.
#[derive(Clone, Debug)]
pub struct CompletionLogprobs {
    /// (b, t-1) f32: log p(input_ids[:, i+1] | input_ids[:, ..=i])
    pub logprobs: Tensor,
    /// (b, t-1) f32: entropy of the distribution that predicted token i+1
    pub entropy: Tensor,
    /// (b, t-1) f32: 1 where token i+1 is a real completion token
    pub mask: Tensor,
}

impl CompletionLogprobs {
    /// Σ over completion tokens of each row: (b,).
    pub fn sequence_logprobs(&self) -> Result<Tensor> {
        Ok((&self.logprobs * &self.mask)?.sum(D::Minus1)?)
    }

    /// Mean over all completion tokens of the batch (a scalar), e.g. the SFT loss is its negative.
    pub fn mean_logprob(&self) -> Result<Tensor> {
        let total = (&self.logprobs * &self.mask)?.sum_all()?;
        let count = self.mask.sum_all()?.maximum(1.0)?;
        Ok(total.div(&count)?)
    }
}

/// Scores the completion tokens of `batch` under `model` (differentiable).
pub fn completion_logprobs(model: &CausalLm, batch: &TokenBatch) -> Result<CompletionLogprobs> {
    let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), None)?; // (b, t, v)
    logprobs_from_logits(&logits, batch)
}

/// As [`completion_logprobs`], from logits already computed for `batch`.
pub fn logprobs_from_logits(logits: &Tensor, batch: &TokenBatch) -> Result<CompletionLogprobs> {
    let time = batch.input_ids.dim(1)?;
    let predicting = logits.narrow(1, 0, time - 1)?; // (b, t-1, v)
    let targets = batch.input_ids.narrow(1, 1, time - 1)?; // (b, t-1)
    let mask = (batch
        .completion_mask
        .narrow(1, 1, time - 1)?
        .to_dtype(DType::F32)?
        * batch
            .attention_mask
            .narrow(1, 1, time - 1)?
            .to_dtype(DType::F32)?)?;
    Ok(CompletionLogprobs {
        logprobs: token_logprobs(&predicting, &targets)?,
        entropy: token_entropy(&predicting)?,
        mask,
    })
}
