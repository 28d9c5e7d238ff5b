//! KV-cache generation: greedy equals argmax of the no-cache forward, a batch gives the
//! same tokens as each row alone, stopping rules, and seeded sampling.

#[path = "model_common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_stages::model::generate::FinishReason;
use rlhf_stages::model::{generate, generate_rows, token_logprobs, GenerationSettings};

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 5, 9],
        vec![1, 40, 41, 42, 43, 44, 45],
        vec![1],
        vec![1, 3, 3, 3, 60],
    ]
}

fn settings(max_new_tokens: usize) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens,
        ..GenerationSettings::greedy()
    }
}

#[test]
fn greedy_with_kv_cache_equals_argmax_of_the_full_forward() {
    let model = tiny_model(11);
    let prompt = prompts()[1].clone();
    let output = generate(&model, std::slice::from_ref(&prompt), &settings(12), None).unwrap();
    let mut sequence = prompt.clone();
    for (step, &token) in output.tokens[0].iter().enumerate() {
        let input = Tensor::new(sequence.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&input, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(sequence.len() - 1)
            .unwrap();
        let expected = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(token, expected, "step {step}");
        let lp = candle_nn::ops::log_softmax(&logits, 0)
            .unwrap()
            .get(token as usize)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (lp - output.logprobs[0][step]).abs() < 1e-4,
            "log-prob at step {step}"
        );
        sequence.push(token);
    }
    assert_eq!(output.tokens[0].len(), 12);
}

#[test]
fn a_batch_generates_the_same_tokens_as_each_row_alone() {
    let model = tiny_model(12);
    let batch = generate(&model, &prompts(), &settings(10), None).unwrap();
    for (row, prompt) in prompts().iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(prompt), &settings(10), None).unwrap();
        assert_eq!(batch.tokens[row], alone.tokens[0], "row {row}");
        for (a, b) in batch.logprobs[row].iter().zip(&alone.logprobs[0]) {
            assert!((a - b).abs() < 1e-4, "row {row}: {a} vs {b}");
        }
    }
}

#[test]
fn a_row_stops_at_eos_and_the_others_continue() {
    let model = tiny_model(13);
    let free = generate(&model, &prompts(), &settings(8), None).unwrap();
    // Declare the third token generated for row 0 an EOS.
    let eos = free.tokens[0][2];
    let stopped = generate(
        &model,
        &prompts(),
        &GenerationSettings {
            eos_token_ids: vec![eos],
            ..settings(8)
        },
        None,
    )
    .unwrap();
    for row in 0..prompts().len() {
        let expected_len = free.tokens[row]
            .iter()
            .position(|&t| t == eos)
            .map(|i| i + 1)
            .unwrap_or(8);
        assert_eq!(
            stopped.tokens[row],
            free.tokens[row][..expected_len].to_vec(),
            "row {row}"
        );
        let reason = if expected_len < 8 || free.tokens[row][7] == eos {
            FinishReason::Eos
        } else {
            FinishReason::MaxNewTokens
        };
        assert_eq!(stopped.finish_reasons[row], reason, "row {row}");
    }
    let (ids, logprobs, mask) = stopped.padded(0, &Device::Cpu).unwrap();
    assert_eq!(ids.dims(), &[4, 8]);
    assert_eq!(logprobs.dims(), &[4, 8]);
    let row0: Vec<f32> = mask.get(0).unwrap().to_vec1().unwrap();
    assert_eq!(row0, vec![1., 1., 1., 0., 0., 0., 0., 0.]);
}

#[test]
fn sampling_is_reproducible_with_a_seed_and_top_k_one_is_greedy() {
    let model = tiny_model(14);
    let sampled = |seed: u64, top_k: Option<usize>| {
        let settings = GenerationSettings {
            temperature: 1.0,
            top_k,
            top_p: Some(0.9),
            seed,
            ..settings(10)
        };
        generate(&model, &prompts(), &settings, None).unwrap()
    };
    assert_eq!(sampled(1, None).tokens, sampled(1, None).tokens);
    assert_ne!(sampled(1, None).tokens, sampled(2, None).tokens);
    assert_eq!(
        sampled(3, Some(1)).tokens,
        generate(&model, &prompts(), &settings(10), None)
            .unwrap()
            .tokens
    );
}

#[test]
fn a_sampled_batch_cut_into_parts_draws_the_same_tokens_as_the_whole() {
    let model = tiny_model(14);
    let settings = GenerationSettings {
        temperature: 1.0,
        seed: 5,
        ..settings(10)
    };
    let all = prompts();
    let whole = generate(&model, &all, &settings, None).unwrap();
    let head = generate_rows(&model, &all[..1], 0, &settings, None).unwrap();
    let tail = generate_rows(&model, &all[1..], 1, &settings, None).unwrap();
    let parts: Vec<Vec<u32>> = head.tokens.into_iter().chain(tail.tokens).collect();
    assert_eq!(parts, whole.tokens);
    // Without the offset the tail would replay the head's streams: different tokens.
    let replayed = generate_rows(&model, &all[1..], 0, &settings, None).unwrap();
    assert_ne!(replayed.tokens, whole.tokens[1..].to_vec());
}

#[test]
fn rows_sharing_a_prompt_sample_as_if_each_had_run_its_own_prefill() {
    // A GRPO-style batch: each prompt repeated, and one left alone. The shared prompts
    // are run through the model once; every row must still draw what it would alone.
    let model = tiny_model(16);
    let settings = GenerationSettings {
        temperature: 1.0,
        seed: 9,
        ..settings(8)
    };
    let base = prompts();
    let batch: Vec<Vec<u32>> = vec![
        base[0].clone(),
        base[0].clone(),
        base[1].clone(),
        base[0].clone(),
        base[3].clone(),
        base[1].clone(),
    ];
    let together = generate(&model, &batch, &settings, None).unwrap();
    for (row, prompt) in batch.iter().enumerate() {
        let alone =
            generate_rows(&model, std::slice::from_ref(prompt), row, &settings, None).unwrap();
        assert_eq!(alone.tokens[0], together.tokens[row], "row {row}");
        for (a, b) in alone.logprobs[0].iter().zip(&together.logprobs[row]) {
            assert!((a - b).abs() < 1e-5, "row {row}: {a} vs {b}");
        }
    }
    // The repeated prompts drew different completions (their own streams).
    assert_ne!(together.tokens[0], together.tokens[1]);
}

#[test]
fn sampled_logprobs_equal_teacher_forced_logprobs_of_the_same_tokens() {
    let model = tiny_model(15);
    let prompt = vec![1u32, 7, 8, 9];
    let settings = GenerationSettings {
        temperature: 1.0,
        seed: 5,
        ..settings(6)
    };
    let output = generate(&model, std::slice::from_ref(&prompt), &settings, None).unwrap();
    let full: Vec<u32> = prompt.iter().chain(&output.tokens[0]).copied().collect();
    let input = Tensor::new(full.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let n = full.len();
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
    for (i, sampled) in output.logprobs[0].iter().enumerate() {
        assert!(
            (lp[prompt.len() - 1 + i] - sampled).abs() < 1e-4,
            "token {i}"
        );
    }
}
