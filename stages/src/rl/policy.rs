//! Loading what an RL stage trains and compares against: the trainable policy (LoRA by
//! default), the frozen reference (the policy input as given), the codec, the prompt rows
//! and the sampling settings; scoring rollouts with the configured judges.

use super::judge::{RewardScorer, RuleJudge};
use super::rollout::Rollouts;
use crate::data::row::Row;
use crate::model::{CausalLm, GenerationSettings, LoraConfig};
use crate::train::model_input::{resolve_model_input, ModelInput, TextCodec, TrainedAs};
use crate::train::StageResultExt;
use candle_nn::VarMap;
use rlhf_engine::{StageContext, StageError};

/// The default policy adapter: LoRA r 8, alpha 16 on every linear module (BENCH.md).
pub fn default_lora() -> Option<LoraConfig> {
    Some(LoraConfig::default())
}

/// The policy being trained and everything loaded with it.
pub struct Policy {
    pub input: ModelInput,
    pub codec: TextCodec,
    pub model: CausalLm,
    pub trained_as: TrainedAs,
    pub varmap: VarMap,
}

/// Loads input `name` as a trainable policy: `lora` on a model input adds a fresh
/// seeded adapter; on an adapter input it keeps training that adapter.
pub fn load_policy(
    ctx: &StageContext,
    name: &str,
    lora: Option<&LoraConfig>,
    template: Option<&str>,
    add_bos: bool,
) -> Result<Policy, StageError> {
    let input = resolve_model_input(ctx, name)?;
    let codec = TextCodec::load(&input, template, add_bos, usize::MAX / 2)?;
    let varmap = VarMap::new();
    let (model, trained_as) = input.load_trainable(lora, &varmap, ctx.seed)?;
    Ok(Policy {
        input,
        codec,
        model,
        trained_as,
        varmap,
    })
}

/// A policy loaded for sampling only: base + adapter, frozen (a model or an adapter input).
pub struct FrozenPolicy {
    pub codec: TextCodec,
    pub model: CausalLm,
}

/// Loads input `name` for sampling without training it. Unlike [`load_policy`] with no
/// `lora`, this accepts an adapter input (an SFT adapter is the usual sampler) and keeps
/// no trainable copy of the weights.
pub fn load_frozen_policy(
    ctx: &StageContext,
    name: &str,
    template: Option<&str>,
    add_bos: bool,
) -> Result<FrozenPolicy, StageError> {
    let input = resolve_model_input(ctx, name)?;
    let codec = TextCodec::load(&input, template, add_bos, usize::MAX / 2)?;
    let model = input.load_frozen()?;
    Ok(FrozenPolicy { codec, model })
}

/// The prompt token ids of `rows` (the template's prompt, as generation starts from it).
pub fn encode_prompts(codec: &TextCodec, rows: &[Row]) -> Result<Vec<Vec<u32>>, StageError> {
    let encoder = codec.encoder();
    rows.iter()
        .enumerate()
        .map(|(index, row)| {
            encoder
                .encode_prompt(row)
                .or_fail(&format!("encoding prompt row {}", index + 1))
        })
        .collect()
}

/// Sampling settings shared by the RL kinds.
pub fn sampling_settings(
    codec: &TextCodec,
    max_new_tokens: usize,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    seed: u64,
) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        eos_token_ids: vec![codec.special.eos],
        stop_strings: Vec::new(),
        seed,
        pad_token_id: codec.special.pad,
    }
}

/// Scores of a step's rollouts and what they are made of.
#[derive(Clone, Debug)]
pub struct RolloutScores {
    /// The total score of each completion (rule + weight · reward model).
    pub scores: Vec<f64>,
    /// Fraction of completions exactly right (rows with a gold answer only; NaN if none).
    pub accuracy: f64,
}

/// Scores `rollouts` with the rule judge and/or the reward model (`weight` · its score).
pub fn score_rollouts(
    rollouts: &Rollouts,
    rows: &[Row],
    rule: Option<&RuleJudge>,
    reward_model: Option<(&RewardScorer, f64)>,
) -> Result<RolloutScores, StageError> {
    let mut scores = vec![0.0; rollouts.len()];
    if let Some(rule) = rule {
        for (i, text) in rollouts.texts.iter().enumerate() {
            scores[i] += rule.score(&rows[rollouts.row_index[i]], text);
        }
    }
    if let Some((scorer, weight)) = reward_model {
        let replies: Vec<(&[u32], &[u32])> = rollouts
            .prompts
            .iter()
            .zip(&rollouts.completions)
            .map(|(prompt, completion)| (prompt.as_slice(), completion.as_slice()))
            .collect();
        let model_scores = scorer.score(&replies)?;
        for (score, model_score) in scores.iter_mut().zip(model_scores) {
            *score += weight * model_score;
        }
    }
    let (mut judged, mut right) = (0usize, 0usize);
    for (i, text) in rollouts.texts.iter().enumerate() {
        let row = &rows[rollouts.row_index[i]];
        if super::judge::gold_answer(row).is_some() {
            judged += 1;
            right += usize::from(RuleJudge::is_correct(row, text));
        }
    }
    let accuracy = if judged == 0 {
        f64::NAN
    } else {
        right as f64 / judged as f64
    };
    Ok(RolloutScores { scores, accuracy })
}

/// The trainable variables of `varmap` in name order (a stable order for clipping).
pub fn sorted_vars(varmap: &VarMap) -> Vec<candle_core::Var> {
    let Ok(data) = varmap.data().lock() else {
        return Vec::new();
    };
    let mut named: Vec<(&String, &candle_core::Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

/// Held-out exact match of greedy answers, as `eval_accuracy` (nothing without rows).
pub fn evaluate_policy(
    model: &CausalLm,
    codec: &TextCodec,
    rows: &[Row],
    max_new_tokens: usize,
) -> Result<Vec<(String, f64)>, StageError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let accuracy =
        crate::train::evaluation::exact_match_accuracy(model, codec, rows, max_new_tokens)?;
    Ok(vec![("eval_accuracy".to_string(), accuracy)])
}
