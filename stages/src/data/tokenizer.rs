//! Tokenizers as the data module needs them: loading a `tokenizer.json`, finding the
//! pad/bos/eos ids, and training a byte-level BPE tokenizer on rows.
//!
//! The trained tokenizer is set up like ../shared/bench/trl/train_tokenizer.py: a BPE
//! model with no unk token, pre-tokenizer Sequence[Digits(individual_digits),
//! ByteLevel(add_prefix_space = false)] so every digit is its own token, a ByteLevel
//! decoder, no normalizer and no post-processor (encoding adds no special tokens;
//! callers add bos/eos where they want them). Special tokens take the first ids in the
//! order given (`<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2 by default).

use super::error::DataError;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The ids batching needs. `pad` falls back to `eos` for tokenizers without a pad token
/// (Llama's), which is safe because padded positions are masked out everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: u32,
    pub eos: u32,
    pub bos: Option<u32>,
}

/// `dir/tokenizer.json`, or the file itself.
pub fn tokenizer_path(dir_or_file: &Path) -> PathBuf {
    if dir_or_file.is_dir() {
        dir_or_file.join(TOKENIZER_FILE)
    } else {
        dir_or_file.to_path_buf()
    }
}

pub fn load_tokenizer(dir_or_file: &Path) -> Result<Tokenizer, DataError> {
    let path = tokenizer_path(dir_or_file);
    if !path.exists() {
        return Err(DataError::tokenizer(
            &path,
            "not found (a tokenizer or model artifact holds a tokenizer.json)",
        ));
    }
    Tokenizer::from_file(&path).map_err(|e| DataError::tokenizer(&path, e.to_string()))
}

/// Pad/bos/eos ids from `dir/tokenizer_config.json` (`pad_token`, `bos_token`,
/// `eos_token`, as strings or `{"content": ...}`), looked up in the tokenizer's vocab.
pub fn special_tokens(dir: &Path, tokenizer: &Tokenizer) -> Result<SpecialTokens, DataError> {
    let config_path = dir.join(TOKENIZER_CONFIG_FILE);
    let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| DataError::tokenizer(&config_path, format!("invalid JSON: {e}")))?,
        Err(_) => serde_json::Value::Null,
    };
    let id_of = |key: &str| -> Result<Option<u32>, DataError> {
        let token = match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => other
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        match token {
            None => Ok(None),
            Some(token) => tokenizer.token_to_id(&token).map(Some).ok_or_else(|| {
                DataError::tokenizer(
                    &config_path,
                    format!("`{key}` {token:?} is not in the tokenizer's vocabulary"),
                )
            }),
        }
    };
    let eos = id_of("eos_token")?.ok_or_else(|| {
        DataError::tokenizer(
            &config_path,
            "no `eos_token`; completions need one to end with",
        )
    })?;
    Ok(SpecialTokens {
        pad: id_of("pad_token")?.unwrap_or(eos),
        eos,
        bos: id_of("bos_token")?,
    })
}

/// Settings of [`train_bpe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpeSettings {
    pub vocab_size: usize,
    pub min_frequency: u64,
    /// Given the first ids, in order.
    pub special_tokens: Vec<String>,
    /// Split every digit into its own token before BPE.
    pub individual_digits: bool,
}

impl Default for BpeSettings {
    fn default() -> Self {
        BpeSettings {
            vocab_size: 512,
            min_frequency: 2,
            special_tokens: vec!["<|pad|>".into(), "<|bos|>".into(), "<|eos|>".into()],
            individual_digits: true,
        }
    }
}

/// Trains a byte-level BPE tokenizer on `texts`. The result depends only on the texts
/// and the settings (the tokenizers crate breaks count ties by token ids), so two runs
/// give identical `tokenizer.json` bytes.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    settings: &BpeSettings,
) -> Result<Tokenizer, DataError> {
    let failed = |message: String| DataError::tokenizer("(training)", message);
    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::new();
    if settings.individual_digits {
        pre_tokenizers.push(Digits::new(true).into());
    }
    pre_tokenizers.push(ByteLevel::new(false, true, true).into());
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = settings
        .special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(settings.vocab_size)
        .min_frequency(settings.min_frequency)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| failed(e.to_string()))?;
    for (id, token) in settings.special_tokens.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(failed(format!(
                "special token {token:?} did not get id {id}"
            )));
        }
    }
    Ok(tokenizer)
}

/// `tokenizer.json` text (pretty-printed, as transformers writes it).
pub fn tokenizer_json(tokenizer: &Tokenizer) -> Result<String, DataError> {
    tokenizer
        .to_string(true)
        .map_err(|e| DataError::tokenizer(TOKENIZER_FILE, e.to_string()))
}
