//! Parity with transformers on the repo's own fixtures (stages/tests/fixtures/model/,
//! made by scripts/fixtures/make_model_fixtures.py): a Qwen2 with q/k/v biases and tied
//! embeddings in the pre-transformers-5 config layout, and a Llama without GQA using
//! llama3 RoPE scaling. Same tolerances as the shared tiny-llama fixture.

use candle_core::{DType, Device, Tensor};
use rlhf_stages::model::{generate, token_logprobs, CausalLm, GenerationSettings, Trainability};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> (CausalLm, Value) {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name);
    let model = CausalLm::load(&folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let reference =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap())
            .unwrap();
    (model, reference)
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every check of reference.json: log-probs, perplexity, last logits, the right-padded
/// batch, and greedy generation.
fn check_against_reference(name: &str) {
    let (model, reference) = fixture(name);
    for case in reference["texts"].as_array().unwrap() {
        let tokens = ids(&case["token_ids"]);
        let n = tokens.len();
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, None, None).unwrap();
        let lp: Vec<f32> = token_logprobs(
            &logits.narrow(1, 0, n - 1).unwrap(),
            &input.narrow(1, 1, n - 1).unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
        let diff = max_abs_diff(&lp, &floats(&case["next_token_logprobs"]));
        assert!(diff < 1e-4, "{name}: log-prob diff {diff}");
        let perplexity = (-lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64).exp();
        let expected = case["perplexity"].as_f64().unwrap();
        assert!(
            (perplexity - expected).abs() / expected < 1e-4,
            "{name}: perplexity {perplexity} vs {expected}"
        );
        let last: Vec<f32> = logits
            .squeeze(0)
            .unwrap()
            .get(n - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            max_abs_diff(&last, &floats(&case["last_logits"])) < 1e-4,
            "{name}: last logits"
        );
    }
    let batch = &reference["batch_right_padded"];
    let rows: Vec<Vec<u32>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let masks: Vec<Vec<u32>> = batch["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    let input = Tensor::new(rows.concat(), &Device::Cpu)
        .unwrap()
        .reshape((b, t))
        .unwrap();
    let mask = Tensor::new(masks.concat(), &Device::Cpu)
        .unwrap()
        .reshape((b, t))
        .unwrap();
    let logits = model.forward(&input, Some(&mask), None).unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(
        &logits.narrow(1, 0, t - 1).unwrap(),
        &input.narrow(1, 1, t - 1).unwrap(),
    )
    .unwrap()
    .to_vec2()
    .unwrap();
    for (row, expected) in batch["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let expected = floats(expected);
        assert!(
            max_abs_diff(&lp[row][..expected.len()], &expected) < 1e-4,
            "{name}: padded row {row}"
        );
    }
    let greedy = &reference["greedy"];
    let settings = GenerationSettings {
        max_new_tokens: greedy["max_new_tokens"].as_u64().unwrap() as usize,
        ..GenerationSettings::greedy()
    };
    let output = generate(&model, &[ids(&greedy["prompt_ids"])], &settings, None).unwrap();
    assert_eq!(
        output.tokens[0],
        ids(&greedy["new_token_ids"]),
        "{name}: greedy tokens"
    );
}

#[test]
fn qwen2_with_qkv_bias_and_tied_embeddings_matches_transformers() {
    let (model, _) = fixture("qwen2-tiny");
    assert!(
        model.layers[0].self_attn.q_proj.bias.is_some()
            && model.layers[0].self_attn.o_proj.bias.is_none()
    );
    check_against_reference("qwen2-tiny");
}

#[test]
fn llama_without_gqa_and_llama3_rope_scaling_matches_transformers() {
    check_against_reference("llama-nogqa");
}
