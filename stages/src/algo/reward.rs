//! Reward-model training: the Bradley–Terry pairwise loss and pair accuracy.
//!
//! Bradley & Terry 1952; for LMs Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155) and
//! Llama 2 (arXiv:2307.09288, margin term). Formula as TRL `RewardTrainer.compute_loss`
//! (`trl/trainer/reward_trainer.py`).

use candle_core::{DType, Tensor};

use super::error::{at, expect_rank, expect_shape, AlgoError};
use super::ops::log_sigmoid;

/// Mean Bradley–Terry loss over pairs, a scalar tensor.
///
/// Shapes: `chosen_rewards`, `rejected_rewards` and `margin` (if any) are `(b,)`.
///
/// ```text
/// loss = mean(-log σ(r_w - r_l - m))  +  c · mean((r_w + r_l)²)
/// ```
///
/// `m` is the optional per-pair margin (Llama 2; TRL's `margin` column), `c` the optional
/// `center_rewards_coefficient` (TRL; Eisenstein et al. 2023) that keeps rewards near zero.
/// Differentiable with respect to both reward inputs.
pub fn bradley_terry_loss(
    chosen_rewards: &Tensor,
    rejected_rewards: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<Tensor, AlgoError> {
    let function = "bradley_terry_loss";
    let f = at(function);
    let dims = expect_rank(
        function,
        "chosen_rewards",
        chosen_rewards,
        1,
        "one scalar reward per pair: (batch,)",
    )?;
    expect_shape(
        function,
        "rejected_rewards",
        rejected_rewards,
        dims,
        "one rejected reward per chosen reward",
    )?;
    let mut difference = (chosen_rewards - rejected_rewards).map_err(&f)?; // (b,)
    if let Some(margin) = margin {
        expect_shape(function, "margin", margin, dims, "one margin per pair")?;
        let margin = margin.to_dtype(chosen_rewards.dtype()).map_err(&f)?;
        difference = (difference - margin).map_err(&f)?;
    }
    let mut loss = log_sigmoid(&difference)?
        .neg()
        .map_err(&f)?
        .mean_all()
        .map_err(&f)?;
    if let Some(coefficient) = center_rewards_coefficient {
        let centering = (chosen_rewards + rejected_rewards)
            .map_err(&f)?
            .sqr()
            .map_err(&f)?
            .mean_all()
            .map_err(&f)?;
        loss = (loss + centering.affine(coefficient, 0.0).map_err(&f)?).map_err(&f)?;
    }
    Ok(loss)
}

/// Fraction of pairs whose chosen reward is strictly greater than the rejected one (ties
/// count as wrong). Shapes `(b,)`; returns NaN for an empty batch.
pub fn pair_accuracy(chosen_rewards: &Tensor, rejected_rewards: &Tensor) -> Result<f64, AlgoError> {
    let function = "pair_accuracy";
    let f = at(function);
    let dims = expect_rank(
        function,
        "chosen_rewards",
        chosen_rewards,
        1,
        "one scalar reward per pair: (batch,)",
    )?;
    expect_shape(
        function,
        "rejected_rewards",
        rejected_rewards,
        dims,
        "one rejected reward per chosen reward",
    )?;
    let chosen = chosen_rewards
        .to_dtype(DType::F64)
        .map_err(&f)?
        .to_vec1::<f64>()
        .map_err(&f)?;
    let rejected = rejected_rewards
        .to_dtype(DType::F64)
        .map_err(&f)?
        .to_vec1::<f64>()
        .map_err(&f)?;
    let correct = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
    Ok(correct as f64 / chosen.len() as f64)
}
