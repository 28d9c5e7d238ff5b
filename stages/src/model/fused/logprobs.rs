//! Log-softmax + gather (the log-probability of given tokens) and the entropy of each
//! softmax row, one pass per direction, over rows that may be strided (a `narrow` over
//! time of the logits).

use super::kernels::{
    contiguous_f32, entropy_rows, entropy_rows_backward, log_softmax_gather_rows,
    log_softmax_gather_rows_backward, row_starts,
};
use super::{fusable, last_dim, CandleResult};
use crate::model::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

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

pub(super) struct LogSoftmaxGatherOp;

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

pub(super) struct EntropyOp;

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
