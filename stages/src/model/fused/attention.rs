//! The grouped-query attention core, `softmax(q k^T * scale + mask) v`, as one graph
//! node. The composite is about fifteen nodes (head split of v, reshapes, a transpose
//! for k, two matmuls, scale, mask, softmax, the merge of heads), and candle's backward
//! zero-fills and accumulates a fresh gradient buffer for every one of them. Here the
//! products still run on candle's gemm, the softmax on the fused kernel, and the
//! backward recomputes the probabilities instead of keeping them.

use super::kernels::masked_softmax_in_place;
use super::{fusable, masked_softmax_reference, CandleResult, SoftmaxBackwardOp};
use crate::model::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub time: usize,
    pub keys: usize,
    pub head_dim: usize,
}

impl Geometry {
    /// Query heads per kv head.
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// (batch * kv_heads): the batch of the grouped products.
    fn groups(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Query rows per group: the n_rep heads of one kv head stacked along time.
    fn group_rows(&self) -> usize {
        self.n_rep() * self.time
    }
}

/// Attention of q (b, heads, t, d) over k (b, kv_heads, s, d) and v (b, s, kv_heads*d)
/// (v straight from its projection, heads not split) under the additive mask
/// (b or 1, 1, t, s) → context (b, t, heads*d), ready for the output projection.
/// Query head h reads kv head h / (heads / kv_heads). The mask gets no gradient; a
/// query row whose every key is -inf attends to nothing (zeros) instead of NaN.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    match geometry(q, k, v, mask)? {
        Some(geometry) => {
            let op = AttentionOp::new(geometry, mask, scale, true)?;
            Ok(q.apply_op3(k, v, op)?)
        }
        None => attention_reference(q, k, v, mask, scale),
    }
}

fn geometry(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Option<Geometry>> {
    let contiguous = [q, k, v, mask].iter().all(|t| t.is_contiguous());
    if !fusable(&[q, k, v, mask]) || !contiguous || q.rank() != 4 || k.rank() != 4 {
        return Ok(None);
    }
    let (batch, heads, time, head_dim) = q.dims4()?;
    let (k_batch, kv_heads, keys, k_dim) = k.dims4()?;
    let fits = k_batch == batch
        && k_dim == head_dim
        && kv_heads > 0
        && heads % kv_heads == 0
        && v.dims() == [batch, keys, kv_heads * head_dim]
        && matches!(mask.dims(), [mb, 1, mt, ms] if (*mb == 1 || *mb == batch) && *mt == time && *ms == keys);
    Ok(fits.then_some(Geometry {
        batch,
        heads,
        kv_heads,
        time,
        keys,
        head_dim,
    }))
}

/// The composite attention core: the reference for [`attention`] and its path for other
/// dtypes and layouts.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, time, head_dim) = q.dims4()?;
    let (_, kv_heads, keys, _) = k.dims4()?;
    let v = v
        .reshape((batch, keys, kv_heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?; // (b, kvh, s, d)
                        // Query head h uses kv head h / n_rep, so the n_rep query heads of one kv head are
                        // stacked along time and k/v are never copied per query head.
    let n_rep = heads / kv_heads;
    let q = q.reshape((batch, kv_heads, n_rep * time, head_dim))?;
    let scores = q
        .matmul(&k.t()?)? // (b, kvh, n_rep*t, s)
        .reshape((batch, heads, time, keys))?;
    let probs = masked_softmax_reference(&scores, mask, scale)?; // (b, h, t, s)
    let probs = probs.reshape((batch, kv_heads, n_rep * time, keys))?;
    Ok(probs
        .matmul(&v)? // (b, kvh, n_rep*t, d)
        .reshape((batch, heads, time, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, time, heads * head_dim))?) // (b, t, h*d)
}

pub(super) struct AttentionOp {
    geometry: Geometry,
    scale: f32,
    /// The mask's values, (mask_batch, 1, t, s) row-major.
    mask: Arc<Vec<f32>>,
    mask_batch: usize,
    /// The forward's probabilities (groups, group_rows, s), kept for the backward as the
    /// composite keeps its softmax output.
    probs: Mutex<Option<Tensor>>,
    /// Keep the probabilities (false only in tests of the recomputing backward).
    keep_probs: bool,
}

impl AttentionOp {
    pub(super) fn new(
        geometry: Geometry,
        mask: &Tensor,
        scale: f64,
        keep_probs: bool,
    ) -> Result<Self> {
        Ok(AttentionOp {
            geometry,
            scale: scale as f32,
            mask: Arc::new(mask.flatten_all()?.to_vec1::<f32>()?),
            mask_batch: mask.dim(0)?,
            probs: Mutex::new(None),
            keep_probs,
        })
    }

    /// softmax(q k^T * scale + mask), (groups, group_rows, s) row-major; its rows are
    /// (b, h, t) in order.
    fn probabilities(
        &self,
        q: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
    ) -> CandleResult<Vec<f32>> {
        let g = &self.geometry;
        let (groups, rows) = (g.groups(), g.group_rows());
        let lhs = Layout::contiguous_with_offset((groups, rows, g.head_dim), q.1.start_offset());
        let rhs = Layout::new(
            Shape::from((groups, g.head_dim, g.keys)),
            vec![g.keys * g.head_dim, 1, g.head_dim],
            k.1.start_offset(),
        ); // k^T, a view
        let scores =
            q.0.matmul(k.0, (groups, rows, g.keys, g.head_dim), &lhs, &rhs)?;
        let CpuStorage::F32(mut scores) = scores else {
            candle_core::bail!("fused-attention: the scores are not f32");
        };
        let per_batch = g.heads * g.time * g.keys;
        let per_mask = g.time * g.keys;
        for (b, rows) in scores.chunks_exact_mut(per_batch).enumerate() {
            let mask_b = if self.mask_batch == 1 { 0 } else { b };
            let mask = &self.mask[mask_b * per_mask..][..per_mask];
            masked_softmax_in_place(rows, mask, g.time, g.keys, self.scale);
        }
        Ok(scores)
    }

    /// probs · v per batch row, with the heads merged: (b, t, h*d) row-major.
    fn context(
        &self,
        probs: &CpuStorage,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> CandleResult<Vec<f32>> {
        let g = &self.geometry;
        let (rows, d, width) = (g.group_rows(), g.head_dim, g.kv_heads * g.head_dim);
        let mut out = vec![0f32; g.batch * g.time * g.heads * d];
        for b in 0..g.batch {
            let lhs = Layout::contiguous_with_offset(
                (g.kv_heads, rows, g.keys),
                b * g.kv_heads * rows * g.keys,
            );
            // v of batch row b seen as (kvh, s, d) without copying it.
            let rhs = Layout::new(
                Shape::from((g.kv_heads, g.keys, d)),
                vec![d, width, 1],
                v_layout.start_offset() + b * g.keys * width,
            );
            let context = probs.matmul(v, (g.kv_heads, rows, d, g.keys), &lhs, &rhs)?;
            let CpuStorage::F32(context) = context else {
                candle_core::bail!("fused-attention: the context is not f32");
            };
            // (h, t, d) → rows (t, h*d) of the output.
            for (h, head) in context.chunks_exact(g.time * d).enumerate() {
                for (t, row) in head.chunks_exact(d).enumerate() {
                    out[((b * g.time + t) * g.heads + h) * d..][..d].copy_from_slice(row);
                }
            }
        }
        Ok(out)
    }

    /// The forward's probabilities, or recomputed if they were not kept.
    fn probabilities_of(&self, q: &Tensor, k: &Tensor) -> CandleResult<Tensor> {
        if let Some(probs) = self.probs.lock().ok().and_then(|slot| slot.clone()) {
            return Ok(probs);
        }
        let g = &self.geometry;
        let values = {
            let (q_storage, q_layout) = q.storage_and_layout();
            let (k_storage, k_layout) = k.storage_and_layout();
            match (&*q_storage, &*k_storage) {
                (Storage::Cpu(q), Storage::Cpu(k)) => {
                    self.probabilities((q, q_layout), (k, k_layout))?
                }
                _ => candle_core::bail!("fused-attention: q and k must be on the CPU"),
            }
        };
        Tensor::from_vec(values, (g.groups(), g.group_rows(), g.keys), q.device())
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let g = &self.geometry;
        let values = self.probabilities((s1, l1), (s2, l2))?;
        let probs = Tensor::from_vec(values, (g.groups(), g.group_rows(), g.keys), &Device::Cpu)?;
        let out = {
            let (storage, _) = probs.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("fused-attention: the probabilities are not on the CPU");
            };
            self.context(storage, s3, l3)?
        };
        if self.keep_probs {
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(probs);
            }
        }
        let shape = Shape::from((g.batch, g.time, g.heads * g.head_dim));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _context: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        let (groups, rows, d) = (g.groups(), g.group_rows(), g.head_dim);
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let probs = self.probabilities_of(&q, &k)?; // (b*kvh, n_rep*t, s)
        let dcontext = grad
            .detach()
            .reshape((g.batch, g.time, g.heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((groups, rows, d))?; // (b*kvh, n_rep*t, d)
        let v_heads = v
            .reshape((g.batch, g.keys, g.kv_heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((groups, g.keys, d))?; // (b*kvh, s, d)
        let dv = probs
            .t()?
            .matmul(&dcontext)? // (b*kvh, s, d)
            .reshape((g.batch, g.kv_heads, g.keys, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((g.batch, g.keys, g.kv_heads * d))?;
        let dprobs = dcontext.matmul(&v_heads.t()?)?; // (b*kvh, n_rep*t, s)
        let softmax_backward = SoftmaxBackwardOp { scale: self.scale };
        let dscores = probs.apply_op2_no_bwd(&dprobs, &softmax_backward)?;
        let dq = dscores
            .matmul(&k.reshape((groups, g.keys, d))?)?
            .reshape((g.batch, g.heads, g.time, d))?;
        let dk = dscores
            .t()?
            .matmul(&q.reshape((groups, rows, d))?)?
            .reshape((g.batch, g.kv_heads, g.keys, d))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Applies the fused op itself (never the composite fallback), for the tests; with
/// `recompute`, the backward recomputes the probabilities instead of reusing them.
#[cfg(test)]
pub(super) fn apply_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    recompute: bool,
) -> Result<Tensor> {
    let geometry = geometry(q, k, v, mask)?.expect("shapes the fused kernel takes");
    let op = AttentionOp::new(geometry, mask, scale, !recompute)?;
    Ok(q.apply_op3(k, v, op)?)
}
