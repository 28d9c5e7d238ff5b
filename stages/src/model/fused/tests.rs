//! Each fused op against its composite reference: forward values and the gradients of
//! a random weighted sum of the output, on odd shapes, through the custom op itself (not
//! the dispatching wrapper, so a silent fallback cannot make a test pass).

use super::kernels::exp_f32;
use super::*;
use crate::model::config::RopeScaling;
use crate::model::rope::Rope;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOLERANCE: f32 = 1e-5;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// max |a - b| <= TOLERANCE * max |b| (a norm-wise relative error), and the same NaNs.
fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let a: Vec<f32> = actual.flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    let scale = e.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        assert!(x.is_finite(), "{what}[{i}]: fused gave {x}");
        assert!(
            (x - y).abs() <= TOLERANCE * scale,
            "{what}[{i}]: fused {x} vs reference {y} (scale {scale})"
        );
    }
}

/// Runs `op` on `inputs` (the `trainable` ones as variables), backpropagates a fixed
/// random weighting of the output and returns the output and the inputs' gradients.
fn forward_backward(
    inputs: &[Tensor],
    trainable: &[bool],
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(trainable)
        .map(|(t, &train)| train.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let tensors: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let out = op(&tensors).unwrap();
    let weights = random(out.dims(), 99);
    let grads = (&out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let input_grads = tensors
        .iter()
        .zip(&vars)
        .map(|(t, v)| v.as_ref().and_then(|_| grads.get(t).cloned()))
        .collect();
    (out, input_grads)
}

fn assert_same_op(
    name: &str,
    inputs: &[Tensor],
    trainable: &[bool],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    let (fused_out, fused_grads) = forward_backward(inputs, trainable, fused);
    let (reference_out, reference_grads) = forward_backward(inputs, trainable, reference);
    assert_close(&fused_out, &reference_out, &format!("{name} output"));
    for (i, (f, r)) in fused_grads.iter().zip(&reference_grads).enumerate() {
        match (f, r) {
            (Some(f), Some(r)) => assert_close(f, r, &format!("{name} grad of input {i}")),
            (None, None) => {}
            _ => panic!("{name}: input {i} has a gradient on one path only"),
        }
        assert_eq!(
            f.is_some(),
            trainable[i],
            "{name}: input {i} gradient presence"
        );
    }
}

#[test]
fn fused_linear_matches_the_composite_in_values_and_gradients() {
    let x = random(&[2, 5, 7], 20);
    let weight = random(&[3, 7], 21);
    let fused = |t: &[Tensor]| -> Result<Tensor> { Ok(t[0].apply_op2(&t[1], LinearOp)?) };
    let reference = |t: &[Tensor]| linear_reference(&t[0], &t[1]);
    let inputs = [x, weight];
    assert_same_op("linear", &inputs, &[true, true], &fused, &reference);
    // A frozen weight (LoRA) gets no gradient and x's is unchanged.
    assert_same_op("linear frozen", &inputs, &[true, false], &fused, &reference);
    // A constant input (frozen layers below) gets no gradient; the weight's is unchanged.
    assert_same_op(
        "linear constant input",
        &inputs,
        &[false, true],
        &fused,
        &reference,
    );
}

#[test]
fn fused_linear_add_matches_the_composite_in_values_and_gradients() {
    let x = random(&[2, 5, 7], 30);
    let weight = random(&[3, 7], 31);
    let residual = random(&[2, 5, 3], 32);
    let fused = |t: &[Tensor]| -> Result<Tensor> { Ok(t[0].apply_op3(&t[1], &t[2], LinearAddOp)?) };
    let reference = |t: &[Tensor]| Ok((&t[2] + linear_reference(&t[0], &t[1])?)?);
    let inputs = [x, weight, residual];
    for trainable in [
        [true, true, true],
        [true, false, true],
        [false, true, false],
    ] {
        let name = format!("linear_add {trainable:?}");
        assert_same_op(&name, &inputs, &trainable, &fused, &reference);
    }
    // The same bits as the pair it replaces.
    let pair = (&inputs[2] + inputs[0].apply_op2(&inputs[1], LinearOp).unwrap()).unwrap();
    let one = fused(&inputs).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    };
    assert_eq!(bits(&one), bits(&pair));
    // A residual of another shape takes the composite path, which reports the mismatch.
    assert!(linear_add(&inputs[0], &inputs[1], &random(&[2, 5, 4], 33)).is_err());
}

#[test]
fn fused_gated_mlp_input_matches_the_composite_in_values_and_gradients() {
    let x = random(&[2, 5, 7], 40);
    let gate_weight = (random(&[9, 7], 41) * 2.0).unwrap();
    let up_weight = random(&[9, 7], 42);
    let reference = |t: &[Tensor]| gated_mlp_input_reference(&t[0], &t[1], &t[2]);
    let inputs = [x, gate_weight, up_weight];
    for keep in [true, false] {
        let fused = |t: &[Tensor]| -> Result<Tensor> {
            Ok(t[0].apply_op3(&t[1], &t[2], mlp::GatedMlpInputOp::new(keep))?)
        };
        let name = format!("gated_mlp_input (keep {keep})");
        assert_same_op(&name, &inputs, &[true, true, true], &fused, &reference);
        let frozen = format!("{name} frozen weights");
        assert_same_op(&frozen, &inputs, &[true, false, false], &fused, &reference);
        let constant = format!("{name} constant input");
        assert_same_op(
            &constant,
            &inputs,
            &[false, true, false],
            &fused,
            &reference,
        );
    }
}

#[test]
fn fused_gated_mlp_with_lora_deltas_matches_the_composite() {
    let x = random(&[2, 5, 7], 43);
    let gate_weight = (random(&[9, 7], 44) * 2.0).unwrap();
    let up_weight = random(&[9, 7], 45);
    let gate_delta = random(&[2, 5, 9], 46);
    let up_delta = random(&[2, 5, 9], 47);
    let (g, u) = (gate_weight.clone(), up_weight.clone());
    let reference =
        |t: &[Tensor]| gated_mlp_input_with_deltas_reference(&t[0], &g, &u, &t[1], &t[2]);
    let inputs = [x, gate_delta, up_delta];
    for keep in [true, false] {
        let fused = |t: &[Tensor]| -> Result<Tensor> {
            let op = mlp::GatedMlpDeltaOp::new(&gate_weight, &up_weight, keep);
            Ok(t[0].apply_op3(&t[1], &t[2], op)?)
        };
        let name = format!("gated_mlp_input_with_deltas (keep {keep})");
        assert_same_op(&name, &inputs, &[true, true, true], &fused, &reference);
        let constant = format!("{name} constant input");
        assert_same_op(&constant, &inputs, &[false, true, true], &fused, &reference);
    }
}

#[test]
fn fused_linear_with_a_lora_delta_matches_the_composite() {
    let x = random(&[2, 5, 7], 22);
    let weight = random(&[3, 7], 23);
    let delta = random(&[10, 3], 24); // (rows, out), as LoRA hands it over
    let w = weight.clone();
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        let op = LinearDeltaOp { weight: w.clone() };
        Ok(t[0].apply_op2(&t[1], op)?)
    };
    let reference = |t: &[Tensor]| -> Result<Tensor> {
        let y = linear_reference(&t[0], &weight)?;
        Ok((&y + t[1].reshape(y.shape())?)?)
    };
    let inputs = [x, delta];
    assert_same_op(
        "linear_with_delta",
        &inputs,
        &[true, true],
        &fused,
        &reference,
    );
    assert_same_op(
        "linear_with_delta constant input",
        &inputs,
        &[false, true],
        &fused,
        &reference,
    );
}

#[test]
fn fused_rms_norm_matches_the_composite_in_values_and_gradients() {
    let x = random(&[3, 5, 13], 1);
    let weight = random(&[13], 2);
    let fused =
        |t: &[Tensor]| -> Result<Tensor> { Ok(t[0].apply_op2(&t[1], RmsNormOp { eps: 1e-5 })?) };
    let reference = |t: &[Tensor]| rms_norm_reference(&t[0], &t[1], 1e-5);
    let inputs = [x, weight];
    assert_same_op("rms_norm", &inputs, &[true, true], &fused, &reference);
    // A frozen weight (LoRA) gets no gradient and x's is unchanged.
    assert_same_op(
        "rms_norm frozen",
        &inputs,
        &[true, false],
        &fused,
        &reference,
    );
}

#[test]
fn fused_silu_mul_matches_the_composite_in_values_and_gradients() {
    let gate = (random(&[3, 7, 11], 3) * 4.0).unwrap(); // reaches the tails of σ
    let up = random(&[3, 7, 11], 4);
    let fused = |t: &[Tensor]| -> Result<Tensor> { Ok(t[0].apply_op2(&t[1], SiluMulOp)?) };
    let reference = |t: &[Tensor]| silu_mul_reference(&t[0], &t[1]);
    assert_same_op("silu_mul", &[gate, up], &[true, true], &fused, &reference);
}

/// (b, 1, t, s): causal, and in batch row 1 the last two keys are padding; the values
/// are -inf or, like the model's mask, f32::MIN (batch 1's query 0 sees only padding).
fn attention_mask(batch: usize, time: usize, masked: f32) -> Tensor {
    let mut values = Vec::new();
    for b in 0..batch {
        for i in 0..time {
            for j in 0..time {
                let padding = b == 1 && (j >= time - 2 || i == 0);
                values.push(if j <= i && !padding { 0.0 } else { masked });
            }
        }
    }
    Tensor::from_vec(values, (batch, 1, time, time), &Device::Cpu).unwrap()
}

#[test]
fn fused_masked_softmax_matches_the_composite_in_values_and_gradients() {
    let scores = random(&[2, 3, 5, 5], 5);
    let scale = 1.0 / 6f64.sqrt();
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        Ok(t[0].apply_op2(
            &t[1],
            MaskedSoftmaxOp {
                scale: scale as f32,
            },
        )?)
    };
    let reference = |t: &[Tensor]| masked_softmax_reference(&t[0], &t[1], scale);
    let finite = attention_mask(2, 5, f32::MIN);
    assert_same_op(
        "softmax",
        &[scores.clone(), finite],
        &[true, false],
        &fused,
        &reference,
    );
    let shared = attention_mask(1, 5, f32::MIN);
    assert_same_op(
        "softmax shared mask",
        &[scores.clone(), shared],
        &[true, false],
        &fused,
        &reference,
    );
    // -inf everywhere masked, but only in batch 0 so that every row keeps a visible key.
    let infinite = attention_mask(1, 5, f32::NEG_INFINITY);
    assert_same_op(
        "softmax -inf",
        &[scores, infinite],
        &[true, false],
        &fused,
        &reference,
    );
}

#[test]
fn fused_masked_softmax_gives_zero_weights_where_every_key_is_minus_infinity() {
    let scores = random(&[2, 3, 5, 5], 6);
    let mask = attention_mask(2, 5, f32::NEG_INFINITY); // batch 1, query 0: all -inf
    let probs = masked_softmax(&scores, &mask, 0.5).unwrap(); // the dispatching wrapper
    let row: Vec<f32> = probs
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(row, vec![0.0; 5]);
    let sums: Vec<f32> = probs
        .get(0)
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
}

#[test]
fn fused_attention_matches_the_composite_in_values_and_gradients() {
    for recompute in [false, true] {
        assert_attention_matches_the_composite(recompute);
    }
}

fn assert_attention_matches_the_composite(recompute: bool) {
    let scale = 1.0 / 6f64.sqrt();
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        let (b, h, time, d) = t[0].dims4()?;
        let (_, kvh, s, _) = t[1].dims4()?;
        assert_eq!(t[2].dims(), [b, s, kvh * d]);
        let out = attention::apply_fused(&t[0], &t[1], &t[2], &t[3], scale, recompute)?;
        assert_eq!(out.dims(), [b, time, h * d]);
        Ok(out)
    };
    let reference = |t: &[Tensor]| attention_reference(&t[0], &t[1], &t[2], &t[3], scale);
    let trainable = [true, true, true, false];
    for (heads, kv_heads) in [(4, 2), (3, 3), (4, 1)] {
        let q = random(&[2, heads, 5, 6], 30);
        let k = random(&[2, kv_heads, 5, 6], 31);
        let v = random(&[2, 5, kv_heads * 6], 32);
        let name = format!("attention {heads}/{kv_heads} (recompute {recompute})");
        let mask = attention_mask(2, 5, f32::MIN); // padding, and a query that sees only padding
        let inputs = [q.clone(), k.clone(), v.clone(), mask];
        assert_same_op(&name, &inputs, &trainable, &fused, &reference);
        let mask = attention_mask(1, 5, f32::NEG_INFINITY); // shared, -inf
        assert_same_op(&name, &[q, k, v, mask], &trainable, &fused, &reference);
    }
}

fn rope_tables(batch: usize, time: usize, head_dim: usize) -> (Tensor, Tensor) {
    let rope = Rope::new(head_dim, 10_000.0, &RopeScaling::Default, &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..batch * time).map(|i| (i * 3 % 11) as u32).collect();
    let ids = Tensor::from_vec(positions, (batch, time), &Device::Cpu).unwrap();
    let tables = rope.tables(&ids, DType::F32).unwrap();
    (tables.cos, tables.sin)
}

#[test]
fn fused_rope_matches_the_composite_in_values_and_gradients() {
    let x = random(&[2, 3, 5, 6], 7); // head_dim 6
    let (cos, sin) = rope_tables(2, 5, 6);
    let geometry =
        |x: &Tensor, c: &Tensor, s: &Tensor| rope_geometry(x, c, s, false, 3).unwrap().unwrap();
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        let op = RopeOp {
            geometry: geometry(&t[0], &t[1], &t[2]),
        };
        Ok(t[0].apply_op3(&t[1], &t[2], op)?)
    };
    let reference = |t: &[Tensor]| rope_reference(&t[0], &t[1], &t[2]);
    assert_same_op(
        "rope",
        &[x.clone(), cos, sin],
        &[true, false, false],
        &fused,
        &reference,
    );
    let (cos, sin) = rope_tables(1, 5, 6); // tables shared across the batch
    assert_same_op(
        "rope shared tables",
        &[x, cos, sin],
        &[true, false, false],
        &fused,
        &reference,
    );
}

#[test]
fn fused_rope_split_heads_matches_reshape_transpose_then_rope() {
    let x = random(&[2, 5, 3 * 6], 8); // (b, t, heads * d)
    let (cos, sin) = rope_tables(2, 5, 6);
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        let geometry = rope_geometry(&t[0], &t[1], &t[2], true, 3)
            .unwrap()
            .unwrap();
        Ok(t[0].apply_op3(&t[1], &t[2], RopeOp { geometry })?)
    };
    let reference = |t: &[Tensor]| {
        let split = t[0].reshape((2, 5, 3, 6))?.transpose(1, 2)?.contiguous()?;
        rope_reference(&split, &t[1], &t[2])
    };
    assert_same_op(
        "rope_split_heads",
        &[x, cos, sin],
        &[true, false, false],
        &fused,
        &reference,
    );
}

fn targets(shape: &[usize], vocab: u32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count: usize = shape.iter().product();
    let values: Vec<u32> = (0..count).map(|_| rng.random_range(0..vocab)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_token_logprobs_match_the_composite_on_strided_rows() {
    let logits = (random(&[3, 5, 17], 9) * 3.0).unwrap();
    let targets = targets(&[3, 4], 17, 10);
    let fused = |t: &[Tensor]| -> Result<Tensor> {
        let shifted = t[0].narrow(1, 0, 4)?; // (3, 4, 17), rows strided
        assert!(!shifted.is_contiguous());
        Ok(shifted.apply_op2(&t[1], LogSoftmaxGatherOp)?)
    };
    let reference = |t: &[Tensor]| token_logprobs_reference(&t[0].narrow(1, 0, 4)?, &t[1]);
    assert_same_op(
        "token_logprobs",
        &[logits, targets],
        &[true, false],
        &fused,
        &reference,
    );
}

#[test]
fn fused_token_logprobs_reject_a_target_outside_the_vocabulary() {
    let logits = random(&[2, 7], 11);
    let targets = Tensor::new(&[1u32, 7], &Device::Cpu).unwrap();
    let error = token_logprobs(&logits, &targets).unwrap_err().to_string();
    assert!(
        error.contains("target 7 is outside the vocabulary of 7"),
        "{error}"
    );
}

#[test]
fn fused_token_entropy_matches_the_composite_on_strided_rows() {
    let logits = (random(&[3, 5, 17], 12) * 3.0).unwrap();
    let fused =
        |t: &[Tensor]| -> Result<Tensor> { Ok(t[0].narrow(1, 1, 4)?.apply_op1(EntropyOp)?) };
    let reference = |t: &[Tensor]| token_entropy_reference(&t[0].narrow(1, 1, 4)?);
    assert_same_op("token_entropy", &[logits], &[true], &fused, &reference);
}

#[test]
fn wrappers_take_the_composite_path_for_other_dtypes() {
    let x = random(&[4, 6], 13).to_dtype(DType::F64).unwrap();
    let weight = random(&[6], 14).to_dtype(DType::F64).unwrap();
    let fused = rms_norm(&x, &weight, 1e-6).unwrap();
    let reference = rms_norm_reference(&x, &weight, 1e-6).unwrap();
    assert_eq!(fused.dtype(), DType::F64);
    let difference = (fused - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(difference.to_scalar::<f64>().unwrap(), 0.0);
}

#[test]
fn fast_exp_is_within_a_few_ulp_of_the_exact_exponential() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let exact = (x as f64).exp();
        worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(f32::NAN).is_nan());
}

/// The attention half of a layer as one node (`attention_block`) against the separate
/// fused ops, through `weight_grads` (the block's weight gradients are deposits):
/// output and the gradients of x and of the five weights, trained or frozen, under a
/// padding mask per row and a shared causal one.
#[test]
fn the_attention_block_matches_the_separate_ops() {
    use crate::model::weight_grads::{forward_for_backward, gradients_through_deposits};
    let (heads, kv_heads, head_dim, hidden) = (4, 2, 4, 12);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let (cos, sin) = rope_tables(2, 5, head_dim);
    let shapes: [&[usize]; 5] = [
        &[hidden],
        &[heads * head_dim, hidden],
        &[kv_heads * head_dim, hidden],
        &[kv_heads * head_dim, hidden],
        &[hidden, heads * head_dim],
    ];
    let separate = |x: &Tensor, w: &[Tensor], mask: &Tensor| -> Result<Tensor> {
        let n = rms_norm(x, &w[0], 1e-5)?;
        let q = rope_split_heads(&linear(&n, &w[1])?, &cos, &sin, heads)?;
        let k = rope_split_heads(&linear(&n, &w[2])?, &cos, &sin, kv_heads)?;
        let context = attention(&q, &k, &linear(&n, &w[3])?, mask, scale)?;
        linear_add(&context, &w[4], x)
    };
    for mask in [
        attention_mask(2, 5, f32::MIN),
        attention_mask(1, 5, f32::NEG_INFINITY),
    ] {
        for trained in [true, false] {
            let run = |fused: bool| {
                let x = Var::from_tensor(&random(&[2, 5, hidden], 60)).unwrap();
                let w: Vec<Tensor> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, shape)| {
                        let t = random(shape, 61 + i as u64);
                        match trained {
                            true => Var::from_tensor(&t).unwrap().as_tensor().clone(),
                            false => t,
                        }
                    })
                    .collect();
                let y = if fused {
                    let weights = AttentionBlockWeights {
                        norm: &w[0],
                        eps: 1e-5,
                        q: &w[1],
                        k: &w[2],
                        v: &w[3],
                        o: &w[4],
                        heads,
                        kv_heads,
                        cos: &cos,
                        sin: &sin,
                        mask: &mask,
                        scale,
                    };
                    forward_for_backward(|| attention_block(x.as_tensor(), &weights))
                        .unwrap()
                        .expect("the block fuses")
                } else {
                    separate(x.as_tensor(), &w, &mask).unwrap()
                };
                let loss = (&y * random(y.dims(), 99)).unwrap().sum_all().unwrap();
                let tensors: Vec<&Tensor> = std::iter::once(x.as_tensor()).chain(&w).collect();
                let grads = gradients_through_deposits(&loss, &tensors).unwrap();
                (y, grads)
            };
            let ((y_fused, g_fused), (y_separate, g_separate)) = (run(true), run(false));
            let what = format!(
                "attention block (trained {trained}, mask {:?})",
                mask.dims()
            );
            assert_close(&y_fused, &y_separate, &format!("{what} output"));
            for (i, (f, s)) in g_fused.iter().zip(&g_separate).enumerate() {
                match (f, s) {
                    (Some(f), Some(s)) => assert_close(f, s, &format!("{what} gradient {i}")),
                    (None, None) => assert!(!trained && i > 0, "{what}: gradient {i} missing"),
                    _ => panic!("{what}: gradient {i} on one path only"),
                }
            }
        }
    }
}
