//! The KV cache of generation and the attention that reads it.
//!
//! Generation needs no gradients, and at decode time every (row, head) pair is its own
//! tiny matrix product: candle's batched matmul runs one gemm call per pair, whose
//! overhead dominated decoding (batch 32 cost almost as much as 32 single rows). So the
//! cache keeps keys and values in plain vectors per (row, kv head) and attention over it
//! is a direct loop: scores, a max-subtracted softmax over visible keys, and the
//! weighted sum of values. Masked keys get weight exactly 0, as with transformers'
//! additive min-float mask.

use super::Result;
use candle_core::{DType, Device, Tensor};

/// Keys and values of every cached position for one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    /// Per (row, kv head), `len * head_dim` floats: the keys after RoPE.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
}

impl LayerCache {
    /// Appends k, v (b, kv_heads, t, head_dim).
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        let (batch, kv_heads, time, head_dim) = keys.dims4()?;
        if self.keys.is_empty() {
            self.keys = vec![Vec::new(); batch * kv_heads];
            self.values = vec![Vec::new(); batch * kv_heads];
            self.kv_heads = kv_heads;
            self.head_dim = head_dim;
        }
        let flat_keys = keys.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let flat_values = values
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let chunk = time * head_dim;
        for (pair, (k, v)) in self.keys.iter_mut().zip(self.values.iter_mut()).enumerate() {
            k.extend_from_slice(&flat_keys[pair * chunk..(pair + 1) * chunk]);
            v.extend_from_slice(&flat_values[pair * chunk..(pair + 1) * chunk]);
        }
        Ok(())
    }

    /// Keeps only the batch rows listed in `rows` (finished sequences are dropped).
    pub fn select_rows(&mut self, rows: &[usize]) {
        let heads = self.kv_heads;
        let pick = |store: &[Vec<f32>]| -> Vec<Vec<f32>> {
            rows.iter()
                .flat_map(|&r| (0..heads).map(move |h| r * heads + h))
                .map(|i| store[i].clone())
                .collect()
        };
        self.keys = pick(&self.keys);
        self.values = pick(&self.values);
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.keys
            .first()
            .map(|k| k.len() / self.head_dim.max(1))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attention of q (b, heads, t, head_dim) over every cached key (the t newest are
    /// these queries' own), causal, with `key_mask[row][j]` 0 for keys to ignore.
    /// Returns the context (b, t, heads * head_dim) in f32.
    pub fn attend(
        &self,
        queries: &Tensor,
        key_mask: &[Vec<f32>],
        device: &Device,
    ) -> Result<Tensor> {
        let (batch, heads, time, head_dim) = queries.dims4()?;
        let q = queries
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (keys_len, n_rep) = (self.len(), heads / self.kv_heads.max(1));
        let past = keys_len - time;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0f32; batch * time * heads * head_dim];
        let mut weights = vec![0.0f32; keys_len];
        for row in 0..batch {
            for head in 0..heads {
                let pair = row * self.kv_heads + head / n_rep;
                let (keys, values) = (&self.keys[pair], &self.values[pair]);
                for step in 0..time {
                    let query = &q[((row * heads + head) * time + step) * head_dim..][..head_dim];
                    let visible = past + step + 1;
                    let mut max = f32::NEG_INFINITY;
                    for (j, weight) in weights.iter_mut().enumerate().take(visible) {
                        *weight = if key_mask[row][j] > 0.5 {
                            let key = &keys[j * head_dim..][..head_dim];
                            dot(query, key) * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        max = max.max(*weight);
                    }
                    if max == f32::NEG_INFINITY {
                        continue; // a pad query with nothing to see: its output is never read
                    }
                    let mut total = 0.0f32;
                    for weight in weights.iter_mut().take(visible) {
                        *weight = (*weight - max).exp();
                        total += *weight;
                    }
                    let context =
                        &mut out[((row * time + step) * heads + head) * head_dim..][..head_dim];
                    for (j, weight) in weights.iter().enumerate().take(visible) {
                        if *weight > 0.0 {
                            let p = weight / total;
                            let value = &values[j * head_dim..][..head_dim];
                            context.iter_mut().zip(value).for_each(|(c, v)| *c += p * v);
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(
            out,
            (batch, time, heads * head_dim),
            device,
        )?)
    }
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it
/// (a single running sum is a serial dependency chain it must keep in order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
