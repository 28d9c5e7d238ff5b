//! A Hugging Face model folder on disk: which files it has, its parsed metadata, and a
//! validated copy of it (what the `load_pretrained` stage writes into the cache).

use super::causal_lm::{CausalLm, Trainability};
use super::config::{GenerationDefaults, LlamaConfig};
use super::tokenizer::ModelTokenizer;
use super::weights::safetensors_files;
use super::{ModelError, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Tokenizer and metadata files copied along with a model when present.
pub const SIDE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// A model folder whose config parsed and whose weight files exist.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub path: PathBuf,
    pub config: LlamaConfig,
    pub generation: Option<GenerationDefaults>,
}

impl ModelFolder {
    /// Checks the folder holds config.json (supported), weights, and tokenizer.json.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "expected a Hugging Face model folder (config.json, model.safetensors, tokenizer.json)".into(),
            });
        }
        let config_path = path.join("config.json");
        if !config_path.exists() {
            return Err(ModelError::MissingFile {
                path: config_path,
                hint: "a model folder needs config.json".into(),
            });
        }
        let config = LlamaConfig::from_file(&config_path)?;
        safetensors_files(path)?;
        let generation_path = path.join("generation_config.json");
        let generation = if generation_path.exists() {
            Some(GenerationDefaults::from_file(&generation_path)?)
        } else {
            None
        };
        Ok(ModelFolder {
            path: path.to_path_buf(),
            config,
            generation,
        })
    }

    pub fn load_model(
        &self,
        dtype: DType,
        device: &Device,
        trainability: Trainability,
    ) -> Result<CausalLm> {
        CausalLm::load(&self.path, dtype, device, trainability)
    }

    pub fn load_tokenizer(&self) -> Result<ModelTokenizer> {
        ModelTokenizer::from_folder(&self.path)
    }

    /// End-of-sequence ids: generation_config.json's, else config.json's, else the tokenizer's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_generation = self
            .generation
            .as_ref()
            .map(|g| g.eos_token_ids())
            .unwrap_or_default();
        if !from_generation.is_empty() {
            return from_generation;
        }
        self.config.eos_token_ids()
    }

    /// Copies config.json, the weight file(s) and the tokenizer/side files into `dest`.
    pub fn copy_to(&self, dest: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dest).map_err(|e| ModelError::io(dest, e))?;
        let mut names: Vec<PathBuf> = vec![PathBuf::from("config.json")];
        for file in safetensors_files(&self.path)? {
            if let Some(name) = file.file_name() {
                names.push(PathBuf::from(name));
            }
        }
        if self.path.join("model.safetensors.index.json").exists()
            && !self.path.join("model.safetensors").exists()
        {
            names.push(PathBuf::from("model.safetensors.index.json"));
        }
        names.extend(
            SIDE_FILES
                .iter()
                .map(PathBuf::from)
                .filter(|n| self.path.join(n).exists()),
        );
        for name in &names {
            let (from, to) = (self.path.join(name), dest.join(name));
            std::fs::copy(&from, &to).map_err(|e| ModelError::io(&from, e))?;
        }
        Ok(names)
    }
}
