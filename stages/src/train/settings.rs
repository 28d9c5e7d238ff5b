//! Optimiser and schedule params shared by every training kind (`optimizer:` in YAML),
//! and [`TrainSettings`], everything the training loop needs, resolved from a stage's
//! params. Learning rate, batch size and epochs stay flat in each kind's params because
//! their good defaults differ per method.

use crate::algo::optim::AdamWConfig;
use crate::algo::schedule::{LearningRateSchedule, ScheduleKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `optimizer:` — AdamW, the lr schedule, accumulation and clipping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimizerParams {
    /// Decoupled weight decay (AdamW λ).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// constant, linear (default) or cosine, after warmup.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Optimiser steps of linear warmup from 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this; `null` disables clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Micro-batches of `batch_size` summed into one optimiser step.
    #[serde(default = "default_accumulation")]
    pub gradient_accumulation_steps: usize,
    /// Each micro-batch is cut into this many shards whose passes run in parallel, one
    /// per thread, and whose gradients are summed. A recipe setting, not the core count,
    /// so results do not depend on the machine; more shards than cores still works.
    #[serde(default = "default_shards")]
    pub shards: usize,
}

fn default_weight_decay() -> f64 {
    0.01
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_accumulation() -> usize {
    1
}
fn default_shards() -> usize {
    2
}

impl Default for OptimizerParams {
    fn default() -> Self {
        OptimizerParams {
            weight_decay: default_weight_decay(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            schedule: ScheduleKind::default(),
            warmup_steps: 0,
            max_grad_norm: default_max_grad_norm(),
            gradient_accumulation_steps: default_accumulation(),
            shards: default_shards(),
        }
    }
}

/// Default checkpoint interval (optimiser steps) of every training kind.
pub fn default_checkpoint_every() -> usize {
    100
}

/// Default longest prompt + completion in tokens.
pub fn default_max_length() -> usize {
    256
}

pub fn default_true() -> bool {
    true
}

/// Everything the loop needs, resolved from a stage's params and context.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub learning_rate: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// Stop after this many optimiser steps even if epochs remain.
    pub max_steps: Option<usize>,
    pub optimizer: OptimizerParams,
    /// Checkpoint every N optimiser steps (0: never).
    pub checkpoint_every: usize,
    /// Evaluate every N optimiser steps (also before the first and after the last).
    pub eval_every: Option<usize>,
    /// Batch examples of similar length (less padding, same examples per epoch).
    pub group_by_length: bool,
    /// The stage seed: data order and dropout.
    pub seed: u64,
}

impl TrainSettings {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            learning_rate: self.learning_rate,
            beta1: self.optimizer.beta1,
            beta2: self.optimizer.beta2,
            eps: self.optimizer.eps,
            weight_decay: self.optimizer.weight_decay,
        }
    }

    pub fn schedule(&self, total_steps: usize) -> LearningRateSchedule {
        LearningRateSchedule {
            kind: self.optimizer.schedule,
            base_learning_rate: self.learning_rate,
            warmup_steps: self.optimizer.warmup_steps,
            total_steps,
        }
    }

    /// Checks values serde cannot: a message naming the param, for `PortsError`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1".into()));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(("epochs", "must be at least 1 (or set `max_steps`)".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(("learning_rate", "must be a positive number".into()));
        }
        if self.optimizer.shards == 0 {
            return Err(("optimizer.shards", "must be at least 1".into()));
        }
        if self.optimizer.gradient_accumulation_steps == 0 {
            return Err((
                "optimizer.gradient_accumulation_steps",
                "must be at least 1".into(),
            ));
        }
        if let Some(norm) = self.optimizer.max_grad_norm {
            if !(norm > 0.0) {
                return Err((
                    "optimizer.max_grad_norm",
                    "must be positive (or null)".into(),
                ));
            }
        }
        Ok(())
    }
}
