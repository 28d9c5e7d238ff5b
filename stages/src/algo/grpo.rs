//! GRPO: group-relative advantages (or RLOO baselines) and the clipped, KL-regularised loss.
//!
//! Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300) §4.1; the formulas follow TRL's
//! `GRPOTrainer` (`trl/trainer/grpo_trainer.py`: `_generate_and_score_completions` for the
//! advantages, `_compute_loss` for the loss). RLOO: Ahmadian et al. 2024 (arXiv:2402.14740),
//! TRL `RLOOTrainer`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{at, expect_in_range, expect_rank, expect_shape, AlgoError};
use super::kl::{kl_estimate, KlEstimator};
use super::masked::{mask_like, masked_mean, masked_mean_per_row};

/// Rewards as `f64` groups of `group_size`, after checking the layout.
fn reward_groups(
    function: &'static str,
    rewards: &Tensor,
    group_size: usize,
) -> Result<Vec<f64>, AlgoError> {
    let f = at(function);
    let dims = expect_rank(
        function,
        "rewards",
        rewards,
        1,
        "one reward per completion: (n_prompts * group_size,)",
    )?;
    if group_size < 2 || dims[0] % group_size != 0 {
        return Err(AlgoError::Parameter {
            function,
            name: "group_size",
            value: group_size as f64,
            expected:
                "at least 2, dividing the number of rewards (completions of a prompt are adjacent)",
        });
    }
    rewards
        .to_dtype(DType::F64)
        .map_err(&f)?
        .to_vec1::<f64>()
        .map_err(&f)
}

/// Group-normalised advantages, `(n_prompts * group_size,)` in and out (detached).
///
/// Completions of one prompt are adjacent. For each group with mean μ and unbiased standard
/// deviation σ (torch's default `std`): `A_i = r_i - μ`, divided by `σ + eps` when
/// `scale_by_std` (TRL `scale_rewards`, `eps` = 1e-4 there). Without scaling this is
/// Dr. GRPO's advantage (Liu et al. 2025, arXiv:2503.20783).
pub fn group_advantages(
    rewards: &Tensor,
    group_size: usize,
    scale_by_std: bool,
    eps: f64,
) -> Result<Tensor, AlgoError> {
    let function = "group_advantages";
    let values = reward_groups(function, rewards, group_size)?;
    let mut advantages = Vec::with_capacity(values.len());
    for group in values.chunks(group_size) {
        let mean = group.iter().sum::<f64>() / group_size as f64;
        let variance =
            group.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (group_size - 1) as f64;
        let scale = if scale_by_std {
            variance.sqrt() + eps
        } else {
            1.0
        };
        advantages.extend(group.iter().map(|r| (r - mean) / scale));
    }
    let f = at(function);
    Tensor::from_vec(advantages, rewards.dims(), rewards.device())
        .map_err(&f)?
        .to_dtype(rewards.dtype())
        .map_err(&f)
}

/// REINFORCE-leave-one-out advantages, `(n_prompts * group_size,)` in and out (detached):
/// `A_i = r_i - (Σ_{j≠i} r_j) / (k - 1)` within each group of `k = group_size`
/// (TRL `RLOOTrainer`: `baseline = (rlhf_reward.sum(0) - rlhf_reward) / (rloo_k - 1)`).
pub fn rloo_advantages(rewards: &Tensor, group_size: usize) -> Result<Tensor, AlgoError> {
    let function = "rloo_advantages";
    let values = reward_groups(function, rewards, group_size)?;
    let mut advantages = Vec::with_capacity(values.len());
    for group in values.chunks(group_size) {
        let total: f64 = group.iter().sum();
        advantages.extend(
            group
                .iter()
                .map(|r| r - (total - r) / (group_size - 1) as f64),
        );
    }
    let f = at(function);
    Tensor::from_vec(advantages, rewards.dims(), rewards.device())
        .map_err(&f)?
        .to_dtype(rewards.dtype())
        .map_err(&f)
}

/// How per-token GRPO losses become one number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LossAggregation {
    /// Sum over all response tokens of the batch / number of those tokens (TRL `bnpo`,
    /// DAPO's token-level loss): long completions weigh in proportion to their length.
    #[default]
    Token,
    /// Mean over tokens within each sequence, then mean over sequences (TRL `grpo`, the
    /// original paper's `1/|o_i|` normalisation).
    Sequence,
}

/// Settings of [`grpo_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    /// ε of the clipped ratio, usually 0.2.
    pub clip_epsilon: f64,
    /// β, the weight of the k3 KL to the reference; 0 disables it (no reference needed).
    pub beta: f64,
    pub aggregation: LossAggregation,
}

/// The GRPO loss and diagnostics (scalar tensors).
#[derive(Debug, Clone)]
pub struct GrpoLossOutput {
    /// Differentiable with respect to `logprobs`.
    pub loss: Tensor,
    /// Masked token mean of the k3 KL to the reference (detached); `None` when β = 0.
    pub mean_kl: Option<Tensor>,
    /// Fraction of response tokens whose ratio left `[1-ε, 1+ε]` in the direction the clip
    /// binds (detached), TRL's `clip_ratio`.
    pub clip_ratio: Tensor,
}

/// GRPO loss.
///
/// Shapes: `logprobs`, `old_logprobs`, `reference_logprobs`, `mask` `(b, t)`;
/// `advantages` `(b,)`, one per completion. Per token:
///
/// ```text
/// ρ = exp(log π_θ - log π_old)
/// k3 = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1
/// ℓ_t = -(min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) - β·k3)
/// ```
///
/// aggregated per [`LossAggregation`]. With a single optimisation step per batch pass
/// `old_logprobs = logprobs.detach()` (ρ = 1 but the gradient flows), as TRL does.
/// `reference_logprobs` may be `None` only when β = 0.
pub fn grpo_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    reference_logprobs: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    config: GrpoLossConfig,
) -> Result<GrpoLossOutput, AlgoError> {
    let function = "grpo_loss";
    let f = at(function);
    let dims = expect_rank(
        function,
        "logprobs",
        logprobs,
        2,
        "per-token log-probs: (batch, response_length)",
    )?;
    expect_shape(
        function,
        "old_logprobs",
        old_logprobs,
        dims,
        "old log-probs are per token like `logprobs`",
    )?;
    expect_shape(
        function,
        "advantages",
        advantages,
        &[dims[0]],
        "one advantage per completion",
    )?;
    expect_in_range(
        function,
        "clip_epsilon",
        config.clip_epsilon,
        0.0,
        1.0,
        "a clip range in [0, 1], usually 0.2",
    )?;
    expect_in_range(
        function,
        "beta",
        config.beta,
        0.0,
        f64::MAX,
        "a non-negative KL weight",
    )?;
    let mask = mask_like(function, logprobs, mask)?;

    let ratio = (logprobs - old_logprobs).map_err(&f)?.exp().map_err(&f)?; // (b, t)
    let epsilon = config.clip_epsilon;
    let clipped_ratio = ratio.clamp(1.0 - epsilon, 1.0 + epsilon).map_err(&f)?;
    let advantage_column = advantages
        .to_dtype(logprobs.dtype())
        .map_err(&f)?
        .unsqueeze(1)
        .map_err(&f)?; // (b, 1)
    let unclipped = ratio.broadcast_mul(&advantage_column).map_err(&f)?;
    let clipped = clipped_ratio.broadcast_mul(&advantage_column).map_err(&f)?;
    let mut per_token = unclipped.minimum(&clipped).map_err(&f)?.neg().map_err(&f)?;

    let mut mean_kl = None;
    if config.beta > 0.0 {
        let reference = reference_logprobs.ok_or(AlgoError::Parameter {
            function,
            name: "beta",
            value: config.beta,
            expected: "0 when no reference log-probs are given",
        })?;
        expect_shape(
            function,
            "reference_logprobs",
            reference,
            dims,
            "reference log-probs are per token like `logprobs`",
        )?;
        let kl = kl_estimate(logprobs, reference, KlEstimator::K3)?;
        per_token = (per_token + kl.affine(config.beta, 0.0).map_err(&f)?).map_err(&f)?;
        mean_kl = Some(masked_mean(&kl.detach(), &mask)?);
    }
    let loss = match config.aggregation {
        LossAggregation::Token => masked_mean(&per_token, &mask)?,
        LossAggregation::Sequence => masked_mean_per_row(&per_token, &mask)?
            .mean_all()
            .map_err(&f)?,
    };
    // The clip binds when ρ < 1-ε with A < 0, or ρ > 1+ε with A > 0 (TRL's `is_region_clipped`).
    let binds = unclipped
        .gt(&clipped)
        .map_err(&f)?
        .to_dtype(logprobs.dtype())
        .map_err(&f)?;
    let clip_ratio = masked_mean(&binds.detach(), &mask)?;
    Ok(GrpoLossOutput {
        loss,
        mean_kl,
        clip_ratio,
    })
}
