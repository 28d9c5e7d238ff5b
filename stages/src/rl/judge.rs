//! Judges: how a completion gets its score.
//!
//! - `rule`: exact match of the completion against the row's gold `answer` (else its
//!   `completion`), as BENCH.md scores it (text up to the first newline, stripped); an
//!   optional required substring; optional length bounds (characters) with a penalty.
//! - `reward_model`: the scalar head of a `reward_model` artifact on prompt + completion.
//! - `file`: scores imported from a jsonl of `{"prompt", "completion", "score"}` lines.

use crate::data::row::Row;
use crate::eval::metrics::exact_match;
use crate::model::{CausalLm, RewardHead, Trainability};
use crate::parallel::map_shards;
use crate::train::StageResultExt;
use candle_core::{DType, Device};
use rlhf_engine::StageError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `rule:` — a judge computed from the row itself, no model needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleJudge {
    /// Score the answer against the row's gold `answer` (or `completion`).
    #[serde(default = "default_true")]
    pub exact_match: bool,
    /// Score of a right answer.
    #[serde(default = "default_correct_reward")]
    pub correct_reward: f64,
    /// Score of a wrong answer (or of a row without a gold answer).
    #[serde(default)]
    pub wrong_reward: f64,
    /// A substring the completion must contain; adds `contains_reward` when it does.
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default = "default_correct_reward")]
    pub contains_reward: f64,
    /// Answers shorter than this many characters (after stripping) lose `length_penalty`.
    #[serde(default)]
    pub min_chars: Option<usize>,
    /// Answers longer than this many characters (after stripping) lose `length_penalty`.
    #[serde(default)]
    pub max_chars: Option<usize>,
    #[serde(default = "default_correct_reward")]
    pub length_penalty: f64,
    /// Partial credit for numeric answers: adds `numeric_reward · max(0, 1 - |answer -
    /// gold| / numeric_tolerance)` when both parse as numbers, a dense signal where exact
    /// match alone is too sparse for a weak policy to learn from.
    #[serde(default)]
    pub numeric_tolerance: Option<f64>,
    #[serde(default = "default_correct_reward")]
    pub numeric_reward: f64,
}

fn default_true() -> bool {
    true
}
fn default_correct_reward() -> f64 {
    1.0
}

impl Default for RuleJudge {
    fn default() -> Self {
        RuleJudge {
            exact_match: true,
            correct_reward: 1.0,
            wrong_reward: 0.0,
            contains: None,
            contains_reward: 1.0,
            min_chars: None,
            max_chars: None,
            length_penalty: 1.0,
            numeric_tolerance: None,
            numeric_reward: 1.0,
        }
    }
}

impl RuleJudge {
    /// The score of `completion` (decoded, special tokens skipped) for `row`.
    pub fn score(&self, row: &Row, completion: &str) -> f64 {
        let mut score = 0.0;
        if self.exact_match {
            let right = gold_answer(row).is_some_and(|gold| exact_match(completion, gold));
            score += if right {
                self.correct_reward
            } else {
                self.wrong_reward
            };
        }
        if let Some(needle) = &self.contains {
            if completion.contains(needle.as_str()) {
                score += self.contains_reward;
            }
        }
        if let Some(tolerance) = self.numeric_tolerance.filter(|t| *t > 0.0) {
            let parsed = answer_text(completion).parse::<f64>().ok();
            let gold = gold_answer(row).and_then(|g| g.trim().parse::<f64>().ok());
            if let (Some(answer), Some(gold)) = (parsed, gold) {
                let closeness = (1.0 - (answer - gold).abs() / tolerance).max(0.0);
                score += self.numeric_reward * closeness;
            }
        }
        let length = answer_text(completion).chars().count();
        let too_short = self.min_chars.is_some_and(|min| length < min);
        let too_long = self.max_chars.is_some_and(|max| length > max);
        if too_short || too_long {
            score -= self.length_penalty;
        }
        score
    }

    /// Whether `completion` is exactly right (for the `accuracy` metric).
    pub fn is_correct(row: &Row, completion: &str) -> bool {
        gold_answer(row).is_some_and(|gold| exact_match(completion, gold))
    }
}

/// The gold answer of a row: `answer`, else `completion`.
pub fn gold_answer(row: &Row) -> Option<&str> {
    row.answer.as_deref().or(row.completion.as_deref())
}

/// The answer part of a completion as exact match reads it: up to the first newline, stripped.
fn answer_text(completion: &str) -> &str {
    completion.split('\n').next().unwrap_or("").trim()
}

/// A reward model artifact loaded for scoring: the LM and its reward head.
pub struct RewardScorer {
    pub model: CausalLm,
    pub head: RewardHead,
    pub pad: u32,
}

/// Sequences scored per forward pass; the passes share the compute threads.
const SCORE_BATCH: usize = 16;

impl RewardScorer {
    /// Loads a `reward_model` artifact folder (config.json, model.safetensors with
    /// `score.weight`, as the reward_model stage writes it).
    pub fn load(dir: &Path, pad: u32) -> Result<Self, StageError> {
        let doing = format!("loading the reward model {}", dir.display());
        let tensors = crate::model::weights::load_safetensors(dir, DType::F32, &Device::Cpu)
            .or_fail(&doing)?;
        let head = RewardHead::from_checkpoint(&tensors).map_err(|e| {
            StageError::failed_with_hint(
                format!("{doing}: {e}"),
                "the reward input must be a `reward_model` stage",
            )
        })?;
        let config =
            crate::model::LlamaConfig::from_file(&dir.join("config.json")).or_fail(&doing)?;
        let model = CausalLm::from_tensors(config, tensors, &Device::Cpu, Trainability::Frozen)
            .or_fail(&doing)?;
        Ok(RewardScorer { model, head, pad })
    }

    /// One reward per (prompt, completion) pair of token ids, in order.
    pub fn score(&self, replies: &[(&[u32], &[u32])]) -> Result<Vec<f64>, StageError> {
        // Fixed chunks spread over the compute threads: the same numbers on any count.
        let chunks: Vec<&[(&[u32], &[u32])]> = replies.chunks(SCORE_BATCH).collect();
        let scored = map_shards(chunks.len(), |k| self.score_chunk(chunks[k]));
        let mut scores = Vec::with_capacity(replies.len());
        for chunk in scored {
            scores.extend(chunk?);
        }
        Ok(scores)
    }

    fn score_chunk(&self, chunk: &[(&[u32], &[u32])]) -> Result<Vec<f64>, StageError> {
        let batch = crate::data::batch::Batch::from_parts(chunk, self.pad);
        let ids = batch.input_ids_tensor(&Device::Cpu).or_fail("batch")?; // (b, t)
        let mask = batch.attention_mask_tensor(&Device::Cpu).or_fail("batch")?; // (b, t)
        let reply_mask = batch.loss_mask_tensor(&Device::Cpu).or_fail("batch")?; // (b, t)
        let hidden = self
            .model
            .hidden_states(&ids, Some(&mask), None)
            .or_fail("reward model forward pass")?; // (b, t, d)
        let rewards = self
            .head
            .rewards(&self.model, &ids, &hidden, &mask, &reply_mask, false)
            .or_fail("reward head")?
            .0; // (b,)
        let values: Vec<f32> = rewards.to_vec1().or_fail("reading rewards")?;
        Ok(values.into_iter().map(f64::from).collect())
    }
}

/// Scores imported from a jsonl file of `{"prompt", "completion", "score"}` lines.
#[derive(Clone, Debug, Default)]
pub struct FileLabels {
    /// (prompt, completion) → score; later lines win.
    pub scores: BTreeMap<(String, String), f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelLine {
    prompt: String,
    completion: String,
    score: f64,
}

impl FileLabels {
    /// Reads `path` (a file, or a folder holding `labels.jsonl`).
    pub fn load(path: &Path) -> Result<Self, StageError> {
        let file = if path.is_dir() {
            path.join("labels.jsonl")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| StageError::io(&file, e))?;
        let mut scores = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let label: LabelLine = serde_json::from_str(line).map_err(|e| {
                StageError::failed_with_hint(
                    format!("{}:{}: {e}", file.display(), index + 1),
                    "each line must be {\"prompt\": …, \"completion\": …, \"score\": number}",
                )
            })?;
            scores.insert((label.prompt, label.completion), label.score);
        }
        Ok(FileLabels { scores })
    }

    /// The labelled completions of `prompt`, in file-sorted order, with their scores.
    pub fn completions_of(&self, prompt: &str) -> Vec<(String, f64)> {
        self.scores
            .range((prompt.to_string(), String::new())..)
            .take_while(|((p, _), _)| p == prompt)
            .map(|((_, c), s)| (c.clone(), *s))
            .collect()
    }

    pub fn score(&self, prompt: &str, completion: &str) -> Option<f64> {
        self.scores
            .get(&(prompt.to_string(), completion.to_string()))
            .copied()
    }
}
