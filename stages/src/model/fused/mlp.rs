//! The input half of the SiLU-gated MLP, `silu(x Wg^T) * (x Wu^T)`, as one graph node:
//! one gemm against the stacked [Wg; Wu], the gate applied row by row, and a backward
//! that gives x one gradient (not one per projection plus two for the product) and both
//! weights theirs from a single gemm. For projections without LoRA or bias.

use super::kernels::{
    contiguous_f32, silu_mul_backward, silu_mul_forward, silu_mul_rows, silu_mul_rows_backward,
};
use super::{fusable, linear_reference, silu_mul_reference, with_last_dim, CandleResult};
use crate::model::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor, D};
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

/// What the forward keeps for the backward: the projections [gate | up] per row
/// (rows, 2*inter) and the stacked weights (2*inter, in).
#[derive(Clone)]
struct Kept {
    gate_up: Tensor,
    weights: Tensor,
}

pub(super) struct GatedMlpInputOp {
    kept: Mutex<Option<Kept>>,
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

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CandleResult<R>) -> CandleResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("fused-gated-mlp: expected a CPU tensor");
    };
    f(contiguous_f32(storage, layout, "fused-gated-mlp")?)
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
        let mut stacked = Vec::with_capacity(2 * inter * in_dim);
        stacked.extend_from_slice(contiguous_f32(s2, l2, self.name())?);
        stacked.extend_from_slice(contiguous_f32(s3, l3, self.name())?);
        let weights = Tensor::from_vec(stacked, (2 * inter, in_dim), &Device::Cpu)?;
        let gate_up = {
            let (storage, _) = weights.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("fused-gated-mlp: the stacked weights are not on the CPU");
            };
            let lhs = Layout::contiguous_with_offset((rows, in_dim), l1.start_offset());
            let rhs = Layout::new(Shape::from((in_dim, 2 * inter)), vec![1, in_dim], 0); // W^T
            s1.matmul(storage, (1, rows, 2 * inter, in_dim), &lhs, &rhs)?
        };
        let CpuStorage::F32(gate_up) = gate_up else {
            candle_core::bail!("fused-gated-mlp: the projections are not f32");
        };
        let hidden = silu_mul_rows(&gate_up, inter);
        if self.keep {
            let gate_up = Tensor::from_vec(gate_up, (rows, 2 * inter), &Device::Cpu)?;
            if let Ok(mut slot) = self.kept.lock() {
                *slot = Some(Kept { gate_up, weights });
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
        let (inter, in_dim) = gate_weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let x_rows = x.detach().reshape((rows, in_dim))?;
        let kept = self.kept.lock().ok().and_then(|slot| slot.clone());
        let Kept { gate_up, weights } = match kept {
            Some(kept) => kept,
            None => {
                let weights = Tensor::cat(&[gate_weight.detach(), up_weight.detach()], 0)?;
                let gate_up = x_rows.matmul(&weights.t()?)?;
                Kept { gate_up, weights }
            }
        };
        let grad = grad.detach().contiguous()?;
        let dgate_up = with_f32(&gate_up, |gate_up| {
            with_f32(&grad, |grad| {
                Ok(silu_mul_rows_backward(gate_up, grad, inter))
            })
        })?;
        let dgate_up = Tensor::from_vec(dgate_up, (rows, 2 * inter), x.device())?;
        let dx = if x.track_op() {
            Some(dgate_up.matmul(&weights)?.reshape(x.shape())?) // (..., in)
        } else {
            None
        };
        let (want_gate, want_up) = (gate_weight.track_op(), up_weight.track_op());
        if !want_gate && !want_up {
            return Ok((dx, None, None));
        }
        let dweights = dgate_up.t()?.matmul(&x_rows)?; // (2*inter, in)
        let dgate = want_gate
            .then(|| dweights.narrow(0, 0, inter))
            .transpose()?;
        let dup = want_up
            .then(|| dweights.narrow(0, inter, inter))
            .transpose()?;
        Ok((dx, dgate, dup))
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
    kept: Mutex<Option<(Tensor, Tensor)>>,
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

    /// x W^T + delta, (rows, inter).
    fn projection(&self, x: &Tensor, weight: &Tensor, delta: &Tensor) -> CandleResult<Tensor> {
        let (inter, in_dim) = weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let base = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        base + delta.reshape((rows, inter))?
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
        let (inter, in_dim) = self.gate_weight.dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let project = |weight: &Tensor, delta: &[f32]| -> CandleResult<Vec<f32>> {
            let (storage, layout) = weight.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("fused-gated-mlp-lora: the weights are not on the CPU");
            };
            let lhs = Layout::contiguous_with_offset((rows, in_dim), l1.start_offset());
            let rhs = layout.transpose(0, 1)?; // W^T, a view
            let projected = s1.matmul(storage, (1, rows, inter, in_dim), &lhs, &rhs)?;
            let CpuStorage::F32(mut projected) = projected else {
                candle_core::bail!("fused-gated-mlp-lora: the projection is not f32");
            };
            for (p, d) in projected.iter_mut().zip(delta) {
                *p += d;
            }
            Ok(projected)
        };
        let gate = project(&self.gate_weight, contiguous_f32(s2, l2, self.name())?)?;
        let up = project(&self.up_weight, contiguous_f32(s3, l3, self.name())?)?;
        let hidden = silu_mul_forward(&gate, &up);
        if self.keep {
            let gate = Tensor::from_vec(gate, (rows, inter), &Device::Cpu)?;
            let up = Tensor::from_vec(up, (rows, inter), &Device::Cpu)?;
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
        let (inter, _) = self.gate_weight.dims2()?;
        let want_x = x.track_op();
        let x = x.detach();
        let kept = self.kept.lock().ok().and_then(|slot| slot.clone());
        let (gate, up) = match kept {
            Some(kept) => kept,
            None => (
                self.projection(&x, &self.gate_weight, &gate_delta.detach())?,
                self.projection(&x, &self.up_weight, &up_delta.detach())?,
            ),
        };
        let rows = gate.dim(0)?;
        let grad = grad.detach().contiguous()?;
        let both = with_f32(&gate, |gate| {
            with_f32(&up, |up| {
                with_f32(&grad, |grad| Ok(silu_mul_backward(gate, up, grad)))
            })
        })?;
        let both = Tensor::from_vec(both, (2 * rows, inter), x.device())?; // [dgate; dup]
        let (dgate, dup) = (both.narrow(0, 0, rows)?, both.narrow(0, rows, rows)?);
        let dx = if want_x {
            let dx = (dgate.matmul(&self.gate_weight)? + dup.matmul(&self.up_weight)?)?;
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };
        Ok((
            dx,
            Some(dgate.reshape(gate_delta.shape())?),
            Some(dup.reshape(up_delta.shape())?),
        ))
    }
}
