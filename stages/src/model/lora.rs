//! LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on chosen linear modules,
//! initialised like PEFT (A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0) from a seed.
//! A and B are `Var`s in a [`VarMap`] under PEFT's tensor names, e.g.
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so saving the
//! adapter is writing those variables out.

use super::causal_lm::CausalLm;
use super::layers::DropoutRng;
use super::{ModelError, Result};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The linear modules that get adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LoraTargets {
    /// `"all-linear"`: every projection of every layer (not the LM head).
    All(String),
    /// Short module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    Modules(Vec<String>),
}

pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl LoraTargets {
    /// The short module names, checked.
    pub fn modules(&self) -> Result<Vec<String>> {
        match self {
            LoraTargets::All(word) if word == "all-linear" => {
                Ok(LINEAR_MODULES.iter().map(|s| s.to_string()).collect())
            }
            LoraTargets::All(other) => Err(ModelError::Invalid(format!(
                "LoRA targets `{other}`: expected \"all-linear\" or a list of {}",
                LINEAR_MODULES.join(", ")
            ))),
            LoraTargets::Modules(names) => {
                for name in names {
                    if !LINEAR_MODULES.contains(&name.as_str()) {
                        return Err(ModelError::Invalid(format!(
                            "LoRA target `{name}` is not a linear module (expected one of {})",
                            LINEAR_MODULES.join(", ")
                        )));
                    }
                }
                Ok(names.clone())
            }
        }
    }
}

/// LoRA hyper-parameters, with PEFT's meanings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of A (r, in) and B (out, r).
    #[serde(default = "default_rank")]
    pub r: usize,
    /// The update is scaled by alpha / r (alpha / √r with `use_rslora`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: LoraTargets,
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> LoraTargets {
    LoraTargets::All("all-linear".to_string())
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: default_targets(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapter: `delta(x) = scale * dropout(x) A^T B^T`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// x (n, in) → (n, out)
    pub fn delta(&self, x: &Tensor, rng: DropoutRng) -> Result<Tensor> {
        let x = match rng.as_deref_mut() {
            Some(rng) if self.dropout > 0.0 => {
                let keep = 1.0 - self.dropout;
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        // Scaled at rank r, where it is n × r multiplications instead of n × out (and
        // as many again in the backward pass).
        let down = (x.matmul(&self.a.t()?)? * self.scale)?; // (n, r)
        Ok(down.matmul(&self.b.t()?)?) // (n, out)
    }

    /// `scale * B A`, (out, in): what merging adds to the base weight.
    pub fn merged_delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// PEFT's name for a LoRA tensor: `base_model.model.model.layers.{layer}.{block}.{module}.lora_{A|B}.weight`.
pub fn peft_name(layer: usize, block: &str, module: &str, which: char) -> String {
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight")
}

fn block_of(module: &str) -> &'static str {
    if matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
        "self_attn"
    } else {
        "mlp"
    }
}

fn insert_var(varmap: &VarMap, name: String, tensor: Tensor) -> Result<Tensor> {
    let var = Var::from_tensor(&tensor)?;
    let shared = var.as_tensor().clone();
    varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Invalid("the VarMap lock is poisoned".into()))?
        .insert(name, var);
    Ok(shared)
}

impl CausalLm {
    /// Attaches fresh adapters (seeded PEFT init) to the configured modules; A and B
    /// become `Var`s of `varmap` under PEFT names.
    pub fn add_lora(&mut self, config: &LoraConfig, varmap: &VarMap, seed: u64) -> Result<()> {
        if config.r == 0 {
            return Err(ModelError::Invalid(
                "LoRA rank `r` must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(ModelError::Invalid(format!(
                "LoRA dropout {} must be in [0, 1)",
                config.dropout
            )));
        }
        let modules = config.targets.modules()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (dtype, device) = (self.dtype(), self.device().clone());
        for (layer_index, layer) in self.layers.iter_mut().enumerate() {
            for (module, linear) in layer.linears_mut() {
                if !modules.iter().any(|m| m == module) {
                    continue;
                }
                let (in_dim, out_dim) = (linear.in_dim(), linear.out_dim());
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a_values: Vec<f32> = (0..config.r * in_dim)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a_values, (config.r, in_dim), &device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out_dim, config.r), dtype, &device)?;
                let block = block_of(module);
                linear.lora = Some(LoraAdapter {
                    a: insert_var(varmap, peft_name(layer_index, block, module, 'A'), a)?,
                    b: insert_var(varmap, peft_name(layer_index, block, module, 'B'), b)?,
                    scale: config.scale(),
                    dropout: config.dropout,
                });
            }
        }
        self.lora = Some(config.clone());
        Ok(())
    }

    /// The adapter tensors under PEFT names (for `adapter_model.safetensors`).
    pub fn lora_tensors(&self) -> Vec<(String, Tensor)> {
        let mut named = Vec::new();
        for (layer_index, layer) in self.layers.iter().enumerate() {
            for (block, module, linear) in layer.linears() {
                if let Some(lora) = &linear.lora {
                    named.push((peft_name(layer_index, block, module, 'A'), lora.a.clone()));
                    named.push((peft_name(layer_index, block, module, 'B'), lora.b.clone()));
                }
            }
        }
        named
    }

    /// Attaches adapters from tensors under PEFT names (as read from
    /// `adapter_model.safetensors`); trainable when `varmap` is given.
    pub fn attach_lora_tensors(
        &mut self,
        config: &LoraConfig,
        tensors: &std::collections::HashMap<String, Tensor>,
        varmap: Option<&VarMap>,
    ) -> Result<()> {
        let modules = config.targets.modules()?;
        let dtype = self.dtype();
        for (layer_index, layer) in self.layers.iter_mut().enumerate() {
            for (module, linear) in layer.linears_mut() {
                if !modules.iter().any(|m| m == module) {
                    continue;
                }
                let block = block_of(module);
                let fetch = |which: char, shape: [usize; 2]| -> Result<Tensor> {
                    let name = peft_name(layer_index, block, module, which);
                    let tensor = tensors
                        .get(&name)
                        .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
                    if tensor.dims() != shape {
                        return Err(ModelError::ShapeMismatch {
                            name,
                            expected: shape.to_vec(),
                            actual: tensor.dims().to_vec(),
                        });
                    }
                    let tensor = tensor.to_dtype(dtype)?;
                    match varmap {
                        Some(varmap) => insert_var(varmap, name, tensor),
                        None => Ok(tensor),
                    }
                };
                let a = fetch('A', [config.r, linear.in_dim()])?;
                let b = fetch('B', [linear.out_dim(), config.r])?;
                linear.lora = Some(LoraAdapter {
                    a,
                    b,
                    scale: config.scale(),
                    dropout: config.dropout,
                });
            }
        }
        self.lora = Some(config.clone());
        Ok(())
    }

    /// A copy with every adapter folded into its base weight and removed.
    pub fn merge_lora(&self) -> Result<CausalLm> {
        let mut merged = self.clone();
        for layer in merged.layers.iter_mut() {
            for (_, linear) in layer.linears_mut() {
                if let Some(lora) = linear.lora.take() {
                    linear.weight =
                        (&linear.weight + lora.merged_delta()?)?.to_dtype(linear.weight.dtype())?;
                }
            }
        }
        merged.lora = None;
        Ok(merged)
    }
}
