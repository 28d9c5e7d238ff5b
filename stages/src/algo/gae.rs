//! Generalised Advantage Estimation over response tokens.
//!
//! Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
//! Estimation" (arXiv:1506.02438), in the per-token form TRL's PPO trainer uses
//! (`trl/trainer/ppo_trainer.py`, "compute advantages and returns").

use candle_core::{DType, Tensor};

use super::error::{at, expect_in_range, expect_rank, expect_shape, AlgoError};

/// Advantages and returns, both `(b, t)`, detached from any graph.
#[derive(Debug, Clone)]
pub struct GaeOutput {
    /// `Â_t`, zero where the mask is 0. Not whitened: see [`super::masked::masked_whiten`].
    pub advantages: Tensor,
    /// `Â_t + V_t` (values masked), the regression target of the value loss.
    pub returns: Tensor,
}

/// GAE per token.
///
/// Shapes: `rewards`, `values`, `mask` all `(b, t)`; sequences are right-padded and the mask
/// is 1 on response tokens. Rewards and values are multiplied by the mask first, then from
/// the last token backwards:
///
/// ```text
/// δ_t = r_t + γ·V_{t+1} - V_t            (V_t = 0 for t ≥ T)
/// Â_t = (δ_t + γ·λ·Â_{t+1}) · mask_t
/// returns_t = Â_t + V_t
/// ```
///
/// For right-padded masks this equals TRL's loop (which zeroes padded rewards and values
/// and runs without the mask factor); the mask factor also keeps any left padding at zero.
/// `gamma` (γ) is the discount, `lambda` (λ) the bias/variance trade-off, both in [0, 1].
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lambda: f64,
) -> Result<GaeOutput, AlgoError> {
    let function = "gae";
    let f = at(function);
    let dims = expect_rank(
        function,
        "rewards",
        rewards,
        2,
        "rewards are per token: (batch, response_length)",
    )?;
    let (batch, length) = (dims[0], dims[1]);
    expect_shape(
        function,
        "values",
        values,
        &[batch, length],
        "values must be per token like the rewards",
    )?;
    expect_shape(
        function,
        "mask",
        mask,
        &[batch, length],
        "the mask must be per token like the rewards",
    )?;
    expect_in_range(function, "gamma", gamma, 0.0, 1.0, "a discount in [0, 1]")?;
    expect_in_range(
        function,
        "lambda",
        lambda,
        0.0,
        1.0,
        "a GAE lambda in [0, 1]",
    )?;

    let read = |t: &Tensor| -> Result<Vec<Vec<f64>>, AlgoError> {
        t.to_dtype(DType::F64)
            .map_err(&f)?
            .to_vec2::<f64>()
            .map_err(&f)
    };
    let (rewards_rows, values_rows, mask_rows) = (read(rewards)?, read(values)?, read(mask)?);
    let mut advantages = vec![0f64; batch * length];
    let mut returns = vec![0f64; batch * length];
    for row in 0..batch {
        let (r, v, m) = (&rewards_rows[row], &values_rows[row], &mask_rows[row]);
        let mut last_advantage = 0f64;
        for t in (0..length).rev() {
            let next_value = if t + 1 < length {
                v[t + 1] * m[t + 1]
            } else {
                0.0
            };
            let delta = r[t] * m[t] + gamma * next_value - v[t] * m[t];
            last_advantage = (delta + gamma * lambda * last_advantage) * m[t];
            advantages[row * length + t] = last_advantage;
            returns[row * length + t] = last_advantage + v[t] * m[t];
        }
    }
    let build = |data: Vec<f64>| -> Result<Tensor, AlgoError> {
        Tensor::from_vec(data, (batch, length), values.device())
            .map_err(&f)?
            .to_dtype(values.dtype())
            .map_err(&f)
    };
    Ok(GaeOutput {
        advantages: build(advantages)?,
        returns: build(returns)?,
    })
}
