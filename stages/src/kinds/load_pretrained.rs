//! Stage kind `load_pretrained`: brings a model into the pipeline as a `model` artifact
//! (a Hugging Face folder: config.json, safetensors weights, tokenizer files).
//!
//! ```yaml
//! base: { kind: load_pretrained, model: hf://HuggingFaceTB/SmolLM2-135M }   # or a local folder
//! scratch:
//!   kind: load_pretrained
//!   init: { hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 8,
//!           num_key_value_heads: 4, intermediate_size: 688, tokenizer: tok,
//!           max_position_embeddings: 256 }
//! ```
//!
//! `model:` is validated (config supported, every tensor present with the right shape,
//! tokenizer.json parses) and copied byte for byte, or converted when `dtype` differs
//! from the checkpoint's. `init:` writes a randomly initialised model (transformers'
//! default init, seeded by the stage seed); its vocabulary comes from `vocab_size` or a
//! `tokenizer:` input (a tokenizer or model artifact, or a folder), whose files are copied.

use crate::model::folder::ModelFolder;
use crate::model::weights::safetensors_files;
use crate::model::{
    save_model_folder, CausalLm, LlamaConfig, ModelError, ModelTokenizer, Trainability,
};
use candle_core::{DType, Device};
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadPretrainedParams {
    /// A local model folder, a `hf://org/name[@revision]` reference, or a model stage.
    #[serde(default)]
    pub model: Option<String>,
    /// Create a new random model from this shape instead.
    #[serde(default)]
    pub init: Option<InitParams>,
    /// Weight dtype of the written model: f32, bf16 or f16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitParams {
    /// `llama` or `qwen2` (q/k/v biases).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    /// Defaults to the tokenizer's vocabulary size.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// A tokenizer (or model) stage output, or a folder with tokenizer.json.
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Standard deviation of the normal init of linear and embedding weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_architecture() -> String {
    "llama".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}

pub struct LoadPretrainedStage;

impl Stage for LoadPretrainedStage {
    type Params = LoadPretrainedParams;
    const KIND: &'static str = "load_pretrained";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Load a Hugging Face causal LM (local folder or hf://), or initialise a random one";

    fn ports(params: &LoadPretrainedParams) -> Result<Ports, PortsError> {
        parse_dtype(&params.dtype).map_err(|e| PortsError::new(Some("dtype"), e))?;
        let mut inputs = Vec::new();
        match (&params.model, &params.init) {
            (Some(model), None) => inputs.push(
                InputPort::stage("model", model, &[ArtifactKind::Model])
                    .allow_external(ExternalPolicy::StageOrPathOrHub),
            ),
            (None, Some(init)) => {
                if init.vocab_size.is_none() && init.tokenizer.is_none() {
                    return Err(PortsError::new(
                        Some("init"),
                        "needs `vocab_size` or a `tokenizer`",
                    )
                    .with_hint(
                        "e.g. `tokenizer: tok` (a train_tokenizer stage) or `vocab_size: 512`",
                    ));
                }
                if let Some(tokenizer) = &init.tokenizer {
                    inputs.push(
                        InputPort::stage(
                            "tokenizer",
                            tokenizer,
                            &[ArtifactKind::Tokenizer, ArtifactKind::Model],
                        )
                        .at_param("init.tokenizer")
                        .allow_external(ExternalPolicy::StageOrPath),
                    );
                }
                init_config(init, init.vocab_size.unwrap_or(1))
                    .and_then(|c| c.validate().map(|_| c))
                    .map_err(|e| PortsError::new(Some("init"), e.to_string()))?;
            }
            (Some(_), Some(_)) => {
                return Err(PortsError::new(
                    None,
                    "give either `model` or `init`, not both",
                ))
            }
            (None, None) => {
                return Err(PortsError::new(
                    None,
                    "needs `model` (a folder or hf://org/name) or `init` (a model shape)",
                ))
            }
        }
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("model", ArtifactKind::Model)],
        })
    }

    fn run(params: &LoadPretrainedParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let dtype = parse_dtype(&params.dtype).map_err(StageError::failed)?;
        let out = ctx.output_dir("model")?.to_path_buf();
        let parameters = match &params.init {
            Some(init) => {
                let tokenizer_dir = match &init.tokenizer {
                    Some(_) => Some(ctx.input("tokenizer")?.path.clone()),
                    None => None,
                };
                write_random_model(init, tokenizer_dir.as_deref(), ctx.seed, dtype, &out)
            }
            None => copy_model(&ctx.input("model")?.path.clone(), dtype, &out),
        }
        .map_err(|e| stage_error(&ctx.stage, e))?;
        ctx.metrics.set("parameters", parameters);
        Ok(())
    }
}

fn parse_dtype(dtype: &str) -> Result<DType, String> {
    match dtype {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(format!(
            "unknown dtype `{other}` (expected f32, bf16 or f16)"
        )),
    }
}

fn stage_error(stage: &str, error: ModelError) -> StageError {
    StageError::failed_with_hint(
        format!("stage `{stage}`: {error}"),
        "`model:` must be a Hugging Face folder (config.json, model.safetensors or an index with shards, tokenizer.json) of a Llama or Qwen2 causal LM",
    )
}

/// Validates the folder (config, every tensor, tokenizer) and copies it into `out`,
/// converting the weights when `dtype` differs from the checkpoint's.
fn copy_model(source: &Path, dtype: DType, out: &Path) -> Result<usize, ModelError> {
    let folder = ModelFolder::open(source)?;
    folder.load_tokenizer()?;
    let device = Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    let mut same_dtype = true;
    for file in safetensors_files(source)? {
        let loaded = candle_core::safetensors::load(&file, &device).map_err(|e| {
            ModelError::Invalid(format!("{}: cannot read safetensors: {e}", file.display()))
        })?;
        for (name, tensor) in loaded {
            same_dtype &= tensor.dtype() == dtype;
            tensors.insert(name, tensor.to_dtype(dtype)?);
        }
    }
    let model = CausalLm::from_tensors(
        folder.config.clone(),
        tensors,
        &device,
        Trainability::Frozen,
    )?;
    if same_dtype {
        folder.copy_to(out)?;
    } else {
        let mut overrides = serde_json::Map::new();
        overrides.insert("torch_dtype".into(), dtype_name(dtype).into());
        save_model_folder(&model, out, Some(source), &[], &overrides)?;
    }
    model.num_parameters()
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// The config.json of an `init:` model.
fn init_config(init: &InitParams, vocab_size: usize) -> Result<LlamaConfig, ModelError> {
    let architecture = match init.architecture.as_str() {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        other => {
            return Err(ModelError::Unsupported(format!(
                "init architecture `{other}` (llama or qwen2)"
            )))
        }
    };
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": init.architecture,
        "hidden_size": init.hidden_size,
        "intermediate_size": init.intermediate_size,
        "num_hidden_layers": init.num_hidden_layers,
        "num_attention_heads": init.num_attention_heads,
        "num_key_value_heads": init.num_key_value_heads.unwrap_or(init.num_attention_heads),
        "vocab_size": vocab_size,
        "max_position_embeddings": init.max_position_embeddings,
        "rms_norm_eps": init.rms_norm_eps,
        "rope_theta": init.rope_theta,
        "tie_word_embeddings": init.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": init.initializer_range,
        "torch_dtype": "float32",
    });
    serde_json::from_value(config).map_err(|e| ModelError::Invalid(format!("init config: {e}")))
}

/// Writes a seeded random model (plus the tokenizer's files and generation config).
fn write_random_model(
    init: &InitParams,
    tokenizer_dir: Option<&Path>,
    seed: u64,
    dtype: DType,
    out: &Path,
) -> Result<usize, ModelError> {
    let tokenizer = tokenizer_dir.map(ModelTokenizer::from_folder).transpose()?;
    let tokenizer_vocab = tokenizer.as_ref().map(ModelTokenizer::vocab_size);
    let vocab_size = match (init.vocab_size, tokenizer_vocab) {
        (Some(given), Some(needed)) if given < needed => {
            return Err(ModelError::Invalid(format!(
                "init.vocab_size {given} is smaller than the tokenizer's vocabulary ({needed})"
            )))
        }
        (Some(given), _) => given,
        (None, Some(needed)) => needed,
        (None, None) => {
            return Err(ModelError::Invalid(
                "init needs `vocab_size` or a `tokenizer`".into(),
            ))
        }
    };
    let mut config = init_config(init, vocab_size)?;
    if let Some(tokenizer) = &tokenizer {
        config.bos_token_id = tokenizer.bos_token_id.map(Into::into);
        config.eos_token_id = tokenizer.eos_token_id.map(Into::into);
        config.pad_token_id = tokenizer.pad_token_id.map(Into::into);
    }
    let model = CausalLm::random(config, seed, dtype, &Device::Cpu, Trainability::Frozen)?;
    let mut overrides = serde_json::Map::new();
    overrides.insert("torch_dtype".into(), dtype_name(dtype).into());
    save_model_folder(&model, out, tokenizer_dir, &[], &overrides)?;
    let generation = serde_json::json!({
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": model.config.eos_token_id,
        "pad_token_id": model.config.pad_token_id,
    });
    let path = out.join("generation_config.json");
    std::fs::write(&path, format!("{generation:#}\n")).map_err(|e| ModelError::io(&path, e))?;
    model.num_parameters()
}
