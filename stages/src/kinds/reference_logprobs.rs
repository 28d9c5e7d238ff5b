//! Stage kind `reference_logprobs`: the frozen reference model's summed log-probs of the
//! chosen and rejected reply of every preference pair, computed once into an artifact of
//! their own. `dpo` reads them through its `reference:` input, so a rerun of DPO with
//! another `beta` (or lr, or loss) reuses this cached stage instead of recomputing.
//!
//! ```yaml
//! ref:
//!   kind: reference_logprobs
//!   model: sft                   # usually the policy's starting model
//!   data: prefs                  # prompt / chosen / rejected rows
//!   template: "{prompt}"         # default: the model's template.json
//! ```
//!
//! Output (`files`): `reference_logprobs.safetensors` with `chosen`, `rejected` (summed
//! log-probs, f32, one per encoded pair) and `chosen_tokens`, `rejected_tokens` (reply
//! lengths, for IPO's per-token averages), and `reference.json` recording the data digest
//! and the encoding (template, add_bos, max_length) that `dpo` checks against its own.

use crate::train::model_input::{resolve_model_input, TextCodec};
use crate::train::pairs::{encode_pairs, score_pairs};
use crate::train::settings::default_max_length;
use crate::train::{read_dataset, StageResultExt};
use candle_core::{Device, Tensor};
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const LOGPROBS_FILE: &str = "reference_logprobs.safetensors";
pub const REFERENCE_FILE: &str = "reference.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceLogprobsParams {
    /// The reference model: a model or adapter stage.
    pub model: String,
    /// Preference pairs (prompt, chosen, rejected).
    pub data: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Pairs per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    32
}

/// `reference.json`: what the log-probs were computed on, for `dpo` to check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceInfo {
    pub data_digest: String,
    pub model_digest: String,
    pub pairs: usize,
    pub template: serde_json::Value,
    pub add_bos: bool,
    pub max_length: usize,
}

/// The four per-pair vectors of a reference artifact.
pub struct ReferenceLogprobs {
    pub info: ReferenceInfo,
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
    pub chosen_tokens: Vec<f32>,
    pub rejected_tokens: Vec<f32>,
}

/// Reads a `reference_logprobs` artifact.
pub fn read_reference(dir: &Path) -> Result<ReferenceLogprobs, StageError> {
    let info_path = dir.join(REFERENCE_FILE);
    let text = std::fs::read_to_string(&info_path).map_err(|e| StageError::io(&info_path, e))?;
    let info: ReferenceInfo =
        serde_json::from_str(&text).or_fail(&info_path.display().to_string())?;
    let path = dir.join(LOGPROBS_FILE);
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).or_fail(&path.display().to_string())?;
    let get = |name: &str| -> Result<Vec<f32>, StageError> {
        tensors
            .get(name)
            .ok_or_else(|| {
                StageError::failed(format!("{}: tensor `{name}` is missing", path.display()))
            })?
            .to_vec1()
            .or_fail(&path.display().to_string())
    };
    Ok(ReferenceLogprobs {
        chosen: get("chosen")?,
        rejected: get("rejected")?,
        chosen_tokens: get("chosen_tokens")?,
        rejected_tokens: get("rejected_tokens")?,
        info,
    })
}

pub struct ReferenceLogprobsStage;

impl Stage for ReferenceLogprobsStage {
    type Params = ReferenceLogprobsParams;
    const KIND: &'static str = "reference_logprobs";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Log-probs of chosen and rejected replies under a frozen reference model, for dpo";

    fn ports(params: &ReferenceLogprobsParams) -> Result<Ports, PortsError> {
        if params.batch_size == 0 {
            return Err(PortsError::new(Some("batch_size"), "must be at least 1"));
        }
        Ok(Ports {
            inputs: vec![
                InputPort::stage("model", &params.model, ArtifactKind::MODELS),
                InputPort::stage(
                    "data",
                    &params.data,
                    &[ArtifactKind::Dataset, ArtifactKind::Preferences],
                ),
            ],
            outputs: vec![OutputPort::new("logprobs", ArtifactKind::Files)],
        })
    }

    fn run(params: &ReferenceLogprobsParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let input = resolve_model_input(ctx, "model")?;
        let codec = TextCodec::load(
            &input,
            params.template.as_deref(),
            params.add_bos,
            params.max_length,
        )?;
        let rows = read_dataset(ctx, "data")?;
        let pairs = encode_pairs(&codec.encoder(), &rows)?;
        let model = input.load_frozen()?;
        let mut task = ctx.progress.task("score", pairs.len() as u64);
        let [chosen, rejected, chosen_tokens, rejected_tokens] =
            score_pairs(&model, &pairs, codec.special.pad, params.batch_size)?;
        task.set_position(pairs.len() as u64);
        task.finish();
        let dest = ctx.output_dir("logprobs")?.to_path_buf();
        let mut tensors = HashMap::new();
        for (name, values) in [
            ("chosen", &chosen),
            ("rejected", &rejected),
            ("chosen_tokens", &chosen_tokens),
            ("rejected_tokens", &rejected_tokens),
        ] {
            let tensor =
                Tensor::from_slice(values, values.len(), &Device::Cpu).or_fail("tensor")?;
            tensors.insert(name.to_string(), tensor);
        }
        let path = dest.join(LOGPROBS_FILE);
        candle_core::safetensors::save(&tensors, &path).or_fail(&path.display().to_string())?;
        let info = reference_info(ctx, &input.digest, &codec, pairs.len())?;
        let info_path = dest.join(REFERENCE_FILE);
        let text = serde_json::to_string_pretty(&info).or_fail("reference.json")?;
        std::fs::write(&info_path, text + "\n").map_err(|e| StageError::io(&info_path, e))?;
        let accuracy = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64
            / pairs.len().max(1) as f64;
        ctx.metrics.set("pairs", pairs.len() as u64);
        ctx.metrics.set("logprob_ranking_accuracy", accuracy);
        Ok(())
    }
}

/// What `dpo` must match: the data digest and the encoding settings.
pub fn reference_info(
    ctx: &StageContext,
    model_digest: &str,
    codec: &TextCodec,
    pairs: usize,
) -> Result<ReferenceInfo, StageError> {
    Ok(ReferenceInfo {
        data_digest: ctx.input("data")?.digest.clone(),
        model_digest: model_digest.to_string(),
        pairs,
        template: serde_json::to_value(&codec.template).or_fail("template")?,
        add_bos: codec.add_bos,
        max_length: codec.max_length,
    })
}
