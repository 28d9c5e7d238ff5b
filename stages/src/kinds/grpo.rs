//! Stage kind `grpo`: Group Relative Policy Optimisation (DeepSeekMath, arXiv:2402.03300)
//! as TRL's `GRPOTrainer` runs it: G sampled completions per prompt, advantages
//! normalised within each group (or RLOO baselines), the clipped objective with a k3 KL
//! to the frozen reference, token-level loss aggregation; LoRA policy by default.
//!
//! ```yaml
//! grpo:
//!   kind: grpo
//!   policy: sft                 # a model or adapter stage (an adapter keeps training)
//!   prompts: rl_prompts         # rows with `prompt` (+ `answer` for the rule judge)
//!   eval: eval                  # optional: held-out exact match before / after
//!   rule: { exact_match: true } # and/or  reward_model: rm  (weighted by reward_model_weight)
//!   steps: 50
//!   prompts_per_step: 8
//!   group_size: 8
//!   max_new_tokens: 8
//!   beta: 0.04                  # 0 loads no reference model
//!   learning_rate: 2.0e-4
//! ```
//!
//! Output: the trained policy (an adapter on the input's base, or a full model when
//! `lora: null`). metrics.jsonl per step: reward, reward_std, accuracy, kl, clip_ratio,
//! entropy, loss, grad_norm, learning_rate, response_length, eos_fraction (and
//! eval_accuracy); generation/training seconds and tokens/s go to the run log.

use crate::algo::grpo::{
    group_advantages, grpo_loss, rloo_advantages, GrpoLossConfig, LossAggregation,
};
use crate::algo::masked::masked_mean;
use crate::data::batch::shuffle;
use crate::data::row::Row;
use crate::model::{CausalLm, LoraConfig};
use crate::parallel::ShardLoss;
use crate::rl::judge::{RewardScorer, RuleJudge};
use crate::rl::policy::{
    default_lora, encode_prompts, load_policy, sampling_settings, score_rollouts, Policy,
};
use crate::rl::rl_loop::{
    run_rl_loop, sharded_update, LoopSettings, StepOutput, Trainer, UpdateIndex,
};
use crate::rl::rollout::{
    frozen_logprobs, sample_rollouts, shared_prompt_token_stats, Rollouts, SequenceBatch,
    FROZEN_CHUNK_ROWS,
};
use crate::rl::run_log::{step_prompts, step_rng, step_seed, RunLog};
use crate::train::model_input::write_trained_model;
use crate::train::settings::OptimizerParams;
use crate::train::{read_dataset, StageResultExt};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How per-completion advantages are computed from a group's rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdvantageKind {
    /// (r - mean) / (std + 1e-4) within the group (`scale_rewards: false` drops the std).
    #[default]
    Group,
    /// REINFORCE leave-one-out: r minus the mean of the group's other rewards.
    Rloo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpoParams {
    /// The policy to start from (and the frozen reference): a model or adapter stage.
    pub policy: String,
    /// Prompt rows (`prompt`, plus `answer` or `completion` for the rule judge).
    pub prompts: String,
    /// Held-out rows (prompt + answer/completion): greedy exact match before and after.
    #[serde(default)]
    pub eval: Option<String>,
    /// Reward from the row itself (exact match, substring, length bounds).
    #[serde(default)]
    pub rule: Option<RuleJudge>,
    /// A `reward_model` stage whose score is added, times `reward_model_weight`.
    #[serde(default)]
    pub reward_model: Option<String>,
    #[serde(default = "default_one")]
    pub reward_model_weight: f64,
    /// LoRA adapter trained on the policy (default r 8, alpha 16, all linear); `null`
    /// trains every weight.
    #[serde(default = "default_lora")]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
    /// RL steps: one generation batch each.
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_prompts_per_step")]
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_one")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Weight of the k3 KL to the reference; 0 loads no reference.
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default = "default_clip_epsilon")]
    pub clip_epsilon: f64,
    #[serde(default)]
    pub advantage: AdvantageKind,
    /// Divide group advantages by the group's standard deviation.
    #[serde(default = "default_true")]
    pub scale_rewards: bool,
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// Optimisation passes over each generation batch (TRL `num_iterations`).
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    /// Optimiser steps per pass: the batch is split into this many minibatches.
    #[serde(default = "default_iterations")]
    pub mini_batches: usize,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "rl_optimizer_defaults")]
    pub optimizer: OptimizerParams,
    #[serde(default = "default_checkpoint_every_rl")]
    pub checkpoint_every: usize,
    /// Evaluate every N steps (also before the first and after the last).
    #[serde(default)]
    pub eval_every: Option<usize>,
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
}

fn default_one() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_steps() -> usize {
    50
}
fn default_prompts_per_step() -> usize {
    8
}
fn default_group_size() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    8
}
fn default_beta() -> f64 {
    0.04
}
fn default_clip_epsilon() -> f64 {
    0.2
}
fn default_iterations() -> usize {
    1
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_eval_max_new_tokens() -> usize {
    6
}
/// RL steps are few and slow: checkpoint more often than the training kinds do.
pub fn default_checkpoint_every_rl() -> usize {
    10
}
/// The training kinds' optimiser defaults (linear decay, as TRL's RL trainers) without
/// weight decay, as BENCH.md's RL runs.
pub fn rl_optimizer_defaults() -> OptimizerParams {
    OptimizerParams {
        weight_decay: 0.0,
        ..OptimizerParams::default()
    }
}

impl GrpoParams {
    fn check(&self) -> Result<(), PortsError> {
        let fail = |param: &str, message: &str| Err(PortsError::new(Some(param), message));
        if self.rule.is_none() && self.reward_model.is_none() {
            return Err(PortsError::new(
                Some("rule"),
                "grpo needs a reward: set `rule` and/or `reward_model`",
            )
            .with_hint(
                "e.g. `rule: { exact_match: true }` scores answers against each row's `answer`",
            ));
        }
        if self.steps == 0 {
            return fail("steps", "must be at least 1");
        }
        if self.prompts_per_step == 0 {
            return fail("prompts_per_step", "must be at least 1");
        }
        if self.group_size < 2 {
            return fail(
                "group_size",
                "must be at least 2 (advantages compare completions of a prompt)",
            );
        }
        if self.max_new_tokens == 0 {
            return fail("max_new_tokens", "must be at least 1");
        }
        if !(self.temperature > 0.0) {
            return fail(
                "temperature",
                "must be positive (GRPO samples several completions per prompt)",
            );
        }
        if !(self.beta >= 0.0) {
            return fail("beta", "must be 0 or positive");
        }
        if !(0.0..=1.0).contains(&self.clip_epsilon) {
            return fail("clip_epsilon", "must be in [0, 1]");
        }
        if self.iterations == 0 {
            return fail("iterations", "must be at least 1");
        }
        if self.mini_batches == 0 || self.mini_batches > self.prompts_per_step * self.group_size {
            return fail(
                "mini_batches",
                "must be between 1 and prompts_per_step × group_size",
            );
        }
        if !(self.learning_rate > 0.0) {
            return fail("learning_rate", "must be positive");
        }
        Ok(())
    }
}

pub struct GrpoStage;

impl Stage for GrpoStage {
    type Params = GrpoParams;
    const KIND: &'static str = "grpo";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "GRPO: group-normalised advantages over sampled completions, clipped objective, k3 KL to the reference";

    fn ports(params: &GrpoParams) -> Result<Ports, PortsError> {
        params.check()?;
        let mut inputs = vec![
            InputPort::stage("policy", &params.policy, ArtifactKind::MODELS),
            InputPort::stage("prompts", &params.prompts, &[ArtifactKind::Dataset]),
        ];
        if let Some(eval) = &params.eval {
            inputs.push(InputPort::stage("eval", eval, &[ArtifactKind::Dataset]));
        }
        if let Some(rm) = &params.reward_model {
            inputs.push(InputPort::stage(
                "reward_model",
                rm,
                &[ArtifactKind::RewardModel],
            ));
        }
        let output = if params.lora.is_some() {
            ArtifactKind::Adapter
        } else {
            ArtifactKind::Model
        };
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("model", output)],
        })
    }

    fn run(params: &GrpoParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut policy = load_policy(
            ctx,
            "policy",
            params.lora.as_ref(),
            params.template.as_deref(),
            params.add_bos,
        )?;
        let reference = if params.beta > 0.0 {
            Some(policy.input.load_frozen()?)
        } else {
            None
        };
        let rows = read_dataset(ctx, "prompts")?;
        let prompt_ids = encode_prompts(&policy.codec, &rows)?;
        let eval_rows = match &params.eval {
            Some(_) => read_dataset(ctx, "eval")?,
            None => Vec::new(),
        };
        let scorer = match &params.reward_model {
            Some(_) => Some(RewardScorer::load(
                &ctx.input("reward_model")?.path,
                policy.codec.special.pad,
            )?),
            None => None,
        };
        let run = GrpoRun {
            params,
            rows: &rows,
            prompt_ids: &prompt_ids,
            reference: reference.as_ref(),
            scorer: scorer.as_ref(),
        };
        let log = run.train(ctx, &mut policy, &eval_rows)?;
        let dest = ctx.output_dir("model")?.to_path_buf();
        write_trained_model(
            &policy.model,
            policy.trained_as,
            &policy.input,
            &policy.codec.template,
            &dest,
        )?;
        set_summary(ctx, &log, &policy, params.steps);
        Ok(())
    }
}

/// The final metrics.json of an RL run.
pub fn set_summary(ctx: &mut StageContext, log: &RunLog, policy: &Policy, steps: usize) {
    ctx.metrics.set("steps", steps as u64);
    let trainable: usize = policy
        .varmap
        .all_vars()
        .iter()
        .map(|v| v.elem_count())
        .sum();
    ctx.metrics.set("trainable_parameters", trainable as u64);
    for name in [
        "reward",
        "kl",
        "accuracy",
        "response_length",
        "eval_accuracy",
    ] {
        if let Some(value) = log.last(name) {
            ctx.metrics.set(name, value);
        }
    }
    if let Some(start) = log.first("eval_accuracy") {
        ctx.metrics.set("eval_accuracy_start", start);
    }
    if let Some(start) = log.first("reward") {
        ctx.metrics.set("reward_start", start);
    }
}

/// What the steps of a run share.
struct GrpoRun<'a> {
    params: &'a GrpoParams,
    rows: &'a [Row],
    prompt_ids: &'a [Vec<u32>],
    reference: Option<&'a CausalLm>,
    scorer: Option<&'a RewardScorer>,
}

/// Sums of the update metrics of a step, averaged over its optimiser updates.
#[derive(Default)]
struct UpdateMetrics {
    count: usize,
    loss: f64,
    kl: f64,
    clip_ratio: f64,
    entropy: f64,
    grad_norm: f64,
}

fn scalar(t: &Tensor) -> Result<f64, StageError> {
    Ok(t.to_scalar::<f32>().or_fail("reading a metric")? as f64)
}

/// What the shards of one optimiser update read from.
struct Minibatch<'a> {
    batch: &'a SequenceBatch,
    /// The rows' prompts and completions, to run each group's prompt once.
    rollouts: &'a Rollouts,
    /// The sampling policy's log-probs (several passes only).
    old_logprobs: Option<&'a Tensor>,
    reference_logprobs: Option<&'a Tensor>,
    advantages: &'a Tensor,
}

impl GrpoRun<'_> {
    /// The GRPO loss of rows `rows` of the step's batch, weighted by what it averages.
    fn shard_loss(
        &self,
        policy: &Policy,
        minibatch: &Minibatch,
        rows: &[u32],
        rng: &mut ChaCha8Rng,
    ) -> Result<ShardLoss, StageError> {
        let p = self.params;
        let index = Tensor::new(rows, &Device::Cpu).or_fail("minibatch")?;
        let shard = minibatch.batch.select(&index)?;
        // A group's completions share their prompt: it runs once per group.
        let rollouts = minibatch.rollouts;
        let parts: Vec<(&[u32], &[u32])> = rows
            .iter()
            .map(|&r| {
                let r = r as usize;
                (&rollouts.prompts[r][..], &rollouts.completions[r][..])
            })
            .collect();
        let stats =
            shared_prompt_token_stats(&policy.model, &parts, &shard, p.temperature, Some(rng))?;
        let pick = |t: &Tensor| t.index_select(&index, 0).or_fail("minibatch");
        let old = match minibatch.old_logprobs {
            Some(o) => pick(o)?,
            None => stats.logprobs.detach(),
        };
        let reference = match minibatch.reference_logprobs {
            Some(r) => Some(pick(r)?),
            None => None,
        };
        let config = GrpoLossConfig {
            clip_epsilon: p.clip_epsilon,
            beta: p.beta,
            aggregation: p.loss_aggregation,
        };
        let output = grpo_loss(
            &stats.logprobs,
            &old,
            reference.as_ref(),
            &pick(minibatch.advantages)?,
            &shard.response_mask,
            config,
        )
        .or_fail("GRPO loss")?;
        // The loss is a mean over response tokens or over rows (see LossAggregation).
        let weight = match p.loss_aggregation {
            LossAggregation::Token => scalar(&shard.response_mask.sum_all().or_fail("mask")?)?,
            LossAggregation::Sequence => rows.len() as f64,
        };
        let kl = match &output.mean_kl {
            Some(kl) => scalar(kl)?,
            None => 0.0,
        };
        let entropy =
            masked_mean(&stats.entropy.detach(), &shard.response_mask).or_fail("entropy")?;
        Ok(ShardLoss {
            loss: output.loss,
            weight,
            metrics: vec![
                ("kl", kl),
                ("clip_ratio", scalar(&output.clip_ratio)?),
                ("entropy", scalar(&entropy)?),
            ],
        })
    }

    fn train(
        &self,
        ctx: &mut StageContext,
        policy: &mut Policy,
        eval_rows: &[Row],
    ) -> Result<RunLog, StageError> {
        let p = self.params;
        let settings = LoopSettings {
            steps: p.steps,
            updates_per_step: p.iterations * p.mini_batches,
            learning_rate: p.learning_rate,
            optimizer: &p.optimizer,
            checkpoint_every: p.checkpoint_every,
            eval_every: p.eval_every,
            eval_max_new_tokens: p.eval_max_new_tokens,
        };
        let seed = ctx.seed;
        run_rl_loop(ctx, policy, eval_rows, &settings, &mut |step, trainer| {
            self.step(seed, step, trainer)
        })
    }

    /// One RL step: sample, score, compute advantages, update.
    fn step(
        &self,
        seed: u64,
        step: usize,
        trainer: &mut Trainer,
    ) -> Result<StepOutput, StageError> {
        let p = self.params;
        let policy = trainer.policy;
        let codec = &policy.codec;
        let indices = step_prompts(self.rows.len(), p.prompts_per_step, seed, step);
        let prompts: Vec<Vec<u32>> = indices
            .iter()
            .map(|&i| self.prompt_ids[i].clone())
            .collect();
        let settings = sampling_settings(
            codec,
            p.max_new_tokens,
            p.temperature,
            p.top_k,
            p.top_p,
            step_seed(seed, step),
        );
        let rollouts = sample_rollouts(
            &policy.model,
            &prompts,
            &indices,
            p.group_size,
            &settings,
            &codec.tokenizer,
        )?;
        let scored = score_rollouts(
            &rollouts,
            self.rows,
            p.rule.as_ref(),
            self.scorer.map(|s| (s, p.reward_model_weight)),
        )?;
        let rewards = Tensor::new(
            scored.scores.iter().map(|&s| s as f32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .or_fail("rewards")?;
        let advantages = match p.advantage {
            AdvantageKind::Group => group_advantages(&rewards, p.group_size, p.scale_rewards, 1e-4),
            AdvantageKind::Rloo => rloo_advantages(&rewards, p.group_size),
        }
        .or_fail("advantages")?;
        let batch = SequenceBatch::new(&rollouts, codec.special.pad)?;
        let reference_logprobs = match self.reference {
            Some(model) => {
                Some(frozen_logprobs(model, &batch, p.temperature, None, FROZEN_CHUNK_ROWS)?.0)
            }
            None => None,
        };
        // One pass: the ratio is exactly 1 with a live gradient (TRL); several passes
        // need the sampling policy's log-probs, fixed before the first update.
        let old_logprobs = if p.iterations > 1 {
            Some(
                frozen_logprobs(
                    &policy.model,
                    &batch,
                    p.temperature,
                    None,
                    FROZEN_CHUNK_ROWS,
                )?
                .0,
            )
        } else {
            None
        };
        let mut rng = step_rng(seed, step);
        let rows = rollouts.len();
        let policy = trainer.policy;
        let mut metrics = UpdateMetrics::default();
        let mut update = step * p.iterations * p.mini_batches;
        for _ in 0..p.iterations {
            let mut order: Vec<u32> = (0..rows as u32).collect();
            if p.mini_batches > 1 {
                shuffle(&mut order, &mut rng);
            }
            for chunk in order.chunks(rows.div_ceil(p.mini_batches)) {
                let minibatch = Minibatch {
                    batch: &batch,
                    rollouts: &rollouts,
                    old_logprobs: old_logprobs.as_ref(),
                    reference_logprobs: reference_logprobs.as_ref(),
                    advantages: &advantages,
                };
                let index = UpdateIndex::new(seed, step, update, p.iterations * p.mini_batches);
                let (combined, grad_norm) = sharded_update(
                    trainer,
                    chunk,
                    p.optimizer.shards,
                    &index,
                    p.optimizer.max_grad_norm,
                    |rows, rng| self.shard_loss(policy, &minibatch, rows, rng),
                )?;
                metrics.grad_norm += grad_norm;
                update += 1;
                metrics.count += 1;
                metrics.loss += combined.loss;
                for (name, value) in combined.metrics {
                    match name {
                        "kl" => metrics.kl += value,
                        "clip_ratio" => metrics.clip_ratio += value,
                        "entropy" => metrics.entropy += value,
                        _ => {}
                    }
                }
            }
        }
        let n = metrics.count.max(1) as f64;
        let mean = scored.scores.iter().sum::<f64>() / rows as f64;
        let variance = scored
            .scores
            .iter()
            .map(|s| (s - mean).powi(2))
            .sum::<f64>()
            / rows as f64;
        let eos = rollouts.has_eos.iter().filter(|&&e| e).count() as f64 / rows as f64;
        let values = vec![
            ("reward", mean),
            ("reward_std", variance.sqrt()),
            ("accuracy", scored.accuracy),
            ("kl", metrics.kl / n),
            ("clip_ratio", metrics.clip_ratio / n),
            ("entropy", metrics.entropy / n),
            ("loss", metrics.loss / n),
            ("grad_norm", metrics.grad_norm / n),
            (
                "learning_rate",
                trainer.schedule.learning_rate(update.saturating_sub(1)),
            ),
            ("response_length", rollouts.mean_length()),
            ("eos_fraction", eos),
        ];
        Ok(StepOutput {
            values,
            generation_seconds: rollouts.seconds,
            generated_tokens: rollouts.generated_tokens(),
        })
    }
}
