//! Reading model folders: config.json in both transformers layouts, rope scaling
//! variants (unsupported ones named in the error), sharded safetensors, and the special
//! tokens and chat template of tokenizer_config.json.

use candle_core::{DType, Device, Tensor};
use rlhf_stages::model::weights::load_safetensors;
use rlhf_stages::model::{
    CausalLm, GenerationSettings, LlamaConfig, ModelFolder, ModelTokenizer, RopeScaling,
    Trainability,
};
use rlhf_stages::testing::shared_path;
use std::path::PathBuf;

fn config(extra: serde_json::Value) -> Result<LlamaConfig, String> {
    let mut base = serde_json::json!({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 10
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    let config: LlamaConfig = serde_json::from_value(base).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

#[test]
fn rope_theta_is_read_top_level_or_from_rope_parameters() {
    assert_eq!(
        config(serde_json::json!({"rope_theta": 500000.0}))
            .unwrap()
            .rope_theta(),
        500000.0
    );
    let nested =
        config(serde_json::json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}))
            .unwrap();
    assert_eq!(nested.rope_theta(), 1e6);
    assert_eq!(config(serde_json::json!({})).unwrap().rope_theta(), 10000.0);
    assert_eq!(
        config(serde_json::json!({})).unwrap().num_kv_heads(),
        2,
        "no GQA by default"
    );
}

#[test]
fn rope_scaling_variants_parse_and_unsupported_ones_are_named() {
    let linear =
        config(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
    assert_eq!(
        linear.rope_scaling().unwrap(),
        RopeScaling::Linear { factor: 2.0 }
    );
    let llama3 = config(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    .unwrap();
    assert!(matches!(
        llama3.rope_scaling().unwrap(),
        RopeScaling::Llama3 { .. }
    ));
    let yarn = config(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
        .unwrap_err();
    assert!(yarn.contains("`yarn`"), "{yarn}");
    let missing =
        config(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
            .unwrap_err();
    assert!(missing.contains("low_freq_factor"), "{missing}");
}

#[test]
fn unsupported_architectures_and_shapes_are_errors_naming_the_field() {
    assert!(config(serde_json::json!({"model_type": "gpt2"}))
        .unwrap_err()
        .contains("model_type `gpt2`"));
    assert!(config(serde_json::json!({"hidden_act": "gelu"}))
        .unwrap_err()
        .contains("hidden_act `gelu`"));
    assert!(config(serde_json::json!({"num_key_value_heads": 3}))
        .unwrap_err()
        .contains("num_key_value_heads 3"));
    assert!(
        config(serde_json::json!({"model_type": "qwen2", "use_sliding_window": true}))
            .unwrap_err()
            .contains("sliding")
    );
}

#[test]
fn sharded_checkpoint_loads_the_same_model_as_the_single_file() {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/llama-nogqa");
    let tensors = load_safetensors(&source, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let subset: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.path().join(shard)).unwrap();
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded =
        CausalLm::load(dir.path(), DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let single = CausalLm::load(&source, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 200]], &Device::Cpu).unwrap();
    let diff = (sharded.forward(&ids, None, None).unwrap()
        - single.forward(&ids, None, None).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(diff, 0.0);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let error = CausalLm::load(dir.path(), DType::F32, &Device::Cpu, Trainability::Frozen)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("model-00002-of-00002.safetensors"),
        "{error}"
    );
}

#[test]
fn missing_weights_file_is_an_error_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/llama-nogqa");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let error = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("hint:"),
        "{error}"
    );
}

#[test]
fn tokenizer_config_gives_special_tokens_and_the_default_chat_template() {
    let Some(shared) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        shared.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tokenizer_config = serde_json::json!({
        "bos_token": {"content": "<|bos|>", "lstrip": false},
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ messages }}"}]
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    let tokenizer = ModelTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(
        (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id
        ),
        (Some(1), Some(2), Some(0))
    );
    assert_eq!(tokenizer.chat_template.as_deref(), Some("{{ messages }}"));
}

#[test]
fn generation_stops_at_a_stop_string() {
    let Some(folder) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let model = CausalLm::load(&folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let tokenizer = ModelTokenizer::from_folder(&folder).unwrap();
    let prompt = vec![1u32, 51, 28, 223, 21, 13, 22, 31, 201, 35, 28];
    let free = rlhf_stages::model::generate(
        &model,
        std::slice::from_ref(&prompt),
        &GenerationSettings {
            max_new_tokens: 16,
            ..GenerationSettings::greedy()
        },
        None,
    )
    .unwrap();
    let text = tokenizer.decode(&free.tokens[0], false).unwrap();
    // A stop string made of the text of the first three new tokens.
    let stop = tokenizer.decode(&free.tokens[0][..3], false).unwrap();
    assert!(text.len() > stop.len());
    let settings = GenerationSettings {
        max_new_tokens: 16,
        stop_strings: vec![stop.clone()],
        ..GenerationSettings::greedy()
    };
    let stopped =
        rlhf_stages::model::generate(&model, &[prompt], &settings, Some(&tokenizer)).unwrap();
    let first_hit = (1..=16)
        .find(|&n| {
            tokenizer
                .decode(&free.tokens[0][..n], false)
                .unwrap()
                .contains(&stop)
        })
        .unwrap();
    assert_eq!(stopped.tokens[0], free.tokens[0][..first_hit].to_vec());
    assert_eq!(
        stopped.finish_reasons[0],
        rlhf_stages::model::generate::FinishReason::StopString
    );
}
