//! Scoring text without a model: ROUGE and exact-match accuracy over (prediction,
//! reference, answer) rows, and the `predictions: FILE` mode of the `evaluate` stage.

use super::{EvalError, EvaluateParams, Metric};
use crate::eval::metrics::exact_match;
use crate::eval::rouge::rouge_scores;
use rlhf_engine::StageContext;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The file of generated completions written beside metrics.json.
pub const PREDICTIONS_FILE: &str = "predictions.jsonl";

/// One scored row: the generated text and what it is compared with.
#[derive(Clone, Debug, Default)]
pub struct ScoredText {
    pub prediction: String,
    pub reference: Option<String>,
    pub answer: Option<String>,
}

/// ROUGE (mean F-measure over rows with a reference) and accuracy (over rows with an
/// answer), as asked for by `metrics`. A metric no row can support is an error.
pub fn text_metrics(
    texts: &[ScoredText],
    metrics: &[Metric],
    stemmer: bool,
) -> Result<Map<String, Value>, EvalError> {
    let mut out = Map::new();
    if metrics.contains(&Metric::Rouge) {
        let scored: Vec<_> = texts
            .iter()
            .filter_map(|t| {
                t.reference
                    .as_deref()
                    .map(|r| rouge_scores(r, &t.prediction, stemmer))
            })
            .collect();
        if scored.is_empty() {
            return Err(EvalError::invalid(
                "metric `rouge` needs reference completions, and no row has one",
                Some("rows need `completion` (or `messages` ending with an assistant turn)"),
            ));
        }
        let n = scored.len() as f64;
        out.insert(
            "rouge1".into(),
            json!(scored.iter().map(|s| s.rouge1.fmeasure).sum::<f64>() / n),
        );
        out.insert(
            "rouge2".into(),
            json!(scored.iter().map(|s| s.rouge2.fmeasure).sum::<f64>() / n),
        );
        out.insert(
            "rougeL".into(),
            json!(scored.iter().map(|s| s.rouge_l.fmeasure).sum::<f64>() / n),
        );
    }
    if metrics.contains(&Metric::Accuracy) {
        let judged: Vec<bool> = texts
            .iter()
            .filter_map(|t| t.answer.as_deref().map(|a| exact_match(&t.prediction, a)))
            .collect();
        if judged.is_empty() {
            return Err(EvalError::invalid(
                "metric `accuracy` needs gold answers, and no row has an `answer`",
                Some("drop `accuracy` from `metrics`, or evaluate on rows with `answer`"),
            ));
        }
        let correct = judged.iter().filter(|&&c| c).count();
        out.insert(
            "accuracy".into(),
            json!(correct as f64 / judged.len() as f64),
        );
    }
    out.insert("n".into(), json!(texts.len()));
    Ok(out)
}

/// Predictions mode: the `predictions` input is a JSONL file, or a folder holding
/// `predictions.jsonl`.
pub fn score_predictions_input(
    params: &EvaluateParams,
    ctx: &mut StageContext,
) -> Result<(), EvalError> {
    let input = ctx
        .input("predictions")
        .map_err(|e| EvalError::invalid(e.to_string(), None))?;
    let path = if input.path.is_dir() {
        input.path.join(PREDICTIONS_FILE)
    } else {
        input.path.clone()
    };
    let mut texts = read_predictions(&path)?;
    if let Some(limit) = params.limit {
        texts.truncate(limit);
    }
    let mut task = ctx.progress.task("score predictions", texts.len() as u64);
    let metrics = text_metrics(&texts, &params.metrics, params.stemmer)?;
    task.inc(texts.len() as u64);
    task.finish();
    ctx.metrics.set("predictions", Value::Object(metrics));
    Ok(())
}

/// Reads rows with a string `prediction` and optional `reference` and `answer`.
pub fn read_predictions(path: &Path) -> Result<Vec<ScoredText>, EvalError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::invalid(format!("{}: {e}", path.display()), None))?;
    let mut rows = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", path.display(), index + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| EvalError::invalid(format!("{}: invalid JSON: {e}", at()), None))?;
        let field = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        let prediction = field("prediction").ok_or_else(|| {
            EvalError::invalid(
                format!("{}: no string `prediction`", at()),
                Some("each line must be {\"prediction\": ..., \"reference\": ...}"),
            )
        })?;
        rows.push(ScoredText {
            prediction,
            reference: field("reference"),
            answer: field("answer"),
        });
    }
    Ok(rows)
}
