//! Learning-rate schedules with linear warmup, as functions of the optimiser step.
//!
//! They reproduce `transformers.get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (0.5 cycles):
//! `step` counts optimiser steps already taken, so the first update uses `step = 0` and,
//! with warmup, a learning rate of 0, exactly as a `LambdaLR` stepped after each update.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warmup.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Flat at the base learning rate.
    Constant,
    /// Linear decay to 0 at `total_steps`.
    #[default]
    Linear,
    /// Half a cosine from the base rate to 0 at `total_steps`.
    Cosine,
}

/// A learning-rate schedule: warmup from 0 over `warmup_steps`, then `kind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningRateSchedule {
    pub kind: ScheduleKind,
    pub base_learning_rate: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LearningRateSchedule {
    /// The multiplier of the base rate at `step` (transformers' `lr_lambda`).
    ///
    /// ```text
    /// warmup (step < w):  step / max(1, w)
    /// constant:           1
    /// linear:             max(0, (N - step) / max(1, N - w))
    /// cosine:             max(0, ½ (1 + cos(π · (step - w) / max(1, N - w))))
    /// ```
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let decay_steps = (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - step) / decay_steps).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (step - warmup) / decay_steps;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate for the update made after `step` earlier updates.
    pub fn learning_rate(&self, step: usize) -> f64 {
        self.base_learning_rate * self.factor(step)
    }
}
