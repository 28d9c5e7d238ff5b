//! Stage kind `train_tokenizer`: trains a byte-level BPE tokenizer on every text field
//! of a dataset and writes a Tokenizer artifact (`tokenizer.json`,
//! `tokenizer_config.json` with bos/eos/pad, and `template.json` when a prompt template
//! is given), usable wherever a model's tokenizer is.
//!
//! ```yaml
//! tok:
//!   kind: train_tokenizer
//!   data: arith.train
//!   vocab_size: 512
//!   template: "{prompt}"
//! ```
//!
//! Defaults follow ../shared/bench/trl/train_tokenizer.py: `<|pad|>`=0, `<|bos|>`=1,
//! `<|eos|>`=2, every digit its own token, no special tokens added when encoding. Two runs
//! on the same data write identical bytes.

use crate::data::load::{load_rows, LoadOptions};
use crate::data::row::{DATA_FILE, TEXT_FIELDS};
use crate::data::template::PromptTemplate;
use crate::data::tokenizer::{
    tokenizer_json, train_bpe, BpeSettings, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use crate::data::{DataError, Format};
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainTokenizerParams {
    /// A dataset stage output, or a data file or folder.
    pub data: String,
    /// Row fields to learn from (prompt, completion, messages, chosen, rejected, text);
    /// empty (the default) takes every text field. `[text]` trains on pretraining text
    /// only, as the TRL reference tokenizer was.
    #[serde(default)]
    pub fields: Vec<String>,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// A pair must occur this often to be merged.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// Special tokens, given the first ids in this order.
    #[serde(default = "default_special_tokens")]
    pub special_tokens: Vec<String>,
    #[serde(default = "default_pad")]
    pub pad_token: String,
    #[serde(default = "default_bos")]
    pub bos_token: String,
    #[serde(default = "default_eos")]
    pub eos_token: String,
    /// Split every digit into its own token.
    #[serde(default = "default_true")]
    pub individual_digits: bool,
    /// Longest sequence models using this tokenizer expect (tokenizer_config.json).
    #[serde(default = "default_model_max_length")]
    pub model_max_length: usize,
    /// A prompt template (`{prompt}` marks the prompt) kept with the tokenizer.
    #[serde(default)]
    pub template: Option<String>,
}

fn default_vocab_size() -> usize {
    512
}
fn default_min_frequency() -> u64 {
    2
}
fn default_special_tokens() -> Vec<String> {
    vec![default_pad(), default_bos(), default_eos()]
}
fn default_pad() -> String {
    "<|pad|>".into()
}
fn default_bos() -> String {
    "<|bos|>".into()
}
fn default_eos() -> String {
    "<|eos|>".into()
}
fn default_true() -> bool {
    true
}
fn default_model_max_length() -> usize {
    256
}

pub struct TrainTokenizerStage;

impl Stage for TrainTokenizerStage {
    type Params = TrainTokenizerParams;
    const KIND: &'static str = "train_tokenizer";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Train a byte-level BPE tokenizer on a dataset's text";

    fn ports(params: &TrainTokenizerParams) -> Result<Ports, PortsError> {
        for (param, token) in [
            ("pad_token", &params.pad_token),
            ("bos_token", &params.bos_token),
            ("eos_token", &params.eos_token),
        ] {
            if !params.special_tokens.contains(token) {
                return Err(PortsError::new(
                    Some(param),
                    format!("{token:?} is not one of `special_tokens`"),
                ));
            }
        }
        let minimum = 256 + params.special_tokens.len();
        if params.vocab_size < minimum {
            return Err(PortsError::new(
                Some("vocab_size"),
                format!("must be at least {minimum} (256 byte tokens plus the special tokens)"),
            ));
        }
        if let Some(template) = &params.template {
            PromptTemplate::plain(template)
                .map_err(|e| PortsError::new(Some("template"), e.to_string()))?;
        }
        if let Some(unknown) = params
            .fields
            .iter()
            .find(|f| !TEXT_FIELDS.contains(&f.as_str()))
        {
            return Err(
                PortsError::new(Some("fields"), format!("unknown field `{unknown}`"))
                    .with_hint(format!("text fields are {}", TEXT_FIELDS.join(", "))),
            );
        }
        Ok(Ports {
            inputs: vec![
                InputPort::stage("data", &params.data, &[ArtifactKind::Dataset])
                    .allow_external(ExternalPolicy::StageOrPath),
            ],
            outputs: vec![OutputPort::new("tokenizer", ArtifactKind::Tokenizer)],
        })
    }

    fn run(params: &TrainTokenizerParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let input = ctx.input("data")?;
        let (path, format) = match input.kind {
            Some(ArtifactKind::Dataset) => (input.path.join(DATA_FILE), Format::Rows),
            _ => (input.path.clone(), Format::Auto),
        };
        let options = LoadOptions {
            format,
            ..LoadOptions::default()
        };
        let rows = load_rows(&path, &options)?.rows;
        let settings = BpeSettings {
            vocab_size: params.vocab_size,
            min_frequency: params.min_frequency,
            special_tokens: params.special_tokens.clone(),
            individual_digits: params.individual_digits,
        };
        let texts: Vec<String> = if params.fields.is_empty() {
            rows.iter()
                .flat_map(|row| row.texts())
                .map(str::to_string)
                .collect()
        } else {
            rows.iter()
                .flat_map(|row| params.fields.iter().filter_map(|f| row.text_field(f)))
                .collect()
        };
        if texts.is_empty() {
            return Err(StageError::failed_with_hint(
                "the dataset has no text to train a tokenizer on",
                "check `fields:` against the rows' fields",
            ));
        }
        let tokenizer = train_bpe(texts.iter().map(String::as_str), &settings)?;
        let out = ctx.output_dir("tokenizer")?.to_path_buf();
        write_file(
            &out.join(TOKENIZER_FILE),
            tokenizer_json(&tokenizer)? + "\n",
        )?;
        write_file(&out.join(TOKENIZER_CONFIG_FILE), tokenizer_config(params)?)?;
        if let Some(template) = &params.template {
            PromptTemplate::plain(template)?.save(&out)?;
        }
        ctx.metrics
            .set("vocab_size", tokenizer.get_vocab_size(true));
        ctx.metrics
            .set("texts", rows.iter().map(|r| r.texts().len()).sum::<usize>());
        Ok(())
    }
}

/// The portable tokenizer_config.json the TRL reference writes.
fn tokenizer_config(params: &TrainTokenizerParams) -> Result<String, DataError> {
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": params.bos_token,
        "eos_token": params.eos_token,
        "pad_token": params.pad_token,
        "model_max_length": params.model_max_length,
        "padding_side": "right",
        "add_bos_token": false,
        "add_eos_token": false,
    });
    serde_json::to_string_pretty(&config)
        .map(|text| text + "\n")
        .map_err(|e| DataError::tokenizer(TOKENIZER_CONFIG_FILE, e.to_string()))
}

fn write_file(path: &std::path::Path, text: String) -> Result<(), StageError> {
    std::fs::write(path, text).map_err(|e| StageError::io(path, e))
}
