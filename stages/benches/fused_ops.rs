//! Per-op time of the fused CPU kernels (model::fused) against their composite
//! references, forward + backward of a weighted sum, at the BENCH.md training shapes
//! (batch 32 x 40 tokens, hidden 256, 8/4 heads of 32, intermediate 688, vocab 512).
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p rlhf-stages --bench fused_ops
//!
//! Prints milliseconds per forward+backward (of the op plus a weighted sum) for both
//! paths and the speed-up. A fresh buffer per op makes page faults a large share here
//! (they shrink to a few % inside the training loop, where the heap is warm).

use candle_core::{DType, Device, Tensor, Var};
use rlhf_stages::model::fused;
use std::time::Instant;

type Op<'a> = dyn Fn(&[Tensor]) -> rlhf_stages::model::Result<Tensor> + 'a;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

/// Milliseconds per forward + backward of `op` on `inputs` (the `trainable` ones as
/// variables), the best of a few repetitions.
fn time(op: &Op<'_>, inputs: &[Tensor], trainable: &[bool]) -> f64 {
    let tensors: Vec<Tensor> = inputs
        .iter()
        .zip(trainable)
        .map(|(t, &train)| {
            if train {
                Var::from_tensor(t).expect("var").as_tensor().clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let weights = random(op(&tensors).expect("op").dims(), 7);
    let iterations = 20;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..iterations {
            let out = op(&tensors).expect("op");
            let loss = (&out * &weights).expect("mul").sum_all().expect("sum");
            let _ = loss.backward().expect("backward");
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e3 / iterations as f64);
    }
    best
}

fn compare(name: &str, fused: &Op<'_>, reference: &Op<'_>, inputs: &[Tensor], trainable: &[bool]) {
    let fused_ms = time(fused, inputs, trainable);
    let reference_ms = time(reference, inputs, trainable);
    println!(
        "{name:<22} fused {fused_ms:7.3} ms   composite {reference_ms:7.3} ms   x{:.2}",
        reference_ms / fused_ms
    );
}

fn causal_mask(batch: usize, time: usize) -> Tensor {
    let values: Vec<f32> = (0..batch * time * time)
        .map(|i| {
            if i % time <= (i / time) % time {
                0.0
            } else {
                f32::MIN
            }
        })
        .collect();
    Tensor::from_vec(values, (batch, 1, time, time), &Device::Cpu).expect("mask")
}

fn main() {
    let (batch, time, hidden, heads, kv_heads, head_dim) = (32, 40, 256, 8, 4, 32);
    let x = random(&[batch, time, hidden], 1);
    let norm_weight = random(&[hidden], 2);
    compare(
        "rms_norm",
        &|t| fused::rms_norm(&t[0], &t[1], 1e-6),
        &|t| fused::rms_norm_reference(&t[0], &t[1], 1e-6),
        &[x.clone(), norm_weight],
        &[true, true],
    );
    let weight = random(&[688, hidden], 3);
    for (name, trainable) in [("linear (full)", true), ("linear (frozen W)", false)] {
        compare(
            name,
            &|t| fused::linear(&t[0], &t[1]),
            &|t| fused::linear_reference(&t[0], &t[1]),
            &[x.clone(), weight.clone()],
            &[true, trainable],
        );
    }
    let up_weight = random(&[688, hidden], 10);
    compare(
        "gated_mlp_input",
        &|t| fused::gated_mlp_input(&t[0], &t[1], &t[2]),
        &|t| fused::gated_mlp_input_reference(&t[0], &t[1], &t[2]),
        &[x.clone(), weight.clone(), up_weight.clone()],
        &[true, true, true],
    );
    let (gate_delta, up_delta) = (
        random(&[batch * time, 688], 11),
        random(&[batch * time, 688], 12),
    );
    compare(
        "gated_mlp (LoRA)",
        &|t| fused::gated_mlp_input_with_deltas(&t[0], &weight, &up_weight, &t[1], &t[2]),
        &|t| fused::gated_mlp_input_with_deltas_reference(&t[0], &weight, &up_weight, &t[1], &t[2]),
        &[x.clone(), gate_delta.clone(), up_delta],
        &[true, true, true],
    );
    compare(
        "linear (LoRA delta)",
        &|t| fused::linear_with_delta(&t[0], &weight, &t[1]),
        &|t| {
            let y = fused::linear_reference(&t[0], &weight)?;
            Ok((&y + t[1].reshape(y.shape())?)?)
        },
        &[x.clone(), gate_delta],
        &[true, true],
    );
    let (gate, up) = (
        random(&[batch, time, 688], 4),
        random(&[batch, time, 688], 5),
    );
    compare(
        "silu_mul",
        &|t| fused::silu_mul(&t[0], &t[1]),
        &|t| fused::silu_mul_reference(&t[0], &t[1]),
        &[gate, up],
        &[true, true],
    );
    let ids: Vec<u32> = (0..batch * time).map(|i| (i % time) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, time), &Device::Cpu).expect("ids");
    let rope = rlhf_stages::model::rope::Rope::new(
        head_dim,
        10_000.0,
        &rlhf_stages::model::RopeScaling::Default,
        &Device::Cpu,
    )
    .expect("rope");
    let tables = rope.tables(&ids, DType::F32).expect("tables");
    compare(
        "rope_split_heads",
        &|t| fused::rope_split_heads(&t[0], &t[1], &t[2], heads),
        &|t| {
            let split = t[0]
                .reshape((batch, time, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            fused::rope_reference(&split, &t[1], &t[2])
        },
        &[x.clone(), tables.cos.clone(), tables.sin.clone()],
        &[true, false, false],
    );
    let q = random(&[batch, heads, time, head_dim], 6);
    let k = random(&[batch, kv_heads, time, head_dim], 7);
    let v = random(&[batch, time, kv_heads * head_dim], 8);
    let mask = causal_mask(batch, time);
    let scale = 1.0 / (head_dim as f64).sqrt();
    compare(
        "attention",
        &|t| fused::attention(&t[0], &t[1], &t[2], &t[3], scale),
        &|t| fused::attention_reference(&t[0], &t[1], &t[2], &t[3], scale),
        &[q, k, v, mask],
        &[true, true, true, false],
    );
    let logits = random(&[batch, time, 512], 9);
    let targets: Vec<u32> = (0..batch * (time - 1))
        .map(|i| (i * 37 % 512) as u32)
        .collect();
    let targets = Tensor::from_vec(targets, (batch, time - 1), &Device::Cpu).expect("targets");
    compare(
        "token_logprobs",
        &|t| fused::token_logprobs(&t[0].narrow(1, 0, time - 1)?, &t[1]),
        &|t| fused::token_logprobs_reference(&t[0].narrow(1, 0, time - 1)?, &t[1]),
        &[logits.clone(), targets],
        &[true, false],
    );
    compare(
        "token_entropy",
        &|t| fused::token_entropy(&t[0].narrow(1, 0, time - 1)?),
        &|t| fused::token_entropy_reference(&t[0].narrow(1, 0, time - 1)?),
        &[logits],
        &[true],
    );
}
