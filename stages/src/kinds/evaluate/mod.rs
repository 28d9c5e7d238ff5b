//! Stage kind `evaluate`: scores one or more models (Model or Adapter artifacts) on an
//! evaluation dataset, or scores a file of predictions with no model at all.
//!
//! ```yaml
//! eval:
//!   kind: evaluate
//!   models: [base, sft, ppo]          # stage references: Model or Adapter artifacts
//!   data: dolly.eval                  # a Dataset: rows with prompt (+ completion, answer)
//!   metrics: [rouge, perplexity, reward, accuracy, kl, win_rate]
//!   reward: rm                        # a RewardModel, for reward and win_rate
//!   reference: base                   # KL(model ‖ reference) on the generated text
//!   baseline: sft                     # win_rate: how often a model's reward beats this one's
//!   max_new_tokens: 64                # generation: greedy unless temperature > 0
//!   batch_size: 8
//!   limit: 200                        # the first 200 rows
//!   template: "{prompt}"              # default: each model's template.json
//! score:
//!   kind: evaluate
//!   predictions: preds.jsonl          # rows {"prediction", "reference", "answer"?}
//!   metrics: [rouge, accuracy]
//! ```
//!
//! Output: a Metrics artifact whose `metrics.json` holds one object per evaluated model,
//! keyed by the model's reference as written (`sft`), with `rouge1`, `rouge2`, `rougeL`
//! (mean F-measure, rouge-score's tokenisation, Porter stemming by default),
//! `perplexity` (exp of the mean NLL over all reference-completion tokens),
//! `reward_mean`, `accuracy` (exact match against `answer`), `kl` (mean over rows of
//! the summed per-token estimate), `win_rate` (ties count ½) and `n` (rows evaluated);
//! a predictions file gives the key `predictions`. `predictions.jsonl` beside it holds
//! every generated completion. Nothing time-dependent is written, so reruns are
//! byte-identical.

pub mod models;
pub mod predictions;
pub mod run;
pub mod scoring;

use crate::algo::kl::KlEstimator;
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What can go wrong evaluating; converted into a [`StageError`] naming the stage.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Algo(#[from] crate::algo::AlgoError),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{message}")]
    Invalid {
        message: String,
        hint: Option<String>,
    },
}

impl EvalError {
    pub fn invalid(message: impl Into<String>, hint: Option<&str>) -> Self {
        EvalError::Invalid {
            message: message.into(),
            hint: hint.map(str::to_string),
        }
    }

    fn into_stage_error(self, stage: &str) -> StageError {
        let hint = match &self {
            EvalError::Invalid { hint, .. } => hint.clone(),
            _ => None,
        };
        let message = format!("stage `{stage}`: {self}");
        match hint {
            Some(hint) => StageError::failed_with_hint(message, hint),
            None => StageError::failed(message),
        }
    }
}

/// A metric the stage can compute.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// ROUGE-1/2/L F-measure of the generated completion against the reference completion.
    Rouge,
    /// Perplexity of the reference completions under the model.
    Perplexity,
    /// Mean reward of the generated completions under `reward`.
    Reward,
    /// Exact match of the generated answer against the row's `answer`.
    Accuracy,
    /// KL to `reference` on the generated completions.
    Kl,
    /// How often the model's completion out-scores `baseline`'s under `reward`.
    WinRate,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Rouge => "rouge",
            Metric::Perplexity => "perplexity",
            Metric::Reward => "reward",
            Metric::Accuracy => "accuracy",
            Metric::Kl => "kl",
            Metric::WinRate => "win_rate",
        }
    }

    /// Whether the metric reads generated completions (and so needs generation).
    fn needs_generation(self) -> bool {
        !matches!(self, Metric::Perplexity)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// Stage references of the models to evaluate (Model or Adapter artifacts).
    #[serde(default)]
    pub models: Vec<String>,
    /// The evaluation Dataset (a stage reference such as `dolly.eval`).
    #[serde(default)]
    pub data: Option<String>,
    /// Instead of models: a JSONL file (or a stage output holding `predictions.jsonl`)
    /// with `prediction` and `reference` (and optionally `answer`) per row.
    #[serde(default)]
    pub predictions: Option<String>,
    #[serde(default = "default_metrics")]
    pub metrics: Vec<Metric>,
    /// A RewardModel stage, for `reward` and `win_rate`.
    #[serde(default)]
    pub reward: Option<String>,
    /// The model KL is measured against (usually the base of the evaluated models).
    #[serde(default)]
    pub reference: Option<String>,
    /// The model whose completions `win_rate` compares against.
    #[serde(default)]
    pub baseline: Option<String>,
    /// A plain prompt template (with `{prompt}`) for every evaluated model and the
    /// baseline; default: each model's template.json (its training stage writes one),
    /// else "User: {prompt}\n\nAssistant: ".
    #[serde(default)]
    pub template: Option<String>,
    /// Prepend bos to prompts; default: the tokenizer's `add_bos_token`.
    #[serde(default)]
    pub add_bos: Option<bool>,
    /// Per-token KL estimator: k1 (TRL's default), k3 or mse.
    #[serde(default = "default_kl_estimator")]
    pub kl_estimator: KlEstimator,
    /// Porter-stem tokens for ROUGE, as rouge-score's `use_stemmer=True`.
    #[serde(default = "default_true")]
    pub stemmer: bool,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Rows per generation and scoring batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Sampling seed (default: the stage seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Evaluate only the first `limit` rows.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_metrics() -> Vec<Metric> {
    vec![Metric::Rouge, Metric::Perplexity]
}
fn default_kl_estimator() -> KlEstimator {
    KlEstimator::K1
}
fn default_true() -> bool {
    true
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_batch_size() -> usize {
    8
}

pub struct EvaluateStage;

impl Stage for EvaluateStage {
    type Params = EvaluateParams;
    const KIND: &'static str = "evaluate";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Score models (ROUGE, perplexity, reward, accuracy, KL, win rate) on a dataset, or a predictions file";

    fn ports(params: &EvaluateParams) -> Result<Ports, PortsError> {
        check_params(params)?;
        let mut inputs = Vec::new();
        if let Some(predictions) = &params.predictions {
            inputs.push(
                InputPort::stage("predictions", predictions, &[])
                    .allow_external(ExternalPolicy::StageOrPath),
            );
        }
        for (index, model) in params.models.iter().enumerate() {
            let name = format!("models.{index}");
            inputs.push(InputPort::stage(&name, model, ArtifactKind::MODELS));
        }
        if let Some(data) = &params.data {
            inputs.push(InputPort::stage("data", data, &[ArtifactKind::Dataset]));
        }
        if let Some(reward) = &params.reward {
            inputs.push(InputPort::stage(
                "reward",
                reward,
                &[ArtifactKind::RewardModel],
            ));
        }
        if let Some(reference) = &params.reference {
            inputs.push(InputPort::stage(
                "reference",
                reference,
                ArtifactKind::MODELS,
            ));
        }
        if let Some(baseline) = &params.baseline {
            inputs.push(InputPort::stage("baseline", baseline, ArtifactKind::MODELS));
        }
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("metrics", ArtifactKind::Metrics)],
        })
    }

    fn run(params: &EvaluateParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let stage = ctx.stage.clone();
        let result = match params.predictions {
            Some(_) => predictions::score_predictions_input(params, ctx),
            None => run::evaluate_models(params, ctx),
        };
        result.map_err(|e| e.into_stage_error(&stage))
    }
}

/// Checks what serde cannot: one mode, the inputs each metric needs, sane numbers.
fn check_params(params: &EvaluateParams) -> Result<(), PortsError> {
    let needs = |metric: Metric, param: &str, what: &str| -> Result<(), PortsError> {
        Err(PortsError::new(
            Some(param),
            format!("metric `{}` needs `{param}`", metric.name()),
        )
        .with_hint(what.to_string()))
    };
    if params.metrics.is_empty() {
        return Err(PortsError::new(Some("metrics"), "no metrics to compute")
            .with_hint("e.g. `metrics: [rouge, perplexity]`"));
    }
    if params.predictions.is_some() {
        if !params.models.is_empty() || params.data.is_some() {
            return Err(PortsError::new(
                Some("predictions"),
                "give either `predictions` or `models` with `data`, not both",
            ));
        }
        if let Some(metric) = params
            .metrics
            .iter()
            .find(|m| !matches!(m, Metric::Rouge | Metric::Accuracy))
        {
            return Err(PortsError::new(
                Some("metrics"),
                format!(
                    "metric `{}` needs a model; a predictions file gives only rouge and accuracy",
                    metric.name()
                ),
            ));
        }
        return Ok(());
    }
    if params.models.is_empty() {
        return Err(
            PortsError::new(Some("models"), "no models to evaluate").with_hint(
                "e.g. `models: [base, sft]`, or `predictions: FILE` to score a predictions file",
            ),
        );
    }
    if params.data.is_none() {
        return Err(PortsError::new(Some("data"), "needs an evaluation dataset")
            .with_hint("e.g. `data: dolly.eval`"));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(duplicate) = params.models.iter().find(|m| !seen.insert(m.as_str())) {
        return Err(PortsError::new(
            Some("models"),
            format!("`{duplicate}` is listed twice (metrics are keyed by model)"),
        ));
    }
    for &metric in &params.metrics {
        match metric {
            Metric::Reward if params.reward.is_none() => {
                needs(metric, "reward", "name a reward_model stage: `reward: rm`")?
            }
            Metric::WinRate if params.reward.is_none() => needs(
                metric,
                "reward",
                "win rate is judged by a reward model: `reward: rm`",
            )?,
            Metric::WinRate if params.baseline.is_none() => needs(
                metric,
                "baseline",
                "name the model to compare against: `baseline: sft`",
            )?,
            Metric::Kl if params.reference.is_none() => needs(
                metric,
                "reference",
                "name the model to measure KL against: `reference: base`",
            )?,
            _ => {}
        }
    }
    if params.max_new_tokens == 0 && params.metrics.iter().any(|m| m.needs_generation()) {
        return Err(PortsError::new(
            Some("max_new_tokens"),
            "must be at least 1",
        ));
    }
    if let Some(template) = &params.template {
        crate::data::PromptTemplate::plain(template)
            .map_err(|e| PortsError::new(Some("template"), e.to_string()))?;
    }
    if params.batch_size == 0 {
        return Err(PortsError::new(Some("batch_size"), "must be at least 1"));
    }
    if params.temperature < 0.0 || !params.temperature.is_finite() {
        return Err(PortsError::new(
            Some("temperature"),
            "must be 0 (greedy) or positive",
        ));
    }
    Ok(())
}
