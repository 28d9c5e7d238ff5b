//! Per-token estimators of KL(π_θ ‖ π_ref) from sampled tokens' log-probabilities.
//!
//! John Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html);
//! the names follow TRL (`kl_estimator` in `trl/trainer/ppo_config.py`, `_kl_penalty` of
//! the older `PPOTrainer`) and seeds/002.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::error::{at, expect_shape, AlgoError};

/// Which per-token KL estimate to use; tokens are sampled from π_θ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log π_θ - log π_ref`: unbiased, high variance, can be negative.
    K1,
    /// `exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1`: unbiased, always ≥ 0.
    K3,
    /// `½ (log π_θ - log π_ref)²`: biased, low variance, always ≥ 0 (k2 in Schulman's note).
    Mse,
}

/// The per-token KL estimate, same shape as the inputs (any shape, usually `(b, t)`).
///
/// With `d = logprobs - reference_logprobs`: k1 = `d`, k3 = `exp(-d) + d - 1`,
/// mse = `½ d²`. Differentiable with respect to both inputs; padding is not masked here.
pub fn kl_estimate(
    logprobs: &Tensor,
    reference_logprobs: &Tensor,
    estimator: KlEstimator,
) -> Result<Tensor, AlgoError> {
    let f = at("kl_estimate");
    expect_shape(
        "kl_estimate",
        "reference_logprobs",
        reference_logprobs,
        logprobs.dims(),
        "policy and reference log-probs must be taken on the same tokens",
    )?;
    let difference = (logprobs - reference_logprobs).map_err(&f)?; // log π_θ - log π_ref
    match estimator {
        KlEstimator::K1 => Ok(difference),
        KlEstimator::K3 => {
            let ratio = difference.neg().map_err(&f)?.exp().map_err(&f)?; // π_ref / π_θ
            (ratio + difference)
                .map_err(&f)?
                .affine(1.0, -1.0)
                .map_err(&f)
        }
        KlEstimator::Mse => difference.sqr().map_err(&f)?.affine(0.5, 0.0).map_err(&f),
    }
}
