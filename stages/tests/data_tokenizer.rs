//! Byte-level BPE training: deterministic bytes, digits as single tokens, special tokens
//! at fixed ids, and the same vocabulary and merges as the Python-trained reference
//! tokenizer (bench/trl/tokenizer, made by train_tokenizer.py) on the same corpus.

use rlhf_stages::data::row::read_rows;
use rlhf_stages::data::synthetic::{generate, SyntheticSpec};
use rlhf_stages::data::tokenizer::{
    load_tokenizer, special_tokens, tokenizer_json, train_bpe, BpeSettings, SpecialTokens,
};
use rlhf_stages::testing::shared_path;

fn corpus() -> Vec<String> {
    let spec: SyntheticSpec =
        serde_json::from_value(serde_json::json!({ "count": 3000, "plain_text_fraction": 0.3 }))
            .unwrap();
    generate(&spec, 5)
        .unwrap()
        .into_iter()
        .map(|row| row.text.unwrap())
        .collect()
}

#[test]
fn training_twice_gives_identical_tokenizer_json_bytes() {
    let texts = corpus();
    let settings = BpeSettings::default();
    let first =
        tokenizer_json(&train_bpe(texts.iter().map(String::as_str), &settings).unwrap()).unwrap();
    let second =
        tokenizer_json(&train_bpe(texts.iter().map(String::as_str), &settings).unwrap()).unwrap();
    assert_eq!(first, second);
    let smaller = BpeSettings {
        vocab_size: 300,
        ..BpeSettings::default()
    };
    assert_ne!(
        first,
        tokenizer_json(&train_bpe(texts.iter().map(String::as_str), &smaller).unwrap()).unwrap()
    );
}

#[test]
fn every_digit_is_its_own_token_and_no_special_tokens_are_added() {
    let texts = corpus();
    let tokenizer = train_bpe(texts.iter().map(String::as_str), &BpeSettings::default()).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 512);
    for (id, token) in ["<|pad|>", "<|bos|>", "<|eos|>"].iter().enumerate() {
        assert_eq!(tokenizer.token_to_id(token), Some(id as u32));
    }
    let text = "Q: 12345+678=\nA: 13023";
    let encoding = tokenizer.encode(text, false).unwrap();
    let digit_tokens: Vec<&str> = encoding
        .get_tokens()
        .iter()
        .map(String::as_str)
        .filter(|t| t.chars().any(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(
        digit_tokens.len(),
        "12345678".len() + "13023".len(),
        "{:?}",
        encoding.get_tokens()
    );
    assert!(
        digit_tokens.iter().all(|t| t.chars().count() == 1),
        "{digit_tokens:?}"
    );
    assert!(
        !encoding.get_ids().iter().any(|&id| id < 3),
        "no special tokens added"
    );
    assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), text);
    // Without the digit splitter, BPE learns multi-digit tokens from the same corpus.
    let merged = BpeSettings {
        individual_digits: false,
        ..BpeSettings::default()
    };
    let tokenizer = train_bpe(texts.iter().map(String::as_str), &merged).unwrap();
    let tokens = tokenizer.encode(text, false).unwrap().get_tokens().to_vec();
    assert!(
        tokens
            .iter()
            .any(|t| t.chars().filter(char::is_ascii_digit).count() > 1),
        "{tokens:?}"
    );
}

#[test]
fn rust_training_reproduces_the_python_reference_tokenizer() {
    let (Some(data), Some(reference)) = (
        shared_path("bench/trl/data/pretrain.jsonl"),
        shared_path("bench/trl/tokenizer/tokenizer.json"),
    ) else {
        return;
    };
    let rows = read_rows(&data).unwrap();
    let tokenizer = train_bpe(
        rows.iter().map(|r| r.text.as_deref().unwrap()),
        &BpeSettings::default(),
    )
    .unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&tokenizer_json(&tokenizer).unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    assert_eq!(ours["model"]["vocab"], theirs["model"]["vocab"]);
    assert_eq!(ours["model"]["merges"], theirs["model"]["merges"]);
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    assert_eq!(ours["added_tokens"], theirs["added_tokens"]);
}

#[test]
fn special_token_ids_come_from_tokenizer_config() {
    let Some(dir) = shared_path("bench/trl/tokenizer") else {
        return;
    };
    let tokenizer = load_tokenizer(&dir).unwrap();
    assert_eq!(
        special_tokens(&dir, &tokenizer).unwrap(),
        SpecialTokens {
            pad: 0,
            eos: 2,
            bos: Some(1)
        }
    );
}

#[test]
fn a_missing_pad_token_falls_back_to_eos() {
    let dir = tempfile::tempdir().unwrap();
    let texts = corpus();
    let tokenizer = train_bpe(texts.iter().map(String::as_str), &BpeSettings::default()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|eos|>", "bos_token": {"content": "<|bos|>"}}"#,
    )
    .unwrap();
    assert_eq!(
        special_tokens(dir.path(), &tokenizer).unwrap(),
        SpecialTokens {
            pad: 2,
            eos: 2,
            bos: Some(1)
        }
    );
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    let error = special_tokens(dir.path(), &tokenizer)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("not in the tokenizer's vocabulary"),
        "{error}"
    );
}
