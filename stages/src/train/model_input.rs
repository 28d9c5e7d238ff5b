//! "A model input", whatever artifact it is, for every stage that reads a policy:
//!
//! - `model` (HF folder): the weights and the tokenizer are in the artifact.
//! - `adapter` (PEFT folder + `base.json`): LoRA tensors here; the base model is another
//!   cached artifact named by digest in `base.json`, found with `ctx.artifact_path`.
//! - `reward_model` (HF folder + `score.weight`): loads as its causal LM (head ignored).
//!
//! Tokenizer files and `template.json` travel with every artifact written here, so a
//! downstream stage tokenises exactly as the stage that trained the model did.

use super::StageResultExt;
use crate::data::batch::Encoder;
use crate::data::template::{PromptTemplate, Renderer, TEMPLATE_FILE};
use crate::data::tokenizer::{load_tokenizer, special_tokens, SpecialTokens};
use crate::model::folder::SIDE_FILES;
use crate::model::{
    load_lora_adapter, save_lora_adapter, save_model_folder, CausalLm, LoraConfig, Trainability,
};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use rlhf_engine::{ArtifactKind, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The file of an adapter artifact that names its base model.
pub const BASE_FILE: &str = "base.json";

/// `base.json` of an adapter artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterBase {
    /// Content digest of the base model artifact (a `model` artifact in the cache).
    pub base_model_digest: String,
}

/// A model input resolved to files.
#[derive(Clone, Debug)]
pub struct ModelInput {
    pub kind: ArtifactKind,
    /// The input artifact itself (tokenizer files and template.json are here).
    pub dir: PathBuf,
    pub digest: String,
    /// The folder with config.json and the base weights.
    pub base_dir: PathBuf,
    pub base_digest: String,
    /// The PEFT folder when the input is an adapter.
    pub adapter_dir: Option<PathBuf>,
}

/// How a trainable model was set up, which decides what gets written at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainedAs {
    /// Every weight trained: written as a full model.
    Full,
    /// LoRA adapters trained on a frozen base: written as an adapter on `base_digest`.
    Adapter,
}

/// Resolves the input `name` of `ctx` (Model, Adapter or RewardModel).
pub fn resolve_model_input(ctx: &StageContext, name: &str) -> Result<ModelInput, StageError> {
    let input = ctx.input(name)?;
    let kind = input.kind.unwrap_or(ArtifactKind::Model);
    if kind != ArtifactKind::Adapter {
        return Ok(ModelInput {
            kind,
            dir: input.path.clone(),
            digest: input.digest.clone(),
            base_dir: input.path.clone(),
            base_digest: input.digest.clone(),
            adapter_dir: None,
        });
    }
    let base_path = input.path.join(BASE_FILE);
    let text = std::fs::read_to_string(&base_path).map_err(|e| StageError::io(&base_path, e))?;
    let base: AdapterBase =
        serde_json::from_str(&text).or_fail(&base_path.display().to_string())?;
    let base_dir = ctx.artifact_path(&base.base_model_digest).ok_or_else(|| {
        StageError::failed_with_hint(
            format!(
                "input `{name}` ({}) is an adapter whose base model {} is not in the cache",
                input.reference, base.base_model_digest
            ),
            "rerun the stage that produced the base model (rlhf run recomputes missing artifacts)",
        )
    })?;
    Ok(ModelInput {
        kind,
        dir: input.path.clone(),
        digest: input.digest.clone(),
        base_dir,
        base_digest: base.base_model_digest,
        adapter_dir: Some(input.path.clone()),
    })
}

impl ModelInput {
    /// The model for inference or as a frozen reference: base + adapter (unmerged, so it
    /// computes exactly what the trained policy computed), nothing trainable.
    pub fn load_frozen(&self) -> Result<CausalLm, StageError> {
        let mut model = CausalLm::load(
            &self.base_dir,
            DType::F32,
            &Device::Cpu,
            Trainability::Frozen,
        )
        .or_fail(&format!("loading model {}", self.base_dir.display()))?;
        if let Some(adapter) = &self.adapter_dir {
            load_lora_adapter(&mut model, adapter, None)
                .or_fail(&format!("loading adapter {}", adapter.display()))?;
        }
        Ok(model)
    }

    /// The model set up for training: `lora` given → LoRA on a frozen base (a fresh,
    /// seeded adapter on a model input; the input's own adapter, trainable, on an adapter
    /// input); `lora` absent → full fine-tuning (model inputs only). Trainable tensors
    /// land in `varmap`.
    pub fn load_trainable(
        &self,
        lora: Option<&LoraConfig>,
        varmap: &VarMap,
        seed: u64,
    ) -> Result<(CausalLm, TrainedAs), StageError> {
        let doing = format!("loading model {}", self.base_dir.display());
        match (lora, &self.adapter_dir) {
            (None, None) => {
                let model = CausalLm::load(&self.base_dir, DType::F32, &Device::Cpu, Trainability::Full(varmap))
                    .or_fail(&doing)?;
                Ok((model, TrainedAs::Full))
            }
            (None, Some(adapter)) => Err(StageError::failed_with_hint(
                format!("full fine-tuning of an adapter input ({}) is not supported", adapter.display()),
                "give a `lora:` config to continue training the adapter, or start from its base model",
            )),
            (Some(config), None) => {
                let mut model = CausalLm::load(&self.base_dir, DType::F32, &Device::Cpu, Trainability::Frozen)
                    .or_fail(&doing)?;
                model.add_lora(config, varmap, seed).or_fail("adding LoRA adapters")?;
                Ok((model, TrainedAs::Adapter))
            }
            (Some(_), Some(adapter)) => {
                let mut model = CausalLm::load(&self.base_dir, DType::F32, &Device::Cpu, Trainability::Frozen)
                    .or_fail(&doing)?;
                load_lora_adapter(&mut model, adapter, Some(varmap))
                    .or_fail(&format!("loading adapter {}", adapter.display()))?;
                Ok((model, TrainedAs::Adapter))
            }
        }
    }

    /// Where tokenizer.json is: the artifact itself, else its base model.
    pub fn tokenizer_dir(&self) -> &Path {
        if self.dir.join("tokenizer.json").exists() {
            &self.dir
        } else {
            &self.base_dir
        }
    }
}

/// Tokenizer, special tokens and prompt template of a model, ready to encode rows.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub template: PromptTemplate,
    pub renderer: Renderer,
    pub add_bos: bool,
    pub max_length: usize,
}

impl TextCodec {
    /// Loads the tokenizer of `input`; the template is `template` when given, else the
    /// artifact's template.json, else the default plain template.
    pub fn load(
        input: &ModelInput,
        template: Option<&str>,
        add_bos: bool,
        max_length: usize,
    ) -> Result<Self, StageError> {
        let dir = input.tokenizer_dir();
        let tokenizer = load_tokenizer(dir).or_fail("loading the tokenizer")?;
        let special = special_tokens(dir, &tokenizer).or_fail("reading special tokens")?;
        let template = match template {
            Some(text) => PromptTemplate::plain(text).or_fail("param `template`")?,
            None => PromptTemplate::load(&input.dir)
                .or_fail("reading template.json")?
                .unwrap_or_default(),
        };
        let renderer = template
            .renderer()
            .or_fail("compiling the prompt template")?;
        Ok(TextCodec {
            tokenizer,
            special,
            template,
            renderer,
            add_bos,
            max_length,
        })
    }

    pub fn encoder(&self) -> Encoder<'_> {
        Encoder::new(&self.tokenizer, &self.renderer, self.special)
            .with_bos(self.add_bos)
            .with_max_length(self.max_length)
    }
}

/// Writes a trained policy into `dest`: a full HF folder, or a PEFT adapter with
/// `base.json` naming `input.base_digest`; tokenizer files and template.json copied.
pub fn write_trained_model(
    model: &CausalLm,
    trained_as: TrainedAs,
    input: &ModelInput,
    template: &PromptTemplate,
    dest: &Path,
) -> Result<(), StageError> {
    match trained_as {
        TrainedAs::Full => {
            save_model_folder(
                model,
                dest,
                Some(input.tokenizer_dir()),
                &[],
                &Default::default(),
            )
            .or_fail("writing the model")?;
        }
        TrainedAs::Adapter => {
            save_lora_adapter(model, dest, &input.base_digest).or_fail("writing the adapter")?;
            let base = AdapterBase {
                base_model_digest: input.base_digest.clone(),
            };
            let path = dest.join(BASE_FILE);
            let text = serde_json::to_string_pretty(&base).or_fail("base.json")?;
            std::fs::write(&path, text + "\n").map_err(|e| StageError::io(&path, e))?;
            copy_side_files(input.tokenizer_dir(), dest)?;
        }
    }
    template
        .save(dest)
        .or_fail(&format!("writing {TEMPLATE_FILE}"))
}

/// Copies tokenizer and generation side files from `source` to `dest`.
pub fn copy_side_files(source: &Path, dest: &Path) -> Result<(), StageError> {
    for name in SIDE_FILES {
        let from = source.join(name);
        if from.exists() {
            std::fs::copy(&from, dest.join(name)).map_err(|e| StageError::io(&from, e))?;
        }
    }
    Ok(())
}
