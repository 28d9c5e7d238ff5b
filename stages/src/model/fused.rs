//! Fused CPU kernels for the training hot path, each a candle custom op with a
//! hand-written backward: the linear projection, RMSNorm, the SiLU-gated product and the
//! whole gated-MLP input (`mlp`), the attention core and its masked softmax
//! (`attention`), rotary embeddings (`rope`), log-softmax + gather / entropy
//! (`logprobs`), and each half of a decoder layer as a single node for training loops
//! (`block`). The loops themselves live in `kernels`.
//!
//! Why: a composite of small candle ops allocates (and page-faults) one fresh buffer per
//! op forward, and in backward candle zero-fills and accumulates a fresh gradient buffer
//! for every edge of the graph; one node per block is several times cheaper. The kernels
//! are plain single-threaded loops over contiguous f32 rows (training runs data-parallel
//! shards, one thread each), written so LLVM vectorises them; the projections' products
//! call gemm directly (`products`), and their weight gradients go to the running
//! [`super::weight_grads::backward`] when there is one. Inputs that are not f32 on the
//! CPU, or not laid out as a kernel needs, take the composite `*_reference` path, which
//! is also what the tests compare against.
//! The backward of each op is computed without a graph: nothing here takes second
//! derivatives. Unlike candle's own fused ops (../shared/NOTES.md), these keep gradients:
//! they are applied with `apply_op*`, never `apply_op*_no_bwd`.

use super::weight_grads;
use super::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use kernels::{
    contiguous_f32, masked_softmax_rows, rms_norm_rows, rms_norm_rows_backward, silu_mul_backward,
    silu_mul_forward, softmax_rows_backward, with_f32,
};
use products::MatrixView;

mod attention;
mod block;
mod kernels;
mod logprobs;
mod mlp;
mod products;
mod rope;
pub use attention::{attention, attention_reference};
pub use block::{attention_block, mlp_block, AttentionBlockWeights, MlpBlockWeights};
pub use logprobs::{
    token_entropy, token_entropy_reference, token_logprobs, token_logprobs_reference,
};
#[cfg(test)]
use logprobs::{EntropyOp, LogSoftmaxGatherOp};
pub use mlp::{
    gated_mlp_input, gated_mlp_input_reference, gated_mlp_input_with_deltas,
    gated_mlp_input_with_deltas_reference,
};
pub use rope::{rope, rope_reference, rope_split_heads};
#[cfg(test)]
use rope::{rope_geometry, RopeOp};

type CandleResult<T> = candle_core::Result<T>;

/// True when `tensors` can take a fused f32 CPU kernel.
fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

fn last_dim(shape: &Shape) -> usize {
    shape.dims().last().copied().unwrap_or(1)
}

/// `shape` with its last dimension replaced by `last` (a projection's output shape).
fn with_last_dim(shape: &Shape, last: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(slot) = dims.last_mut() {
        *slot = last;
    }
    Shape::from(dims)
}

// ---------------------------------------------------------------- linear

/// `x W^T`: x (..., in), weight (out, in) → (..., out), one graph node. Its backward
/// computes the weight's gradient only when the weight is trained (candle's matmul
/// backward computes it for frozen weights too, a third of the backward matmul work
/// under LoRA) and adds no reshape/transpose nodes whose gradients candle would
/// zero-fill and accumulate one by one.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let fits = fusable(&[x, weight])
        && x.is_contiguous()
        && weight.is_contiguous()
        && weight.rank() == 2
        && x.rank() >= 1
        && weight.dim(1)? == x.dim(D::Minus1)?;
    if !fits {
        return linear_reference(x, weight);
    }
    Ok(x.apply_op2(weight, LinearOp)?)
}

/// The composite `x W^T`.
pub fn linear_reference(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let in_dim = dims.pop().unwrap_or(1);
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?; // (n, out)
    dims.push(weight.dim(0)?);
    Ok(y.reshape(dims)?)
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let x = MatrixView::row_major(contiguous_f32(s1, l1, self.name())?, rows, in_dim);
        let weight = MatrixView::row_major(contiguous_f32(s2, l2, self.name())?, out_dim, in_dim);
        let y = products::matmul(x, weight.t())?;
        Ok((CpuStorage::F32(y), with_last_dim(l1.shape(), out_dim)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (out_dim, in_dim) = weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let grad = grad.detach().contiguous()?;
        with_f32(&grad, name, |grad| {
            let grad = MatrixView::row_major(grad, rows, out_dim);
            let dx = if x.track_op() {
                let dx = with_f32(weight, name, |weight| {
                    products::matmul(grad, MatrixView::row_major(weight, out_dim, in_dim))
                })?;
                Some(Tensor::from_vec(dx, x.shape(), x.device())?) // (..., in)
            } else {
                None
            };
            if !weight.track_op() {
                return Ok((dx, None));
            }
            let x = x.contiguous()?;
            let dweight = with_f32(&x, name, |x| {
                weight_gradient(weight, grad, MatrixView::row_major(x, rows, in_dim))
            })?;
            Ok((dx, dweight))
        })
    }
}

/// `residual + x W^T`: a projection whose output joins the residual stream (the
/// attention's o_proj, the MLP's down_proj), as one node. Against a projection then a
/// separate add, candle keeps one node fewer, so one zero-filled gradient buffer and
/// one add fewer per call, and the sum is written over the product instead of into a
/// third buffer. The same float operations as the pair, so the same bits.
pub fn linear_add(x: &Tensor, weight: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let fits = fusable(&[x, weight, residual])
        && [x, weight, residual].iter().all(|t| t.is_contiguous())
        && weight.rank() == 2
        && x.rank() >= 1
        && weight.dim(1)? == x.dim(D::Minus1)?
        && residual.shape() == &with_last_dim(x.shape(), weight.dim(0)?);
    if !fits {
        return Ok((residual + linear(x, weight)?)?);
    }
    Ok(x.apply_op3(weight, residual, LinearAddOp)?)
}

/// `residual + x W^T` for x (rows, in) and weight (out, in), added in the order the
/// separate projection and add use (residual first), so the same bits.
fn residual_plus_projection(
    residual: &[f32],
    x: MatrixView,
    weight: MatrixView,
    op: &'static str,
) -> CandleResult<Vec<f32>> {
    let mut y = products::matmul(x, weight.t())?;
    if residual.len() != y.len() {
        candle_core::bail!("{op}: the residual does not match the projection");
    }
    for (y, r) in y.iter_mut().zip(residual) {
        *y = r + *y;
    }
    Ok(y)
}

struct LinearAddOp;

impl CustomOp3 for LinearAddOp {
    fn name(&self) -> &'static str {
        "fused-linear-add"
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
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let x = MatrixView::row_major(contiguous_f32(s1, l1, self.name())?, rows, in_dim);
        let weight = MatrixView::row_major(contiguous_f32(s2, l2, self.name())?, out_dim, in_dim);
        let residual = contiguous_f32(s3, l3, self.name())?;
        let y = residual_plus_projection(residual, x, weight, self.name())?;
        Ok((CpuStorage::F32(y), l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        residual: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dweight) = LinearOp.bwd(x, weight, y, grad)?;
        // The residual's gradient is the output's, shared rather than copied.
        let dresidual = residual.track_op().then(|| grad.detach());
        Ok((dx, dweight, dresidual))
    }
}

/// The gradient `grad^T x` (out, in) of a projection's trained `weight`, given the
/// gradient of its output (rows, out) and its input (rows, in): handed to the running
/// [`weight_grads::backward`] when there is one (then `None`), else returned for candle.
/// `None` too when the weight is not trained.
fn weight_gradient(
    weight: &Tensor,
    grad: MatrixView,
    x: MatrixView,
) -> CandleResult<Option<Tensor>> {
    if !weight.track_op() {
        return Ok(None);
    }
    let dweight = || products::matmul(grad.t(), x);
    let in_dim = weight.dim(1)?;
    let add = |dst: &mut [f32]| products::matmul_into(dst, in_dim, grad.t(), x, true);
    if weight_grads::deposit(weight, dweight, add)? {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(
        dweight()?,
        weight.shape(),
        weight.device(),
    )?))
}

/// `x W^T + delta` with a constant (frozen) weight: a LoRA projection, delta being the
/// adapter's output (rows, out) or (..., out). One node instead of product, reshape and
/// sum; the composite when the weight is trained.
pub fn linear_with_delta(x: &Tensor, weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let fits = fusable(&[x, weight, delta])
        && !weight.track_op()
        && [x, weight, delta].iter().all(|t| t.is_contiguous())
        && weight.rank() == 2
        && x.rank() >= 1
        && weight.dim(1)? == x.dim(D::Minus1)?
        && delta.elem_count() == x.elem_count() / weight.dim(1)?.max(1) * weight.dim(0)?;
    if !fits {
        let y = linear_reference(x, weight)?;
        return Ok((&y + delta.reshape(y.shape())?)?);
    }
    let op = LinearDeltaOp {
        weight: weight.detach(),
    };
    Ok(x.apply_op2(delta, op)?)
}

struct LinearDeltaOp {
    weight: Tensor,
}

impl CustomOp2 for LinearDeltaOp {
    fn name(&self) -> &'static str {
        "fused-linear-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let x = MatrixView::row_major(contiguous_f32(s1, l1, self.name())?, rows, in_dim);
        // The product lands on a copy of the delta.
        let mut y = contiguous_f32(s2, l2, self.name())?.to_vec();
        with_f32(&self.weight, self.name(), |weight| {
            let weight = MatrixView::row_major(weight, out_dim, in_dim);
            products::matmul_into(&mut y, out_dim, x, weight.t(), true)
        })?;
        Ok((CpuStorage::F32(y), with_last_dim(l1.shape(), out_dim)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        delta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let dx = if x.track_op() {
            let (out_dim, in_dim) = self.weight.dims2()?;
            let rows = x.elem_count() / in_dim.max(1);
            let dx = with_f32(&grad, self.name(), |grad| {
                with_f32(&self.weight, self.name(), |weight| {
                    products::matmul(
                        MatrixView::row_major(grad, rows, out_dim),
                        MatrixView::row_major(weight, out_dim, in_dim),
                    )
                })
            })?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?) // (..., in)
        } else {
            None
        };
        Ok((dx, Some(grad.reshape(delta.shape())?)))
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dim, in f32 like transformers.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let fits = fusable(&[x, weight])
        && x.is_contiguous()
        && weight.is_contiguous()
        && weight.dims() == [x.dim(D::Minus1)?];
    if !fits {
        return rms_norm_reference(x, weight, eps);
    }
    Ok(x.apply_op2(weight, RmsNormOp { eps: eps as f32 })?)
}

/// The composite RMSNorm: the reference for [`rms_norm`] and its path for other dtypes.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
    let normed = x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let y = rms_norm_rows(x, weight, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let want_weight = weight.track_op();
        let grad = grad.contiguous()?;
        let op = RmsNormBackwardOp {
            eps: self.eps,
            want_weight,
        };
        // (rows + 1, d): dx, then dweight as the last row when wanted.
        let both = x.apply_op3_no_bwd(weight, &grad, &op)?;
        let rows = x.elem_count() / weight.elem_count().max(1);
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dweight = if want_weight {
            Some(both.narrow(0, rows, 1)?.reshape(weight.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dweight))
    }
}

struct RmsNormBackwardOp {
    eps: f32,
    want_weight: bool,
}

impl CustomOp3 for RmsNormBackwardOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let d = weight.len();
        let rows = x.len() / d.max(1);
        let out = rms_norm_rows_backward(x, weight, grad, self.eps, self.want_weight);
        let out_rows = if self.want_weight { rows + 1 } else { rows };
        Ok((CpuStorage::F32(out), Shape::from((out_rows, d))))
    }
}

// ---------------------------------------------------------------- SiLU-gated product

/// `silu(gate) * up`, elementwise (same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fits = fusable(&[gate, up])
        && gate.is_contiguous()
        && up.is_contiguous()
        && gate.dims() == up.dims();
    if !fits {
        return silu_mul_reference(gate, up);
    }
    Ok(gate.apply_op2(up, SiluMulOp)?)
}

/// The composite SiLU-gated product.
pub fn silu_mul_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let gate = contiguous_f32(s1, l1, self.name())?;
        let up = contiguous_f32(s2, l2, self.name())?;
        Ok((
            CpuStorage::F32(silu_mul_forward(gate, up)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let both = gate.apply_op3_no_bwd(up, &grad, &SiluMulBackwardOp)?; // (2, n)
        let dgate = both.narrow(0, 0, 1)?.reshape(gate.shape())?;
        let dup = both.narrow(0, 1, 1)?.reshape(up.shape())?;
        Ok((Some(dgate), Some(dup)))
    }
}

struct SiluMulBackwardOp;

impl CustomOp3 for SiluMulBackwardOp {
    fn name(&self) -> &'static str {
        "fused-silu-mul-backward"
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
        let gate = contiguous_f32(s1, l1, self.name())?;
        let up = contiguous_f32(s2, l2, self.name())?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let out = silu_mul_backward(gate, up, grad);
        Ok((CpuStorage::F32(out), Shape::from((2, gate.len()))))
    }
}

// ---------------------------------------------------------------- attention softmax

/// `softmax(scores * scale + mask)` over the last dim: scores (b, h, t, s), mask
/// (b or 1, 1, t, s) additive. A row whose every entry is -inf gets all-zero weights
/// (the composite gives NaN). The mask receives no gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let fits = fusable(&[scores, mask])
        && scores.is_contiguous()
        && mask.is_contiguous()
        && mask_fits(scores, mask);
    if !fits {
        return masked_softmax_reference(scores, mask, scale);
    }
    Ok(scores.apply_op2(
        mask,
        MaskedSoftmaxOp {
            scale: scale as f32,
        },
    )?)
}

/// True when mask is (1 or b, 1, t, s) for scores (b, h, t, s).
fn mask_fits(scores: &Tensor, mask: &Tensor) -> bool {
    match (scores.dims(), mask.dims()) {
        ([b, _, t, s], [mb, 1, mt, ms]) => (*mb == 1 || mb == b) && mt == t && ms == s,
        _ => false,
    }
}

/// The composite masked softmax.
pub fn masked_softmax_reference(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let shifted = (scores * scale)?.broadcast_add(mask)?;
    Ok(candle_nn::ops::softmax(&shifted, D::Minus1)?)
}

struct MaskedSoftmaxOp {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let scores = contiguous_f32(s1, l1, self.name())?;
        let mask = contiguous_f32(s2, l2, self.name())?;
        let (batch, heads, time, keys) = l1.shape().dims4()?;
        let mask_batch = l2.shape().dims()[0];
        let per_batch = heads * time * keys;
        let mut out = vec![0f32; scores.len()];
        for b in 0..batch {
            let mask_b = if mask_batch == 1 { 0 } else { b };
            let mask_rows = &mask[mask_b * time * keys..][..time * keys];
            let range = b * per_batch..(b + 1) * per_batch;
            masked_softmax_rows(
                &scores[range.clone()],
                mask_rows,
                time,
                keys,
                self.scale,
                &mut out[range],
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = SoftmaxBackwardOp { scale: self.scale };
        Ok((Some(probs.apply_op2_no_bwd(&grad, &op)?), None))
    }
}

/// `scale * y * (g - Σ g y)` per row, from the softmax output y.
struct SoftmaxBackwardOp {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackwardOp {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let probs = contiguous_f32(s1, l1, self.name())?;
        let grad = contiguous_f32(s2, l2, self.name())?;
        let out = softmax_rows_backward(probs, grad, last_dim(l1.shape()), self.scale);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests;
