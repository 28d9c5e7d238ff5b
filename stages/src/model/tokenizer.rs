//! The tokenizer of a model folder: `tokenizer.json` through the `tokenizers` crate, and
//! the special tokens and chat template from `tokenizer_config.json` (which the data
//! module renders).

use super::ModelError;
use std::path::Path;

/// A loaded tokenizer with the special tokens its folder declares.
#[derive(Clone)]
pub struct ModelTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The Jinja chat template (the `default` one when the config lists several).
    pub chat_template: Option<String>,
    /// `tokenizer_config.json` as read (empty when the file is absent).
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `folder`.
    pub fn from_folder(folder: &Path) -> Result<Self, ModelError> {
        let tokenizer_path = folder.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(ModelError::MissingFile {
                path: tokenizer_path,
                hint: "a model folder needs tokenizer.json (the fast-tokenizer file transformers writes)".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            ModelError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            }
        })?;
        let config_path = folder.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => {
                    return Err(ModelError::Invalid(format!(
                        "{}: expected a JSON object",
                        config_path.display()
                    )))
                }
                Err(source) => {
                    return Err(ModelError::Json {
                        path: config_path,
                        source,
                    })
                }
            }
        } else {
            serde_json::Map::new()
        };
        Ok(Self::from_parts(tokenizer, config))
    }

    /// Builds from an already loaded tokenizer and its config map.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        config: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let token = |key: &str| special_token(config.get(key));
        let (bos_token, eos_token, pad_token) =
            (token("bos_token"), token("eos_token"), token("pad_token"));
        let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
        ModelTokenizer {
            bos_token_id: id(&bos_token),
            eos_token_id: id(&eos_token),
            pad_token_id: id(&pad_token),
            chat_template: chat_template(config.get("chat_template")),
            bos_token,
            eos_token,
            pad_token,
            tokenizer,
            config,
        }
    }

    /// Token ids of `text`, adding the special tokens the tokenizer's post-processor
    /// adds when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Invalid(format!("cannot tokenize text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Invalid(format!("cannot decode token ids: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// A special token written as a string or as `{"content": ...}` (AddedToken).
fn special_token(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` wins.
fn chat_template(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let named = |name: &str| {
                items
                    .iter()
                    .find(|item| item.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            named("default")
                .or_else(|| items.first())
                .and_then(|item| item.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        }
        _ => None,
    }
}
