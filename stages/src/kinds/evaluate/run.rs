//! The models mode of the `evaluate` stage, step by step: load each model, generate
//! (when a metric needs it), score, then compare with the baseline.

use super::models::{load_model, load_reward_model, LoadedModel, LoadedRewardModel};
use super::predictions::{text_metrics, ScoredText, PREDICTIONS_FILE};
use super::scoring::{completion_nll, generate_completions, sequence_kl, sequence_rewards};
use super::{EvalError, EvaluateParams, Metric};
use crate::data::batch::EncodedExample;
use crate::data::PromptTemplate;
use crate::data::{read_rows, Message, Row};
use crate::model::GenerationSettings;
use rlhf_engine::progress::Progress;
use rlhf_engine::StageContext;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The reference completion of a row: `completion`, or the last assistant turn.
fn reference_completion(row: &Row) -> Option<String> {
    row.completion.clone().or_else(|| {
        row.split_last_assistant()
            .map(|(_, reply)| reply.to_string())
    })
}

/// The row with its reference replaced by `completion` (for a reward model to read).
fn with_completion(row: &Row, completion: &str) -> Row {
    if let Some((before, _)) = row.split_last_assistant() {
        let mut messages = before.to_vec();
        messages.push(Message::new("assistant", completion));
        return Row {
            messages: Some(messages),
            ..Row::default()
        };
    }
    if let Some(messages) = &row.messages {
        let mut messages = messages.clone();
        messages.push(Message::new("assistant", completion));
        return Row {
            messages: Some(messages),
            ..Row::default()
        };
    }
    Row {
        prompt: row.prompt.clone(),
        completion: Some(completion.to_string()),
        ..Row::default()
    }
}

/// What one model produced on the dataset.
struct ModelRun {
    name: String,
    completions: Vec<String>,
    rewards: Option<Vec<f64>>,
    metrics: Map<String, Value>,
}

/// Models mode: for each model, generate (when a metric needs it), then score.
pub fn evaluate_models(params: &EvaluateParams, ctx: &mut StageContext) -> Result<(), EvalError> {
    let data_dir = input_path(ctx, "data")?;
    let mut rows = read_rows(&data_dir)?;
    if let Some(limit) = params.limit {
        rows.truncate(limit);
    }
    if rows.is_empty() {
        return Err(EvalError::invalid(
            format!("{}: the evaluation dataset has no rows", data_dir.display()),
            None,
        ));
    }
    let lookup = |digest: &str| ctx.artifact_path(digest);
    let progress = ctx.progress.clone();
    let reward_model = match &params.reward {
        Some(_) => Some(load_reward_model(&input_path(ctx, "reward")?, &lookup)?),
        None => None,
    };
    let reference = match (&params.reference, params.metrics.contains(&Metric::Kl)) {
        (Some(_), true) => Some(load_model(&input_path(ctx, "reference")?, &lookup)?),
        _ => None,
    };
    let seed = params.seed.unwrap_or(ctx.seed);
    let mut runs = Vec::new();
    for (index, name) in params.models.iter().enumerate() {
        let loaded = load_evaluated(
            &input_path(ctx, &format!("models.{index}"))?,
            &lookup,
            params,
        )?;
        let run = evaluate_one(
            name,
            &loaded,
            &rows,
            params,
            seed,
            reward_model.as_ref(),
            reference.as_ref(),
            &progress,
        )?;
        runs.push(run);
    }
    if params.metrics.contains(&Metric::WinRate) {
        add_win_rates(
            &mut runs,
            &rows,
            params,
            seed,
            reward_model.as_ref(),
            &|| load_evaluated(&input_path(ctx, "baseline")?, &lookup, params),
            &progress,
        )?;
    }
    write_predictions(ctx, &rows, &runs)?;
    for run in runs {
        ctx.metrics.set(&run.name, Value::Object(run.metrics));
    }
    Ok(())
}

/// A model to generate with, with the stage's `template` and `add_bos` applied.
fn load_evaluated(
    path: &Path,
    lookup: super::models::DigestLookup,
    params: &EvaluateParams,
) -> Result<LoadedModel, EvalError> {
    let mut loaded = load_model(path, lookup)?;
    if let Some(template) = &params.template {
        loaded.renderer = PromptTemplate::plain(template)?.renderer()?;
    }
    if let Some(add_bos) = params.add_bos {
        loaded.add_bos = add_bos;
    }
    Ok(loaded)
}

fn input_path(ctx: &StageContext, name: &str) -> Result<PathBuf, EvalError> {
    ctx.input(name)
        .map(|i| i.path.clone())
        .map_err(|e| EvalError::invalid(e.to_string(), None))
}

#[allow(clippy::too_many_arguments)]
fn evaluate_one(
    name: &str,
    loaded: &LoadedModel,
    rows: &[Row],
    params: &EvaluateParams,
    seed: u64,
    reward_model: Option<&LoadedRewardModel>,
    reference: Option<&LoadedModel>,
    progress: &Progress,
) -> Result<ModelRun, EvalError> {
    let mut metrics = Map::new();
    if params.metrics.contains(&Metric::Perplexity) {
        metrics.insert(
            "perplexity".into(),
            json!(reference_perplexity(name, loaded, rows, params, progress)?),
        );
    }
    let generating = params.metrics.iter().any(|m| m.needs_generation());
    let Generated {
        prompts,
        completions: generated,
    } = if generating {
        generate_rows(name, loaded, rows, params, seed, progress)?
    } else {
        Generated {
            prompts: Vec::new(),
            completions: Vec::new(),
        }
    };
    let completions = generated
        .iter()
        .map(|ids| loaded.decode(ids))
        .collect::<Result<Vec<_>, _>>()?;
    let texts: Vec<ScoredText> = rows
        .iter()
        .zip(&completions)
        .map(|(row, prediction)| ScoredText {
            prediction: prediction.clone(),
            reference: reference_completion(row),
            answer: row.answer.clone(),
        })
        .collect();
    let text_metric_list: Vec<Metric> = params
        .metrics
        .iter()
        .copied()
        .filter(|m| matches!(m, Metric::Rouge | Metric::Accuracy))
        .collect();
    metrics.extend(text_metrics(&texts, &text_metric_list, params.stemmer)?);
    metrics.insert("n".into(), json!(rows.len()));
    let rewards = match reward_model.filter(|_| generating) {
        Some(rm) => Some(reward_completions(
            name,
            rm,
            rows,
            &completions,
            params,
            progress,
        )?),
        None => None,
    };
    if let (Some(rewards), true) = (&rewards, params.metrics.contains(&Metric::Reward)) {
        metrics.insert("reward_mean".into(), json!(mean(rewards)));
    }
    if let Some(reference) = reference {
        let examples: Vec<EncodedExample> = prompts
            .into_iter()
            .zip(generated)
            .map(|(prompt, completion)| EncodedExample { prompt, completion })
            .collect();
        let mut task = progress.task(&format!("kl {name}"), examples.len() as u64);
        let kls = sequence_kl(
            &loaded.model,
            &reference.model,
            &examples,
            loaded.special.pad,
            params.kl_estimator,
            params.batch_size,
            &mut task,
        )?;
        task.finish();
        metrics.insert("kl".into(), json!(mean(&kls)));
    }
    Ok(ModelRun {
        name: name.to_string(),
        completions,
        rewards,
        metrics,
    })
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Perplexity of the rows' reference completions, tokenised as training does.
fn reference_perplexity(
    name: &str,
    loaded: &LoadedModel,
    rows: &[Row],
    params: &EvaluateParams,
    progress: &Progress,
) -> Result<f64, EvalError> {
    let with_reference: Vec<Row> = rows
        .iter()
        .filter(|r| reference_completion(r).is_some())
        .cloned()
        .collect();
    let examples: Vec<EncodedExample> = loaded
        .encoder()
        .encode_examples(&with_reference)?
        .into_iter()
        .flatten()
        .collect();
    let mut task = progress.task(&format!("perplexity {name}"), examples.len() as u64);
    let accumulator = completion_nll(
        &loaded.model,
        &examples,
        loaded.special.pad,
        params.batch_size,
        &mut task,
    )?;
    task.finish();
    accumulator.perplexity().ok_or_else(|| {
        EvalError::invalid(
            "metric `perplexity` needs reference completions, and no row has one",
            Some("rows need `completion` (or `messages` ending with an assistant turn)"),
        )
    })
}

/// Prompt ids and generated ids of every row.
struct Generated {
    prompts: Vec<Vec<u32>>,
    completions: Vec<Vec<u32>>,
}

fn generate_rows(
    name: &str,
    loaded: &LoadedModel,
    rows: &[Row],
    params: &EvaluateParams,
    seed: u64,
    progress: &Progress,
) -> Result<Generated, EvalError> {
    let encoder = loaded.encoder();
    let prompts = rows
        .iter()
        .map(|row| encoder.encode_prompt(row))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = generation_settings(loaded, params, seed);
    let mut task = progress.task(&format!("generate {name}"), rows.len() as u64);
    let generated =
        generate_completions(loaded, &prompts, &settings, params.batch_size, &mut task)?;
    task.finish();
    Ok(Generated {
        prompts,
        completions: generated,
    })
}

/// The generation settings of the stage's params for one model.
pub fn generation_settings(
    loaded: &LoadedModel,
    params: &EvaluateParams,
    seed: u64,
) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens: params.max_new_tokens,
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        eos_token_ids: loaded.eos_token_ids.clone(),
        stop_strings: Vec::new(),
        seed,
        pad_token_id: loaded.special.pad,
    }
}

/// Rewards of generated completions, each re-tokenised the reward model's way.
fn reward_completions(
    name: &str,
    reward_model: &LoadedRewardModel,
    rows: &[Row],
    completions: &[String],
    params: &EvaluateParams,
    progress: &Progress,
) -> Result<Vec<f64>, EvalError> {
    let judged: Vec<Row> = rows
        .iter()
        .zip(completions)
        .map(|(r, c)| with_completion(r, c))
        .collect();
    let examples: Vec<EncodedExample> = reward_model
        .loaded
        .encoder()
        .encode_examples(&judged)?
        .into_iter()
        .flatten()
        .collect();
    let mut task = progress.task(&format!("reward {name}"), examples.len() as u64);
    let rewards = sequence_rewards(reward_model, &examples, params.batch_size, &mut task)?;
    task.finish();
    Ok(rewards)
}

/// Win rate of every model against the baseline's completions (generated here unless
/// the baseline is one of the evaluated models): 1 per row won, ½ per tie.
fn add_win_rates(
    runs: &mut [ModelRun],
    rows: &[Row],
    params: &EvaluateParams,
    seed: u64,
    reward_model: Option<&LoadedRewardModel>,
    load_baseline: &dyn Fn() -> Result<LoadedModel, EvalError>,
    progress: &Progress,
) -> Result<(), EvalError> {
    let (Some(baseline_name), Some(reward_model)) = (&params.baseline, reward_model) else {
        return Ok(());
    };
    let baseline_rewards = match runs.iter().find(|r| &r.name == baseline_name) {
        Some(run) => run.rewards.clone().unwrap_or_default(),
        None => {
            let loaded = load_baseline()?;
            let generated = generate_rows(baseline_name, &loaded, rows, params, seed, progress)?;
            let completions = generated
                .completions
                .iter()
                .map(|ids| loaded.decode(ids))
                .collect::<Result<Vec<_>, _>>()?;
            reward_completions(
                baseline_name,
                reward_model,
                rows,
                &completions,
                params,
                progress,
            )?
        }
    };
    for run in runs.iter_mut() {
        let Some(rewards) = &run.rewards else {
            continue;
        };
        let scores: Vec<f64> = rewards
            .iter()
            .zip(&baseline_rewards)
            .map(|(model, baseline)| match model.total_cmp(baseline) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            })
            .collect();
        run.metrics.insert("win_rate".into(), json!(mean(&scores)));
    }
    Ok(())
}

/// `predictions.jsonl`: one line per (model, row), in model then row order.
fn write_predictions(ctx: &StageContext, rows: &[Row], runs: &[ModelRun]) -> Result<(), EvalError> {
    let path = ctx
        .output_dir("metrics")
        .map_err(|e| EvalError::invalid(e.to_string(), None))?
        .join(PREDICTIONS_FILE);
    let io_error = |e: std::io::Error| EvalError::invalid(format!("{}: {e}", path.display()), None);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io_error)?);
    for run in runs {
        for (index, (row, prediction)) in rows.iter().zip(&run.completions).enumerate() {
            let mut line = Map::new();
            line.insert("model".into(), json!(run.name));
            line.insert("index".into(), json!(index));
            if let Some(prompt) = &row.prompt {
                line.insert("prompt".into(), json!(prompt));
            }
            if let Some(messages) = &row.messages {
                line.insert("messages".into(), json!(messages));
            }
            line.insert("prediction".into(), json!(prediction));
            if let Some(reference) = reference_completion(row) {
                line.insert("reference".into(), json!(reference));
            }
            if let Some(reward) = run.rewards.as_ref().and_then(|r| r.get(index)) {
                line.insert("reward".into(), json!(reward));
            }
            writeln!(file, "{}", Value::Object(line)).map_err(io_error)?;
        }
    }
    file.flush().map_err(io_error)
}
