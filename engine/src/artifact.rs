//! The kinds of artifact that flow along the edges of a pipeline, so the engine can
//! refuse a dataset where a model is needed before anything runs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a stage output is. An artifact is always a directory in the cache; the kind says
/// which files a consumer may expect inside it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// Rows as `data.jsonl` (see the data module for the row model).
    Dataset,
    /// A `tokenizer.json` (plus `tokenizer_config.json` when known).
    Tokenizer,
    /// A Hugging Face model folder: config.json, model.safetensors, tokenizer files.
    Model,
    /// A PEFT LoRA adapter folder that names its base model by digest.
    Adapter,
    /// A model folder with a scalar reward head.
    RewardModel,
    /// Preference pairs as `pairs.jsonl` (prompt, chosen, rejected, judge info).
    Preferences,
    /// Evaluation results: `metrics.json`.
    Metrics,
    /// Anything else, e.g. the declared outputs of a `command` stage.
    Files,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 8] = [
        ArtifactKind::Dataset,
        ArtifactKind::Tokenizer,
        ArtifactKind::Model,
        ArtifactKind::Adapter,
        ArtifactKind::RewardModel,
        ArtifactKind::Preferences,
        ArtifactKind::Metrics,
        ArtifactKind::Files,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Tokenizer => "tokenizer",
            ArtifactKind::Model => "model",
            ArtifactKind::Adapter => "adapter",
            ArtifactKind::RewardModel => "reward_model",
            ArtifactKind::Preferences => "preferences",
            ArtifactKind::Metrics => "metrics",
            ArtifactKind::Files => "files",
        }
    }

    /// The kinds a port that asks for "any model" (a policy, an evaluated model) accepts.
    pub const MODELS: &'static [ArtifactKind] = &[ArtifactKind::Model, ArtifactKind::Adapter];
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
