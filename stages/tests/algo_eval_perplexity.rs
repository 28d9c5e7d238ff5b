//! Perplexity of the tiny-llama fixture's texts equals the transformers reference.
//!
//! Expected numbers: `../shared/fixtures/tiny-llama/reference.json` (`texts[i].perplexity`,
//! made by the fixture's `make_fixture.py` with transformers: exp of the mean next-token
//! NLL, each text alone). Here the four texts go through the model as one right-padded
//! batch, and `token_logprobs` + `perplexity` with the shifted attention mask must give
//! each text's perplexity: the mask, not the padding, decides which tokens count.

use candle_core::{DType, Device, Tensor};
use rlhf_stages::algo::lm::token_logprobs;
use rlhf_stages::eval::metrics::{perplexity, PerplexityAccumulator};
use rlhf_stages::model::{CausalLm, Trainability};
use rlhf_stages::testing::shared_path;
use serde_json::Value;

fn rows(value: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn perplexity_of_a_right_padded_batch_matches_transformers_per_text() {
    let Some(folder) = shared_path("fixtures/tiny-llama") else {
        return;
    };
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap())
            .unwrap();
    let model = CausalLm::load(&folder, DType::F32, &Device::Cpu, Trainability::Frozen).unwrap();
    let batch = &reference["batch_right_padded"];
    let (ids, attention) = (rows(&batch["input_ids"]), rows(&batch["attention_mask"]));
    let (b, t) = (ids.len(), ids[0].len());
    let input_ids = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap();
    let attention_mask = Tensor::from_vec(attention.concat(), (b, t), &Device::Cpu).unwrap();

    let logits = model
        .forward(&input_ids, Some(&attention_mask), None)
        .unwrap(); // (b, t, v)
    let predicting = logits.narrow(1, 0, t - 1).unwrap(); // position i predicts token i + 1
    let targets = input_ids.narrow(1, 1, t - 1).unwrap();
    let nll = token_logprobs(&predicting, &targets)
        .unwrap()
        .neg()
        .unwrap(); // (b, t - 1)
    let mask = attention_mask
        .narrow(1, 1, t - 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();

    let texts = reference["texts"].as_array().unwrap();
    let mut accumulator = PerplexityAccumulator::default();
    let (mut total_nll, mut total_tokens) = (0.0, 0.0);
    for (row, text) in texts.iter().enumerate() {
        let row_nll = nll.narrow(0, row, 1).unwrap();
        let row_mask = mask.narrow(0, row, 1).unwrap();
        let expected = text["perplexity"].as_f64().unwrap();
        let actual = perplexity(&row_nll, &row_mask).unwrap();
        assert!(
            (actual / expected - 1.0).abs() < 1e-4,
            "text {row}: perplexity {actual} vs transformers {expected}"
        );
        accumulator.add(&row_nll, &row_mask).unwrap();
        let n = text["next_token_logprobs"].as_array().unwrap().len() as f64;
        total_nll += text["mean_nll"].as_f64().unwrap() * n;
        total_tokens += n;
    }
    let pooled = accumulator.perplexity().unwrap();
    let expected_pooled = (total_nll / total_tokens).exp();
    assert!(
        (pooled / expected_pooled - 1.0).abs() < 1e-4,
        "pooled {pooled} vs {expected_pooled}"
    );
}
