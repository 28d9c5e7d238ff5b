//! The training-first causal LM (Llama, Qwen2): `forward` returns logits at every
//! position of a right-padded batch and keeps no state between calls; generation runs
//! a separate cached decoder over a snapshot of these weights (`kv_cache`).

use super::layers::{DecoderLayer, DropoutRng, RmsNorm};
use super::lora::LoraConfig;
use super::rope::Rope;
use super::weights::{load_safetensors, WeightSource};
use super::{LlamaConfig, ModelError, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Whether the base weights are frozen tensors or trainable `Var`s.
#[derive(Clone, Copy)]
pub enum Trainability<'a> {
    /// Plain tensors: nothing in the base model can reach an optimiser.
    Frozen,
    /// Full fine-tuning: every weight becomes a `Var` in this map, under its HF name.
    Full(&'a VarMap),
}

/// A Llama-family decoder with its LM head.
#[derive(Clone, Debug)]
pub struct CausalLm {
    pub config: LlamaConfig,
    /// (vocab, hidden)
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// (vocab, hidden); the embedding itself when `tie_word_embeddings`.
    pub lm_head: Tensor,
    rope: Rope,
    /// The LoRA configuration of the attached adapters, if any.
    pub lora: Option<LoraConfig>,
}

impl CausalLm {
    /// Loads `config.json` and the safetensors weights of an HF folder.
    pub fn load(
        folder: &Path,
        dtype: DType,
        device: &Device,
        trainability: Trainability,
    ) -> Result<Self> {
        let config = LlamaConfig::from_file(&folder.join("config.json"))?;
        let tensors = load_safetensors(folder, dtype, device)?;
        Self::from_tensors(config, tensors, device, trainability)
    }

    /// Builds the model from tensors named as in an HF checkpoint.
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        trainability: Trainability,
    ) -> Result<Self> {
        config.validate()?;
        let varmap = match trainability {
            Trainability::Frozen => None,
            Trainability::Full(varmap) => Some(varmap),
        };
        let weights = WeightSource::new(tensors, varmap);
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&weights, &format!("model.layers.{i}"), &config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&weights, "model.norm", hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            weights.get("lm_head.weight", &[vocab, hidden])?
        };
        let rope = Rope::new(
            config.head_dim(),
            config.rope_theta(),
            &config.rope_scaling()?,
            device,
        )?;
        Ok(CausalLm {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            lora: None,
        })
    }

    /// A seeded random model in transformers' default init: linear and embedding
    /// weights ~ N(0, initializer_range (default 0.02)), biases 0, norms 1.
    pub fn random(
        config: LlamaConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        trainability: Trainability,
    ) -> Result<Self> {
        config.validate()?;
        let std = config
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in checkpoint_shapes(&config) {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; count]
            } else if name.ends_with(".bias") {
                vec![0.0; count]
            } else {
                (0..count)
                    .map(|_| (standard_normal(&mut rng) * std) as f32)
                    .collect()
            };
            tensors.insert(
                name,
                Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?,
            );
        }
        Self::from_tensors(config, tensors, device, trainability)
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Logits at every position: input_ids (b, t) u32, attention_mask (b, t) 1 on real
    /// tokens (right padding; `None` = no padding), position_ids (b, t) u32 (`None` =
    /// 0..t for every row). Returns (b, t, vocab) in f32.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids)?;
        self.logits(&hidden)
    }

    /// As [`Self::forward`], with LoRA dropout drawn from `rng` (training mode).
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let hidden =
            self.hidden_states_with(input_ids, attention_mask, position_ids, &mut Some(rng))?;
        self.logits(&hidden)
    }

    /// The final (normed) hidden states (b, t, hidden), for value and reward heads.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.hidden_states_with(input_ids, attention_mask, position_ids, &mut None)
    }

    /// Hidden states with optional LoRA dropout randomness.
    pub fn hidden_states_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        rng: DropoutRng,
    ) -> Result<Tensor> {
        let (batch, time) = input_ids.dims2()?;
        let default_positions;
        let position_ids = match position_ids {
            Some(p) => p,
            None => {
                default_positions = Tensor::arange(0u32, time as u32, self.device())?
                    .unsqueeze(0)?
                    .repeat((batch, 1))?;
                &default_positions
            }
        };
        let mask = attention_bias(attention_mask, batch, time, 0, self.dtype(), self.device())?;
        self.run_layers(input_ids, position_ids, &mask, rng)
    }

    /// Whether a training pass draws LoRA dropout (an adapter with dropout > 0).
    pub fn applies_dropout(&self) -> bool {
        self.lora.as_ref().is_some_and(|lora| lora.dropout > 0.0)
    }

    /// Final hidden states (b, t, d) under an explicit additive attention `bias`
    /// (b, 1, t, t) and `position_ids` (b, t): for packed sequences, where one row holds
    /// several sequences that must not see each other.
    pub fn hidden_states_with_bias(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        rng: DropoutRng,
    ) -> Result<Tensor> {
        self.run_layers(input_ids, position_ids, &bias.to_dtype(self.dtype())?, rng)
    }

    /// The RoPE inverse frequencies (head_dim / 2,), for the generation decoder.
    pub(crate) fn rope_inv_freq(&self) -> Result<Vec<f32>> {
        self.rope.inv_freq()
    }

    /// Logits (…, vocab) in f32 from hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let hidden_size = dims[dims.len() - 1];
        let flat = hidden.reshape((hidden.elem_count() / hidden_size, hidden_size))?; // (n, d)
        let logits = super::fused::linear(&flat, &self.lm_head)?; // (n, vocab)
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.config.vocab_size;
        Ok(logits.reshape(out_dims)?.to_dtype(DType::F32)?)
    }

    /// Embeds, runs every layer under the additive (b or 1, 1, t, t) `mask` and applies
    /// the final norm. (Generation has its own cached decoder, `kv_cache`.)
    fn run_layers(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &Tensor,
        rng: DropoutRng,
    ) -> Result<Tensor> {
        let (batch, time) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.reshape((
            batch,
            time,
            self.config.hidden_size,
        ))?; // (b, t, d)
        let rope = self.rope.tables(position_ids, self.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope, mask, rng)?;
        }
        self.norm.forward(&x)
    }

    /// Every weight under its HF checkpoint name; with `merge_lora`, LoRA deltas are
    /// folded into their base weights (for export). A tied head is not listed.
    pub fn named_weights(&self, merge_lora: bool) -> Result<Vec<(String, Tensor)>> {
        let mut named = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            for (block, short, linear) in layer.linears() {
                let name = format!("model.layers.{i}.{block}.{short}");
                let weight = match (&linear.lora, merge_lora) {
                    (Some(lora), true) => (&linear.weight + lora.merged_delta()?)?,
                    _ => linear.weight.clone(),
                };
                named.push((format!("{name}.weight"), weight));
                if let Some(bias) = &linear.bias {
                    named.push((format!("{name}.bias"), bias.clone()));
                }
            }
            named.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.weight.clone(),
            ));
            named.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.clone(),
            ));
        }
        named.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if !self.config.tie_word_embeddings {
            named.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        Ok(named)
    }

    /// Number of parameters of the base model (LoRA excluded; a tied head counted once).
    pub fn num_parameters(&self) -> Result<usize> {
        Ok(self
            .named_weights(false)?
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum())
    }
}

/// The HF name and shape of every tensor a checkpoint of `config` holds.
pub fn checkpoint_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (q_out, kv_out) = (
        config.num_attention_heads * config.head_dim(),
        config.num_kv_heads() * config.head_dim(),
    );
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d])];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let linears = [
            ("self_attn.q_proj", q_out, d, config.qkv_bias()),
            ("self_attn.k_proj", kv_out, d, config.qkv_bias()),
            ("self_attn.v_proj", kv_out, d, config.qkv_bias()),
            ("self_attn.o_proj", d, q_out, config.o_bias()),
            ("mlp.gate_proj", inter, d, config.mlp_bias),
            ("mlp.up_proj", inter, d, config.mlp_bias),
            ("mlp.down_proj", d, inter, config.mlp_bias),
        ];
        for (name, out_dim, in_dim, bias) in linears {
            shapes.push((format!("{p}.{name}.weight"), vec![out_dim, in_dim]));
            if bias {
                shapes.push((format!("{p}.{name}.bias"), vec![out_dim]));
            }
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![d]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    shapes.push(("model.norm.weight".to_string(), vec![d]));
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![vocab, d]));
    }
    shapes
}

/// A standard normal draw (Box–Muller), so init depends only on the seed.
pub(crate) fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The large negative added to masked attention scores: finite, so a row with every
/// key masked (a pad query under left padding) gives uniform weights instead of NaN.
pub(crate) fn masked_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -1e30,
        _ => f32::MIN,
    }
}

/// The additive attention mask (b or 1, 1, t, past + t): query i (at absolute index
/// past + i) sees key j when j <= past + i and `attention_mask[b, j]` is 1.
pub fn attention_bias(
    attention_mask: Option<&Tensor>,
    batch: usize,
    time: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keys = past + time;
    let masked = masked_value(dtype);
    let rows: Vec<Vec<f32>> = match attention_mask {
        Some(mask) => {
            let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            if rows.len() != batch || rows.iter().any(|r| r.len() != keys) {
                return Err(ModelError::Invalid(format!(
                    "attention_mask has shape {:?}, expected ({batch}, {keys})",
                    mask.dims()
                )));
            }
            rows
        }
        None => vec![vec![1.0; keys]],
    };
    let mut values = Vec::with_capacity(rows.len() * time * keys);
    for row in &rows {
        for i in 0..time {
            values.extend((0..keys).map(|j| {
                if j <= past + i && row[j] > 0.5 {
                    0.0
                } else {
                    masked
                }
            }));
        }
    }
    Ok(Tensor::from_vec(values, (rows.len(), 1, time, keys), device)?.to_dtype(dtype)?)
}
