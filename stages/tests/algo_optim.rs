//! Gradient clipping and AdamW against PyTorch, and AdamW checkpoint/resume.
//!
//! Expected numbers: `stages/tests/reference/algo_optim.json`, written by
//! `stages/tests/reference/algo_optim.py` (torch.nn.utils.clip_grad_norm_ and
//! torch.optim.AdamW themselves, float64). Regenerate from the repo root with
//!     /work/pyenv/bin/python stages/tests/reference/algo_optim.py
//! Gradients are injected exactly: the backward pass of `Σ var·g` is `g`.

use std::sync::OnceLock;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rlhf_stages::algo::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rlhf_stages::algo::AlgoError;
use serde_json::Value;

const NAMES: [&str; 2] = ["layer.weight", "layer.bias"];

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/algo_optim.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference JSON is committed"))
            .expect("parses")
    })
}

fn tensor(value: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = match value.as_array().unwrap().first() {
        Some(Value::Array(_)) => value
            .as_array()
            .unwrap()
            .iter()
            .map(|r| serde_json::from_value(r.clone()).unwrap())
            .collect(),
        _ => {
            return Tensor::new(
                serde_json::from_value::<Vec<f64>>(value.clone()).unwrap(),
                &Device::Cpu,
            )
            .unwrap()
        }
    };
    let (n, m) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, m), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(actual: &Tensor, expected: &Value, tolerance: f64, what: &str) {
    let (a, e) = (flat(actual), flat(&tensor(expected)));
    let worst = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(
        a.len() == e.len() && worst <= tolerance,
        "{what}: max |diff| {worst:e}\n{a:?}\n{e:?}"
    );
}

fn fresh_vars() -> Vec<Var> {
    NAMES
        .iter()
        .map(|n| Var::from_tensor(&tensor(&reference()["initial"][n])).unwrap())
        .collect()
}

/// A GradStore holding exactly `grads[name]` for each named var in `with` (the others get none).
fn inject(vars: &[Var], grads: &Value, with: &[bool]) -> GradStore {
    let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
    for ((var, name), keep) in vars.iter().zip(NAMES).zip(with) {
        if *keep {
            let term = (var.as_tensor() * tensor(&grads[name]))
                .unwrap()
                .sum_all()
                .unwrap();
            total = (total + term).unwrap();
        }
    }
    total.backward().unwrap()
}

fn torch_config() -> AdamWConfig {
    let c = &reference()["adamw"]["config"];
    let get = |k: &str| c[k].as_f64().unwrap();
    AdamWConfig {
        learning_rate: get("learning_rate"),
        beta1: get("beta1"),
        beta2: get("beta2"),
        eps: get("eps"),
        weight_decay: get("weight_decay"),
    }
}

fn named(vars: &[Var]) -> Vec<(String, Var)> {
    NAMES
        .iter()
        .map(|n| n.to_string())
        .zip(vars.iter().cloned())
        .collect()
}

/// Which vars receive a gradient at `step` (torch's script drops the bias at step 2).
fn present(step: usize) -> [bool; 2] {
    [true, step != 2]
}

#[test]
fn clip_grad_norm_matches_torch_when_clipping_and_when_not() {
    let r = &reference()["clip"];
    for case in r["cases"].as_array().unwrap() {
        let vars = fresh_vars();
        let mut grads = inject(&vars, &r["grads"], &[true, true]);
        let norm = clip_grad_norm(&vars, &mut grads, case["max_norm"].as_f64().unwrap()).unwrap();
        assert!(
            (norm - case["total_norm"].as_f64().unwrap()).abs() < 1e-12,
            "norm {norm} vs {}",
            case["total_norm"]
        );
        for (var, name) in vars.iter().zip(NAMES) {
            assert_close(
                grads.get(var.as_tensor()).unwrap(),
                &case["clipped"][name],
                1e-12,
                name,
            );
        }
    }
}

#[test]
fn adamw_matches_torch_including_a_step_where_one_variable_has_no_gradient() {
    let r = &reference()["adamw"];
    let vars = fresh_vars();
    let mut optimizer = AdamW::new(named(&vars), torch_config()).unwrap();
    for (step, grads) in r["grads"].as_array().unwrap().iter().enumerate() {
        optimizer
            .step(&inject(&vars, grads, &present(step)))
            .unwrap();
        for (var, name) in vars.iter().zip(NAMES) {
            assert_close(
                var.as_tensor(),
                &r["params_after_step"][step][name],
                1e-12,
                &format!("{name} after step {step}"),
            );
        }
    }
    let state = optimizer.state_tensors().unwrap();
    for name in NAMES {
        assert_close(
            &state[&format!("adamw.m.{name}")],
            &r["final_exp_avg"][name],
            1e-12,
            "exp_avg",
        );
        assert_close(
            &state[&format!("adamw.v.{name}")],
            &r["final_exp_avg_sq"][name],
            1e-12,
            "exp_avg_sq",
        );
    }
}

#[test]
fn candle_nn_adamw_matches_torch_while_every_variable_has_a_gradient() {
    // Why we keep our own AdamW: candle_nn's update is torch's, but its state is private.
    let r = &reference()["adamw"];
    let vars = fresh_vars();
    let c = torch_config();
    let params = candle_nn::ParamsAdamW {
        lr: c.learning_rate,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
    };
    let mut optimizer = candle_nn::AdamW::new(vars.clone(), params).unwrap();
    for step in 0..2 {
        optimizer
            .step(&inject(&vars, &r["grads"][step], &[true, true]))
            .unwrap();
        for (var, name) in vars.iter().zip(NAMES) {
            assert_close(
                var.as_tensor(),
                &r["params_after_step"][step][name],
                1e-12,
                name,
            );
        }
    }
}

#[test]
fn adamw_resumed_from_saved_state_continues_exactly_like_an_uninterrupted_run() {
    let r = &reference()["adamw"];
    let grads = r["grads"].as_array().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("optimizer.safetensors");

    let vars = fresh_vars();
    let mut first = AdamW::new(named(&vars), torch_config()).unwrap();
    for (step, g) in grads.iter().enumerate().take(3) {
        first.step(&inject(&vars, g, &present(step))).unwrap();
    }
    first.save(&path).unwrap();
    let weights: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();

    // A new process: fresh optimiser over variables restored to the checkpointed weights.
    let resumed_vars: Vec<Var> = weights
        .iter()
        .map(|w| Var::from_tensor(w).unwrap())
        .collect();
    let mut resumed = AdamW::new(named(&resumed_vars), torch_config()).unwrap();
    resumed.load(&path).unwrap();
    assert_eq!(resumed.step_count(), 3);
    resumed
        .step(&inject(&resumed_vars, &grads[3], &present(3)))
        .unwrap();
    first.step(&inject(&vars, &grads[3], &present(3))).unwrap();
    for (a, b) in vars.iter().zip(&resumed_vars) {
        assert_eq!(
            flat(a.as_tensor()),
            flat(b.as_tensor()),
            "bit-identical after resume"
        );
    }
    for (var, name) in resumed_vars.iter().zip(NAMES) {
        assert_close(
            var.as_tensor(),
            &r["params_after_step"][3][name],
            1e-12,
            name,
        );
    }
}

#[test]
fn adamw_state_for_other_variables_is_rejected_naming_the_entry() {
    let vars = fresh_vars();
    let optimizer = AdamW::new(named(&vars), AdamWConfig::default()).unwrap();
    let state = optimizer.state_tensors().unwrap();
    let other = Var::from_tensor(&Tensor::zeros((5,), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let mut mismatched =
        AdamW::new(vec![("layer.bias".into(), other)], AdamWConfig::default()).unwrap();
    let error = mismatched
        .load_state_tensors(&state, "ckpt/optimizer.safetensors")
        .unwrap_err();
    assert!(matches!(error, AlgoError::OptimizerState { .. }));
    let message = error.to_string();
    assert!(
        message.contains("adamw.m.layer.bias") && message.contains("ckpt/optimizer.safetensors"),
        "{message}"
    );
}
