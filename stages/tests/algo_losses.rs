//! The loss and estimator functions of `rlhf_stages::algo` against PyTorch reference numbers.
//!
//! Every expected number comes from `stages/tests/reference/algo_losses.json`, produced by
//! `stages/tests/reference/algo_losses.py` (PyTorch float64, TRL's formulas transcribed line
//! for line; schedules from transformers itself). Regenerate with, from the repo root:
//!     /work/pyenv/bin/python stages/tests/reference/algo_losses.py
//! Tests compute in f64 so that a formula difference, not rounding, is what fails them.
//! Gradient tests compare candle's backward pass with torch.autograd's on the same inputs.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use rlhf_stages::algo::dpo::{dpo_loss, DpoLossType};
use rlhf_stages::algo::gae::gae;
use rlhf_stages::algo::grpo::{
    group_advantages, grpo_loss, rloo_advantages, GrpoLossConfig, LossAggregation,
};
use rlhf_stages::algo::kl::{kl_estimate, KlEstimator};
use rlhf_stages::algo::lm::{
    entropy_from_logits, masked_token_cross_entropy, sequence_logprobs, token_logprobs,
};
use rlhf_stages::algo::masked::{
    masked_mean, masked_mean_per_row, masked_sum, masked_var, masked_whiten,
};
use rlhf_stages::algo::ppo::{
    clip_scores, explained_variance, penalize_missing_eos, per_token_rewards, ppo_policy_loss,
    ppo_value_loss,
};
use rlhf_stages::algo::reward::{bradley_terry_loss, pair_accuracy};
use rlhf_stages::algo::schedule::{LearningRateSchedule, ScheduleKind};
use rlhf_stages::algo::AlgoError;
use serde_json::Value;

const TOLERANCE: f64 = 1e-10;

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/algo_losses.json"
        );
        let text = std::fs::read_to_string(path).expect("reference JSON is committed");
        serde_json::from_str(&text).expect("reference JSON parses")
    })
}

fn flatten(value: &Value, shape: &mut Vec<usize>, depth: usize, data: &mut Vec<f64>) {
    match value {
        Value::Array(items) => {
            if shape.len() == depth {
                shape.push(items.len());
            }
            for item in items {
                flatten(item, shape, depth + 1, data);
            }
        }
        other => data.push(other.as_f64().expect("a number")),
    }
}

/// A float64 tensor from a (nested) JSON array.
fn tensor(value: &Value) -> Tensor {
    let (mut shape, mut data) = (Vec::new(), Vec::new());
    flatten(value, &mut shape, 0, &mut data);
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

fn assert_close_values(actual: &[f64], expected: &[f64], tolerance: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= tolerance,
        "{what}: max |diff| {worst:e} > {tolerance:e}\nactual   {actual:?}\nexpected {expected:?}"
    );
}

fn assert_tensor(actual: &Tensor, expected: &Value, what: &str) {
    assert_close_values(&values(actual), &values(&tensor(expected)), TOLERANCE, what);
}

fn assert_scalar(actual: &Tensor, expected: &Value, what: &str) {
    assert_close_values(
        &[scalar(actual)],
        &[expected.as_f64().unwrap()],
        TOLERANCE,
        what,
    );
}

fn mask() -> Tensor {
    tensor(&reference()["mask"])
}

#[test]
fn masked_statistics_match_trl_core() {
    let r = &reference()["masked"];
    let v = tensor(&r["values"]);
    assert_scalar(&masked_sum(&v, &mask()).unwrap(), &r["sum"], "masked_sum");
    assert_scalar(
        &masked_mean(&v, &mask()).unwrap(),
        &r["mean"],
        "masked_mean",
    );
    assert_tensor(
        &masked_mean_per_row(&v, &mask()).unwrap(),
        &r["mean_per_row"],
        "masked_mean_per_row",
    );
    assert_scalar(
        &masked_var(&v, &mask(), true).unwrap(),
        &r["var_unbiased"],
        "masked_var unbiased",
    );
    assert_scalar(
        &masked_var(&v, &mask(), false).unwrap(),
        &r["var_biased"],
        "masked_var biased",
    );
    assert_tensor(
        &masked_whiten(&v, &mask(), true).unwrap(),
        &r["whiten"],
        "masked_whiten",
    );
    assert_tensor(
        &masked_whiten(&v, &mask(), false).unwrap(),
        &r["whiten_keep_mean"],
        "masked_whiten keep mean",
    );
}

#[test]
fn masked_mean_of_an_empty_mask_is_an_error_not_nan() {
    let v = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let empty = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let error = masked_mean(&v, &empty).unwrap_err();
    assert!(
        matches!(
            error,
            AlgoError::EmptyMask {
                function: "masked_mean",
                ..
            }
        ),
        "{error}"
    );
    let one = Tensor::new(&[[1f32, 0., 0.], [0., 0., 0.]], &Device::Cpu).unwrap();
    assert!(matches!(
        masked_var(&v, &one, true),
        Err(AlgoError::EmptyMask { .. })
    ));
}

#[test]
fn mask_of_another_shape_is_rejected_with_its_name() {
    let v = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let wrong = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    let message = masked_mean(&v, &wrong).unwrap_err().to_string();
    assert!(
        message.contains("masked_mean") && message.contains("`mask`") && message.contains("[2, 4]"),
        "{message}"
    );
}

#[test]
fn gae_matches_trl_compute_advantages_for_several_gamma_lambda() {
    let r = &reference()["gae"];
    let (rewards, critic) = (tensor(&r["rewards"]), tensor(&r["values"]));
    for case in r["cases"].as_array().unwrap() {
        let (gamma, lambda) = (
            case["gamma"].as_f64().unwrap(),
            case["lambda"].as_f64().unwrap(),
        );
        let out = gae(&rewards, &critic, &mask(), gamma, lambda).unwrap();
        // TRL leaves advantages of padding at 0 too when padding is on the right.
        assert_tensor(
            &out.advantages,
            &case["advantages"],
            &format!("advantages γ={gamma} λ={lambda}"),
        );
        assert_tensor(
            &out.returns,
            &case["returns"],
            &format!("returns γ={gamma} λ={lambda}"),
        );
    }
}

#[test]
fn gae_with_lambda_one_and_gamma_one_gives_reward_to_go_minus_value() {
    // Monte-Carlo identity: with γ = λ = 1, Â_t = Σ_{s≥t} r_s - V_t.
    let rewards = Tensor::new(&[[0.0f64, 0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let critic = Tensor::new(&[[0.5f64, 0.25, 0.75, 9.0]], &Device::Cpu).unwrap();
    let m = Tensor::new(&[[1.0f64, 1.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let out = gae(&rewards, &critic, &m, 1.0, 1.0).unwrap();
    assert_close_values(
        &values(&out.advantages),
        &[0.5, 0.75, 0.25, 0.0],
        1e-12,
        "advantages",
    );
    assert_close_values(
        &values(&out.returns),
        &[1.0, 1.0, 1.0, 0.0],
        1e-12,
        "returns",
    );
}

#[test]
fn gae_rejects_gamma_outside_unit_interval() {
    let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let error = gae(&x, &x, &x, 1.5, 0.95).unwrap_err();
    assert!(
        matches!(error, AlgoError::Parameter { name: "gamma", .. }),
        "{error}"
    );
}

#[test]
fn kl_estimators_k1_k3_mse_match_reference() {
    let r = &reference()["kl"];
    let (logp, reference_logp) = (tensor(&r["logprobs"]), tensor(&r["reference_logprobs"]));
    for (estimator, key) in [
        (KlEstimator::K1, "k1"),
        (KlEstimator::K3, "k3"),
        (KlEstimator::Mse, "mse"),
    ] {
        let kl = kl_estimate(&logp, &reference_logp, estimator).unwrap();
        assert_tensor(&kl, &r[key], key);
    }
}

#[test]
fn k3_and_mse_are_zero_when_policy_equals_reference_and_positive_otherwise() {
    let logp = Tensor::new(&[-1.0f64, -2.0, -0.5], &Device::Cpu).unwrap();
    for estimator in [KlEstimator::K3, KlEstimator::Mse] {
        assert_close_values(
            &values(&kl_estimate(&logp, &logp, estimator).unwrap()),
            &[0.0; 3],
            1e-15,
            "equal",
        );
        let shifted = logp.affine(1.0, 0.3).unwrap();
        assert!(values(&kl_estimate(&logp, &shifted, estimator).unwrap())
            .iter()
            .all(|k| *k > 0.0));
    }
}

#[test]
fn ppo_policy_loss_value_clip_fraction_and_gradient_match_trl() {
    let r = &reference()["ppo_policy"];
    let logp = Var::from_tensor(&tensor(&r["logprobs"])).unwrap();
    let out = ppo_policy_loss(
        logp.as_tensor(),
        &tensor(&r["old_logprobs"]),
        &tensor(&r["advantages"]),
        &mask(),
        r["clip_epsilon"].as_f64().unwrap(),
    )
    .unwrap();
    assert_scalar(&out.loss, &r["loss"], "loss");
    assert_scalar(&out.clip_fraction, &r["clip_fraction"], "clip_fraction");
    assert_scalar(&out.approx_kl, &r["approx_kl"], "approx_kl");
    let grads = out.loss.backward().unwrap();
    assert_tensor(
        grads.get(logp.as_tensor()).unwrap(),
        &r["grad_logprobs"],
        "d loss / d logprobs",
    );
}

#[test]
fn ppo_value_loss_value_clip_fraction_and_gradient_match_trl() {
    let r = &reference()["ppo_value"];
    let v = Var::from_tensor(&tensor(&r["values"])).unwrap();
    let out = ppo_value_loss(
        v.as_tensor(),
        &tensor(&r["old_values"]),
        &tensor(&r["returns"]),
        &mask(),
        r["clip_range_value"].as_f64().unwrap(),
    )
    .unwrap();
    assert_scalar(&out.loss, &r["loss"], "loss");
    assert_scalar(&out.clip_fraction, &r["clip_fraction"], "clip_fraction");
    let grads = out.loss.backward().unwrap();
    assert_tensor(
        grads.get(v.as_tensor()).unwrap(),
        &r["grad_values"],
        "d loss / d values",
    );
}

#[test]
fn per_token_rewards_put_the_score_on_the_last_response_token() {
    let r = &reference()["rewards"];
    let out = per_token_rewards(
        &tensor(&r["scores"]),
        &tensor(&r["kl"]),
        r["kl_coef"].as_f64().unwrap(),
        &mask(),
    )
    .unwrap();
    assert_tensor(&out.rewards, &r["rewards"], "rewards");
    assert_tensor(
        &out.non_score_rewards,
        &r["non_score_rewards"],
        "non_score_rewards",
    );
}

#[test]
fn entropy_and_its_gradient_match_torch() {
    let r = &reference()["entropy"];
    let logits = Var::from_tensor(&tensor(&r["logits"])).unwrap();
    let entropy = entropy_from_logits(logits.as_tensor()).unwrap();
    assert_tensor(&entropy, &r["entropy"], "entropy");
    let grads = entropy.sum_all().unwrap().backward().unwrap();
    assert_tensor(
        grads.get(logits.as_tensor()).unwrap(),
        &r["grad_logits_of_sum"],
        "d Σ H / d logits",
    );
}

#[test]
fn group_advantages_scaled_unscaled_and_rloo_match_trl() {
    let r = &reference()["group"];
    let rewards = tensor(&r["rewards"]);
    let g = r["group_size"].as_u64().unwrap() as usize;
    assert_tensor(
        &group_advantages(&rewards, g, true, 1e-4).unwrap(),
        &r["scaled"],
        "scaled",
    );
    assert_tensor(
        &group_advantages(&rewards, g, false, 1e-4).unwrap(),
        &r["unscaled"],
        "unscaled",
    );
    assert_tensor(&rloo_advantages(&rewards, g).unwrap(), &r["rloo"], "rloo");
}

#[test]
fn group_size_must_divide_the_rewards() {
    let rewards = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let error = group_advantages(&rewards, 2, true, 1e-4).unwrap_err();
    assert!(
        matches!(
            error,
            AlgoError::Parameter {
                name: "group_size",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn grpo_loss_token_and_sequence_aggregation_match_trl_with_gradients() {
    let r = &reference()["grpo"];
    for case in r["cases"].as_array().unwrap() {
        let logp = Var::from_tensor(&tensor(&r["logprobs"])).unwrap();
        let aggregation = match case["aggregation"].as_str().unwrap() {
            "token" => LossAggregation::Token,
            _ => LossAggregation::Sequence,
        };
        let config = GrpoLossConfig {
            clip_epsilon: r["clip_epsilon"].as_f64().unwrap(),
            beta: r["beta"].as_f64().unwrap(),
            aggregation,
        };
        let reference_logprobs = tensor(&r["reference_logprobs"]);
        let out = grpo_loss(
            logp.as_tensor(),
            &tensor(&r["old_logprobs"]),
            Some(&reference_logprobs),
            &tensor(&r["advantages"]),
            &mask(),
            config,
        )
        .unwrap();
        let what = format!("{aggregation:?}");
        assert_scalar(&out.loss, &case["loss"], &what);
        assert_scalar(out.mean_kl.as_ref().unwrap(), &case["mean_kl"], &what);
        assert_scalar(&out.clip_ratio, &case["clip_ratio"], &what);
        let grads = out.loss.backward().unwrap();
        assert_tensor(
            grads.get(logp.as_tensor()).unwrap(),
            &case["grad_logprobs"],
            &format!("{what} gradient"),
        );
    }
}

#[test]
fn grpo_on_policy_without_kl_has_unit_ratio_and_a_flowing_gradient() {
    let r = &reference()["grpo"];
    let logp = Var::from_tensor(&tensor(&r["logprobs"])).unwrap();
    let old = logp.as_tensor().detach();
    let config = GrpoLossConfig {
        clip_epsilon: 0.2,
        beta: 0.0,
        aggregation: LossAggregation::Token,
    };
    let out = grpo_loss(
        logp.as_tensor(),
        &old,
        None,
        &tensor(&r["advantages"]),
        &mask(),
        config,
    )
    .unwrap();
    assert!(out.mean_kl.is_none());
    assert_scalar(&out.loss, &r["on_policy_no_kl"]["loss"], "loss");
    let grads = out.loss.backward().unwrap();
    assert_tensor(
        grads.get(logp.as_tensor()).unwrap(),
        &r["on_policy_no_kl"]["grad_logprobs"],
        "gradient",
    );
}

#[test]
fn grpo_with_beta_but_no_reference_is_an_error() {
    let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let a = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let config = GrpoLossConfig {
        clip_epsilon: 0.2,
        beta: 0.04,
        aggregation: LossAggregation::Token,
    };
    let error = grpo_loss(&x, &x, None, &a, &x.ones_like().unwrap(), config).unwrap_err();
    assert!(
        matches!(error, AlgoError::Parameter { name: "beta", .. }),
        "{error}"
    );
}

#[test]
fn dpo_sigmoid_ipo_hinge_and_label_smoothing_match_trl_with_gradients() {
    let r = &reference()["dpo"];
    for case in r["cases"].as_array().unwrap() {
        let chosen = Var::from_tensor(&tensor(&r["policy_chosen"])).unwrap();
        let rejected = Var::from_tensor(&tensor(&r["policy_rejected"])).unwrap();
        let loss_type = match case["loss_type"].as_str().unwrap() {
            "sigmoid" => DpoLossType::Sigmoid,
            "ipo" => DpoLossType::Ipo,
            _ => DpoLossType::Hinge,
        };
        let (beta, smoothing) = (
            case["beta"].as_f64().unwrap(),
            case["label_smoothing"].as_f64().unwrap(),
        );
        let out = dpo_loss(
            chosen.as_tensor(),
            rejected.as_tensor(),
            &tensor(&r["reference_chosen"]),
            &tensor(&r["reference_rejected"]),
            beta,
            loss_type,
            smoothing,
        )
        .unwrap();
        let what = format!("{loss_type:?} β={beta} s={smoothing}");
        assert_scalar(&out.loss, &case["loss"], &what);
        assert_tensor(&out.chosen_rewards, &case["chosen_rewards"], &what);
        assert_tensor(&out.rejected_rewards, &case["rejected_rewards"], &what);
        assert_tensor(&out.margins, &case["margins"], &what);
        assert_scalar(&out.reward_accuracy, &case["reward_accuracy"], &what);
        let grads = out.loss.backward().unwrap();
        assert_tensor(
            grads.get(chosen.as_tensor()).unwrap(),
            &case["grad_chosen"],
            &format!("{what} d/dchosen"),
        );
        assert_tensor(
            grads.get(rejected.as_tensor()).unwrap(),
            &case["grad_rejected"],
            &format!("{what} d/drejected"),
        );
    }
}

#[test]
fn bradley_terry_loss_with_margin_and_centering_matches_trl_with_gradients() {
    let r = &reference()["bradley_terry"];
    for name in ["plain", "with_margin", "with_margin_center"] {
        let chosen = Var::from_tensor(&tensor(&r["chosen"])).unwrap();
        let rejected = Var::from_tensor(&tensor(&r["rejected"])).unwrap();
        let margin = tensor(&r["margin"]);
        let margin = (name != "plain").then_some(&margin);
        let center = r[name]["center_rewards_coefficient"].as_f64();
        let loss =
            bradley_terry_loss(chosen.as_tensor(), rejected.as_tensor(), margin, center).unwrap();
        assert_scalar(&loss, &r[name]["loss"], name);
        let grads = loss.backward().unwrap();
        assert_tensor(
            grads.get(chosen.as_tensor()).unwrap(),
            &r[name]["grad_chosen"],
            name,
        );
        assert_tensor(
            grads.get(rejected.as_tensor()).unwrap(),
            &r[name]["grad_rejected"],
            name,
        );
    }
    let accuracy = pair_accuracy(&tensor(&r["chosen"]), &tensor(&r["rejected"])).unwrap();
    assert_close_values(
        &[accuracy],
        &[r["accuracy"].as_f64().unwrap()],
        1e-12,
        "accuracy (ties count as wrong)",
    );
}

#[test]
fn token_logprobs_and_masked_cross_entropy_match_torch_with_gradient() {
    let r = &reference()["lm"];
    let logits = Var::from_tensor(&tensor(&r["logits"])).unwrap();
    let labels = tensor(&r["labels"]).to_dtype(DType::U32).unwrap();
    let lm_mask = tensor(&r["mask"]);
    let per_token = token_logprobs(logits.as_tensor(), &labels).unwrap();
    assert_tensor(&per_token, &r["token_logprobs"], "token_logprobs");
    assert_tensor(
        &sequence_logprobs(&per_token, &lm_mask).unwrap(),
        &r["sequence_logprobs"],
        "sequence_logprobs",
    );
    let loss = masked_token_cross_entropy(logits.as_tensor(), &labels, &lm_mask).unwrap();
    assert_scalar(&loss, &r["cross_entropy"], "cross_entropy");
    let grads = loss.backward().unwrap();
    assert_tensor(
        grads.get(logits.as_tensor()).unwrap(),
        &r["grad_logits"],
        "d CE / d logits",
    );
}

#[test]
fn cross_entropy_gradient_flows_in_f32_and_agrees_with_finite_differences() {
    // Training runs in f32: check one logit's gradient against a central difference.
    let r = &reference()["lm"];
    let logits = Var::from_tensor(&tensor(&r["logits"]).to_dtype(DType::F32).unwrap()).unwrap();
    let labels = tensor(&r["labels"]).to_dtype(DType::U32).unwrap();
    let lm_mask = tensor(&r["mask"]).to_dtype(DType::F32).unwrap();
    let loss_at = |x: &Tensor| scalar(&masked_token_cross_entropy(x, &labels, &lm_mask).unwrap());
    let grads = masked_token_cross_entropy(logits.as_tensor(), &labels, &lm_mask)
        .unwrap()
        .backward()
        .unwrap();
    let analytic = values(grads.get(logits.as_tensor()).unwrap());
    let base = values(logits.as_tensor());
    // The logit with the largest gradient: a selected token's own logit, whatever the data.
    let index = (0..analytic.len())
        .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
        .unwrap();
    let h = 1e-2;
    let mut plus = base.clone();
    plus[index] += h;
    let mut minus = base.clone();
    minus[index] -= h;
    let shape = logits.shape().clone();
    let numeric = (loss_at(
        &Tensor::from_vec(plus, shape.clone(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    ) - loss_at(
        &Tensor::from_vec(minus, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )) / (2.0 * h);
    assert!(analytic[index].abs() > 1e-3, "the chosen logit must matter");
    assert!(
        (analytic[index] - numeric).abs() < 1e-3,
        "analytic {} vs numeric {numeric}",
        analytic[index]
    );
}

#[test]
fn learning_rate_schedules_match_transformers() {
    for case in reference()["schedules"].as_array().unwrap() {
        let kind = match case["kind"].as_str().unwrap() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            _ => ScheduleKind::Cosine,
        };
        let schedule = LearningRateSchedule {
            kind,
            base_learning_rate: case["base_learning_rate"].as_f64().unwrap(),
            warmup_steps: case["warmup_steps"].as_u64().unwrap() as usize,
            total_steps: case["total_steps"].as_u64().unwrap() as usize,
        };
        let steps: Vec<usize> = case["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as usize)
            .collect();
        let actual: Vec<f64> = steps.iter().map(|&s| schedule.learning_rate(s)).collect();
        let expected: Vec<f64> = case["learning_rates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_close_values(&actual, &expected, 1e-15, &format!("{schedule:?}"));
    }
}

#[test]
fn log_sigmoid_is_stable_and_its_gradient_at_zero_is_one_half() {
    // torch: F.logsigmoid([-50, 0, 50]) = [-50, -log 2, -1.9e-22]; gradient 1 - σ(x) = [1, 0.5, 0].
    let x = Var::from_tensor(&Tensor::new(&[-50.0f64, 0.0, 50.0], &Device::Cpu).unwrap()).unwrap();
    let y = rlhf_stages::algo::ops::log_sigmoid(x.as_tensor()).unwrap();
    assert_close_values(
        &values(&y),
        &[-50.0, -std::f64::consts::LN_2, -(-50.0f64).exp()],
        1e-15,
        "log σ",
    );
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_close_values(
        &values(grads.get(x.as_tensor()).unwrap()),
        &[1.0, 0.5, 0.0],
        1e-15,
        "d log σ / dx",
    );
}

#[test]
fn score_clipping_missing_eos_penalty_and_explained_variance_match_reference() {
    let r = &reference()["score_helpers"];
    let scores = tensor(&r["scores"]);
    let clipped = clip_scores(&scores, r["clip_limit"].as_f64().unwrap()).unwrap();
    assert_tensor(&clipped, &r["clipped"], "clip_scores");
    let has_eos: Vec<bool> = r["has_eos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    let penalised = penalize_missing_eos(
        &scores,
        &has_eos,
        r["missing_eos_penalty"].as_f64().unwrap(),
    )
    .unwrap();
    assert_tensor(&penalised, &r["penalised"], "penalize_missing_eos");
    let explained =
        explained_variance(&tensor(&r["values"]), &tensor(&r["returns"]), &mask()).unwrap();
    assert_close_values(
        &[explained],
        &[r["explained_variance"].as_f64().unwrap()],
        1e-10,
        "explained_variance",
    );
}

#[test]
fn a_ppo_step_chained_like_trl_gives_trl_advantages_loss_and_gradient() {
    // rewards (k1 KL, score on the last token) -> GAE -> whitened advantages -> policy loss.
    let r = &reference()["ppo_pipeline"];
    let get = |k: &str| r[k].as_f64().unwrap();
    let kl = kl_estimate(
        &tensor(&r["logprobs"]),
        &tensor(&r["reference_logprobs"]),
        KlEstimator::K1,
    )
    .unwrap();
    let shaped = per_token_rewards(&tensor(&r["scores"]), &kl, get("kl_coef"), &mask()).unwrap();
    let out = gae(
        &shaped.rewards,
        &tensor(&r["values"]),
        &mask(),
        get("gamma"),
        get("lambda"),
    )
    .unwrap();
    let advantages = masked_whiten(&out.advantages, &mask(), true).unwrap();
    assert_tensor(
        &advantages,
        &r["whitened_advantages"],
        "whitened advantages",
    );
    assert_tensor(&out.returns, &r["returns"], "returns");
    let new_logprobs = Var::from_tensor(&tensor(&r["new_logprobs"])).unwrap();
    let policy = ppo_policy_loss(
        new_logprobs.as_tensor(),
        &tensor(&r["logprobs"]),
        &advantages,
        &mask(),
        get("clip_epsilon"),
    )
    .unwrap();
    assert_scalar(&policy.loss, &r["policy_loss"], "policy loss");
    let grads = policy.loss.backward().unwrap();
    assert_tensor(
        grads.get(new_logprobs.as_tensor()).unwrap(),
        &r["grad_new_logprobs"],
        "gradient",
    );
}

#[test]
fn losses_computed_in_f32_agree_with_the_reference_to_single_precision() {
    // Training runs in f32: the same formulas must work there (dtype handling of scalars,
    // masks and comparisons), within single-precision rounding.
    let f32_tensor = |v: &Value| tensor(v).to_dtype(DType::F32).unwrap();
    let f32_mask = mask().to_dtype(DType::F32).unwrap();
    let close = |actual: &Tensor, expected: &Value, what: &str| {
        let expected = match expected {
            Value::Number(_) => vec![expected.as_f64().unwrap()],
            _ => values(&tensor(expected)),
        };
        assert_close_values(&values(actual), &expected, 1e-4, what);
    };

    let r = &reference()["ppo_policy"];
    let out = ppo_policy_loss(
        &f32_tensor(&r["logprobs"]),
        &f32_tensor(&r["old_logprobs"]),
        &f32_tensor(&r["advantages"]),
        &f32_mask,
        0.2,
    )
    .unwrap();
    close(&out.loss, &r["loss"], "ppo policy f32");

    let r = &reference()["ppo_value"];
    let out = ppo_value_loss(
        &f32_tensor(&r["values"]),
        &f32_tensor(&r["old_values"]),
        &f32_tensor(&r["returns"]),
        &f32_mask,
        0.2,
    )
    .unwrap();
    close(&out.loss, &r["loss"], "ppo value f32");

    let r = &reference()["grpo"];
    let config = GrpoLossConfig {
        clip_epsilon: 0.2,
        beta: r["beta"].as_f64().unwrap(),
        aggregation: LossAggregation::Token,
    };
    let reference_logprobs = f32_tensor(&r["reference_logprobs"]);
    let out = grpo_loss(
        &f32_tensor(&r["logprobs"]),
        &f32_tensor(&r["old_logprobs"]),
        Some(&reference_logprobs),
        &f32_tensor(&r["advantages"]),
        &f32_mask,
        config,
    )
    .unwrap();
    close(&out.loss, &r["cases"][0]["loss"], "grpo f32");

    let r = &reference()["dpo"];
    let case = &r["cases"][0];
    let out = dpo_loss(
        &f32_tensor(&r["policy_chosen"]),
        &f32_tensor(&r["policy_rejected"]),
        &f32_tensor(&r["reference_chosen"]),
        &f32_tensor(&r["reference_rejected"]),
        case["beta"].as_f64().unwrap(),
        DpoLossType::Sigmoid,
        0.0,
    )
    .unwrap();
    close(&out.loss, &case["loss"], "dpo f32");

    let r = &reference()["gae"];
    let case = &r["cases"][0];
    let out = gae(
        &f32_tensor(&r["rewards"]),
        &f32_tensor(&r["values"]),
        &f32_mask,
        1.0,
        0.95,
    )
    .unwrap();
    assert_eq!(out.advantages.dtype(), DType::F32);
    close(&out.advantages, &case["advantages"], "gae f32");
}
