//! The outer loop both RL kinds share: resume, evaluate before the first step, run steps
//! (the kind's closure samples, scores and updates), log metrics and timings, evaluate
//! every `eval_every` steps and after the last, checkpoint every `checkpoint_every`.

use super::policy::{evaluate_policy, sorted_vars, Policy};
use super::run_log::{named, RunLog};
use crate::algo::optim::{AdamW, AdamWConfig};
use crate::algo::schedule::LearningRateSchedule;
use crate::data::row::Row;
use crate::parallel::{
    combine_shards, map_shards, shard_rng, split_into_shards, CombinedShards, ShardLoss,
};
use crate::train::settings::OptimizerParams;
use crate::train::StageResultExt;
use candle_core::Var;
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{StageContext, StageError};
use std::time::Instant;

/// Loop settings resolved from a kind's params.
pub struct LoopSettings<'a> {
    pub steps: usize,
    /// Optimiser updates per RL step (epochs × minibatches).
    pub updates_per_step: usize,
    pub learning_rate: f64,
    pub optimizer: &'a OptimizerParams,
    pub checkpoint_every: usize,
    pub eval_every: Option<usize>,
    pub eval_max_new_tokens: usize,
}

/// What one RL step hands back.
pub struct StepOutput {
    /// Deterministic metrics for metrics.jsonl.
    pub values: Vec<(&'static str, f64)>,
    pub generation_seconds: f64,
    pub generated_tokens: usize,
}

/// What a step closure gets: the policy, the optimiser, the trainable vars (name order)
/// and the learning-rate schedule over all updates.
pub struct Trainer<'a> {
    pub policy: &'a Policy,
    pub optimizer: &'a mut AdamW,
    pub vars: &'a [Var],
    pub schedule: &'a LearningRateSchedule,
}

/// Runs the loop; `step(s, trainer)` does RL step `s` (0-based).
pub fn run_rl_loop(
    ctx: &mut StageContext,
    policy: &mut Policy,
    eval_rows: &[Row],
    settings: &LoopSettings,
    step: &mut dyn FnMut(usize, &mut Trainer) -> Result<StepOutput, StageError>,
) -> Result<RunLog, StageError> {
    let schedule = LearningRateSchedule {
        kind: settings.optimizer.schedule,
        base_learning_rate: settings.learning_rate,
        warmup_steps: settings.optimizer.warmup_steps,
        total_steps: settings.steps * settings.updates_per_step,
    };
    let config = AdamWConfig {
        learning_rate: settings.learning_rate,
        beta1: settings.optimizer.beta1,
        beta2: settings.optimizer.beta2,
        eps: settings.optimizer.eps,
        weight_decay: settings.optimizer.weight_decay,
    };
    let mut optimizer = AdamW::from_var_map(&policy.varmap, config).or_fail("optimiser")?;
    let vars = sorted_vars(&policy.varmap);
    let mut log = RunLog::default();
    let start = log.resume(ctx, &mut policy.varmap, &mut optimizer, settings.steps)?;
    let evaluate = |policy: &Policy| {
        evaluate_policy(
            &policy.model,
            &policy.codec,
            eval_rows,
            settings.eval_max_new_tokens,
        )
    };
    if start == 0 {
        let values = evaluate(policy)?;
        log.record(ctx, 0, values)?;
    }
    let mut task = ctx.progress.task(&ctx.kind.clone(), settings.steps as u64);
    task.set_position(start as u64);
    for index in start..settings.steps {
        let started = Instant::now();
        let mut trainer = Trainer {
            policy,
            optimizer: &mut optimizer,
            vars: &vars,
            schedule: &schedule,
        };
        let output = step(index, &mut trainer)?;
        let done = index + 1;
        log.record(ctx, done as u64, named(&output.values))?;
        let seconds = started.elapsed().as_secs_f64();
        let generation = output.generation_seconds;
        ctx.metrics.timing(
            done as u64,
            &[
                ("seconds", seconds),
                ("generation_seconds", generation),
                ("training_seconds", seconds - generation),
                (
                    "generated_tokens_per_second",
                    output.generated_tokens as f64 / generation.max(1e-9),
                ),
            ],
        )?;
        if done == settings.steps || settings.eval_every.is_some_and(|n| n > 0 && done % n == 0) {
            let values = evaluate(policy)?;
            log.record(ctx, done as u64, values)?;
        }
        if done < settings.steps
            && settings.checkpoint_every > 0
            && done % settings.checkpoint_every == 0
        {
            log.checkpoint(ctx, &policy.varmap, &optimizer, done, settings.steps)?;
        }
        let reward = output
            .values
            .iter()
            .find(|(k, _)| *k == "reward")
            .map_or(0.0, |v| v.1);
        task.inc(1);
        task.set_message(&format!("reward {reward:.3} ({seconds:.2}s/step)"));
    }
    task.finish();
    Ok(log)
}

/// Which optimiser update a [`sharded_update`] is: the stage seed, the RL step, the
/// update's index within the step (its pass) and over the whole run.
pub struct UpdateIndex {
    pub seed: u64,
    pub step: usize,
    pub pass: usize,
    pub update: usize,
}

impl UpdateIndex {
    /// Update `update` of the run, in a run of `updates_per_step` updates per RL step.
    pub fn new(seed: u64, step: usize, update: usize, updates_per_step: usize) -> Self {
        UpdateIndex {
            seed,
            step,
            pass: update - step * updates_per_step,
            update,
        }
    }
}

/// One optimiser update over `rows` of a step's batch: the rows cut into `shards`
/// shards whose losses `shard_loss(rows, dropout rng)` run in parallel, combined by
/// their weights ([`crate::parallel`]), then [`apply_update`]. Returns the combined
/// shards and the gradient norm before clipping.
pub fn sharded_update(
    trainer: &mut Trainer,
    rows: &[u32],
    shards: usize,
    index: &UpdateIndex,
    max_grad_norm: Option<f64>,
    shard_loss: impl Fn(&[u32], &mut ChaCha8Rng) -> Result<ShardLoss, StageError> + Sync,
) -> Result<(CombinedShards, f64), StageError> {
    let parts = split_into_shards(rows, shards);
    // Backpropagated by `apply_update` (`weighted_backward`), so whole-block ops may
    // deposit their weights' gradients.
    let outputs = map_shards(parts.len(), |k| {
        crate::model::weight_grads::forward_for_backward(|| {
            shard_loss(
                parts[k],
                &mut shard_rng(index.seed, index.step, index.pass, k),
            )
        })
    })
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let combined = combine_shards(&outputs).or_fail("reading the loss")?;
    if !combined.loss.is_finite() {
        return Err(StageError::failed_with_hint(
            format!(
                "the loss became {} at step {}",
                combined.loss,
                index.step + 1
            ),
            "lower `learning_rate` (PPO: or set `score_clip`); a rerun resumes from the last checkpoint",
        ));
    }
    let grad_norm = apply_update(
        trainer,
        &combined.weighted_losses,
        max_grad_norm,
        index.update,
    )?;
    Ok((combined, grad_norm))
}

/// Backpropagates the weighted shard losses (see [`crate::parallel`]), clips the
/// gradients, sets the scheduled learning rate of update `update` and steps. Returns
/// the gradient norm before clipping.
pub fn apply_update(
    trainer: &mut Trainer,
    weighted_losses: &[(candle_core::Tensor, f64)],
    max_grad_norm: Option<f64>,
    update: usize,
) -> Result<f64, StageError> {
    use crate::algo::optim::{clip_coefficient, grad_norm_with};
    let (grads, squares) = crate::parallel::weighted_backward(weighted_losses, trainer.vars)
        .or_fail("backward pass")?;
    let grad_norm = grad_norm_with(trainer.vars, &grads, &squares).or_fail("gradient norm")?;
    if !grad_norm.is_finite() {
        return Err(StageError::failed_with_hint(
            format!(
                "the gradient norm became {grad_norm} at update {}",
                update + 1
            ),
            "lower `learning_rate`; a rerun resumes from the last checkpoint",
        ));
    }
    trainer
        .optimizer
        .set_learning_rate(trainer.schedule.learning_rate(update));
    let max_norm = max_grad_norm.unwrap_or(f64::INFINITY);
    trainer
        .optimizer
        .step_clipped(&grads, clip_coefficient(grad_norm, max_norm))
        .or_fail("optimiser step")?;
    Ok(grad_norm)
}
