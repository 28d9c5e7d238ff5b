//! PPO for language models: clipped policy loss, clipped value loss, reward shaping.
//!
//! Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347), as
//! TRL implements it for LMs (`trl/trainer/ppo_trainer.py`, and the older
//! `PPOTrainer.loss`/`compute_rewards`): all means are masked means over response tokens.

use candle_core::{DType, Tensor};

use super::error::{at, expect_in_range, expect_rank, expect_shape, AlgoError};
use super::masked::{mask_like, masked_mean, masked_var};

/// The clipped policy loss and its diagnostics (all scalar tensors).
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// Differentiable with respect to `logprobs`.
    pub loss: Tensor,
    /// Fraction of tokens where the clipped term was the larger loss (detached).
    pub clip_fraction: Tensor,
    /// `½ · mean((log π_θ - log π_old)²)` (detached), TRL's `approxkl`.
    pub approx_kl: Tensor,
}

/// PPO-clip policy loss.
///
/// Shapes: `logprobs`, `old_logprobs`, `advantages`, `mask` all `(b, t)`.
///
/// ```text
/// ρ = exp(log π_θ - log π_old)
/// loss = mean_mask( max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) )
/// clip_fraction = mean_mask( [-A·clip(ρ) > -A·ρ] )
/// ```
///
/// `clip_epsilon` (ε) is usually 0.2. Source: TRL `ppo_trainer.py` (`pg_losses`,
/// `pg_losses2`, `pg_clipfrac`, `approxkl`), here with masked means throughout.
pub fn ppo_policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_epsilon: f64,
) -> Result<PolicyLossOutput, AlgoError> {
    let function = "ppo_policy_loss";
    let f = at(function);
    expect_rank(
        function,
        "logprobs",
        logprobs,
        2,
        "per-token log-probs: (batch, response_length)",
    )?;
    let hint = "every per-token input must have the shape of `logprobs`";
    expect_shape(
        function,
        "old_logprobs",
        old_logprobs,
        logprobs.dims(),
        hint,
    )?;
    expect_shape(function, "advantages", advantages, logprobs.dims(), hint)?;
    expect_in_range(
        function,
        "clip_epsilon",
        clip_epsilon,
        0.0,
        1.0,
        "a clip range in [0, 1], usually 0.2",
    )?;
    let mask = mask_like(function, logprobs, mask)?;

    let log_ratio = (logprobs - old_logprobs).map_err(&f)?; // (b, t)
    let ratio = log_ratio.exp().map_err(&f)?;
    let clipped_ratio = ratio
        .clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
        .map_err(&f)?;
    let unclipped_loss = (advantages.neg().map_err(&f)? * &ratio).map_err(&f)?;
    let clipped_loss = (advantages.neg().map_err(&f)? * &clipped_ratio).map_err(&f)?;
    let per_token = unclipped_loss.maximum(&clipped_loss).map_err(&f)?;
    let loss = masked_mean(&per_token, &mask)?;

    let clipped = clipped_loss
        .gt(&unclipped_loss)
        .map_err(&f)?
        .to_dtype(logprobs.dtype())
        .map_err(&f)?;
    let clip_fraction = masked_mean(&clipped.detach(), &mask)?;
    let squared = log_ratio.detach().sqr().map_err(&f)?;
    let approx_kl = masked_mean(&squared, &mask)?.affine(0.5, 0.0).map_err(&f)?;
    Ok(PolicyLossOutput {
        loss,
        clip_fraction,
        approx_kl,
    })
}

/// The clipped value loss and its clip fraction (scalar tensors).
#[derive(Debug, Clone)]
pub struct ValueLossOutput {
    /// Differentiable with respect to `values`.
    pub loss: Tensor,
    /// Fraction of tokens where the clipped error was the larger one (detached).
    pub clip_fraction: Tensor,
}

/// PPO clipped value loss.
///
/// Shapes: `values` (current critic), `old_values` (critic at rollout time), `returns`
/// (from [`super::gae::gae`]), `mask`, all `(b, t)`.
///
/// ```text
/// V_clip = clip(V, V_old - c, V_old + c)
/// loss = ½ · mean_mask( max((V - R)², (V_clip - R)²) )
/// ```
///
/// `clip_range_value` (c) is usually 0.2. Source: TRL `ppo_trainer.py` (`vf_losses1`,
/// `vf_losses2`, `vf_loss = 0.5 * masked_mean(max(...))`, `vf_clipfrac`); seeds/002.
pub fn ppo_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip_range_value: f64,
) -> Result<ValueLossOutput, AlgoError> {
    let function = "ppo_value_loss";
    let f = at(function);
    expect_rank(
        function,
        "values",
        values,
        2,
        "per-token values: (batch, response_length)",
    )?;
    let hint = "every per-token input must have the shape of `values`";
    expect_shape(function, "old_values", old_values, values.dims(), hint)?;
    expect_shape(function, "returns", returns, values.dims(), hint)?;
    expect_in_range(
        function,
        "clip_range_value",
        clip_range_value,
        0.0,
        f64::MAX,
        "a non-negative clip range",
    )?;
    let mask = mask_like(function, values, mask)?;

    let low = old_values.affine(1.0, -clip_range_value).map_err(&f)?;
    let high = old_values.affine(1.0, clip_range_value).map_err(&f)?;
    let clipped_values = values
        .maximum(&low)
        .map_err(&f)?
        .minimum(&high)
        .map_err(&f)?; // (b, t)
    let unclipped_error = (values - returns).map_err(&f)?.sqr().map_err(&f)?;
    let clipped_error = (clipped_values - returns).map_err(&f)?.sqr().map_err(&f)?;
    let per_token = unclipped_error.maximum(&clipped_error).map_err(&f)?;
    let loss = masked_mean(&per_token, &mask)?
        .affine(0.5, 0.0)
        .map_err(&f)?;
    let clipped = clipped_error
        .gt(&unclipped_error)
        .map_err(&f)?
        .to_dtype(values.dtype())
        .map_err(&f)?;
    let clip_fraction = masked_mean(&clipped.detach(), &mask)?;
    Ok(ValueLossOutput {
        loss,
        clip_fraction,
    })
}

/// Per-token rewards for PPO and the KL part of them, both `(b, t)`.
#[derive(Debug, Clone)]
pub struct ShapedRewards {
    /// `-kl_coef · kl` on every response token plus the score on the last one.
    pub rewards: Tensor,
    /// `-kl_coef · kl` alone (TRL's `non_score_reward`), zero on padding.
    pub non_score_rewards: Tensor,
}

/// Folds a sequence score and a per-token KL penalty into per-token rewards.
///
/// Shapes: `scores` `(b,)`, `kl_per_token` `(b, t)` (from [`super::kl::kl_estimate`]),
/// `mask` `(b, t)`, 1 on response tokens.
///
/// ```text
/// rewards_t = -kl_coef · kl_t · mask_t  +  score · [t = last response token]
/// ```
///
/// Source: TRL `PPOTrainer.compute_rewards` (`reward[last_non_masked_index] += score`);
/// seeds/002 `compute_rewards_with_kl_penalty`. Clip or penalise the scores first with
/// [`clip_scores`] and [`penalize_missing_eos`]. A row with an empty mask gets no score.
pub fn per_token_rewards(
    scores: &Tensor,
    kl_per_token: &Tensor,
    kl_coef: f64,
    mask: &Tensor,
) -> Result<ShapedRewards, AlgoError> {
    let function = "per_token_rewards";
    let f = at(function);
    let dims = expect_rank(
        function,
        "kl_per_token",
        kl_per_token,
        2,
        "per-token KL: (batch, response_length)",
    )?;
    let (batch, length) = (dims[0], dims[1]);
    expect_shape(
        function,
        "scores",
        scores,
        &[batch],
        "one score per sequence",
    )?;
    let mask = mask_like(function, kl_per_token, mask)?.detach();
    let non_score_rewards = (kl_per_token.detach() * &mask)
        .map_err(&f)?
        .affine(-kl_coef, 0.0)
        .map_err(&f)?;

    // One-hot of the last masked position per row, built on the host: the mask is small.
    let mask_rows = mask
        .to_dtype(DType::F64)
        .map_err(&f)?
        .to_vec2::<f64>()
        .map_err(&f)?;
    let mut last_token = vec![0f64; batch * length];
    for (row, row_mask) in mask_rows.iter().enumerate() {
        if let Some(last) = row_mask.iter().rposition(|&m| m > 0.0) {
            last_token[row * length + last] = 1.0;
        }
    }
    let last_token = Tensor::from_vec(last_token, (batch, length), kl_per_token.device())
        .map_err(&f)?
        .to_dtype(kl_per_token.dtype())
        .map_err(&f)?;
    let score_column = scores
        .detach()
        .to_dtype(kl_per_token.dtype())
        .map_err(&f)?
        .unsqueeze(1)
        .map_err(&f)?; // (b, 1)
    let placed = last_token.broadcast_mul(&score_column).map_err(&f)?;
    let rewards = (&non_score_rewards + placed).map_err(&f)?;
    Ok(ShapedRewards {
        rewards,
        non_score_rewards,
    })
}

/// Clamps sequence scores to `[-limit, limit]` (TRL's `score_clip`, seeds/002
/// `reward_score_clip`). Shape `(b,)` in and out.
pub fn clip_scores(scores: &Tensor, limit: f64) -> Result<Tensor, AlgoError> {
    expect_in_range(
        "clip_scores",
        "limit",
        limit,
        0.0,
        f64::MAX,
        "a non-negative bound",
    )?;
    scores.clamp(-limit, limit).map_err(at("clip_scores"))
}

/// Subtracts `penalty` from the score of every completion that never produced EOS
/// (TRL `missing_eos_penalty`: `scores[~contain_eos_token] -= penalty`).
/// Shapes: `scores` `(b,)`, `has_eos` `b` booleans.
pub fn penalize_missing_eos(
    scores: &Tensor,
    has_eos: &[bool],
    penalty: f64,
) -> Result<Tensor, AlgoError> {
    let function = "penalize_missing_eos";
    let f = at(function);
    expect_shape(
        function,
        "scores",
        scores,
        &[has_eos.len()],
        "one score per completion in `has_eos`",
    )?;
    let deduction: Vec<f64> = has_eos
        .iter()
        .map(|&ended| if ended { 0.0 } else { penalty })
        .collect();
    let deduction = Tensor::from_vec(deduction, has_eos.len(), scores.device())
        .map_err(&f)?
        .to_dtype(scores.dtype())
        .map_err(&f)?;
    (scores - deduction).map_err(&f)
}

/// Explained variance of the critic, `1 - Var_mask(R - V) / Var_mask(R)` (CleanRL's
/// `explained_var`; the Bessel factors cancel). Shapes: `(b, t)`; NaN when Var(R) = 0.
pub fn explained_variance(
    values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
) -> Result<f64, AlgoError> {
    let function = "explained_variance";
    let f = at(function);
    expect_shape(
        function,
        "returns",
        returns,
        values.dims(),
        "returns and values are per token alike",
    )?;
    let residual_variance = masked_var(&(returns - values).map_err(&f)?, mask, true)?;
    let return_variance = masked_var(returns, mask, true)?;
    let read = |t: Tensor| {
        t.to_dtype(DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(&f)
    };
    let (residual, total) = (read(residual_variance)?, read(return_variance)?);
    if total == 0.0 {
        return Ok(f64::NAN);
    }
    Ok(1.0 - residual / total)
}
