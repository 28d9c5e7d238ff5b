//! Parity of the Rust model with transformers on the shared fixtures: the random
//! tiny-llama (../shared/fixtures/tiny-llama/reference.json) and the pretrained
//! stories260K (../shared/models/tinyllamas-stories260k-reference/golden.json).

use candle_core::{DType, Device, Tensor};
use rlhf_stages::model::{
    generate, token_logprobs, CausalLm, GenerationSettings, ModelTokenizer, Trainability,
};
use rlhf_stages::testing::shared_path;
use serde_json::Value;

fn load(folder: &std::path::Path) -> CausalLm {
    CausalLm::load(folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap()
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

/// Next-token log-probs of one unpadded sequence: (t-1,).
fn next_token_logprobs(model: &CausalLm, tokens: &[u32]) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, None, None).unwrap();
    let n = tokens.len();
    let lp = token_logprobs(
        &logits.narrow(1, 0, n - 1).unwrap(),
        &input.narrow(1, 1, n - 1).unwrap(),
    )
    .unwrap();
    lp.squeeze(0).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference() -> Option<(std::path::PathBuf, Value)> {
    let folder = shared_path("fixtures/tiny-llama")?;
    let text = std::fs::read_to_string(folder.join("reference.json")).unwrap();
    Some((folder, serde_json::from_str(&text).unwrap()))
}

#[test]
fn tiny_llama_next_token_logprobs_and_perplexity_match_transformers() {
    let Some((folder, reference)) = reference() else {
        return;
    };
    let model = load(&folder);
    let tokenizer = ModelTokenizer::from_folder(&folder).unwrap();
    for case in reference["texts"].as_array().unwrap() {
        let tokens = ids(&case["token_ids"]);
        let mut encoded = vec![1u32];
        encoded.extend(
            tokenizer
                .encode(case["text"].as_str().unwrap(), false)
                .unwrap(),
        );
        assert_eq!(
            encoded, tokens,
            "tokenizer ids differ for {:?}",
            case["text"]
        );
        let ours = next_token_logprobs(&model, &tokens);
        let diff = max_abs_diff(&ours, &floats(&case["next_token_logprobs"]));
        assert!(
            diff < 1e-4,
            "log-prob max diff {diff} for {:?}",
            case["text"]
        );
        let mean_nll = -ours.iter().map(|&x| x as f64).sum::<f64>() / ours.len() as f64;
        let expected = case["perplexity"].as_f64().unwrap();
        let relative = (mean_nll.exp() - expected).abs() / expected;
        assert!(
            relative < 1e-4,
            "perplexity {} vs {expected}",
            mean_nll.exp()
        );
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let last = model
            .forward(&input, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(tokens.len() - 1)
            .unwrap();
        let diff = max_abs_diff(&last.to_vec1().unwrap(), &floats(&case["last_logits"]));
        assert!(diff < 1e-4, "last logits max diff {diff}");
    }
}

#[test]
fn tiny_llama_right_padded_batch_equals_unpadded_rows() {
    let Some((folder, reference)) = reference() else {
        return;
    };
    let model = load(&folder);
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
    let lp = token_logprobs(
        &logits.narrow(1, 0, t - 1).unwrap(),
        &input.narrow(1, 1, t - 1).unwrap(),
    )
    .unwrap();
    let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
    for (row, expected) in batch["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let expected = floats(expected);
        let real = masks[row].iter().sum::<u32>() as usize;
        let ours = &lp[row][..real - 1];
        assert!(
            max_abs_diff(ours, &expected) < 1e-4,
            "padded row {row} vs transformers"
        );
        let alone = next_token_logprobs(&model, &rows[row][..real]);
        assert!(
            max_abs_diff(ours, &alone) < 1e-5,
            "padded row {row} vs the row alone"
        );
    }
}

#[test]
fn tiny_llama_greedy_generation_is_token_identical_to_transformers() {
    let Some((folder, reference)) = reference() else {
        return;
    };
    let model = load(&folder);
    let greedy = &reference["greedy"];
    let settings = GenerationSettings {
        max_new_tokens: greedy["max_new_tokens"].as_u64().unwrap() as usize,
        eos_token_ids: vec![],
        ..GenerationSettings::greedy()
    };
    let output = generate(&model, &[ids(&greedy["prompt_ids"])], &settings, None).unwrap();
    assert_eq!(output.tokens[0], ids(&greedy["new_token_ids"]));
    let diff = max_abs_diff(&output.logprobs[0], &floats(&greedy["new_token_logprobs"]));
    assert!(diff < 1e-4, "sampled-token log-prob diff {diff}");
}

fn golden() -> Option<(std::path::PathBuf, Value)> {
    let folder = shared_path("models/tinyllamas-stories260k")?;
    let golden = shared_path("models/tinyllamas-stories260k-reference/golden.json")?;
    Some((
        folder,
        serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap(),
    ))
}

#[test]
fn stories260k_prompt_logits_and_sentence_nll_match_golden() {
    let Some((folder, golden)) = golden() else {
        return;
    };
    let model = load(&folder);
    let tokenizer = ModelTokenizer::from_folder(&folder).unwrap();
    let prompt = ids(&golden["prompt_ids"]);
    assert_eq!(
        tokenizer
            .encode(golden["prompt"].as_str().unwrap(), true)
            .unwrap(),
        prompt
    );
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let last = model
        .forward(&input, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap();
    let diff = max_abs_diff(
        &last.to_vec1().unwrap(),
        &floats(&golden["last_logits_of_prompt"]),
    );
    assert!(diff < 1e-4, "prompt logits diff {diff}");
    for sentence in golden["sentences"].as_array().unwrap() {
        let tokens = ids(&sentence["ids"]);
        let lp = next_token_logprobs(&model, &tokens);
        let nll = -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64;
        let expected = sentence["mean_nll"].as_f64().unwrap();
        assert!(
            (nll - expected).abs() / expected < 1e-4,
            "mean nll {nll} vs {expected}"
        );
    }
}

#[test]
fn stories260k_greedy_continuation_matches_golden() {
    let Some((folder, golden)) = golden() else {
        return;
    };
    let model = load(&folder);
    let prompt = ids(&golden["prompt_ids"]);
    let expected = ids(&golden["greedy_ids"]);
    let settings = GenerationSettings {
        max_new_tokens: expected.len() - prompt.len(),
        eos_token_ids: vec![],
        ..GenerationSettings::greedy()
    };
    let output = generate(&model, std::slice::from_ref(&prompt), &settings, None).unwrap();
    assert_eq!(output.tokens[0], expected[prompt.len()..].to_vec());
}
