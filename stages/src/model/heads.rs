//! Scalar heads on the final hidden state: a value head (one number per position, for
//! PPO's critic) and a reward head (one number per sequence, read at the last non-pad
//! token of a right-padded batch). Both are a bias-free `Linear(hidden, 1)` stored as
//! `score.weight` (1, hidden), the name transformers' `LlamaForSequenceClassification`
//! uses, so a reward model folder loads there with `num_labels = 1`.

use super::causal_lm::{standard_normal, CausalLm};
use super::logprobs::token_logprobs;
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

/// The checkpoint name of the weight of a reward model's reply log-prob feature.
pub const LOGPROB_WEIGHT: &str = "score.logprob_weight";

/// How a reward model scores a sequence: its scalar head on the last real token, plus —
/// when it has the log-prob feature — a learned weight times the reply's mean token
/// log-prob under the model's own LM head. The feature matters where correctness is a
/// matter of the next tokens (arithmetic, code): a head on one hidden state must learn to
/// check the answer from a few thousand pairs, while the LM's log-probs already rank
/// right above wrong (the policy's own ranking) and training sharpens them.
#[derive(Clone, Debug)]
pub struct RewardHead {
    pub score: ScalarHead,
    /// (1,) f32; `None`: the plain head (what transformers' `…ForSequenceClassification`
    /// computes).
    pub logprob_weight: Option<Tensor>,
}

impl RewardHead {
    /// A fresh trainable head. With the log-prob feature the model starts as exactly the
    /// policy's own ranking (feature weight 1, hidden-state head 0) and learns from there;
    /// without it the head is [`ScalarHead::new`]'s seeded N(0, 0.02).
    pub fn new(
        hidden_size: usize,
        logprob_feature: bool,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if !logprob_feature {
            let score = ScalarHead::new(
                ScalarHeadKind::Reward,
                hidden_size,
                varmap,
                "",
                seed,
                DType::F32,
                device,
            )?;
            return Ok(RewardHead {
                score,
                logprob_weight: None,
            });
        }
        let zeros = Tensor::zeros((1, hidden_size), DType::F32, device)?;
        let score = ScalarHead::from_tensor(ScalarHeadKind::Reward, &zeros, Some(varmap), "")?;
        let weight = Var::from_tensor(&Tensor::ones(1, DType::F32, device)?)?;
        let shared = weight.as_tensor().clone();
        varmap
            .data()
            .lock()
            .map_err(|_| ModelError::Invalid("the VarMap lock is poisoned".into()))?
            .insert(LOGPROB_WEIGHT.to_string(), weight);
        Ok(RewardHead {
            score,
            logprob_weight: Some(shared),
        })
    }

    /// Reads `score.weight` and, if present, `score.logprob_weight` (frozen).
    pub fn from_checkpoint(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let score = ScalarHead::from_checkpoint(ScalarHeadKind::Reward, tensors, None, "")?;
        let logprob_weight = match tensors.get(LOGPROB_WEIGHT) {
            None => None,
            Some(tensor) if tensor.dims() == [1] => Some(tensor.to_dtype(DType::F32)?),
            Some(tensor) => {
                return Err(ModelError::ShapeMismatch {
                    name: LOGPROB_WEIGHT.into(),
                    expected: vec![1],
                    actual: tensor.dims().to_vec(),
                })
            }
        };
        Ok(RewardHead {
            score,
            logprob_weight,
        })
    }

    /// The tensors to save beside the model's weights.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = vec![(SCORE_WEIGHT.to_string(), self.score.weight.clone())];
        if let Some(weight) = &self.logprob_weight {
            tensors.push((LOGPROB_WEIGHT.to_string(), weight.clone()));
        }
        tensors
    }

    /// One reward per sequence of a right-padded batch: `input_ids` (b, t), `hidden` the
    /// model's final hidden states (b, t, d), `attention_mask` (b, t), `reply_mask` (b, t)
    /// 1 on the reply tokens the log-prob feature averages → rewards (b,) f32, and each
    /// reply's mean token log-prob (b,) when the feature uses it or `want_reply_logprobs`
    /// asks (one LM-head pass serves both). Differentiable.
    pub fn rewards(
        &self,
        model: &CausalLm,
        input_ids: &Tensor,
        hidden: &Tensor,
        attention_mask: &Tensor,
        reply_mask: &Tensor,
        want_reply_logprobs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rewards = self.score.rewards(hidden, attention_mask)?; // (b,)
        let time = input_ids.dim(1)?;
        if (self.logprob_weight.is_none() && !want_reply_logprobs) || time < 2 {
            return Ok((rewards, None));
        }
        let mask = (reply_mask.narrow(1, 1, time - 1)?.to_dtype(DType::F32)?
            * attention_mask
                .narrow(1, 1, time - 1)?
                .to_dtype(DType::F32)?)?; // (b, t-1)

        // The LM head only where the feature reads it: the reply tokens' predecessors.
        let (batch, hidden_size) = (hidden.dim(0)?, hidden.dim(2)?);
        let scored: Vec<(usize, u32)> = mask
            .to_vec2::<f32>()?
            .iter()
            .enumerate()
            .flat_map(|(row, columns)| {
                columns
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m > 0.5)
                    .map(move |(i, _)| (row, (row * (time - 1) + i) as u32))
            })
            .collect();
        let device = hidden.device();
        let sums = if scored.is_empty() {
            Tensor::zeros(batch, DType::F32, device)?
        } else {
            let places = Tensor::new(scored.iter().map(|s| s.1).collect::<Vec<_>>(), device)?;
            let states = hidden
                .narrow(1, 0, time - 1)?
                .contiguous()?
                .reshape((batch * (time - 1), hidden_size))?
                .index_select(&places, 0)?; // (n, d)
            let targets = input_ids
                .narrow(1, 1, time - 1)?
                .contiguous()?
                .flatten_all()?
                .index_select(&places, 0)?; // (n,)
            let per_token = token_logprobs(&model.logits(&states)?, &targets)?; // (n,)

            // Row sums as a product with the (b, n) row-membership matrix.
            let mut membership = vec![0f32; batch * scored.len()];
            for (k, (row, _)) in scored.iter().enumerate() {
                membership[row * scored.len() + k] = 1.0;
            }
            let membership = Tensor::from_vec(membership, (batch, scored.len()), device)?;
            membership.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)? // (b,)
        };
        let count = mask.sum(D::Minus1)?.maximum(1.0)?; // (b,)
        let mean = sums.div(&count)?; // (b,)
        let rewards = match &self.logprob_weight {
            Some(weight) => (rewards + mean.broadcast_mul(weight)?)?,
            None => rewards,
        };
        Ok((rewards, Some(mean)))
    }
}
