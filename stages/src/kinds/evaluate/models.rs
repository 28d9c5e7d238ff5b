//! Loading "a model input, whatever its kind" for evaluation and generation: a Model
//! artifact (a Hugging Face folder), an Adapter artifact (PEFT LoRA whose
//! `base.json` / `base_model_name_or_path` is the base model's artifact digest, looked
//! up in the cache), or a RewardModel artifact (a model folder, or an adapter, whose weights hold
//! a `score.weight` head). Each comes with what it takes to talk to it: tokenizer,
//! special tokens, prompt template (`template.json` of the adapter, else of the base,
//! else the default plain template) and whether prompts start with bos.

use super::EvalError;
use crate::data::batch::Encoder;
use crate::data::template::PromptTemplate;
use crate::data::template::Renderer;
use crate::data::tokenizer::{load_tokenizer, special_tokens, SpecialTokens};
use crate::model::heads::{ScalarHead, ScalarHeadKind, SCORE_WEIGHT};
use crate::model::save::load_lora_adapter;
use crate::model::weights::safetensors_files;
use crate::model::{CausalLm, ModelFolder, Trainability};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Finds a cached artifact by digest (the engine's lookup, or the CLI's cache).
pub type DigestLookup<'a> = &'a dyn Fn(&str) -> Option<PathBuf>;

/// A causal LM ready to be prompted: weights (adapters attached), tokenizer, template.
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub renderer: Renderer,
    /// Prepend bos to prompts (`add_bos_token: true` in tokenizer_config.json).
    pub add_bos: bool,
    /// Ids that end a completion: the generation config's, config.json's and the tokenizer's eos.
    pub eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    /// Tokenises rows the way training did (same template, bos and eos rules).
    pub fn encoder(&self) -> Encoder<'_> {
        Encoder::new(&self.tokenizer, &self.renderer, self.special).with_bos(self.add_bos)
    }

    /// The text of generated ids, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EvalError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EvalError::invalid(format!("cannot decode generated tokens: {e}"), None))
    }
}

/// A model with a scalar reward head, scoring whole sequences.
pub struct LoadedRewardModel {
    pub loaded: LoadedModel,
    pub head: ScalarHead,
}

/// Where the weights of a model input live: the folder with config.json, and the
/// adapter folder attached to it, if any.
struct Resolved {
    base: PathBuf,
    adapter: Option<PathBuf>,
}

fn resolve(path: &Path, lookup: DigestLookup) -> Result<Resolved, EvalError> {
    let adapter_config = path.join("adapter_config.json");
    if !adapter_config.exists() {
        return Ok(Resolved {
            base: path.to_path_buf(),
            adapter: None,
        });
    }
    let text = std::fs::read_to_string(&adapter_config)
        .map_err(|e| EvalError::invalid(format!("{}: {e}", adapter_config.display()), None))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        EvalError::invalid(
            format!("{}: invalid JSON: {e}", adapter_config.display()),
            None,
        )
    })?;
    // Training stages also write `base.json` {"base_model_digest"}; it wins when present.
    let base_json = std::fs::read_to_string(path.join("base.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| {
            v.get("base_model_digest")
                .and_then(|d| d.as_str())
                .map(str::to_string)
        });
    let base = base_json.unwrap_or_else(|| {
        config
            .get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    });
    let base = base.as_str();
    let base_dir = lookup(base)
        .filter(|p| p.is_dir())
        .or_else(|| Some(PathBuf::from(base)).filter(|p| p.join("config.json").exists()))
        .ok_or_else(|| {
            EvalError::invalid(
                format!(
                    "{}: the adapter's base model `{base}` is neither a cached artifact nor a model folder",
                    adapter_config.display()
                ),
                Some("rerun the stage that produced the base model (`rlhf run FILE --until BASE`) so its artifact is back in the cache"),
            )
        })?;
    Ok(Resolved {
        base: base_dir,
        adapter: Some(path.to_path_buf()),
    })
}

/// Loads a Model or Adapter artifact (frozen, f32, CPU).
pub fn load_model(path: &Path, lookup: DigestLookup) -> Result<LoadedModel, EvalError> {
    let resolved = resolve(path, lookup)?;
    let folder = ModelFolder::open(&resolved.base)?;
    let mut model = folder.load_model(DType::F32, &Device::Cpu, Trainability::Frozen)?;
    if let Some(adapter) = &resolved.adapter {
        load_lora_adapter(&mut model, adapter, None)?;
    }
    finish_loading(model, &folder, &resolved)
}

fn finish_loading(
    model: CausalLm,
    folder: &ModelFolder,
    resolved: &Resolved,
) -> Result<LoadedModel, EvalError> {
    // The adapter may carry its own tokenizer and template (from its training stage).
    let side_dir = |file: &str| -> PathBuf {
        match &resolved.adapter {
            Some(adapter) if adapter.join(file).exists() => adapter.clone(),
            _ => resolved.base.clone(),
        }
    };
    let tokenizer_dir = side_dir("tokenizer.json");
    let tokenizer = load_tokenizer(&tokenizer_dir)?;
    let special = special_tokens(&tokenizer_dir, &tokenizer)?;
    let template =
        PromptTemplate::load(&side_dir(crate::data::template::TEMPLATE_FILE))?.unwrap_or_default();
    let renderer = template.renderer()?;
    let add_bos = tokenizer_config_flag(&tokenizer_dir, "add_bos_token");
    let mut eos_token_ids = folder.eos_token_ids();
    if !eos_token_ids.contains(&special.eos) {
        eos_token_ids.push(special.eos);
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        special,
        renderer,
        add_bos,
        eos_token_ids,
    })
}

fn tokenizer_config_flag(dir: &Path, key: &str) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|config| config.get(key).and_then(|v| v.as_bool()))
        .unwrap_or(false)
}

/// Loads a RewardModel artifact: the LM plus the `score.weight` head found in its
/// safetensors files (the adapter's first, then the base folder's).
pub fn load_reward_model(
    path: &Path,
    lookup: DigestLookup,
) -> Result<LoadedRewardModel, EvalError> {
    let resolved = resolve(path, lookup)?;
    let loaded = load_model(path, lookup)?;
    let mut folders = Vec::new();
    folders.extend(resolved.adapter.clone());
    folders.push(resolved.base.clone());
    for folder in &folders {
        if let Some(weight) = find_score_weight(folder)? {
            let head = ScalarHead::from_tensor(ScalarHeadKind::Reward, &weight, None, "")?;
            return Ok(LoadedRewardModel { loaded, head });
        }
    }
    Err(EvalError::invalid(
        format!(
            "{}: no `{SCORE_WEIGHT}` tensor in the reward model's safetensors files",
            path.display()
        ),
        Some("`reward:` must name a reward_model stage (a model with a scalar reward head)"),
    ))
}

fn find_score_weight(folder: &Path) -> Result<Option<Tensor>, EvalError> {
    let mut files = safetensors_files(folder).unwrap_or_default();
    let adapter_weights = folder.join("adapter_model.safetensors");
    if adapter_weights.exists() && !files.contains(&adapter_weights) {
        files.push(adapter_weights);
    }
    for file in files {
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
            EvalError::invalid(
                format!("{}: cannot read safetensors: {e}", file.display()),
                None,
            )
        })?;
        if let Some(weight) = tensors.get(SCORE_WEIGHT) {
            return Ok(Some(weight.to_dtype(DType::F32)?));
        }
    }
    Ok(None)
}
