//! Fused CPU kernels for the training hot path, each a candle custom op with a
//! hand-written backward: RMSNorm, the SiLU-gated product, the scaled and masked
//! attention softmax, rotary embeddings, and log-softmax + gather / entropy.
//!
//! Why: a composite of small candle ops allocates (and page-faults) one fresh buffer per
//! op forward and several per op backward; one pass over the data per direction is
//! several times cheaper. The kernels are plain single-threaded loops over contiguous
//! f32 rows (training runs data-parallel shards, one thread each), written so LLVM
//! vectorises them. Inputs that are not f32 on the CPU, or not laid out as a kernel
//! needs, take the composite `*_reference` path, which is also what the tests compare
//! against. The backward of each op is itself a custom op applied without a graph:
//! nothing here takes second derivatives.

use super::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

mod attention;
mod kernels;
mod mlp;
pub use attention::{attention, attention_reference};
use kernels::{
    contiguous_f32, entropy_rows, entropy_rows_backward, log_softmax_gather_rows,
    log_softmax_gather_rows_backward, masked_softmax_rows, rms_norm_rows, rms_norm_rows_backward,
    rope_rows, row_starts, silu_mul_backward, silu_mul_forward, softmax_rows_backward,
    RopeDirection, RopeGeometry,
};
pub use mlp::{gated_mlp_input, gated_mlp_input_reference};

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
        use candle_core::backend::BackendStorage;
        let in_dim = last_dim(l1.shape());
        let (out_dim, _) = l2.shape().dims2()?;
        let rows = l1.shape().elem_count() / in_dim.max(1);
        let lhs = Layout::contiguous_with_offset((rows, in_dim), l1.start_offset());
        let rhs = l2.transpose(0, 1)?; // (in, out) view of the weight
        let y = s1.matmul(s2, (1, rows, out_dim, in_dim), &lhs, &rhs)?;
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        // Detached: the gradients need no graph of their own.
        let grad = grad.detach().contiguous()?.reshape((rows, out_dim))?; // (n, out)
        let dx = if x.track_op() {
            Some(grad.matmul(&weight.detach())?.reshape(x.shape())?) // (..., in)
        } else {
            None
        };
        let dweight = if weight.track_op() {
            let x = x.detach().reshape((rows, in_dim))?;
            Some(grad.t()?.matmul(&x)?) // (out, in)
        } else {
            None
        };
        Ok((dx, dweight))
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

// ---------------------------------------------------------------- rotary embeddings

/// `x * cos + rotate_half(x) * sin`: x (b, h, t, d), cos/sin (b or 1, 1, t, d).
/// Gradient to x only (the tables are constants).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let heads = x.dim(1)?;
    let geometry = rope_geometry(x, cos, sin, false, heads)?;
    match geometry {
        Some(geometry) => Ok(x.apply_op3(cos, sin, RopeOp { geometry })?),
        None => rope_reference(x, cos, sin),
    }
}

/// Splits x (b, t, heads*d) into heads and rotates them in one pass: → (b, heads, t, d),
/// equal to `rope(x.reshape((b, t, heads, d)).transpose(1, 2), cos, sin)`.
pub fn rope_split_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    match rope_geometry(x, cos, sin, true, heads)? {
        Some(geometry) => Ok(x.apply_op3(cos, sin, RopeOp { geometry })?),
        None => {
            let (batch, time, width) = x.dims3()?;
            let split = x
                .reshape((batch, time, heads, width / heads.max(1)))?
                .transpose(1, 2)?
                .contiguous()?; // (b, h, t, d)
            rope_reference(&split, cos, sin)
        }
    }
}

/// The kernel's view of x, or None when it must take the composite path.
fn rope_geometry(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    token_major: bool,
    heads: usize,
) -> Result<Option<RopeGeometry>> {
    if !fusable(&[x, cos, sin]) || !x.is_contiguous() || !cos.is_contiguous() {
        return Ok(None);
    }
    if !sin.is_contiguous() || cos.dims() != sin.dims() || cos.rank() != 4 {
        return Ok(None);
    }
    let (table_batch, _, table_time, head_dim) = cos.dims4()?;
    let (batch, time, width) = if token_major {
        x.dims3()?
    } else {
        let (b, h, t, d) = x.dims4()?;
        (b, t, h * d)
    };
    let fits = heads > 0
        && head_dim % 2 == 0
        && width == heads * head_dim
        && table_time == time
        && (table_batch == 1 || table_batch == batch);
    Ok(fits.then_some(RopeGeometry {
        batch,
        heads,
        time,
        head_dim,
        table_batch,
        token_major,
    }))
}

/// The composite rotary embedding, x (b, h, t, d).
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = head_dim / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?; // (b, h, t, d)
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

struct RopeOp {
    geometry: RopeGeometry,
}

impl RopeOp {
    fn run(
        &self,
        direction: RopeDirection,
        input: (&CpuStorage, &Layout),
        cos: (&CpuStorage, &Layout),
        sin: (&CpuStorage, &Layout),
    ) -> CandleResult<(CpuStorage, Shape)> {
        let name = "fused-rope";
        let input = contiguous_f32(input.0, input.1, name)?;
        let cos = contiguous_f32(cos.0, cos.1, name)?;
        let sin = contiguous_f32(sin.0, sin.1, name)?;
        let g = &self.geometry;
        let out = rope_rows(input, cos, sin, g, direction);
        let shape = match (direction, g.token_major) {
            (RopeDirection::Backward, true) => Shape::from((g.batch, g.time, g.heads * g.head_dim)),
            _ => Shape::from((g.batch, g.heads, g.time, g.head_dim)),
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        self.run(RopeDirection::Forward, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = RopeBackwardOp {
            forward: RopeOp {
                geometry: self.geometry,
            },
        };
        Ok((Some(grad.apply_op3_no_bwd(cos, sin, &op)?), None, None))
    }
}

struct RopeBackwardOp {
    forward: RopeOp,
}

impl CustomOp3 for RopeBackwardOp {
    fn name(&self) -> &'static str {
        "fused-rope-backward"
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
        self.forward
            .run(RopeDirection::Backward, (s1, l1), (s2, l2), (s3, l3))
    }
}

// ---------------------------------------------------------------- log-softmax + gather, entropy

/// `log_softmax(logits)[targets]`: logits (..., vocab), targets (...) → (...) f32.
/// The logits' rows may be strided (e.g. a `narrow` over time); the last dim must not be.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fusable(&[logits]) || row_starts(logits.layout()).is_none() {
        return token_logprobs_reference(logits, targets);
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    if targets.dims() != &logits.dims()[..logits.rank() - 1] {
        return token_logprobs_reference(logits, &targets);
    }
    Ok(logits.apply_op2(&targets, LogSoftmaxGatherOp)?)
}

/// The composite log-softmax + gather.
pub fn token_logprobs_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?; // (b, t, v)
                                                                                            // gather needs a contiguous index on CPU (../shared/NOTES.md).
    let index = targets
        .to_dtype(DType::U32)?
        .unsqueeze(D::Minus1)?
        .contiguous()?; // (b, t, 1)
    Ok(log_probs.gather(&index, D::Minus1)?.squeeze(D::Minus1)?)
}

struct LogSoftmaxGatherOp;

impl CustomOp2 for LogSoftmaxGatherOp {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        let logits = s1.as_slice::<f32>()?;
        let targets = targets_slice(s2, l2)?;
        let starts = strided_rows(l1, self.name())?;
        let out = log_softmax_gather_rows(logits, &starts, last_dim(l1.shape()), targets)?;
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dlogits = logits.apply_op3_no_bwd(targets, &grad, &LogSoftmaxGatherBackwardOp)?;
        Ok((Some(dlogits), None))
    }
}

struct LogSoftmaxGatherBackwardOp;

impl CustomOp3 for LogSoftmaxGatherBackwardOp {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather-backward"
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
        let logits = s1.as_slice::<f32>()?;
        let starts = strided_rows(l1, self.name())?;
        let targets = targets_slice(s2, l2)?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let vocab = last_dim(l1.shape());
        let out = log_softmax_gather_rows_backward(logits, &starts, vocab, targets, grad);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Entropy of each softmax row, `-Σ p log p`: logits (..., vocab) → (...).
pub fn token_entropy(logits: &Tensor) -> Result<Tensor> {
    if !fusable(&[logits]) || row_starts(logits.layout()).is_none() {
        return token_entropy_reference(logits);
    }
    Ok(logits.apply_op1(EntropyOp)?)
}

/// The composite entropy.
pub fn token_entropy_reference(logits: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?; // (b, t, v)
    Ok((log_probs.exp()? * &log_probs)?.sum(D::Minus1)?.neg()?)
}

struct EntropyOp;

impl CustomOp1 for EntropyOp {
    fn name(&self) -> &'static str {
        "fused-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CandleResult<(CpuStorage, Shape)> {
        let logits = storage.as_slice::<f32>()?;
        let starts = strided_rows(layout, self.name())?;
        let vocab = last_dim(layout.shape());
        let out = entropy_rows(logits, &starts, vocab);
        let dims = layout.shape().dims();
        Ok((CpuStorage::F32(out), Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        entropy: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let entropy = entropy.contiguous()?;
        Ok(Some(logits.apply_op3_no_bwd(
            &entropy,
            &grad,
            &EntropyBackwardOp,
        )?))
    }
}

struct EntropyBackwardOp;

impl CustomOp3 for EntropyBackwardOp {
    fn name(&self) -> &'static str {
        "fused-entropy-backward"
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
        let logits = s1.as_slice::<f32>()?;
        let starts = strided_rows(l1, self.name())?;
        let entropy = contiguous_f32(s2, l2, self.name())?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let vocab = last_dim(l1.shape());
        let out = entropy_rows_backward(logits, &starts, vocab, entropy, grad);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn strided_rows(layout: &Layout, op: &'static str) -> CandleResult<Vec<usize>> {
    match row_starts(layout) {
        Some(starts) => Ok(starts),
        None => candle_core::bail!("{op}: the last dim must have stride 1"),
    }
}

fn targets_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> CandleResult<&'a [u32]> {
    let data = storage.as_slice::<u32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused-log-softmax-gather: targets must be contiguous"),
    }
}

#[cfg(test)]
mod tests;
