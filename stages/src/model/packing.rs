//! Packed forward passes: several right-padded rows run as fewer, fuller sequences.
//!
//! Each row is `prefix ++ tail`. Rows with the same prefix (the completions of one GRPO
//! prompt, the chosen and rejected replies of a preference pair) share one copy of it;
//! the other rows (pretraining lines, SFT examples) simply sit side by side. A pack is a
//! prefix followed by tails, each tail seeing the prefix and itself only, at the
//! positions it has in its own row, so every row's hidden states are the ones its own
//! forward pass gives. The result is laid out as the right-padded batch of the rows, so
//! everything downstream (heads, losses, masks) is unchanged; only the transformer runs
//! on fewer tokens. On BENCH.md a GRPO group of 8 four-token completions behind a
//! 12-token prompt is 44 tokens instead of 8 × 16.

use super::causal_lm::{masked_value, CausalLm};
use super::layers::DropoutRng;
use super::Result;
use candle_core::Tensor;

/// Tokens per packed sequence; a pack always takes its prefix and at least one tail.
/// Short enough that attention over a pack stays cheap beside the linear layers.
const PACK_TOKENS: usize = 64;

/// Final hidden states (rows, `time`, d) of the rows `prefix ++ tail`, as
/// [`CausalLm::hidden_states_with`] gives them for the right-padded batch of those rows
/// (`time` at least the longest row). Padding positions hold zeros.
pub fn packed_hidden_states(
    model: &CausalLm,
    rows: &[(&[u32], &[u32])],
    time: usize,
    rng: DropoutRng,
) -> Result<Tensor> {
    let device = model.device().clone();
    // A prefix no other row shares is just the start of its row: such rows go with
    // the empty-prefix ones, so short rows fill packs together.
    let merged: Vec<Option<Vec<u32>>> = rows
        .iter()
        .map(|(prefix, tail)| {
            let shared = rows.iter().filter(|(other, _)| other == prefix).count() > 1;
            (!prefix.is_empty() && !shared).then(|| [*prefix, *tail].concat())
        })
        .collect();
    let rows: Vec<(&[u32], &[u32])> = rows
        .iter()
        .zip(&merged)
        .map(|(&(prefix, tail), whole)| match whole {
            Some(whole) => (&[][..], &whole[..]),
            None => (prefix, tail),
        })
        .collect();
    let rows = &rows[..];
    let packs = plan_packs(rows);
    let width = packs
        .iter()
        .map(|(prefix, members)| {
            prefix.len() + members.iter().map(|&r| rows[r].1.len()).sum::<usize>()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let hidden_value = masked_value(model.dtype());
    let (mut ids, mut positions) = (Vec::new(), Vec::new());
    let mut bias = Vec::with_capacity(packs.len() * width * width);
    // Where each row's token i sits among the flattened packs.
    let mut places: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    for (k, (prefix, members)) in packs.iter().enumerate() {
        let base = k * width;
        let mut segment = vec![0usize; prefix.len()];
        ids.extend_from_slice(prefix);
        positions.extend(0..prefix.len() as u32);
        for (s, &r) in members.iter().enumerate() {
            let tail = rows[r].1;
            let start = base + segment.len();
            places[r].extend((0..prefix.len()).map(|i| (base + i) as u32));
            places[r].extend((0..tail.len()).map(|j| (start + j) as u32));
            ids.extend_from_slice(tail);
            positions.extend((0..tail.len()).map(|j| (prefix.len() + j) as u32));
            segment.extend(std::iter::repeat_n(s + 1, tail.len()));
        }
        let real = segment.len();
        ids.extend(std::iter::repeat_n(0, width - real));
        positions.extend(std::iter::repeat_n(0, width - real));
        for q in 0..width {
            for j in 0..width {
                let visible = if q < real {
                    j <= q && (segment[j] == 0 || segment[j] == segment[q])
                } else {
                    j == 0 // padding queries look at something; nothing reads them
                };
                bias.push(if visible { 0.0 } else { hidden_value });
            }
        }
    }
    let count = packs.len();
    let ids = Tensor::from_vec(ids, (count, width), &device)?;
    let positions = Tensor::from_vec(positions, (count, width), &device)?;
    let bias = Tensor::from_vec(bias, (count, 1, width, width), &device)?;
    let hidden = model.hidden_states_with_bias(&ids, &positions, &bias, rng)?; // (packs, width, d)
    let hidden_size = hidden.dims()[2];
    let zero_row = (count * width) as u32;
    let layout: Vec<u32> = places
        .iter()
        .flat_map(|place| (0..time).map(move |i| place.get(i).copied().unwrap_or(zero_row)))
        .collect();
    let flat = hidden.reshape((count * width, hidden_size))?;
    let zero = Tensor::zeros((1, hidden_size), flat.dtype(), &device)?;
    let layout = Tensor::new(layout, &device)?;
    Ok(Tensor::cat(&[&flat, &zero], 0)?
        .index_select(&layout, 0)?
        .reshape((rows.len(), time, hidden_size))?)
}

/// Final hidden states (rows, t, d) of the right-padded batch `input_ids` /
/// `attention_mask` whose rows are `rows` (`prefix ++ tail`): packed
/// ([`packed_hidden_states`]) when some rows share a prefix, else the padded batch as it
/// is. Packing rows that share nothing measured slower than padding (pretraining 2.4
/// against 2.6× TRL), and with LoRA dropout on (`rng` given) rows must not share a
/// prompt's dropout mask, so both run unpacked.
pub fn hidden_states_sharing_prompts(
    model: &CausalLm,
    rows: &[(&[u32], &[u32])],
    input_ids: &Tensor,
    attention_mask: &Tensor,
    rng: DropoutRng,
) -> Result<Tensor> {
    let shares_prompts = rows.iter().enumerate().any(|(r, (prefix, _))| {
        !prefix.is_empty() && rows[..r].iter().any(|(other, _)| other == prefix)
    });
    if !shares_prompts || (rng.is_some() && model.applies_dropout()) {
        return model.hidden_states_with(input_ids, Some(attention_mask), None, rng);
    }
    packed_hidden_states(model, rows, input_ids.dim(1)?, rng)
}

/// The packs: rows grouped by prefix in order of first appearance, each group's tails
/// cut into packs of at most [`PACK_TOKENS`] tokens.
fn plan_packs<'a>(rows: &[(&'a [u32], &[u32])]) -> Vec<(&'a [u32], Vec<usize>)> {
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    for (r, (prefix, _)) in rows.iter().enumerate() {
        match groups.iter_mut().find(|(p, _)| p == prefix) {
            Some((_, members)) => members.push(r),
            None => groups.push((prefix, vec![r])),
        }
    }
    let mut packs = Vec::new();
    for (prefix, members) in groups {
        let mut current: Vec<usize> = Vec::new();
        let mut length = prefix.len();
        for r in members {
            let tail = rows[r].1.len();
            if !current.is_empty() && length + tail > PACK_TOKENS {
                packs.push((prefix, std::mem::take(&mut current)));
                length = prefix.len();
            }
            current.push(r);
            length += tail;
        }
        if !current.is_empty() {
            packs.push((prefix, current));
        }
    }
    packs
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packs_share_prefixes_and_respect_the_token_budget() {
        let (a, b): (Vec<u32>, Vec<u32>) = (vec![1, 2, 3], vec![4]);
        let long: Vec<u32> = vec![9; 30];
        let rows: Vec<(&[u32], &[u32])> = vec![
            (&a, &long),
            (&b, &[5, 6]),
            (&a, &long),
            (&a, &[7]),
            (&[], &long),
            (&[], &long),
            (&[], &long),
        ];
        let packs = plan_packs(&rows);
        let shape: Vec<(usize, Vec<usize>)> =
            packs.iter().map(|(p, m)| (p.len(), m.clone())).collect();
        // Prefix `a`: 3 + 30 + 30 + 1 = 64 fits. Empty prefix: two 30-token lines fit
        // in 64, the third opens a new pack.
        assert_eq!(
            shape,
            vec![
                (3, vec![0, 2, 3]),
                (1, vec![1]),
                (0, vec![4, 5]),
                (0, vec![6])
            ]
        );
    }

    #[test]
    fn packed_rows_have_the_hidden_states_and_gradients_of_the_padded_batch() {
        use crate::data::batch::Batch;
        use crate::model::Trainability;
        use candle_core::DType;
        use candle_nn::VarMap;
        let config = crate::model::tiny_test_config("llama", false);
        let varmap = VarMap::new();
        let model = CausalLm::random(
            config,
            4,
            DType::F32,
            &Device::Cpu,
            Trainability::Full(&varmap),
        )
        .expect("model");
        // A shared prompt (twice), a prompt of its own, pretraining-style rows without
        // one, and enough 20-token lines to need more than one pack.
        let (shared, own): (Vec<u32>, Vec<u32>) = (vec![3, 4, 5], vec![6, 7]);
        let line: Vec<u32> = (10..30).collect();
        let parts: Vec<(&[u32], &[u32])> = vec![
            (&shared, &[40, 41]),
            (&own, &[42, 43, 44]),
            (&[], &[45, 46, 47, 48]),
            (&shared, &[49]),
            (&[], &line),
            (&[], &line[3..]),
            (&[], &line[1..]),
            (&[], &line),
        ];
        let batch = Batch::from_parts(&parts, 0);
        let ids = batch.input_ids_tensor(&Device::Cpu).expect("ids");
        let attention = batch.attention_mask_tensor(&Device::Cpu).expect("mask");
        let padded = model
            .hidden_states_with(&ids, Some(&attention), None, &mut None)
            .expect("padded");
        let packed =
            packed_hidden_states(&model, &batch.rows(), batch.seq_len, &mut None).expect("packed");
        let real = attention.unsqueeze(2).expect("mask");
        let objective = |hidden: &Tensor| {
            // Weighted so every position and feature matters differently.
            let weights =
                Tensor::arange(0f32, hidden.dims()[2] as f32, &Device::Cpu)?.affine(0.01, 0.3)?;
            hidden
                .broadcast_mul(&real)?
                .broadcast_mul(&weights)?
                .sqr()?
                .sum_all()
        };
        let difference = (padded.broadcast_mul(&real).expect("m")
            - packed.broadcast_mul(&real).expect("m"))
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff");
        assert!(difference < 1e-5, "hidden states differ by {difference}");
        let padded_grads = objective(&padded)
            .and_then(|o| o.backward())
            .expect("grads");
        let packed_grads = objective(&packed)
            .and_then(|o| o.backward())
            .expect("grads");
        let mut compared = 0;
        for var in varmap.all_vars() {
            // The LM head is not part of the hidden states: no gradient either way.
            let (Some(a), Some(b)) = (
                padded_grads.get(var.as_tensor()),
                packed_grads.get(var.as_tensor()),
            ) else {
                assert!(padded_grads.get(var.as_tensor()).is_none());
                assert!(packed_grads.get(var.as_tensor()).is_none());
                continue;
            };
            compared += 1;
            let scale = a
                .abs()
                .and_then(|t| t.max_all()?.to_scalar::<f32>())
                .expect("max");
            let diff = (a - b)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert!(
                diff <= 1e-4 * scale.max(1e-3),
                "gradient differs by {diff} (scale {scale})"
            );
        }
        assert!(compared > 10, "only {compared} variables had gradients");
        assert!(
            plan_packs(&batch.rows()).len() >= 3,
            "the lines should need several packs"
        );
    }
}
