//! The input half of the SiLU-gated MLP, `silu(x Wg^T) * (x Wu^T)`, as one graph node:
//! both products written side by side into rows [gate | up], the gate applied row by
//! row, and a backward that gives x one gradient (not one per projection plus two for
//! the product) and each weight its own. For projections without LoRA or bias.

use super::kernels::{
    contiguous_f32, silu_mul_backward, silu_mul_forward, silu_mul_rows,
    silu_mul_rows_backward_in_place, with_f32,
};
use super::products::{self, MatrixView};
use super::{
    fusable, linear_reference, silu_mul_reference, weight_gradient, with_last_dim, CandleResult,
};
use crate::model::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use std::sync::Mutex;

/// `silu(x Wg^T) * (x Wu^T)`: x (..., in), both weights (inter, in) → (..., inter).
pub fn gated_mlp_input(x: &Tensor, gate_weight: &Tensor, up_weight: &Tensor) -> Result<Tensor> {
    let contiguous = [x, gate_weight, up_weight]
        .iter()
        .all(|t| t.is_contiguous());
    let fits = fusable(&[x, gate_weight, up_weight])
        && contiguous
        && gate_weight.rank() == 2
        && gate_weight.dims() == up_weight.dims()
        && x.rank() >= 1
        && gate_weight.dim(1)? == x.dim(D::Minus1)?;
    if !fits {
        return gated_mlp_input_reference(x, gate_weight, up_weight);
    }
    Ok(x.apply_op3(gate_weight, up_weight, GatedMlpInputOp::new(true))?)
}

/// The composite: two projections and the gated product.
pub fn gated_mlp_input_reference(
    x: &Tensor,
    gate_weight: &Tensor,
    up_weight: &Tensor,
) -> Result<Tensor> {
    silu_mul_reference(
        &linear_reference(x, gate_weight)?,
        &linear_reference(x, up_weight)?,
    )
}

pub(super) struct GatedMlpInputOp {
    /// The forward's projections [gate | up] per row, (rows, 2*inter), for the backward.
    kept: Mutex<Option<Vec<f32>>>,
    /// Keep the forward's projections (false only in tests of the recomputing backward).
    keep: bool,
}

impl GatedMlpInputOp {
    pub(super) fn new(keep: bool) -> Self {
        GatedMlpInputOp {
            kept: Mutex::new(None),
            keep,
        }
    }
}

/// The rows [x Wg^T | x Wu^T], (rows, 2*inter): two products written side by side, so the
/// weights are never stacked into a copy.
pub(super) fn gate_up_rows(
    x: MatrixView,
    gate: MatrixView,
    up: MatrixView,
) -> CandleResult<Vec<f32>> {
    products::matmul_side_by_side(x, &[gate.t(), up.t()])
}

impl CustomOp3 for GatedMlpInputOp {
    fn name(&self) -> &'static str {
        "fused-gated-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let (inter, in_dim) = l2.shape().dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let gate_up = gate_up_rows(
            MatrixView::row_major(contiguous_f32(s1, l1, self.name())?, rows, in_dim),
            MatrixView::row_major(contiguous_f32(s2, l2, self.name())?, inter, in_dim),
            MatrixView::row_major(contiguous_f32(s3, l3, self.name())?, inter, in_dim),
        )?;
        let hidden = silu_mul_rows(&gate_up, inter);
        if self.keep {
            if let Ok(mut slot) = self.kept.lock() {
                *slot = Some(gate_up);
            }
        }
        Ok((CpuStorage::F32(hidden), with_last_dim(l1.shape(), inter)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_weight: &Tensor,
        up_weight: &Tensor,
        _hidden: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (inter, in_dim) = gate_weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let want_x = x.track_op();
        let x_data = x.detach().contiguous()?;
        let grad = grad.detach().contiguous()?;
        with_f32(&x_data, name, |x_data| {
            with_f32(gate_weight, name, |gate_data| {
                with_f32(up_weight, name, |up_data| {
                    let x_rows = MatrixView::row_major(x_data, rows, in_dim);
                    let gate = MatrixView::row_major(gate_data, inter, in_dim);
                    let up = MatrixView::row_major(up_data, inter, in_dim);
                    let kept = self.kept.lock().ok().and_then(|mut slot| slot.take());
                    let mut dgate_up = match kept {
                        Some(kept) => kept,
                        None => gate_up_rows(x_rows, gate, up)?,
                    };
                    with_f32(&grad, name, |grad| {
                        silu_mul_rows_backward_in_place(&mut dgate_up, grad, inter);
                        Ok(())
                    })?;
                    let dgate_up = MatrixView::row_major(&dgate_up, rows, 2 * inter);
                    let (dgate, dup) = (dgate_up.columns(0, inter), dgate_up.columns(inter, inter));
                    let dx = if want_x {
                        let mut dx = products::matmul(dgate, gate)?;
                        products::matmul_into(&mut dx, in_dim, dup, up, true)?;
                        Some(Tensor::from_vec(dx, x.shape(), x.device())?) // (..., in)
                    } else {
                        None
                    };
                    let dgate_weight = weight_gradient(gate_weight, dgate, x_rows)?;
                    let dup_weight = weight_gradient(up_weight, dup, x_rows)?;
                    Ok((dx, dgate_weight, dup_weight))
                })
            })
        })
    }
}

/// `silu(x Wg^T + gate_delta) * (x Wu^T + up_delta)` with constant (frozen) weights, for
/// LoRA: the deltas are the adapters' outputs (..., inter) and receive the gradients;
/// x gets the base projections' share of its gradient. Falls back to the composite when
/// a weight is trained.
pub fn gated_mlp_input_with_deltas(
    x: &Tensor,
    gate_weight: &Tensor,
    up_weight: &Tensor,
    gate_delta: &Tensor,
    up_delta: &Tensor,
) -> Result<Tensor> {
    let tensors = [x, gate_weight, up_weight, gate_delta, up_delta];
    let frozen = !gate_weight.track_op() && !up_weight.track_op();
    let fits = frozen
        && fusable(&tensors)
        && tensors.iter().all(|t| t.is_contiguous())
        && gate_weight.rank() == 2
        && gate_weight.dims() == up_weight.dims()
        && x.rank() >= 1
        && gate_weight.dim(1)? == x.dim(D::Minus1)?
        && gate_delta.dims() == up_delta.dims()
        && gate_delta.elem_count() == x.elem_count() / gate_weight.dim(1)? * gate_weight.dim(0)?;
    if !fits {
        return gated_mlp_input_with_deltas_reference(
            x,
            gate_weight,
            up_weight,
            gate_delta,
            up_delta,
        );
    }
    let op = GatedMlpDeltaOp::new(gate_weight, up_weight, true);
    Ok(x.apply_op3(gate_delta, up_delta, op)?)
}

/// The composite of [`gated_mlp_input_with_deltas`].
pub fn gated_mlp_input_with_deltas_reference(
    x: &Tensor,
    gate_weight: &Tensor,
    up_weight: &Tensor,
    gate_delta: &Tensor,
    up_delta: &Tensor,
) -> Result<Tensor> {
    let gate = linear_reference(x, gate_weight)?; // (..., inter)
    let gate = (&gate + gate_delta.reshape(gate.shape())?)?;
    let up = linear_reference(x, up_weight)?;
    let up = (&up + up_delta.reshape(up.shape())?)?;
    silu_mul_reference(&gate, &up)
}

pub(super) struct GatedMlpDeltaOp {
    gate_weight: Tensor,
    up_weight: Tensor,
    /// The forward's gate and up pre-activations, each (rows, inter).
    kept: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    keep: bool,
}

impl GatedMlpDeltaOp {
    pub(super) fn new(gate_weight: &Tensor, up_weight: &Tensor, keep: bool) -> Self {
        GatedMlpDeltaOp {
            gate_weight: gate_weight.detach(),
            up_weight: up_weight.detach(),
            kept: Mutex::new(None),
            keep,
        }
    }
}

impl CustomOp3 for GatedMlpDeltaOp {
    fn name(&self) -> &'static str {
        "fused-gated-mlp-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let name = self.name();
        let (inter, in_dim) = self.gate_weight.dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let x = MatrixView::row_major(contiguous_f32(s1, l1, name)?, rows, in_dim);
        // Each base product lands on a copy of its delta.
        let project = |weight: &Tensor, delta: &[f32]| -> CandleResult<Vec<f32>> {
            let mut projected = delta.to_vec();
            with_f32(weight, name, |weight| {
                let weight = MatrixView::row_major(weight, inter, in_dim);
                products::matmul_into(&mut projected, inter, x, weight.t(), true)
            })?;
            Ok(projected)
        };
        let gate = project(&self.gate_weight, contiguous_f32(s2, l2, name)?)?;
        let up = project(&self.up_weight, contiguous_f32(s3, l3, name)?)?;
        let hidden = silu_mul_forward(&gate, &up);
        if self.keep {
            if let Ok(mut slot) = self.kept.lock() {
                *slot = Some((gate, up));
            }
        }
        Ok((CpuStorage::F32(hidden), with_last_dim(l1.shape(), inter)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_delta: &Tensor,
        up_delta: &Tensor,
        _hidden: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (inter, in_dim) = self.gate_weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let x_data = x.detach().contiguous()?;
        let grad = grad.detach().contiguous()?;
        with_f32(&self.gate_weight, name, |gate_data| {
            with_f32(&self.up_weight, name, |up_data| {
                let gate_weight = MatrixView::row_major(gate_data, inter, in_dim);
                let up_weight = MatrixView::row_major(up_data, inter, in_dim);
                let kept = self.kept.lock().ok().and_then(|mut slot| slot.take());
                let (gate, up) = match kept {
                    Some(kept) => kept,
                    None => with_f32(&x_data, name, |x_data| {
                        let x_rows = MatrixView::row_major(x_data, rows, in_dim);
                        let project = |weight: MatrixView, delta: &Tensor| {
                            let mut projected = delta.detach().flatten_all()?.to_vec1::<f32>()?;
                            products::matmul_into(&mut projected, inter, x_rows, weight.t(), true)?;
                            Ok::<_, candle_core::Error>(projected)
                        };
                        Ok((
                            project(gate_weight, gate_delta)?,
                            project(up_weight, up_delta)?,
                        ))
                    })?,
                };
                // [dgate; dup], (2 * rows, inter)
                let both = with_f32(&grad, name, |grad| Ok(silu_mul_backward(&gate, &up, grad)))?;
                let both_view = MatrixView::row_major(&both, 2 * rows, inter);
                let (dgate, dup) = (both_view.rows(0, rows), both_view.rows(rows, rows));
                let dx = if x.track_op() {
                    let mut dx = products::matmul(dgate, gate_weight)?;
                    products::matmul_into(&mut dx, in_dim, dup, up_weight, true)?;
                    Some(Tensor::from_vec(dx, x.shape(), x.device())?)
                } else {
                    None
                };
                let both = Tensor::from_vec(both, (2 * rows, inter), x.device())?;
                Ok((
                    dx,
                    Some(both.narrow(0, 0, rows)?.reshape(gate_delta.shape())?),
                    Some(both.narrow(0, rows, rows)?.reshape(up_delta.shape())?),
                ))
            })
        })
    }
}
