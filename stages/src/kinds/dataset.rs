//! Stage kind `dataset`: reads a source (a local file or folder, a `hf://datasets/...`
//! repository resolved by the engine, another stage's dataset, or the built-in
//! `synthetic` generator), maps it through a format into rows, filters, samples and
//! splits it, and writes one Dataset artifact per split (`dolly.train`, `dolly.eval`),
//! or one named `data` with no split.
//!
//! ```yaml
//! dolly:
//!   kind: dataset
//!   source: hf://datasets/databricks/databricks-dolly-15k
//!   format: dolly
//!   split: { train: 0.95, eval: 0.05 }
//! arith:
//!   kind: dataset
//!   source: { synthetic: { count: 20000, operations: ["+", "-"], min: 0, max: 99 } }
//!   split: { train: 19800, eval: 200 }
//! ```
//!
//! A hub repository often holds several splits as files (`data/train-00000-of-00001.parquet`,
//! `data/test-…`); `files: "data/train-*"` reads only the matching ones. Folders are read
//! recursively in sorted path order; files other than .jsonl/.json/.csv/.parquet (and
//! their .gz forms) are ignored.
//!
//! Order of operations: read (up to `limit` rows, in file order) → length `filters` →
//! `sample` → `split` → order within each split (source order, or a seeded shuffle with
//! `shuffle: true`). Selection is seeded and stable (see `data::select`).

use crate::data::format::{check_field_map, FieldMap, Format};
use crate::data::load::{load_rows, LoadOptions, OnError};
use crate::data::row::{write_rows, Row, DATA_FILE};
use crate::data::select::{
    check_split_spec, filter_by_length, select, LengthFilter, SelectPlan, SplitSpec,
};
use crate::data::synthetic::{generate, SyntheticSpec};
use crate::data::tokenizer::load_tokenizer;
use crate::data::DataError;
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where rows come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DatasetSource {
    /// A local file or folder, `hf://datasets/org/name[@revision][/path]`, or a stage
    /// output holding rows.
    Reference(String),
    /// The built-in generator: `{synthetic: {count: 1000, ...}}`.
    Synthetic { synthetic: SyntheticSpec },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    pub source: DatasetSource,
    /// How records map to rows; `auto` decides from the first record's keys.
    #[serde(default)]
    pub format: Format,
    /// Source column names by field name, e.g. `{prompt: question, completion: answer}`.
    #[serde(default)]
    pub fields: FieldMap,
    /// Inside a folder source, only files whose relative path matches this glob (`*`).
    #[serde(default)]
    pub files: Option<String>,
    /// Split names and sizes (fractions or counts); no split writes one output `data`.
    #[serde(default)]
    pub split: Option<SplitSpec>,
    /// Shuffle rows within each output (seeded); otherwise keep the source order.
    #[serde(default)]
    pub shuffle: bool,
    /// Read at most this many rows, in file order.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Keep this many rows chosen at random (seeded), before splitting.
    #[serde(default)]
    pub sample: Option<usize>,
    /// Token-length bounds; need `tokenizer`.
    #[serde(default)]
    pub filters: LengthFilter,
    /// A tokenizer or model whose tokenizer measures lengths for `filters`.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// `fail` (default) stops at a malformed record; `skip` skips and counts it.
    #[serde(default)]
    pub on_error: OnError,
    /// Overrides the stage seed (derived from the pipeline seed and the stage name).
    #[serde(default)]
    pub seed: Option<u64>,
}

pub struct DatasetStage;

impl Stage for DatasetStage {
    type Params = DatasetParams;
    const KIND: &'static str = "dataset";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Read, map, filter and split a dataset (files, hf://datasets, or synthetic arithmetic)";

    fn ports(params: &DatasetParams) -> Result<Ports, PortsError> {
        let mut ports = Ports::default();
        match &params.source {
            DatasetSource::Reference(reference) => ports.inputs.push(
                InputPort::stage(
                    "source",
                    reference,
                    &[
                        ArtifactKind::Dataset,
                        ArtifactKind::Preferences,
                        ArtifactKind::Files,
                    ],
                )
                .allow_external(ExternalPolicy::StageOrPathOrHub),
            ),
            DatasetSource::Synthetic { synthetic } => synthetic.check().map_err(ports_error)?,
        }
        check_field_map(params.format, &params.fields).map_err(ports_error)?;
        if let Some(split) = &params.split {
            check_split_spec(split).map_err(ports_error)?;
        }
        match (&params.tokenizer, params.filters.is_empty()) {
            (Some(tokenizer), _) => ports.inputs.push(
                InputPort::stage(
                    "tokenizer",
                    tokenizer,
                    &[ArtifactKind::Tokenizer, ArtifactKind::Model],
                )
                .allow_external(ExternalPolicy::StageOrPathOrHub),
            ),
            (None, false) => {
                return Err(PortsError::new(
                    Some("filters"),
                    "length filters count tokens and need a tokenizer",
                )
                .with_hint("add `tokenizer: <a tokenizer or model stage, folder or hf:// id>`"))
            }
            (None, true) => {}
        }
        let names: Vec<String> = match &params.split {
            Some(split) => split.keys().cloned().collect(),
            None => vec!["data".to_string()],
        };
        ports.outputs = names
            .iter()
            .map(|n| OutputPort::new(n, ArtifactKind::Dataset))
            .collect();
        Ok(ports)
    }

    fn run(params: &DatasetParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let seed = params.seed.unwrap_or(ctx.seed);
        let (rows, skipped, format) = read_source(params, ctx, seed)?;
        ctx.metrics.set("rows_read", rows.len() + skipped);
        ctx.metrics.set("rows_skipped", skipped);
        ctx.metrics.set("format", format.as_str());
        let (rows, filtered) = match &params.tokenizer {
            Some(_) => {
                let tokenizer = load_tokenizer(&ctx.input("tokenizer")?.path)?;
                let count = |text: &str| -> Result<usize, DataError> {
                    tokenizer
                        .encode_fast(text, false)
                        .map(|e| e.len())
                        .map_err(|e| DataError::tokenizer("(filters)", e.to_string()))
                };
                filter_by_length(rows, &params.filters, &count)?
            }
            None => (rows, 0),
        };
        ctx.metrics.set("rows_filtered", filtered);
        let plan = SelectPlan {
            sample: params.sample,
            split: params.split.clone(),
            shuffle: params.shuffle,
        };
        for (name, rows) in select(rows, &plan, seed)? {
            ctx.metrics.set(&format!("rows_{name}"), rows.len());
            write_rows(ctx.output_dir(&name)?, &rows)?;
        }
        Ok(())
    }
}

/// Rows from the source, how many records were skipped, and the format used.
fn read_source(
    params: &DatasetParams,
    ctx: &StageContext,
    seed: u64,
) -> Result<(Vec<Row>, usize, Format), StageError> {
    let reference = match &params.source {
        DatasetSource::Synthetic { synthetic } => {
            let mut rows = generate(synthetic, seed)?;
            if let Some(limit) = params.limit {
                rows.truncate(limit);
            }
            return Ok((rows, 0, Format::Rows));
        }
        DatasetSource::Reference(reference) => reference,
    };
    let input = ctx.input("source")?;
    let (path, default_format): (PathBuf, Format) = match input.kind {
        Some(ArtifactKind::Dataset) => (input.path.join(DATA_FILE), Format::Rows),
        Some(ArtifactKind::Preferences) => (input.path.join("pairs.jsonl"), Format::Preference),
        _ => (input.path.clone(), Format::Auto),
    };
    let format = if params.format == Format::Auto {
        default_format
    } else {
        params.format
    };
    let options = LoadOptions {
        format,
        fields: params.fields.clone(),
        on_error: params.on_error,
        files: params.files.clone(),
        limit: params.limit,
    };
    let loaded = load_rows(&path, &options).map_err(|e| with_reference(e, reference))?;
    for example in &loaded.skip_examples {
        tracing::warn!(stage = %ctx.stage, "skipped: {example}");
    }
    Ok((loaded.rows, loaded.skipped, loaded.format))
}

fn with_reference(error: DataError, reference: &str) -> StageError {
    let error: StageError = error.into();
    match error {
        StageError::Failed { message, hint } if !message.contains(reference) => {
            StageError::Failed {
                message: format!("source `{reference}`: {message}"),
                hint,
            }
        }
        other => other,
    }
}

fn ports_error(error: DataError) -> PortsError {
    match error {
        DataError::Param { param, message } => PortsError::new(Some(&param), message),
        other => PortsError::new(None, other.to_string()),
    }
}
