//! The bookkeeping of an RL run: which prompts step `s` uses, its sampling seed, metric
//! lines (replayed from a checkpoint on resume, so metrics.jsonl equals a straight run's),
//! and checkpoints in the training stages' format ([`crate::train::checkpoint`]).

use crate::algo::optim::AdamW;
use crate::data::batch::shuffle;
use crate::train::checkpoint::{load_latest_checkpoint, new_state, save_checkpoint, MetricLine};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{StageContext, StageError};

/// Row indices of the prompts of RL step `step`: `per_step` rows from epochs of a seeded
/// shuffle laid end to end, so the choice depends only on (seed, step).
pub fn step_prompts(rows: usize, per_step: usize, seed: u64, step: usize) -> Vec<usize> {
    let mut picked = Vec::with_capacity(per_step);
    let mut position = step * per_step;
    while picked.len() < per_step && rows > 0 {
        let epoch = position / rows;
        let order = epoch_order(rows, seed, epoch as u64);
        let start = position % rows;
        let take = (per_step - picked.len()).min(rows - start);
        picked.extend_from_slice(&order[start..start + take]);
        position += take;
    }
    picked
}

fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    shuffle(&mut order, &mut rng);
    order
}

/// The sampling seed of RL step `step` (independent streams per step).
pub fn step_seed(seed: u64, step: usize) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"rl-sampling");
    hasher.update(&seed.to_le_bytes());
    hasher.update(&(step as u64).to_le_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The randomness of step `step`'s minibatch order (LoRA dropout: `parallel::shard_rng`).
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    crate::train::training_loop::step_rng(seed ^ 0x5eed_0f_a1, step)
}

/// Metric lines written so far, mirrored into `ctx.metrics`.
#[derive(Default)]
pub struct RunLog {
    pub history: Vec<MetricLine>,
}

impl RunLog {
    /// Logs one line (skipped when empty).
    pub fn record(
        &mut self,
        ctx: &mut StageContext,
        step: u64,
        values: Vec<(String, f64)>,
    ) -> Result<(), StageError> {
        if values.is_empty() {
            return Ok(());
        }
        let line = MetricLine { step, values };
        write_line(ctx, &line)?;
        self.history.push(line);
        Ok(())
    }

    /// The last logged value of `name`.
    pub fn last(&self, name: &str) -> Option<f64> {
        self.history.iter().rev().find_map(|l| value_of(l, name))
    }

    /// The first logged value of `name`.
    pub fn first(&self, name: &str) -> Option<f64> {
        self.history.iter().find_map(|l| value_of(l, name))
    }

    /// Restores the latest checkpoint, replaying its metric lines; returns the step to
    /// start from (0 without a checkpoint).
    pub fn resume(
        &mut self,
        ctx: &mut StageContext,
        varmap: &mut VarMap,
        optimizer: &mut AdamW,
        total_steps: usize,
    ) -> Result<usize, StageError> {
        let Some(state) = load_latest_checkpoint(&ctx.scratch, varmap, optimizer, total_steps)?
        else {
            return Ok(0);
        };
        let lines = state.metric_lines();
        for line in &lines {
            write_line(ctx, line)?;
        }
        self.history = lines;
        tracing::info!(stage = %ctx.stage, step = state.step, "resumed from checkpoint");
        Ok(state.step)
    }

    /// Checkpoints after `done` steps.
    pub fn checkpoint(
        &self,
        ctx: &StageContext,
        varmap: &VarMap,
        optimizer: &AdamW,
        done: usize,
        total_steps: usize,
    ) -> Result<(), StageError> {
        save_checkpoint(
            &ctx.scratch,
            varmap,
            optimizer,
            &new_state(done, total_steps, &self.history),
        )
    }
}

fn value_of(line: &MetricLine, name: &str) -> Option<f64> {
    line.values.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

fn write_line(ctx: &mut StageContext, line: &MetricLine) -> Result<(), StageError> {
    let values: Vec<(&str, f64)> = line.values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ctx.metrics.log(line.step, &values)
}

/// Names a list of `(&str, f64)` for [`RunLog::record`].
pub fn named(values: &[(&str, f64)]) -> Vec<(String, f64)> {
    values.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}
