//! LoRA, heads and trainability: zero-initialised adapters leave the model unchanged,
//! merging equals the unmerged forward, every trainable variable gets a gradient, and
//! scalar heads read the right positions.

#[path = "model_common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use rand::SeedableRng;
use rlhf_stages::model::{
    completion_logprobs, CausalLm, LoraConfig, LoraTargets, RewardHead, ScalarHead, ScalarHeadKind,
    TokenBatch, Trainability,
};

fn lora_config(targets: LoraTargets) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets,
        use_rslora: false,
    }
}

/// Sets every LoRA B to a seeded random nonzero value (as after a training step).
fn randomise_b(varmap: &VarMap) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            let noise = Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
    }
}

#[test]
fn zero_initialised_lora_equals_base_model() {
    let base = tiny_model(1);
    let mut adapted = base.clone();
    let varmap = VarMap::new();
    adapted
        .add_lora(
            &lora_config(LoraTargets::All("all-linear".into())),
            &varmap,
            7,
        )
        .unwrap();
    assert_eq!(
        varmap.all_vars().len(),
        2 * 7 * 2,
        "A and B for 7 modules in 2 layers"
    );
    let (ids, mask) = padded_batch(&sample_rows());
    let diff = max_abs_diff(
        &base.forward(&ids, Some(&mask), None).unwrap(),
        &adapted.forward(&ids, Some(&mask), None).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn merged_lora_equals_unmerged_forward() {
    let mut model = tiny_model(2);
    let varmap = VarMap::new();
    model
        .add_lora(
            &lora_config(LoraTargets::Modules(vec![
                "q_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ])),
            &varmap,
            3,
        )
        .unwrap();
    randomise_b(&varmap);
    let (ids, mask) = padded_batch(&sample_rows());
    let unmerged = model.forward(&ids, Some(&mask), None).unwrap();
    let base = tiny_model(2).forward(&ids, Some(&mask), None).unwrap();
    assert!(
        max_abs_diff(&unmerged, &base) > 1e-2,
        "nonzero B must change the output"
    );
    let merged = model.merge_lora().unwrap();
    assert!(merged.layers[0].self_attn.q_proj.lora.is_none());
    // Merging reorders float sums: on logits near 6 the two differed by 3.5e-6 to 7.4e-6
    // over 18 random B draws, so 1e-5 failed now and then; skipping the merge moves > 1e-2.
    assert!(max_abs_diff(&unmerged, &merged.forward(&ids, Some(&mask), None).unwrap()) < 5e-5);
}

fn assert_every_var_has_nonzero_gradient(varmap: &VarMap, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert!(!data.is_empty());
    for (name, var) in data.iter() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "gradient of `{name}` is {norm}"
        );
    }
}

fn completion_batch() -> TokenBatch {
    let (input_ids, attention_mask) = padded_batch(&sample_rows());
    // The last two real tokens of every row are the completion.
    let lengths: Vec<usize> = sample_rows().iter().map(Vec::len).collect();
    let width = input_ids.dim(1).unwrap();
    let completion: Vec<u32> = lengths
        .iter()
        .flat_map(|&l| (0..width).map(move |i| u32::from(i + 2 >= l && i < l)))
        .collect();
    TokenBatch {
        input_ids,
        attention_mask,
        completion_mask: Tensor::from_vec(completion, (lengths.len(), width), &Device::Cpu)
            .unwrap(),
    }
}

#[test]
fn every_lora_variable_receives_a_gradient_once_b_is_nonzero() {
    let mut model = tiny_model(3);
    let varmap = VarMap::new();
    model
        .add_lora(
            &lora_config(LoraTargets::All("all-linear".into())),
            &varmap,
            5,
        )
        .unwrap();
    randomise_b(&varmap);
    let loss = completion_logprobs(&model, &completion_batch())
        .unwrap()
        .mean_logprob()
        .unwrap()
        .neg()
        .unwrap();
    assert_every_var_has_nonzero_gradient(&varmap, &loss);
}

#[test]
fn every_weight_receives_a_gradient_under_full_fine_tuning() {
    let varmap = VarMap::new();
    let config = tiny_config("qwen2", 4, 2, true);
    let model = CausalLm::random(
        config,
        4,
        DType::F32,
        &Device::Cpu,
        Trainability::Full(&varmap),
    )
    .unwrap();
    // embed, 2 x (7 weights + 3 biases + 2 norms), final norm; the head is tied.
    assert_eq!(varmap.all_vars().len(), 1 + 2 * 12 + 1);
    let loss = completion_logprobs(&model, &completion_batch())
        .unwrap()
        .mean_logprob()
        .unwrap()
        .neg()
        .unwrap();
    assert_every_var_has_nonzero_gradient(&varmap, &loss);
}

#[test]
fn value_head_and_lora_receive_gradients_through_the_hidden_states() {
    let mut model = tiny_model(5);
    let varmap = VarMap::new();
    model
        .add_lora(
            &lora_config(LoraTargets::Modules(vec![
                "k_proj".into(),
                "up_proj".into(),
            ])),
            &varmap,
            6,
        )
        .unwrap();
    randomise_b(&varmap);
    let head = ScalarHead::new(
        ScalarHeadKind::Value,
        32,
        &varmap,
        "value.",
        9,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (ids, mask) = padded_batch(&sample_rows());
    let values = head
        .values(&model.hidden_states(&ids, Some(&mask), None).unwrap())
        .unwrap(); // (b, t)
    assert_eq!(values.dims(), ids.dims());
    let loss = (values * mask.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_every_var_has_nonzero_gradient(&varmap, &loss);
}

#[test]
fn reward_head_reads_the_last_real_token_and_ignores_padding() {
    let model = tiny_model(6);
    let varmap = VarMap::new();
    let head = ScalarHead::new(
        ScalarHeadKind::Reward,
        32,
        &varmap,
        "",
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let rows = sample_rows();
    let (ids, mask) = padded_batch(&rows);
    let rewards: Vec<f32> = head
        .rewards(
            &model.hidden_states(&ids, Some(&mask), None).unwrap(),
            &mask,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    for (row, tokens) in rows.iter().enumerate() {
        let alone = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let values: Vec<f32> = head
            .values(&model.hidden_states(&alone, None, None).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (values[tokens.len() - 1] - rewards[row]).abs() < 1e-5,
            "row {row}"
        );
    }
}

#[test]
fn lora_dropout_is_seeded_and_only_active_in_training_forward() {
    let mut model = tiny_model(7);
    let varmap = VarMap::new();
    let config = LoraConfig {
        dropout: 0.5,
        ..lora_config(LoraTargets::All("all-linear".into()))
    };
    model.add_lora(&config, &varmap, 1).unwrap();
    randomise_b(&varmap);
    let (ids, mask) = padded_batch(&sample_rows());
    let train = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        model
            .forward_train(&ids, Some(&mask), None, &mut rng)
            .unwrap()
    };
    let eval = model.forward(&ids, Some(&mask), None).unwrap();
    assert_eq!(
        max_abs_diff(&eval, &model.forward(&ids, Some(&mask), None).unwrap()),
        0.0
    );
    assert_eq!(max_abs_diff(&train(11), &train(11)), 0.0);
    assert!(max_abs_diff(&train(11), &train(12)) > 1e-3);
    assert!(max_abs_diff(&train(11), &eval) > 1e-3);
}

#[test]
fn unknown_lora_target_is_an_error_naming_it() {
    let mut model = tiny_model(8);
    let error = model
        .add_lora(
            &lora_config(LoraTargets::Modules(vec!["qproj".into()])),
            &VarMap::new(),
            1,
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`qproj`") && error.contains("q_proj"),
        "{error}"
    );
}

/// Mean log-prob of `row[prompt..]` under `model`, the row scored alone.
fn mean_reply_logprob(model: &CausalLm, row: &[u32], prompt: usize) -> f32 {
    let ids = Tensor::new(row, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap(); // (1, t)
    let attention = Tensor::ones_like(&ids).unwrap();
    let completion: Vec<u32> = (0..row.len()).map(|i| u32::from(i >= prompt)).collect();
    let batch = TokenBatch {
        input_ids: ids,
        attention_mask: attention,
        completion_mask: Tensor::new(completion, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    };
    let scored = completion_logprobs(model, &batch).unwrap();
    let total: f32 = scored
        .sequence_logprobs()
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    total / (row.len() - prompt) as f32
}

#[test]
fn reward_head_with_the_logprob_feature_starts_as_the_mean_reply_logprob() {
    let model = tiny_model(8);
    let varmap = VarMap::new();
    let head = RewardHead::new(32, true, &varmap, 3, &Device::Cpu).unwrap();
    let rows = sample_rows();
    let (ids, mask) = padded_batch(&rows);
    // The reply is each row's last two tokens.
    let width = ids.dim(1).unwrap();
    let reply: Vec<u32> = rows
        .iter()
        .flat_map(|row| (0..width).map(move |i| u32::from(i + 2 >= row.len() && i < row.len())))
        .collect();
    let reply = Tensor::from_vec(reply, ids.dims(), &Device::Cpu).unwrap();
    let hidden = model.hidden_states(&ids, Some(&mask), None).unwrap();
    let (rewards, means) = head
        .rewards(&model, &ids, &hidden, &mask, &reply, true)
        .unwrap(); // (b,), (b,)
    let values: Vec<f32> = rewards.to_vec1().unwrap();
    let means: Vec<f32> = means.unwrap().to_vec1().unwrap();
    for (row, tokens) in rows.iter().enumerate() {
        let expected = mean_reply_logprob(&model, tokens, tokens.len() - 2);
        assert!(
            (values[row] - expected).abs() < 1e-5,
            "row {row}: {} vs {expected}",
            values[row]
        );
        assert!((means[row] - expected).abs() < 1e-5, "row {row}");
    }
    // Both parts learn: the hidden-state head and the feature's weight.
    assert_every_var_has_nonzero_gradient(&varmap, &rewards.sum_all().unwrap());
    // Saved and reloaded, it scores the same.
    let tensors = head.checkpoint_tensors().into_iter().collect();
    let reloaded = RewardHead::from_checkpoint(&tensors).unwrap();
    let again = reloaded
        .rewards(&model, &ids, &hidden, &mask, &reply, false)
        .unwrap()
        .0;
    assert!(max_abs_diff(&rewards, &again) < 1e-7);
}

#[test]
fn reward_head_without_the_logprob_feature_is_the_plain_last_token_head() {
    let model = tiny_model(9);
    let varmap = VarMap::new();
    let head = RewardHead::new(32, false, &varmap, 3, &Device::Cpu).unwrap();
    assert!(head.logprob_weight.is_none());
    assert_eq!(head.checkpoint_tensors().len(), 1, "score.weight only");
    let (ids, mask) = padded_batch(&sample_rows());
    let hidden = model.hidden_states(&ids, Some(&mask), None).unwrap();
    let full = head
        .rewards(&model, &ids, &hidden, &mask, &mask, false)
        .unwrap()
        .0;
    let plain = head.score.rewards(&hidden, &mask).unwrap();
    assert!(max_abs_diff(&full, &plain) < 1e-7);
    assert!(
        plain
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}
