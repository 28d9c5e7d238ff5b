//! Numerically stable elementwise helpers whose gradients candle computes correctly.
//!
//! candle 0.11's fused `softmax_last_dim` detaches its output (no gradient); these helpers
//! are built from primitive ops only, so backpropagation through them is exact.

use candle_core::{Tensor, D};

use super::error::{at, AlgoError};

/// `log σ(x)` elementwise, any shape.
///
/// Two overflow-free branches joined by `where`: `-log(1 + exp(-x))` for `x ≥ 0` and
/// `x - log(1 + exp(x))` for `x < 0`, each fed only its own side of the inputs. The
/// gradient is `1 - σ(x)` everywhere, including `x = 0`, where the `relu`/`abs` form of
/// NOTES.md gets 1.5 instead of 0.5 from candle's subgradients; `x = 0` is common (DPO's
/// first step, when policy = reference, and tied rewards), so the kink matters.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor, AlgoError> {
    let f = at("log_sigmoid");
    let zeros = x.zeros_like().map_err(&f)?;
    let non_negative = x.ge(0.0).map_err(&f)?; // u8 mask
    let positive_side = non_negative.where_cond(x, &zeros).map_err(&f)?; // x where x ≥ 0, else 0
    let negative_side = non_negative.where_cond(&zeros, x).map_err(&f)?; // x where x < 0, else 0
    let positive_branch = positive_side
        .neg()
        .map_err(&f)?
        .exp()
        .map_err(&f)?
        .affine(1.0, 1.0)
        .map_err(&f)?
        .log()
        .map_err(&f)?
        .neg()
        .map_err(&f)?;
    let negative_branch = (&negative_side
        - negative_side
            .exp()
            .map_err(&f)?
            .affine(1.0, 1.0)
            .map_err(&f)?
            .log()
            .map_err(&f)?)
    .map_err(&f)?;
    non_negative
        .where_cond(&positive_branch, &negative_branch)
        .map_err(&f)
}

/// `log softmax(x)` over the last dimension, any rank ≥ 1.
///
/// `x - max - log Σ exp(x - max)`. The max is detached: the result does not depend on it
/// mathematically, so dropping its gradient path is exact and avoids candle's tie-splitting
/// rule for `max`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor, AlgoError> {
    let f = at("log_softmax_last_dim");
    let max = x.max_keepdim(D::Minus1).map_err(&f)?.detach(); // (.., 1)
    let shifted = x.broadcast_sub(&max).map_err(&f)?; // (.., v)
    let log_sum_exp = shifted
        .exp()
        .map_err(&f)?
        .sum_keepdim(D::Minus1)
        .map_err(&f)?
        .log()
        .map_err(&f)?; // (.., 1)
    shifted.broadcast_sub(&log_sum_exp).map_err(&f)
}
