//! The building blocks of a Llama-family decoder, as plain structs of tensors: linear
//! projections (optionally carrying a LoRA adapter), RMSNorm, grouped-query attention,
//! the SiLU-gated MLP and the decoder layer. (Generation's cached decoder: `kv_cache`.)

use super::fused;
use super::lora::LoraAdapter;
use super::rope::RopeTables;
use super::weights::WeightSource;
use super::{LlamaConfig, Result};
use candle_core::{Tensor, D};
use rand_chacha::ChaCha8Rng;

/// Randomness for LoRA dropout; `None` means evaluation (no dropout).
pub type DropoutRng<'a, 'b> = &'a mut Option<&'b mut ChaCha8Rng>;

/// `y = x W^T + b`, plus `scale * B A dropout(x)` when a LoRA adapter is attached.
#[derive(Clone, Debug)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    /// (out,)
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn load(
        weights: &WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            weight: weights.get(&format!("{name}.weight"), &[out_dim, in_dim])?,
            bias: weights.get_if(bias, &format!("{name}.bias"), &[out_dim])?,
            lora: None,
        })
    }

    /// x (..., in) → (..., out)
    pub fn forward(&self, x: &Tensor, rng: DropoutRng) -> Result<Tensor> {
        if let (Some(lora), None) = (&self.lora, &self.bias) {
            // Frozen base product and adapter in one node (`fused::linear_with_delta`).
            let in_dim = x.dim(D::Minus1)?;
            let flat = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?; // (n, in)
            let delta = lora.delta(&flat, rng)?; // (n, out)
            return fused::linear_with_delta(x, &self.weight, &delta);
        }
        // One fused node (`fused::linear`) for the base product.
        let mut y = fused::linear(x, &self.weight)?; // (..., out)
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            let in_dim = x.dim(D::Minus1)?;
            let flat = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?; // (n, in)
            let delta = lora.delta(&flat, rng)?.reshape(y.shape())?; // (..., out)
            y = (y + delta)?;
        }
        Ok(y)
    }

    /// A bare `x W^T`: no bias, no adapter.
    fn is_plain(&self) -> bool {
        self.lora.is_none() && self.bias.is_none()
    }

    fn all_plain(linears: &[&Linear]) -> bool {
        linears.iter().all(|l| l.is_plain())
    }

    /// `residual + forward(x)`: one fused node (`fused::linear_add`) for a plain
    /// projection.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, rng: DropoutRng) -> Result<Tensor> {
        if self.is_plain() {
            return fused::linear_add(x, &self.weight, residual);
        }
        Ok((residual + self.forward(x, rng)?)?)
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// Root-mean-square norm, computed in f32 like transformers (`weight * x / rms(x)`).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(weights: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: weights.get(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    /// One fused pass for f32 on the CPU (`fused::rms_norm`), the composite otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::rms_norm(x, &self.weight, self.eps)
    }
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(weights: &WeightSource, prefix: &str, config: &LlamaConfig) -> Result<Self> {
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_kv_heads(),
            config.head_dim(),
        );
        let qkv_bias = config.qkv_bias();
        Ok(Attention {
            q_proj: Linear::load(
                weights,
                &format!("{prefix}.q_proj"),
                hidden,
                heads * head_dim,
                qkv_bias,
            )?,
            k_proj: Linear::load(
                weights,
                &format!("{prefix}.k_proj"),
                hidden,
                kv_heads * head_dim,
                qkv_bias,
            )?,
            v_proj: Linear::load(
                weights,
                &format!("{prefix}.v_proj"),
                hidden,
                kv_heads * head_dim,
                qkv_bias,
            )?,
            o_proj: Linear::load(
                weights,
                &format!("{prefix}.o_proj"),
                heads * head_dim,
                hidden,
                config.o_bias(),
            )?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
        })
    }

    /// `residual` + attention of x (b, t, hidden) → (b, t, hidden); `mask` (b or 1, 1,
    /// t, t) is added to the scores.
    pub fn forward_add(
        &self,
        x: &Tensor,
        residual: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        rng: DropoutRng,
    ) -> Result<Tensor> {
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (cos, sin) = (&rope.cos, &rope.sin);
        // Splitting into heads and rotating is one pass (no transposed copy).
        let q = fused::rope_split_heads(&self.q_proj.forward(x, rng)?, cos, sin, heads)?; // (b, h, t, d)
        let k = fused::rope_split_heads(&self.k_proj.forward(x, rng)?, cos, sin, kv_heads)?; // (b, kvh, t, d)
        let v = self.v_proj.forward(x, rng)?; // (b, t, kvh*d), heads split inside attention
        let scale = 1.0 / (head_dim as f64).sqrt();
        // One node for scores, mask, softmax and the weighted sum (`fused::attention`).
        let context = fused::attention(&q, &k, &v, mask, scale)?; // (b, t, h*d)
        self.o_proj.forward_add(&context, residual, rng)
    }
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(weights: &WeightSource, prefix: &str, config: &LlamaConfig) -> Result<Self> {
        let (hidden, inter, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Mlp {
            gate_proj: Linear::load(weights, &format!("{prefix}.gate_proj"), hidden, inter, bias)?,
            up_proj: Linear::load(weights, &format!("{prefix}.up_proj"), hidden, inter, bias)?,
            down_proj: Linear::load(weights, &format!("{prefix}.down_proj"), inter, hidden, bias)?,
        })
    }

    /// `residual` + the MLP of x.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, rng: DropoutRng) -> Result<Tensor> {
        let plain = |linear: &Linear| linear.lora.is_none() && linear.bias.is_none();
        if plain(&self.gate_proj) && plain(&self.up_proj) {
            // Both projections and the gate in one node (`fused::gated_mlp_input`).
            let (gate, up) = (&self.gate_proj.weight, &self.up_proj.weight);
            let hidden = fused::gated_mlp_input(x, gate, up)?; // (b, t, inter)
            return self.down_proj.forward_add(&hidden, residual, rng);
        }
        let (gate, up) = (&self.gate_proj, &self.up_proj);
        if let (Some(gate_lora), Some(up_lora), None, None) =
            (&gate.lora, &up.lora, &gate.bias, &up.bias)
        {
            // LoRA on both: one node for the frozen base projections, the adapters'
            // deltas and the gate (`fused::gated_mlp_input_with_deltas`).
            let in_dim = x.dim(D::Minus1)?;
            let flat = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?; // (n, in)
            let gate_delta = gate_lora.delta(&flat, rng)?; // (n, inter)
            let up_delta = up_lora.delta(&flat, rng)?;
            let hidden = fused::gated_mlp_input_with_deltas(
                x,
                &gate.weight,
                &up.weight,
                &gate_delta,
                &up_delta,
            )?; // (b, t, inter)
            return self.down_proj.forward_add(&hidden, residual, rng);
        }
        let gate = self.gate_proj.forward(x, rng)?; // (b, t, inter)
        let up = self.up_proj.forward(x, rng)?;
        self.down_proj
            .forward_add(&fused::silu_mul(&gate, &up)?, residual, rng)
    }
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(weights: &WeightSource, prefix: &str, config: &LlamaConfig) -> Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.input_layernorm"),
                hidden,
                eps,
            )?,
            self_attn: Attention::load(weights, &format!("{prefix}.self_attn"), config)?,
            post_attention_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.post_attention_layernorm"),
                hidden,
                eps,
            )?,
            mlp: Mlp::load(weights, &format!("{prefix}.mlp"), config)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        rng: DropoutRng,
    ) -> Result<Tensor> {
        let x = match self.fused_attention_half(x, rope, mask)? {
            Some(y) => y,
            None => {
                let normed = self.input_layernorm.forward(x)?;
                self.self_attn.forward_add(&normed, x, rope, mask, rng)?
            }
        };
        if let Some(y) = self.fused_mlp_half(&x)? {
            return Ok(y);
        }
        let normed = self.post_attention_layernorm.forward(&x)?;
        self.mlp.forward_add(&normed, &x, rng)
    }

    /// The attention half as one node (`fused::attention_block`) when its projections
    /// are plain.
    fn fused_attention_half(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
    ) -> Result<Option<Tensor>> {
        let attn = &self.self_attn;
        if !Linear::all_plain(&[&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj]) {
            return Ok(None);
        }
        let weights = fused::AttentionBlockWeights {
            norm: &self.input_layernorm.weight,
            eps: self.input_layernorm.eps,
            q: &attn.q_proj.weight,
            k: &attn.k_proj.weight,
            v: &attn.v_proj.weight,
            o: &attn.o_proj.weight,
            heads: attn.num_heads,
            kv_heads: attn.num_kv_heads,
            cos: &rope.cos,
            sin: &rope.sin,
            mask,
            scale: 1.0 / (attn.head_dim as f64).sqrt(),
        };
        fused::attention_block(x, &weights)
    }

    /// The MLP half as one node (`fused::mlp_block`) when its projections are plain.
    fn fused_mlp_half(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let mlp = &self.mlp;
        if !Linear::all_plain(&[&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj]) {
            return Ok(None);
        }
        let weights = fused::MlpBlockWeights {
            norm: &self.post_attention_layernorm.weight,
            eps: self.post_attention_layernorm.eps,
            gate: &mlp.gate_proj.weight,
            up: &mlp.up_proj.weight,
            down: &mlp.down_proj.weight,
        };
        fused::mlp_block(x, &weights)
    }

    /// The seven linear modules with their HF short names.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("q_proj", &mut self.self_attn.q_proj),
            ("k_proj", &mut self.self_attn.k_proj),
            ("v_proj", &mut self.self_attn.v_proj),
            ("o_proj", &mut self.self_attn.o_proj),
            ("gate_proj", &mut self.mlp.gate_proj),
            ("up_proj", &mut self.mlp.up_proj),
            ("down_proj", &mut self.mlp.down_proj),
        ]
    }

    pub fn linears(&self) -> [(&'static str, &'static str, &Linear); 7] {
        [
            ("self_attn", "q_proj", &self.self_attn.q_proj),
            ("self_attn", "k_proj", &self.self_attn.k_proj),
            ("self_attn", "v_proj", &self.self_attn.v_proj),
            ("self_attn", "o_proj", &self.self_attn.o_proj),
            ("mlp", "gate_proj", &self.mlp.gate_proj),
            ("mlp", "up_proj", &self.mlp.up_proj),
            ("mlp", "down_proj", &self.mlp.down_proj),
        ]
    }
}
