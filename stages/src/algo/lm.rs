//! Language-model quantities from logits: per-token log-probs, masked cross-entropy,
//! entropy. Used by pretraining, SFT, DPO, PPO, GRPO and evaluation alike.
//!
//! Position `i` of `logits` is the distribution for `labels[i]`: shift before calling
//! (`logits[:, :-1]` with `input_ids[:, 1:]`), as `transformers`' causal-LM loss does.

use candle_core::{DType, Tensor, D};

use super::error::{at, expect_rank, expect_shape, AlgoError};
use super::masked::{mask_like, masked_mean};
use super::ops::log_softmax_last_dim;

/// `log p(labels[b, t] | logits[b, t])`, shape `(b, t)`.
///
/// Shapes: `logits` `(b, t, v)`, `labels` `(b, t)` of an integer dtype (`u32` or `i64`).
/// log-softmax then gather (TRL `selective_log_softmax`); differentiable in the logits.
pub fn token_logprobs(logits: &Tensor, labels: &Tensor) -> Result<Tensor, AlgoError> {
    let function = "token_logprobs";
    let f = at(function);
    let dims = expect_rank(
        function,
        "logits",
        logits,
        3,
        "logits are (batch, length, vocab)",
    )?;
    expect_shape(
        function,
        "labels",
        labels,
        &dims[..2],
        "one label per logit row: (batch, length)",
    )?;
    let log_probs = log_softmax_last_dim(logits)?; // (b, t, v)
                                                   // gather needs a contiguous index on CPU (NOTES.md).
    let index = labels
        .to_dtype(DType::U32)
        .map_err(&f)?
        .unsqueeze(2)
        .map_err(&f)?
        .contiguous()
        .map_err(&f)?; // (b, t, 1)
    log_probs
        .gather(&index, 2)
        .map_err(&f)?
        .squeeze(2)
        .map_err(&f)
}

/// Mean negative log-likelihood over the tokens the mask selects, a scalar tensor.
///
/// Shapes: `logits` `(b, t, v)`, `labels` `(b, t)`, `loss_mask` `(b, t)` (1 on tokens
/// that count, e.g. completion tokens for SFT). Equals
/// `torch.nn.functional.cross_entropy(logits[m], labels[m])` (mean reduction).
pub fn masked_token_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor, AlgoError> {
    let function = "masked_token_cross_entropy";
    let f = at(function);
    let log_likelihood = token_logprobs(logits, labels)?; // (b, t)
    let mask = mask_like(function, &log_likelihood, loss_mask)?;
    masked_mean(&log_likelihood.neg().map_err(&f)?, &mask)
}

/// Sum of per-token log-probs over the masked tokens of each row, `(b, t) → (b,)`:
/// the sequence log-probability DPO compares.
pub fn sequence_logprobs(token_logprobs: &Tensor, mask: &Tensor) -> Result<Tensor, AlgoError> {
    let function = "sequence_logprobs";
    let f = at(function);
    expect_rank(
        function,
        "token_logprobs",
        token_logprobs,
        2,
        "per-token log-probs: (batch, length)",
    )?;
    let mask = mask_like(function, token_logprobs, mask)?;
    (token_logprobs * mask).map_err(&f)?.sum(1).map_err(&f)
}

/// Entropy of the predicted distribution at every position, `(b, t, v) → (b, t)`:
/// `H = -Σ_v p_v log p_v` (TRL: `logsumexp(logits) - Σ softmax(logits)·logits`, the same
/// quantity). Differentiable; combine with [`masked_mean`] for a bonus or a metric.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor, AlgoError> {
    let function = "entropy_from_logits";
    let f = at(function);
    expect_rank(
        function,
        "logits",
        logits,
        3,
        "logits are (batch, length, vocab)",
    )?;
    let log_probs = log_softmax_last_dim(logits)?; // (b, t, v)
    let probs = log_probs.exp().map_err(&f)?;
    (probs * log_probs)
        .map_err(&f)?
        .sum(D::Minus1)
        .map_err(&f)?
        .neg()
        .map_err(&f)
}
