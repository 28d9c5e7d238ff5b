//! Stage kind `ppo`: actor–critic PPO for language models (Schulman et al. 2017; the
//! per-token form of TRL's `PPOTrainer` and seeds/002). Each step samples completions
//! with the KV-cache generator, scores them (reward model and/or rule judge, with optional
//! score clipping and a missing-EOS penalty), folds a per-token KL penalty to the frozen
//! reference into the rewards, computes GAE on a value head, whitens the advantages and
//! runs several epochs of minibatch updates of the clipped policy loss, the clipped value
//! loss and an entropy bonus.
//!
//! ```yaml
//! ppo:
//!   kind: ppo
//!   policy: sft                 # a model or adapter stage (an adapter keeps training)
//!   prompts: rl_prompts
//!   reward_model: rm            # and/or  rule: { exact_match: true }
//!   eval: eval
//!   kl: { coef: 0.05, estimator: k1 }   # k1 | k3 | mse
//!   steps: 20
//!   rollouts_per_step: 64
//!   max_new_tokens: 8
//!   ppo_epochs: 4
//!   mini_batches: 1
//!   learning_rate: 2.0e-4
//! ```
//!
//! The critic is a value head on the policy's final hidden states (`value.score.weight`,
//! trained with the policy's LoRA through `value_coef`); it is checkpointed but not part
//! of the output, which is the policy alone (an adapter, or a full model with
//! `lora: null`). metrics.jsonl per step: reward, kl, non_score_reward, entropy,
//! clip_fraction, approx_kl, policy_loss, value_loss, value_clip_fraction,
//! explained_variance, response_length, accuracy, eos_fraction, grad_norm,
//! learning_rate; generation vs training seconds go to the run log.

use crate::algo::gae::gae;
use crate::algo::kl::{kl_estimate, KlEstimator};
use crate::algo::masked::{masked_mean, masked_whiten};
use crate::algo::ppo::{
    clip_scores, explained_variance, penalize_missing_eos, per_token_rewards, ppo_policy_loss,
    ppo_value_loss,
};
use crate::data::batch::shuffle;
use crate::data::row::Row;
use crate::model::{CausalLm, LoraConfig, ScalarHead, ScalarHeadKind};
use crate::parallel::ShardLoss;
use crate::rl::judge::{RewardScorer, RuleJudge};
use crate::rl::policy::{
    default_lora, encode_prompts, load_policy, sampling_settings, score_rollouts, Policy,
};
use crate::rl::rl_loop::{
    run_rl_loop, sharded_update, LoopSettings, StepOutput, Trainer, UpdateIndex,
};
use crate::rl::rollout::{
    frozen_logprobs, sample_rollouts, token_stats, SequenceBatch, FROZEN_CHUNK_ROWS,
};
use crate::rl::run_log::{step_prompts, step_rng, step_seed};
use crate::train::model_input::write_trained_model;
use crate::train::settings::OptimizerParams;
use crate::train::{read_dataset, StageResultExt};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::grpo::{default_checkpoint_every_rl, rl_optimizer_defaults, set_summary};

/// `kl:` — the per-token KL penalty folded into the rewards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KlPenalty {
    #[serde(default = "default_kl_coef")]
    pub coef: f64,
    /// k1 (TRL's default), k3 or mse.
    #[serde(default = "default_estimator")]
    pub estimator: KlEstimator,
}

fn default_kl_coef() -> f64 {
    0.05
}
fn default_estimator() -> KlEstimator {
    KlEstimator::K1
}

impl Default for KlPenalty {
    fn default() -> Self {
        KlPenalty {
            coef: default_kl_coef(),
            estimator: default_estimator(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PpoParams {
    /// The policy to start from (and the frozen reference): a model or adapter stage.
    pub policy: String,
    /// Prompt rows (`prompt`, plus `answer`/`completion` for the rule judge and accuracy).
    pub prompts: String,
    #[serde(default)]
    pub eval: Option<String>,
    /// A `reward_model` stage; its score times `reward_model_weight` is the reward.
    #[serde(default)]
    pub reward_model: Option<String>,
    #[serde(default = "default_one")]
    pub reward_model_weight: f64,
    /// A rule judge whose score is added to the reward.
    #[serde(default)]
    pub rule: Option<RuleJudge>,
    #[serde(default = "default_lora")]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_rollouts")]
    pub rollouts_per_step: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_one")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub kl: KlPenalty,
    #[serde(default = "default_one")]
    pub gamma: f64,
    #[serde(default = "default_lambda")]
    pub lambda: f64,
    #[serde(default = "default_true")]
    pub whiten_advantages: bool,
    #[serde(default = "default_clip")]
    pub clip_epsilon: f64,
    #[serde(default = "default_clip")]
    pub value_clip: f64,
    #[serde(default = "default_value_coef")]
    pub value_coef: f64,
    #[serde(default)]
    pub entropy_coef: f64,
    #[serde(default = "default_ppo_epochs")]
    pub ppo_epochs: usize,
    #[serde(default = "default_one_usize")]
    pub mini_batches: usize,
    /// Clamp sequence scores to [-score_clip, score_clip].
    #[serde(default)]
    pub score_clip: Option<f64>,
    /// Subtracted from the score of completions that never emit EOS.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "rl_optimizer_defaults")]
    pub optimizer: OptimizerParams,
    #[serde(default = "default_checkpoint_every_rl")]
    pub checkpoint_every: usize,
    #[serde(default)]
    pub eval_every: Option<usize>,
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
}

fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_steps() -> usize {
    20
}
fn default_rollouts() -> usize {
    64
}
fn default_max_new_tokens() -> usize {
    8
}
fn default_lambda() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_value_coef() -> f64 {
    0.1
}
fn default_ppo_epochs() -> usize {
    4
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_eval_max_new_tokens() -> usize {
    6
}

impl PpoParams {
    fn check(&self) -> Result<(), PortsError> {
        let fail = |param: &str, message: &str| Err(PortsError::new(Some(param), message));
        if self.rule.is_none() && self.reward_model.is_none() {
            return Err(PortsError::new(
                Some("reward_model"),
                "ppo needs a reward: set `reward_model` and/or `rule`",
            )
            .with_hint("e.g. `reward_model: rm` names a reward_model stage"));
        }
        if self.steps == 0 || self.rollouts_per_step == 0 || self.max_new_tokens == 0 {
            return fail(
                "steps",
                "steps, rollouts_per_step and max_new_tokens must be at least 1",
            );
        }
        if self.ppo_epochs == 0 {
            return fail("ppo_epochs", "must be at least 1");
        }
        if self.mini_batches == 0 || self.mini_batches > self.rollouts_per_step {
            return fail("mini_batches", "must be between 1 and rollouts_per_step");
        }
        if !(self.temperature > 0.0) {
            return fail("temperature", "must be positive (PPO samples its rollouts)");
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lambda) {
            return fail("gamma", "gamma and lambda must be in [0, 1]");
        }
        if !(self.kl.coef >= 0.0) {
            return fail("kl.coef", "must be 0 or positive");
        }
        if !(self.learning_rate > 0.0) {
            return fail("learning_rate", "must be positive");
        }
        Ok(())
    }
}

pub struct PpoStage;

impl Stage for PpoStage {
    type Params = PpoParams;
    const KIND: &'static str = "ppo";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Actor–critic PPO: KL-penalised rewards, GAE on a value head, clipped policy and value losses";

    fn ports(params: &PpoParams) -> Result<Ports, PortsError> {
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

    fn run(params: &PpoParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut policy = load_policy(
            ctx,
            "policy",
            params.lora.as_ref(),
            params.template.as_deref(),
            params.add_bos,
        )?;
        let reference = policy.input.load_frozen()?;
        let hidden = policy.model.config.hidden_size;
        let value_head = ScalarHead::new(
            ScalarHeadKind::Value,
            hidden,
            &policy.varmap,
            "value.",
            ctx.seed,
            DType::F32,
            &Device::Cpu,
        )
        .or_fail("creating the value head")?;
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
        let run = PpoRun {
            params,
            rows: &rows,
            prompt_ids: &prompt_ids,
            reference: &reference,
            scorer: scorer.as_ref(),
            value_head: &value_head,
        };
        let settings = LoopSettings {
            steps: params.steps,
            updates_per_step: params.ppo_epochs * params.mini_batches,
            learning_rate: params.learning_rate,
            optimizer: &params.optimizer,
            checkpoint_every: params.checkpoint_every,
            eval_every: params.eval_every,
            eval_max_new_tokens: params.eval_max_new_tokens,
        };
        let seed = ctx.seed;
        let log = run_rl_loop(
            ctx,
            &mut policy,
            &eval_rows,
            &settings,
            &mut |step, trainer| run.step(seed, step, trainer),
        )?;
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

struct PpoRun<'a> {
    params: &'a PpoParams,
    rows: &'a [Row],
    prompt_ids: &'a [Vec<u32>],
    reference: &'a CausalLm,
    scorer: Option<&'a RewardScorer>,
    value_head: &'a ScalarHead,
}

/// A scored rollout batch with everything the updates need, all (b, t-1) but `scores`.
struct Experience {
    batch: SequenceBatch,
    old_logprobs: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
}

fn scalar(t: &Tensor) -> Result<f64, StageError> {
    Ok(t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .or_fail("reading a metric")?)
}

/// Sums of update metrics, averaged over a step's updates.
#[derive(Default)]
struct UpdateMetrics {
    count: usize,
    policy_loss: f64,
    value_loss: f64,
    clip_fraction: f64,
    value_clip_fraction: f64,
    approx_kl: f64,
    entropy: f64,
    grad_norm: f64,
}

impl PpoRun<'_> {
    fn step(
        &self,
        seed: u64,
        step: usize,
        trainer: &mut Trainer,
    ) -> Result<StepOutput, StageError> {
        let p = self.params;
        let policy = trainer.policy;
        let codec = &policy.codec;
        let indices = step_prompts(self.rows.len(), p.rollouts_per_step, seed, step);
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
            1,
            &settings,
            &codec.tokenizer,
        )?;
        let scored = score_rollouts(
            &rollouts,
            self.rows,
            p.rule.as_ref(),
            self.scorer.map(|s| (s, p.reward_model_weight)),
        )?;
        let mut scores = Tensor::new(
            scored.scores.iter().map(|&s| s as f32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .or_fail("scores")?;
        if let Some(penalty) = p.missing_eos_penalty {
            scores = penalize_missing_eos(&scores, &rollouts.has_eos, penalty)
                .or_fail("missing-EOS penalty")?;
        }
        if let Some(limit) = p.score_clip {
            scores = clip_scores(&scores, limit).or_fail("score clipping")?;
        }
        let batch = SequenceBatch::new(&rollouts, codec.special.pad)?;
        let mask = batch.response_mask.clone();
        let (old_logprobs, old_values) = frozen_logprobs(
            &policy.model,
            &batch,
            p.temperature,
            Some(self.value_head),
            FROZEN_CHUNK_ROWS,
        )?;
        let old_values = (old_values
            .ok_or_else(|| StageError::failed("the value head returned nothing"))?
            * &mask)
            .or_fail("values")?;
        let (reference_logprobs, _) = frozen_logprobs(
            self.reference,
            &batch,
            p.temperature,
            None,
            FROZEN_CHUNK_ROWS,
        )?;
        let kl = (kl_estimate(&old_logprobs, &reference_logprobs, p.kl.estimator).or_fail("KL")?
            * &mask)
            .or_fail("KL")?;
        let shaped =
            per_token_rewards(&scores, &kl, p.kl.coef, &mask).or_fail("per-token rewards")?;
        let estimates =
            gae(&shaped.rewards, &old_values, &mask, p.gamma, p.lambda).or_fail("GAE")?;
        let advantages = if p.whiten_advantages {
            (masked_whiten(&estimates.advantages, &mask, true).or_fail("whitening")? * &mask)
                .or_fail("whitening")?
        } else {
            estimates.advantages.clone()
        };
        let explained = explained_variance(&old_values, &estimates.returns, &mask)
            .or_fail("explained variance")?;
        let experience = Experience {
            batch,
            old_logprobs,
            old_values,
            advantages,
            returns: estimates.returns,
        };
        let metrics = self.update(seed, step, trainer, &experience)?;
        let n = metrics.count.max(1) as f64;
        let rows = rollouts.len() as f64;
        let sequence_kl = scalar(&kl.sum_all().or_fail("KL")?)? / rows;
        let non_score = scalar(&shaped.non_score_rewards.sum_all().or_fail("KL")?)? / rows;
        let score_values: Vec<f32> = scores.to_vec1().or_fail("scores")?;
        let reward = score_values.iter().map(|&s| s as f64).sum::<f64>() / rows;
        let eos = rollouts.has_eos.iter().filter(|&&e| e).count() as f64 / rows;
        let update = (step + 1) * p.ppo_epochs * p.mini_batches;
        let values = vec![
            ("reward", reward),
            ("kl", sequence_kl),
            ("non_score_reward", non_score),
            ("accuracy", scored.accuracy),
            ("entropy", metrics.entropy / n),
            ("clip_fraction", metrics.clip_fraction / n),
            ("approx_kl", metrics.approx_kl / n),
            ("policy_loss", metrics.policy_loss / n),
            ("value_loss", metrics.value_loss / n),
            ("value_clip_fraction", metrics.value_clip_fraction / n),
            ("explained_variance", explained),
            ("response_length", rollouts.mean_length()),
            ("eos_fraction", eos),
            ("grad_norm", metrics.grad_norm / n),
            ("learning_rate", trainer.schedule.learning_rate(update - 1)),
        ];
        Ok(StepOutput {
            values,
            generation_seconds: rollouts.seconds,
            generated_tokens: rollouts.generated_tokens(),
        })
    }

    /// The PPO loss (clipped policy loss + value_coef × value loss − entropy_coef ×
    /// entropy) of rows `rows` of the experience, a mean over their response tokens.
    fn shard_loss(
        &self,
        policy: &Policy,
        experience: &Experience,
        rows: &[u32],
        rng: &mut ChaCha8Rng,
    ) -> Result<ShardLoss, StageError> {
        let p = self.params;
        let index = Tensor::new(rows, &Device::Cpu).or_fail("minibatch")?;
        let pick = |t: &Tensor| {
            t.contiguous()
                .and_then(|t| t.index_select(&index, 0))
                .or_fail("minibatch")
        };
        let minibatch = experience.batch.select(&index)?;
        let mask = &minibatch.response_mask;
        let stats = token_stats(
            &policy.model,
            &minibatch,
            p.temperature,
            Some(self.value_head),
            Some(rng),
        )?;
        let values = stats
            .values
            .ok_or_else(|| StageError::failed("the value head returned nothing"))?;
        let policy_loss = ppo_policy_loss(
            &stats.logprobs,
            &pick(&experience.old_logprobs)?,
            &pick(&experience.advantages)?,
            mask,
            p.clip_epsilon,
        )
        .or_fail("policy loss")?;
        let value_loss = ppo_value_loss(
            &values,
            &pick(&experience.old_values)?,
            &pick(&experience.returns)?,
            mask,
            p.value_clip,
        )
        .or_fail("value loss")?;
        let entropy = masked_mean(&stats.entropy, mask).or_fail("entropy")?;
        let loss = (&policy_loss.loss
            + value_loss.loss.affine(p.value_coef, 0.0).or_fail("loss")?)
        .and_then(|l| l - entropy.affine(p.entropy_coef, 0.0)?)
        .or_fail("loss")?;
        Ok(ShardLoss {
            loss,
            weight: scalar(&mask.sum_all().or_fail("mask")?)?,
            metrics: vec![
                ("policy_loss", scalar(&policy_loss.loss)?),
                ("value_loss", scalar(&value_loss.loss)?),
                ("clip_fraction", scalar(&policy_loss.clip_fraction)?),
                ("value_clip_fraction", scalar(&value_loss.clip_fraction)?),
                ("approx_kl", scalar(&policy_loss.approx_kl)?),
                ("entropy", scalar(&entropy.detach())?),
            ],
        })
    }

    /// `ppo_epochs` passes of `mini_batches` updates over one experience batch.
    fn update(
        &self,
        seed: u64,
        step: usize,
        trainer: &mut Trainer,
        experience: &Experience,
    ) -> Result<UpdateMetrics, StageError> {
        let p = self.params;
        let rows = experience.batch.rows();
        let mut rng = step_rng(seed, step);
        let policy = trainer.policy;
        let mut metrics = UpdateMetrics::default();
        let mut update = step * p.ppo_epochs * p.mini_batches;
        for _ in 0..p.ppo_epochs {
            let mut order: Vec<u32> = (0..rows as u32).collect();
            shuffle(&mut order, &mut rng);
            for chunk in order.chunks(rows.div_ceil(p.mini_batches)) {
                let index = UpdateIndex::new(seed, step, update, p.ppo_epochs * p.mini_batches);
                let (combined, grad_norm) = sharded_update(
                    trainer,
                    chunk,
                    p.optimizer.shards,
                    &index,
                    p.optimizer.max_grad_norm,
                    |rows, rng| self.shard_loss(policy, experience, rows, rng),
                )?;
                metrics.grad_norm += grad_norm;
                update += 1;
                metrics.count += 1;
                for (name, value) in combined.metrics {
                    match name {
                        "policy_loss" => metrics.policy_loss += value,
                        "value_loss" => metrics.value_loss += value,
                        "clip_fraction" => metrics.clip_fraction += value,
                        "value_clip_fraction" => metrics.value_clip_fraction += value,
                        "approx_kl" => metrics.approx_kl += value,
                        "entropy" => metrics.entropy += value,
                        _ => {}
                    }
                }
            }
        }
        Ok(metrics)
    }
}
