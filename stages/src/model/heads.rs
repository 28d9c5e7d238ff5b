//! Scalar heads on the final hidden state: a value head (one number per position, for
//! PPO's critic) and a reward head (one number per sequence, read at the last non-pad
//! token of a right-padded batch). Both are a bias-free `Linear(hidden, 1)` stored as
//! `score.weight` (1, hidden), the name transformers' `LlamaForSequenceClassification`
//! uses, so a reward model folder loads there with `num_labels = 1`.

use super::causal_lm::standard_normal;
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// The checkpoint name of a head's weight.
pub const SCORE_WEIGHT: &str = "score.weight";

/// Which pooling a head applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalarHeadKind {
    /// One value per position: (b, t).
    Value,
    /// One value per sequence, at its last real token: (b,).
    Reward,
}

#[derive(Clone, Debug)]
pub struct ScalarHead {
    /// (1, hidden); a `Var` of the VarMap it was made from.
    pub weight: Tensor,
    pub kind: ScalarHeadKind,
}

impl ScalarHead {
    /// A fresh head, weight ~ N(0, 0.02) seeded, registered in `varmap` as `score.weight`
    /// (prefix it with `name_prefix`, e.g. `value.`, to keep two heads in one map).
    pub fn new(
        kind: ScalarHeadKind,
        hidden_size: usize,
        varmap: &VarMap,
        name_prefix: &str,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..hidden_size)
            .map(|_| (standard_normal(&mut rng) * 0.02) as f32)
            .collect();
        let tensor = Tensor::from_vec(values, (1, hidden_size), device)?.to_dtype(dtype)?;
        Self::from_tensor(kind, &tensor, Some(varmap), name_prefix)
    }

    /// A head from a loaded `score.weight`; trainable when `varmap` is given.
    pub fn from_tensor(
        kind: ScalarHeadKind,
        tensor: &Tensor,
        varmap: Option<&VarMap>,
        name_prefix: &str,
    ) -> Result<Self> {
        if tensor.rank() != 2 || tensor.dim(0)? != 1 {
            return Err(ModelError::ShapeMismatch {
                name: format!("{name_prefix}{SCORE_WEIGHT}"),
                expected: vec![1, tensor.dims().last().copied().unwrap_or(0)],
                actual: tensor.dims().to_vec(),
            });
        }
        let weight = match varmap {
            None => tensor.clone(),
            Some(varmap) => {
                let var = Var::from_tensor(tensor)?;
                let shared = var.as_tensor().clone();
                varmap
                    .data()
                    .lock()
                    .map_err(|_| ModelError::Invalid("the VarMap lock is poisoned".into()))?
                    .insert(format!("{name_prefix}{SCORE_WEIGHT}"), var);
                shared
            }
        };
        Ok(ScalarHead { weight, kind })
    }

    /// Reads `{name_prefix}score.weight` from checkpoint tensors.
    pub fn from_checkpoint(
        kind: ScalarHeadKind,
        tensors: &HashMap<String, Tensor>,
        varmap: Option<&VarMap>,
        name_prefix: &str,
    ) -> Result<Self> {
        let name = format!("{name_prefix}{SCORE_WEIGHT}");
        let tensor = tensors
            .get(&name)
            .ok_or(ModelError::MissingTensor { name })?;
        Self::from_tensor(kind, tensor, varmap, name_prefix)
    }

    /// One score per position: hidden (b, t, d) → (b, t), f32.
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let (batch, time, dim) = hidden.dims3()?;
        let scores = hidden
            .reshape((batch * time, dim))?
            .matmul(&self.weight.t()?)?; // (b*t, 1)
        Ok(scores.reshape((batch, time))?.to_dtype(DType::F32)?)
    }

    /// One score per sequence at its last real token: hidden (b, t, d), attention_mask
    /// (b, t) right-padded → (b,), f32.
    pub fn rewards(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let values = self.values(hidden)?; // (b, t)
        let lengths = attention_mask.to_dtype(DType::F32)?.sum(D::Minus1)?; // (b,)
        let last: Vec<u32> = lengths
            .to_vec1::<f32>()?
            .iter()
            .map(|l| (*l as u32).max(1) - 1)
            .collect();
        let index = Tensor::from_vec(last, (values.dim(0)?, 1), values.device())?; // (b, 1)
        Ok(values.gather(&index, 1)?.squeeze(1)?)
    }
}
