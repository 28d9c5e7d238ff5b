//! Stage kind `collect_preferences`: samples K completions per prompt from a policy,
//! scores them with a judge and writes preference pairs.
//!
//! ```yaml
//! prefs:
//!   kind: collect_preferences
//!   policy: sft                       # a model or adapter stage (optional with a file judge)
//!   prompts: rl_prompts               # rows with `prompt` (+ `answer` for the rule judge)
//!   judge: { kind: rule, exact_match: true }   # or { kind: reward_model, model: rm }
//!                                               # or { kind: file, labels: labels.jsonl }
//!                                               # or { kind: human, labels: labels/prefs.jsonl }
//!                                               #   (people label on `rlhf label`; crate::label)
//!   completions_per_prompt: 4
//!   pairing: best_vs_worst            # or all_pairs, random
//!   max_new_tokens: 8
//!   temperature: 1.0
//! ```
//!
//! Output (a `preferences` artifact): `data.jsonl` — rows `{prompt, chosen, rejected,
//! margin}` in the dataset row model, so the artifact is a `data:` input of `reward_model`
//! and `dpo` as it is (margin = score difference) — and `pairs.jsonl`, the same pairs with
//! `chosen_score`, `rejected_score` and `judge`. Pairs whose scores tie are dropped and
//! counted (`ties_dropped` in metrics.json).

use crate::data::batch::shuffle;
use crate::data::row::{write_rows, Row};
use crate::rl::judge::{FileLabels, RewardScorer, RuleJudge};
use crate::rl::policy::{encode_prompts, load_frozen_policy, sampling_settings, score_rollouts};
use crate::rl::rollout::{sample_rollouts, Rollouts};
use crate::rl::run_log::{step_rng, step_seed};
use crate::train::{read_dataset, StageResultExt};
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::io::Write;

/// Which judge scores the completions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JudgeSpec {
    /// Exact match against the row's gold answer, a substring, length bounds.
    Rule(RuleJudge),
    /// The scalar head of a `reward_model` stage.
    RewardModel(RewardModelJudge),
    /// Scores from a jsonl file of `{"prompt", "completion", "score"}` lines.
    File(FileJudge),
    /// People label pairs on the page `rlhf label` serves (see `crate::label`).
    Human(crate::label::HumanJudge),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModelJudge {
    /// A `reward_model` stage.
    pub model: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileJudge {
    /// A jsonl file (or a stage/folder holding `labels.jsonl`). Without a `policy`, the
    /// labelled completions of each prompt are the candidates; with one, generated
    /// completions without a label are left out (counted as `unlabelled`).
    pub labels: String,
}

/// How scored completions of one prompt become pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// The best against the worst completion: one pair per prompt.
    #[default]
    BestVsWorst,
    /// Every pair of completions with different scores.
    AllPairs,
    /// Completions shuffled (seeded) and paired off two by two.
    Random,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectPreferencesParams {
    /// The policy that samples completions.
    #[serde(default)]
    pub policy: Option<String>,
    /// Prompt rows (`prompt`, plus `answer`/`completion` for the rule judge).
    pub prompts: String,
    pub judge: JudgeSpec,
    #[serde(default = "default_completions")]
    pub completions_per_prompt: usize,
    #[serde(default)]
    pub pairing: Pairing,
    /// Use only the first N prompt rows.
    #[serde(default)]
    pub max_prompts: Option<usize>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Prompts per generation batch.
    #[serde(default = "default_batch_prompts")]
    pub batch_prompts: usize,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
}

fn default_completions() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    8
}
fn default_temperature() -> f64 {
    1.0
}
fn default_batch_prompts() -> usize {
    16
}

/// One line of `pairs.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_score: f64,
    pub rejected_score: f64,
    pub judge: String,
}

/// What pairing found.
#[derive(Clone, Debug, Default)]
struct PairCounts {
    pairs: usize,
    ties_dropped: usize,
}

pub struct CollectPreferencesStage;

impl Stage for CollectPreferencesStage {
    type Params = CollectPreferencesParams;
    const KIND: &'static str = "collect_preferences";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Samples completions per prompt, scores them with a judge (rule, reward model, file) and writes preference pairs";

    fn ports(params: &CollectPreferencesParams) -> Result<Ports, PortsError> {
        if params.completions_per_prompt < 2 {
            return Err(PortsError::new(
                Some("completions_per_prompt"),
                "must be at least 2 to form a pair",
            ));
        }
        if params.max_new_tokens == 0 || params.batch_prompts == 0 {
            return Err(PortsError::new(
                Some("max_new_tokens"),
                "max_new_tokens and batch_prompts must be at least 1",
            ));
        }
        let mut inputs = vec![InputPort::stage(
            "prompts",
            &params.prompts,
            &[ArtifactKind::Dataset],
        )];
        match (&params.policy, &params.judge) {
            (Some(policy), _) => {
                inputs.push(InputPort::stage("policy", policy, ArtifactKind::MODELS))
            }
            (None, JudgeSpec::File(_)) => {}
            (None, _) => {
                return Err(PortsError::new(
                    Some("policy"),
                    "a policy is needed to sample completions",
                )
                .with_hint("only `judge: { kind: file }` works without a policy"))
            }
        }
        match &params.judge {
            JudgeSpec::Rule(_) => {}
            JudgeSpec::RewardModel(judge) => inputs.push(
                InputPort::stage("judge_model", &judge.model, &[ArtifactKind::RewardModel])
                    .at_param("judge.model"),
            ),
            JudgeSpec::File(judge) => inputs.push(
                InputPort::stage("labels", &judge.labels, &[])
                    .at_param("judge.labels")
                    .allow_external(ExternalPolicy::StageOrPath),
            ),
            JudgeSpec::Human(judge) => inputs.extend(crate::label::labels_input(judge)),
        }
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("pairs", ArtifactKind::Preferences)],
        })
    }

    fn run(params: &CollectPreferencesParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut rows = read_dataset(ctx, "prompts")?;
        if let Some(max) = params.max_prompts {
            rows.truncate(max);
        }
        if let Some(index) = rows.iter().position(|r| r.prompt.is_none()) {
            return Err(StageError::failed(format!(
                "prompts row {} has no `prompt` (collect_preferences reads plain prompts)",
                index + 1
            )));
        }
        let (judge_name, candidates) = match &params.policy {
            Some(_) => sample_and_score(params, ctx, &rows)?,
            None => (String::from("file"), labelled_candidates(ctx, &rows)?),
        };
        if let JudgeSpec::Human(judge) = &params.judge {
            let texts = candidates
                .into_iter()
                .map(|c| c.into_iter().map(|(text, _)| text).collect())
                .collect();
            let all_pairs = params.pairing == Pairing::AllPairs;
            return crate::label::stage::finish(judge, all_pairs, ctx, &rows, texts);
        }
        let mut counts = PairCounts::default();
        let mut records = Vec::new();
        let mut rng = step_rng(ctx.seed, 0);
        for (row, scored) in rows.iter().zip(candidates) {
            let prompt = row.prompt.clone().unwrap_or_default();
            for (chosen, rejected) in make_pairs(&scored, params.pairing, &mut rng, &mut counts) {
                records.push(PairRecord {
                    prompt: prompt.clone(),
                    chosen: chosen.0.clone(),
                    rejected: rejected.0.clone(),
                    chosen_score: chosen.1,
                    rejected_score: rejected.1,
                    judge: judge_name.clone(),
                });
            }
        }
        counts.pairs = records.len();
        let dest = ctx.output_dir("pairs")?.to_path_buf();
        write_outputs(&dest, &records)?;
        ctx.metrics.set("prompts", rows.len() as u64);
        ctx.metrics.set("pairs", counts.pairs as u64);
        ctx.metrics.set("ties_dropped", counts.ties_dropped as u64);
        let margin = records
            .iter()
            .map(|r| r.chosen_score - r.rejected_score)
            .sum::<f64>();
        ctx.metrics
            .set("mean_margin", margin / records.len().max(1) as f64);
        eprintln!(
            "{}: {} pairs from {} prompts, {} ties dropped",
            ctx.stage,
            counts.pairs,
            rows.len(),
            counts.ties_dropped
        );
        Ok(())
    }
}

/// Scored candidates (completion text, score) per prompt row.
type Candidates = Vec<Vec<(String, f64)>>;

/// Samples `completions_per_prompt` completions per row and scores them with the judge.
fn sample_and_score(
    params: &CollectPreferencesParams,
    ctx: &mut StageContext,
    rows: &[Row],
) -> Result<(String, Candidates), StageError> {
    let policy = load_frozen_policy(ctx, "policy", params.template.as_deref(), params.add_bos)?;
    let pad = policy.codec.special.pad;
    let prompt_ids = encode_prompts(&policy.codec, rows)?;
    let scorer = match &params.judge {
        JudgeSpec::RewardModel(_) => {
            Some(RewardScorer::load(&ctx.input("judge_model")?.path, pad)?)
        }
        _ => None,
    };
    let labels = match &params.judge {
        JudgeSpec::File(_) => Some(FileLabels::load(&ctx.input("labels")?.path)?),
        _ => None,
    };
    let judge_name = match &params.judge {
        JudgeSpec::Rule(_) => "rule".to_string(),
        JudgeSpec::RewardModel(j) => format!("reward_model:{}", j.model),
        JudgeSpec::File(j) => format!("file:{}", j.labels),
        JudgeSpec::Human(_) => "human".to_string(),
    };
    let k = params.completions_per_prompt;
    let mut candidates: Candidates = Vec::with_capacity(rows.len());
    let mut unlabelled = 0usize;
    let mut task = ctx.progress.task("sample", rows.len() as u64);
    let all: Vec<usize> = (0..rows.len()).collect();
    for (batch_index, chunk) in all.chunks(params.batch_prompts).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompt_ids[i].clone()).collect();
        let settings = sampling_settings(
            &policy.codec,
            params.max_new_tokens,
            params.temperature,
            params.top_k,
            params.top_p,
            step_seed(ctx.seed, batch_index),
        );
        let rollouts = sample_rollouts(
            &policy.model,
            &prompts,
            chunk,
            k,
            &settings,
            &policy.codec.tokenizer,
        )?;
        let scores = judge_scores(
            params,
            &rollouts,
            rows,
            scorer.as_ref(),
            labels.as_ref(),
            &mut unlabelled,
        )?;
        for (group, texts) in scores.chunks(k).zip(rollouts.texts.chunks(k)) {
            candidates.push(
                texts
                    .iter()
                    .cloned()
                    .zip(group.iter().copied())
                    .filter_map(|(text, score)| score.map(|s| (text, s)))
                    .collect(),
            );
        }
        task.inc(chunk.len() as u64);
    }
    task.finish();
    ctx.metrics.set("unlabelled", unlabelled as u64);
    Ok((judge_name, candidates))
}

/// The judge's score of each rollout (`None`: no label in the file).
fn judge_scores(
    params: &CollectPreferencesParams,
    rollouts: &Rollouts,
    rows: &[Row],
    scorer: Option<&RewardScorer>,
    labels: Option<&FileLabels>,
    unlabelled: &mut usize,
) -> Result<Vec<Option<f64>>, StageError> {
    match (&params.judge, labels) {
        (JudgeSpec::File(_), Some(labels)) => Ok(rollouts
            .texts
            .iter()
            .zip(&rollouts.row_index)
            .map(|(text, &row)| {
                let score = labels.score(rows[row].prompt.as_deref().unwrap_or(""), text);
                *unlabelled += usize::from(score.is_none());
                score
            })
            .collect()),
        // Sampled only: people judge them later (crate::label).
        (JudgeSpec::Human(_), _) => Ok(vec![Some(0.0); rollouts.texts.len()]),
        (JudgeSpec::Rule(rule), _) => {
            let scored = score_rollouts(rollouts, rows, Some(rule), None)?;
            Ok(scored.scores.into_iter().map(Some).collect())
        }
        _ => {
            let scorer =
                scorer.ok_or_else(|| StageError::failed("the reward model judge is not loaded"))?;
            let scored = score_rollouts(rollouts, rows, None, Some((scorer, 1.0)))?;
            Ok(scored.scores.into_iter().map(Some).collect())
        }
    }
}

/// Without a policy: each row's labelled completions from the file judge.
fn labelled_candidates(ctx: &StageContext, rows: &[Row]) -> Result<Candidates, StageError> {
    let labels = FileLabels::load(&ctx.input("labels")?.path)?;
    Ok(rows
        .iter()
        .map(|row| labels.completions_of(row.prompt.as_deref().unwrap_or("")))
        .collect())
}

/// Pairs (chosen, rejected) of one prompt's scored completions; ties are dropped and counted.
fn make_pairs<'a>(
    scored: &'a [(String, f64)],
    pairing: Pairing,
    rng: &mut rand_chacha::ChaCha8Rng,
    counts: &mut PairCounts,
) -> Vec<(&'a (String, f64), &'a (String, f64))> {
    let mut candidate_pairs: Vec<(usize, usize)> = Vec::new();
    match pairing {
        Pairing::BestVsWorst => {
            if scored.len() >= 2 {
                // The first best and the first worst, so equal scores pick deterministically.
                let best =
                    (0..scored.len()).fold(0, |b, i| if scored[i].1 > scored[b].1 { i } else { b });
                let worst =
                    (0..scored.len()).fold(0, |w, i| if scored[i].1 < scored[w].1 { i } else { w });
                candidate_pairs.push((best, worst));
            }
        }
        Pairing::AllPairs => {
            for i in 0..scored.len() {
                for j in i + 1..scored.len() {
                    candidate_pairs.push((i, j));
                }
            }
        }
        Pairing::Random => {
            let mut order: Vec<usize> = (0..scored.len()).collect();
            shuffle(&mut order, rng);
            candidate_pairs.extend(order.chunks_exact(2).map(|c| (c[0], c[1])));
        }
    }
    let mut pairs = Vec::new();
    for (i, j) in candidate_pairs {
        let (a, b) = (&scored[i], &scored[j]);
        if a.1 == b.1 {
            counts.ties_dropped += 1;
        } else if a.1 > b.1 {
            pairs.push((a, b));
        } else {
            pairs.push((b, a));
        }
    }
    pairs
}

/// Writes `data.jsonl` (dataset rows) and `pairs.jsonl` (with scores and judge).
fn write_outputs(dest: &std::path::Path, records: &[PairRecord]) -> Result<(), StageError> {
    write_preference_artifact(dest, records, |r| Row {
        prompt: Some(r.prompt.clone()),
        chosen: Some(r.chosen.clone()),
        rejected: Some(r.rejected.clone()),
        margin: Some(r.chosen_score - r.rejected_score),
        ..Row::default()
    })
}

/// A Preferences artifact in `dest`: `data.jsonl` (the dataset row of each record, so
/// reward_model and dpo read it like any dataset) and `pairs.jsonl` (the records whole,
/// with whatever scores and provenance the judge kept). Shared with the human judge.
pub(crate) fn write_preference_artifact<T: Serialize>(
    dest: &std::path::Path,
    records: &[T],
    row_of: impl Fn(&T) -> Row,
) -> Result<(), StageError> {
    let rows: Vec<Row> = records.iter().map(row_of).collect();
    write_rows(dest, &rows).or_fail("writing data.jsonl")?;
    let path = dest.join("pairs.jsonl");
    let file = std::fs::File::create(&path).map_err(|e| StageError::io(&path, e))?;
    let mut out = std::io::BufWriter::new(file);
    for record in records {
        let line = serde_json::to_string(record).or_fail("serialising a pair")?;
        writeln!(out, "{line}").map_err(|e| StageError::io(&path, e))?;
    }
    out.flush().map_err(|e| StageError::io(&path, e))
}
