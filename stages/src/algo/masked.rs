//! Means, sums, variances and whitening restricted to the tokens a mask selects.
//!
//! The mask has the shape of the values and holds 1 on tokens that count (response tokens)
//! and 0 elsewhere; any numeric dtype is accepted and converted to the values' dtype.
//! Formulas follow TRL (`trl/core.py`: `masked_mean`, `masked_var`, `masked_whiten`).

use candle_core::{DType, Tensor};

use super::error::{at, expect_shape, AlgoError};

/// The mask in the dtype of `values`, after checking that the shapes agree.
pub(crate) fn mask_like(
    function: &'static str,
    values: &Tensor,
    mask: &Tensor,
) -> Result<Tensor, AlgoError> {
    expect_shape(
        function,
        "mask",
        mask,
        values.dims(),
        "the mask must have the same shape as the values it selects",
    )?;
    mask.to_dtype(values.dtype()).map_err(at(function))
}

/// The number of selected elements, read back as a float.
pub(crate) fn mask_count(function: &'static str, mask: &Tensor) -> Result<f64, AlgoError> {
    let f = at(function);
    mask.to_dtype(DType::F64)
        .map_err(&f)?
        .sum_all()
        .map_err(&f)?
        .to_scalar::<f64>()
        .map_err(&f)
}

/// `Σ values·mask`, a scalar (rank-0) tensor. Shapes: values and mask `(..)` alike.
pub fn masked_sum(values: &Tensor, mask: &Tensor) -> Result<Tensor, AlgoError> {
    let f = at("masked_sum");
    let mask = mask_like("masked_sum", values, mask)?;
    (values * mask).map_err(&f)?.sum_all().map_err(&f)
}

/// `Σ values·mask / Σ mask`, a scalar tensor (TRL `masked_mean` with `axis=None`).
///
/// Errors when the mask selects nothing (TRL would return NaN).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor, AlgoError> {
    let f = at("masked_mean");
    let mask = mask_like("masked_mean", values, mask)?;
    let count = mask_count("masked_mean", &mask)?;
    if count <= 0.0 {
        return Err(AlgoError::EmptyMask {
            function: "masked_mean",
            count,
            needed: "a mean needs at least one",
        });
    }
    let total = (values * mask).map_err(&f)?.sum_all().map_err(&f)?;
    total.affine(1.0 / count, 0.0).map_err(&f)
}

/// Per-row masked mean over the last dimension: `(b, t) → (b,)`, rows with an empty mask
/// divide by 1 instead of 0 (TRL GRPO's `completion_mask.sum(-1).clamp(min=1)`).
pub fn masked_mean_per_row(values: &Tensor, mask: &Tensor) -> Result<Tensor, AlgoError> {
    let f = at("masked_mean_per_row");
    let mask = mask_like("masked_mean_per_row", values, mask)?;
    let last = values.rank().saturating_sub(1);
    let sums = (values * &mask).map_err(&f)?.sum(last).map_err(&f)?; // (b,)
    let counts = mask
        .sum(last)
        .map_err(&f)?
        .clamp(1.0, f64::INFINITY)
        .map_err(&f)?; // (b,)
    (sums / counts).map_err(&f)
}

/// Masked variance, a scalar tensor: `mean_m((x - mean_m(x))²)`, times the Bessel factor
/// `n / (n - 1)` when `unbiased` (TRL `masked_var`, default unbiased).
pub fn masked_var(values: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor, AlgoError> {
    let f = at("masked_var");
    let mask = mask_like("masked_var", values, mask)?;
    let count = mask_count("masked_var", &mask)?;
    if count < 1.0 || (unbiased && count < 2.0) {
        return Err(AlgoError::EmptyMask {
            function: "masked_var",
            count,
            needed: "an unbiased variance needs at least two",
        });
    }
    let mean = masked_mean(values, &mask)?;
    let centered = values.broadcast_sub(&mean).map_err(&f)?;
    let variance = masked_mean(&centered.sqr().map_err(&f)?, &mask)?;
    let bessel = if unbiased { count / (count - 1.0) } else { 1.0 };
    variance.affine(bessel, 0.0).map_err(&f)
}

/// Whitening over the selected elements: `(x - mean) / sqrt(var + 1e-8)`, with the mean
/// added back when `shift_mean` is false. Same shape as `values`.
///
/// Mean and (unbiased) variance come from the masked elements only, but every element is
/// transformed, padding included, exactly as TRL `masked_whiten`; callers that need zeros on
/// padding multiply by the mask afterwards. Used for PPO advantages (`shift_mean = true`)
/// and reward whitening (`shift_mean = false`).
pub fn masked_whiten(
    values: &Tensor,
    mask: &Tensor,
    shift_mean: bool,
) -> Result<Tensor, AlgoError> {
    let f = at("masked_whiten");
    let mean = masked_mean(values, mask)?;
    let variance = masked_var(values, mask, true)?;
    let inverse_std = variance
        .affine(1.0, 1e-8)
        .map_err(&f)?
        .sqrt()
        .map_err(&f)?
        .recip()
        .map_err(&f)?;
    let whitened = values
        .broadcast_sub(&mean)
        .map_err(&f)?
        .broadcast_mul(&inverse_std)
        .map_err(&f)?;
    if shift_mean {
        Ok(whitened)
    } else {
        whitened.broadcast_add(&mean).map_err(&f)
    }
}
