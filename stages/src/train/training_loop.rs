//! One linear training loop, nanoGPT-style, shared by every training kind: for each
//! optimiser step, run its micro-batches (each a stage-specific closure returning a
//! differentiable loss), sum their gradients, stop on a non-finite loss, clip, set the
//! scheduled learning rate, take an AdamW step, log, evaluate and checkpoint.
//!
//! The loop owns no model: the closure does the forward pass, so each kind's file shows
//! its own loss in full. Micro-batch `k` of the whole run is the `k`-th batch of the
//! epochs' seeded batch lists laid end to end, so resuming at step `s` only needs `s`.
//! Each micro-batch is cut into `optimizer.shards` shards of similar padded length,
//! computed in parallel ([`crate::parallel`]) and weighted so the step equals the
//! unsharded one.

use super::checkpoint::{load_latest_checkpoint, new_state, save_checkpoint, MetricLine};
use super::settings::TrainSettings;
use super::StageResultExt;
use crate::algo::optim::{clip_coefficient, grad_norm_with, AdamW};
use crate::data::batch::epoch_batches;
use crate::model::weight_grads::forward_for_backward;
use crate::parallel::{
    combine_shards, map_shards, shard_rng, split_by_padded_length, weighted_backward, ShardLoss,
};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{StageContext, StageError};
use std::time::Instant;

/// What one micro-batch (or shard of one) reports back to the loop.
pub struct MicroBatchOutput {
    /// Scalar, differentiable: the mean loss of this micro-batch.
    pub loss: Tensor,
    /// How many terms `loss` is the mean of (scored tokens, pairs): the shards of a
    /// micro-batch are weighted by it, so their combination is the whole batch's mean.
    pub weight: f64,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
    /// Examples (or pairs) processed.
    pub examples: usize,
    /// Extra per-step metrics (averaged over the step's micro-batches), e.g. accuracy.
    pub metrics: Vec<(&'static str, f64)>,
}

/// What the loop measured; wall-clock values only go to `ctx.metrics.timing`.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub steps: usize,
    /// Mean loss of the last optimiser step.
    pub final_loss: f64,
    /// Steps resumed from a checkpoint instead of computed in this process.
    pub resumed_from_step: usize,
    /// Tokens, examples and seconds of the steps run in this process.
    pub tokens: usize,
    pub examples: usize,
    pub seconds: f64,
    /// Every metric line of the run (resumed ones included), in order.
    pub history: Vec<MetricLine>,
}

impl TrainSummary {
    /// The first logged value of `name` (e.g. `eval_accuracy` before training).
    pub fn first_value(&self, name: &str) -> Option<f64> {
        self.history.iter().find_map(|line| value_of(line, name))
    }

    /// The last logged value of `name`.
    pub fn last_value(&self, name: &str) -> Option<f64> {
        self.history
            .iter()
            .rev()
            .find_map(|line| value_of(line, name))
    }
}

fn value_of(line: &MetricLine, name: &str) -> Option<f64> {
    line.values.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// The whole run's micro-batches (example indices) and its optimiser step count.
pub fn plan_micro_batches(lengths: &[usize], settings: &TrainSettings) -> (Vec<Vec<usize>>, usize) {
    let accumulation = settings.optimizer.gradient_accumulation_steps.max(1);
    let per_epoch_steps = epoch_batches(lengths, settings.batch_size, settings.seed, 0, false)
        .len()
        .div_ceil(accumulation);
    let epochs = match settings.max_steps {
        // Enough epochs to reach max_steps even when `epochs` is smaller.
        Some(max) if per_epoch_steps > 0 => settings.epochs.max(max.div_ceil(per_epoch_steps)),
        _ => settings.epochs,
    };
    let mut micro = Vec::new();
    for epoch in 0..epochs {
        micro.extend(epoch_batches(
            lengths,
            settings.batch_size,
            settings.seed,
            epoch as u64,
            settings.group_by_length,
        ));
    }
    let mut total = micro.len().div_ceil(accumulation);
    if let Some(max) = settings.max_steps {
        total = total.min(max);
    }
    (micro, total)
}

/// A random stream for optimiser step `step`, independent of everything before (the RL
/// stages shuffle minibatches with it; dropout comes from [`shard_rng`]).
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64);
    rng
}

/// Runs the loop. `micro_step(indices, rng)` computes one micro-batch; `evaluate(step)`
/// returns held-out metrics (called before the first step, every `eval_every` steps and
/// after the last; its values go to metrics.jsonl as `eval_*`). Resumes from the latest
/// checkpoint in `ctx.scratch`.
pub fn run_training(
    ctx: &mut StageContext,
    settings: &TrainSettings,
    lengths: &[usize],
    varmap: &mut VarMap,
    micro_step: &(dyn Fn(&[usize], &mut ChaCha8Rng) -> Result<MicroBatchOutput, StageError> + Sync),
    evaluate: &mut dyn FnMut(usize) -> Result<Vec<(&'static str, f64)>, StageError>,
) -> Result<TrainSummary, StageError> {
    let (micro_batches, total_steps) = plan_micro_batches(lengths, settings);
    if total_steps == 0 {
        return Err(StageError::failed(format!(
            "stage `{}` has no training examples",
            ctx.stage
        )));
    }
    let accumulation = settings.optimizer.gradient_accumulation_steps.max(1);
    let schedule = settings.schedule(total_steps);
    let mut optimizer = AdamW::from_var_map(varmap, settings.adamw()).or_fail("optimiser")?;
    let vars: Vec<Var> = sorted_vars(varmap);
    let mut history: Vec<MetricLine> = Vec::new();
    let mut summary = TrainSummary::default();
    let mut start = 0;
    if let Some(state) = load_latest_checkpoint(&ctx.scratch, varmap, &mut optimizer, total_steps)?
    {
        start = state.step;
        history = state.metric_lines();
        for line in &history {
            log_line(ctx, line)?;
        }
        summary.resumed_from_step = start;
        tracing::info!(stage = %ctx.stage, step = start, "resumed from checkpoint");
        eprintln!(
            "{}: resumed at step {start} of {total_steps} from a checkpoint",
            ctx.stage
        );
    } else {
        record(ctx, &mut history, 0, eval_values(evaluate(0)?))?;
    }
    let mut task = ctx.progress.task("train", total_steps as u64);
    task.set_position(start as u64);
    let started = Instant::now();
    for step in start..total_steps {
        let step_started = Instant::now();
        let first = step * accumulation;
        let batches = &micro_batches[first..(first + accumulation).min(micro_batches.len())];
        let mut grads: Option<GradStore> = None;
        let mut squares: Vec<Option<f64>> = Vec::new();
        let (mut loss_sum, mut tokens, mut examples) = (0.0, 0, 0);
        let mut extra: Vec<(&'static str, f64)> = Vec::new();
        for (micro, batch) in batches.iter().enumerate() {
            let shards = split_by_padded_length(batch, lengths, settings.optimizer.shards);
            // Backpropagated below with `weighted_backward`, so whole-block ops may
            // deposit their weights' gradients.
            let outputs = map_shards(shards.len(), |k| {
                forward_for_backward(|| {
                    micro_step(&shards[k], &mut shard_rng(settings.seed, step, micro, k))
                })
            })
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
            tokens += outputs.iter().map(|o| o.tokens).sum::<usize>();
            examples += outputs.iter().map(|o| o.examples).sum::<usize>();
            let shard_losses: Vec<ShardLoss> = outputs
                .into_iter()
                .map(|o| ShardLoss {
                    loss: o.loss,
                    weight: o.weight,
                    metrics: o.metrics,
                })
                .collect();
            let combined = combine_shards(&shard_losses).or_fail("reading the loss")?;
            if !combined.loss.is_finite() {
                return Err(non_finite(ctx, step + 1, combined.loss));
            }
            // Micro-batches count equally in the step, as before sharding.
            let weighted: Vec<(Tensor, f64)> = combined
                .weighted_losses
                .into_iter()
                .map(|(loss, share)| (loss, share / batches.len() as f64))
                .collect();
            let (new_grads, new_squares) =
                weighted_backward(&weighted, &vars).or_fail("backward pass")?;
            // Norms taken while summing shards hold for a step of one micro-batch only.
            squares = if batches.len() == 1 {
                new_squares
            } else {
                Vec::new()
            };
            grads = Some(accumulate(grads, new_grads, &vars)?);
            loss_sum += combined.loss;
            add_metrics(&mut extra, &combined.metrics, batches.len());
        }
        let grads = grads.ok_or_else(|| StageError::failed("a step with no micro-batches"))?;
        let grad_norm = grad_norm_with(&vars, &grads, &squares).or_fail("gradient norm")?;
        if !grad_norm.is_finite() {
            return Err(non_finite(ctx, step + 1, grad_norm));
        }
        let max_norm = settings.optimizer.max_grad_norm.unwrap_or(f64::INFINITY);
        let learning_rate = schedule.learning_rate(step);
        optimizer.set_learning_rate(learning_rate);
        optimizer
            .step_clipped(&grads, clip_coefficient(grad_norm, max_norm))
            .or_fail("optimiser step")?;
        let loss = loss_sum / batches.len() as f64;
        let mut values = vec![
            ("loss".to_string(), loss),
            ("learning_rate".to_string(), learning_rate),
            ("grad_norm".to_string(), grad_norm),
        ];
        values.extend(extra.iter().map(|(k, v)| (k.to_string(), *v)));
        record(ctx, &mut history, step as u64 + 1, values)?;
        let seconds = step_started.elapsed().as_secs_f64();
        ctx.metrics.timing(
            step as u64 + 1,
            &[
                ("seconds", seconds),
                ("tokens_per_second", tokens as f64 / seconds),
                ("examples_per_second", examples as f64 / seconds),
            ],
        )?;
        summary.tokens += tokens;
        summary.examples += examples;
        summary.final_loss = loss;
        let done = step + 1;
        let is_last = done == total_steps;
        if is_last || settings.eval_every.is_some_and(|n| n > 0 && done % n == 0) {
            record(ctx, &mut history, done as u64, eval_values(evaluate(done)?))?;
        }
        if !is_last && settings.checkpoint_every > 0 && done % settings.checkpoint_every == 0 {
            save_checkpoint(
                &ctx.scratch,
                varmap,
                &optimizer,
                &new_state(done, total_steps, &history),
            )?;
        }
        task.inc(1);
        task.set_message(&format!("loss {loss:.4}"));
    }
    task.finish();
    summary.steps = total_steps;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.history = history;
    Ok(summary)
}

fn sorted_vars(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock();
    let Ok(data) = data else { return Vec::new() };
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

fn accumulate(
    sum: Option<GradStore>,
    new: GradStore,
    vars: &[Var],
) -> Result<GradStore, StageError> {
    let Some(mut sum) = sum else { return Ok(new) };
    for var in vars {
        if let Some(g) = new.get(var.as_tensor()) {
            let total = match sum.get(var.as_tensor()) {
                Some(s) => (s + g).or_fail("accumulating gradients")?,
                None => g.clone(),
            };
            sum.insert(var.as_tensor(), total);
        }
    }
    Ok(sum)
}

fn add_metrics(into: &mut Vec<(&'static str, f64)>, values: &[(&'static str, f64)], count: usize) {
    for (name, value) in values {
        match into.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v += value / count as f64,
            None => into.push((name, value / count as f64)),
        }
    }
}

fn eval_values(values: Vec<(&'static str, f64)>) -> Vec<(String, f64)> {
    values
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect()
}

fn record(
    ctx: &mut StageContext,
    history: &mut Vec<MetricLine>,
    step: u64,
    values: Vec<(String, f64)>,
) -> Result<(), StageError> {
    if values.is_empty() {
        return Ok(());
    }
    let line = MetricLine { step, values };
    log_line(ctx, &line)?;
    history.push(line);
    Ok(())
}

fn log_line(ctx: &mut StageContext, line: &MetricLine) -> Result<(), StageError> {
    let values: Vec<(&str, f64)> = line.values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ctx.metrics.log(line.step, &values)
}

fn non_finite(ctx: &StageContext, step: usize, value: f64) -> StageError {
    StageError::failed_with_hint(
        format!("stage `{}`: loss or gradient became {value} at step {step}", ctx.stage),
        "lower `learning_rate` or set `optimizer.max_grad_norm`; the last good checkpoint is kept and a rerun resumes from it",
    )
}
