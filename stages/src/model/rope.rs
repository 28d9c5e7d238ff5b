//! Rotary position embeddings in the rotate-half convention of transformers' Llama,
//! computed from explicit per-row position ids with differentiable ops (candle's fused
//! `rope` drops gradients). Supports the `linear` and `llama3` frequency rescalings.

use super::config::RopeScaling;
use super::Result;
use candle_core::{DType, Device, Tensor, D};

/// The inverse frequencies of one attention head.
#[derive(Clone, Debug)]
pub struct Rope {
    /// (head_dim / 2,)
    inv_freq: Tensor,
}

/// cos and sin for a batch of positions, each (b, 1, t, head_dim), ready to broadcast
/// over heads.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        device: &Device,
    ) -> Result<Self> {
        // Computed in f32 as transformers does, so rounding matches its tables.
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / (theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f as f64;
                    let freq = *f as f64;
                    let scaled = if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *f = scaled as f32;
                }
            }
        }
        let len = inv_freq.len();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv_freq, (len,), device)?,
        })
    }

    /// The inverse frequencies (head_dim / 2,) in f32.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        Ok(self.inv_freq.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// Tables for `position_ids (b, t)` (u32), in `dtype`.
    pub fn tables(&self, position_ids: &Tensor, dtype: DType) -> Result<RopeTables> {
        let (batch, time) = position_ids.dims2()?;
        let half = self.inv_freq.dim(0)?;
        let positions = position_ids
            .to_dtype(DType::F32)?
            .reshape((batch, time, 1))?;
        let freqs = positions.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?; // (b, t, d/2)
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // (b, t, d)
        let cos = emb.cos()?.unsqueeze(1)?.to_dtype(dtype)?; // (b, 1, t, d)
        let sin = emb.sin()?.unsqueeze(1)?.to_dtype(dtype)?;
        Ok(RopeTables { cos, sin })
    }
}

/// `x * cos + rotate_half(x) * sin` for x (b, heads, t, head_dim): one fused pass with
/// its own backward for f32 on the CPU (`fused::rope`), the composite otherwise.
pub fn apply_rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    super::fused::rope(x, &tables.cos, &tables.sin)
}
