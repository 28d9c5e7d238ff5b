//! Direct Preference Optimisation losses: sigmoid (DPO), IPO and hinge (SLiC).
//!
//! Rafailov et al. 2023 (arXiv:2305.18290); IPO: Azar et al. 2023 (arXiv:2310.12036);
//! hinge: Zhao et al. 2023 (SLiC, arXiv:2305.10425); conservative DPO label smoothing:
//! Mitchell 2023. Formulas as TRL `DPOTrainer.dpo_loss` (`trl/trainer/dpo_trainer.py`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::error::{at, expect_in_range, expect_rank, expect_shape, AlgoError};
use super::ops::log_sigmoid;

/// Which preference loss to apply to the implicit reward margin.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    #[default]
    Sigmoid,
    Ipo,
    Hinge,
}

/// DPO loss and the implicit-reward diagnostics TRL logs.
#[derive(Debug, Clone)]
pub struct DpoOutput {
    /// Mean loss over pairs, a scalar tensor differentiable with respect to the policy log-probs.
    pub loss: Tensor,
    /// `β (log π_θ(y_w) - log π_ref(y_w))` per pair, `(b,)`, detached.
    pub chosen_rewards: Tensor,
    /// `β (log π_θ(y_l) - log π_ref(y_l))` per pair, `(b,)`, detached.
    pub rejected_rewards: Tensor,
    /// Fraction of pairs with chosen reward strictly above rejected reward, a scalar tensor.
    pub reward_accuracy: Tensor,
    /// `chosen_rewards - rejected_rewards` per pair, `(b,)`, detached (TRL logs their mean).
    pub margins: Tensor,
}

/// DPO-family loss from sequence log-probabilities.
///
/// Shapes: the four log-prob inputs are `(b,)`, each the sum of per-token log-probs of a
/// completion (for IPO TRL averages them over tokens instead; pass averages for that).
///
/// ```text
/// h = (log π_θ(y_w) - log π_θ(y_l)) - (log π_ref(y_w) - log π_ref(y_l))
/// sigmoid: -(1 - s)·log σ(β h) - s·log σ(-β h)      (s = label_smoothing)
/// ipo:     (h - 1/(2β))²
/// hinge:   relu(1 - β h)
/// ```
pub fn dpo_loss(
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    reference_chosen_logps: &Tensor,
    reference_rejected_logps: &Tensor,
    beta: f64,
    loss_type: DpoLossType,
    label_smoothing: f64,
) -> Result<DpoOutput, AlgoError> {
    let function = "dpo_loss";
    let f = at(function);
    let dims = expect_rank(
        function,
        "policy_chosen_logps",
        policy_chosen_logps,
        1,
        "one summed log-prob per pair: (batch,)",
    )?;
    let hint = "all four log-prob inputs are one number per preference pair";
    expect_shape(
        function,
        "policy_rejected_logps",
        policy_rejected_logps,
        dims,
        hint,
    )?;
    expect_shape(
        function,
        "reference_chosen_logps",
        reference_chosen_logps,
        dims,
        hint,
    )?;
    expect_shape(
        function,
        "reference_rejected_logps",
        reference_rejected_logps,
        dims,
        hint,
    )?;
    if !(beta.is_finite() && beta > 0.0) {
        return Err(AlgoError::Parameter {
            function,
            name: "beta",
            value: beta,
            expected: "a positive number, usually 0.1",
        });
    }
    expect_in_range(
        function,
        "label_smoothing",
        label_smoothing,
        0.0,
        0.5,
        "a probability in [0, 0.5]",
    )?;

    let policy_log_ratio = (policy_chosen_logps - policy_rejected_logps).map_err(&f)?; // (b,)
    let reference_log_ratio = (reference_chosen_logps - reference_rejected_logps).map_err(&f)?;
    let margin = (policy_log_ratio - reference_log_ratio).map_err(&f)?; // h
    let scaled = margin.affine(beta, 0.0).map_err(&f)?; // β h
    let losses = match loss_type {
        DpoLossType::Sigmoid => {
            let agree = log_sigmoid(&scaled)?
                .affine(-(1.0 - label_smoothing), 0.0)
                .map_err(&f)?;
            let disagree = log_sigmoid(&scaled.neg().map_err(&f)?)?
                .affine(-label_smoothing, 0.0)
                .map_err(&f)?;
            (agree + disagree).map_err(&f)?
        }
        DpoLossType::Ipo => margin
            .affine(1.0, -1.0 / (2.0 * beta))
            .map_err(&f)?
            .sqr()
            .map_err(&f)?,
        DpoLossType::Hinge => scaled.affine(-1.0, 1.0).map_err(&f)?.relu().map_err(&f)?,
    };
    let loss = losses.mean_all().map_err(&f)?;

    let chosen_rewards = (policy_chosen_logps - reference_chosen_logps)
        .map_err(&f)?
        .affine(beta, 0.0)
        .map_err(&f)?
        .detach();
    let rejected_rewards = (policy_rejected_logps - reference_rejected_logps)
        .map_err(&f)?
        .affine(beta, 0.0)
        .map_err(&f)?
        .detach();
    let margins = (&chosen_rewards - &rejected_rewards).map_err(&f)?;
    let reward_accuracy = chosen_rewards
        .gt(&rejected_rewards)
        .map_err(&f)?
        .to_dtype(policy_chosen_logps.dtype())
        .map_err(&f)?
        .mean_all()
        .map_err(&f)?;
    Ok(DpoOutput {
        loss,
        chosen_rewards,
        rejected_rewards,
        reward_accuracy,
        margins,
    })
}
