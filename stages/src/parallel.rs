//! Data parallelism on CPU: a batch is cut into a fixed number of shards whose forward
//! and backward passes run at the same time, one per thread, and whose gradients are
//! summed into one optimiser step.
//!
//! Why not candle's own threading: on the BENCH.md model (hidden 256) its per-op threads
//! made a training step only 1.16× faster on 2 cores than one thread, since matrices
//! this small split badly, while two single-threaded shards made it 1.7× faster. The two
//! do not nest: gemm's rayon tasks inside shard tasks made a step 25 % slower than no
//! sharding at all. So the `rlhf` binary turns candle's per-op threading off
//! ([`use_data_parallel_threads`]), and shards run in parallel only then; anywhere else
//! (unit tests, library users) they run one after another, with the same result.
//!
//! The shard count comes from the recipe, not from the machine: the numbers a recipe
//! produces do not depend on how many cores ran it.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// Makes this process run shards in parallel on `threads` threads, with candle's own
/// per-op threading off. Call it once, first thing, before any tensor work: it sets
/// `RAYON_NUM_THREADS=1` (candle reads it at every matmul), which is only sound while no
/// other thread reads the environment.
pub fn use_data_parallel_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global()
        .map_err(|e| format!("starting {threads} compute threads: {e}"))?;
    std::env::set_var("RAYON_NUM_THREADS", "1");
    Ok(())
}

/// Whether shards run at the same time: only when candle's per-op threading is off and
/// the pool has more than one thread (see the module docs for why).
pub fn shards_run_in_parallel() -> bool {
    candle_core::utils::get_num_threads() == 1 && rayon::current_num_threads() > 1
}

/// `items` cut into at most `shards` contiguous, non-empty parts whose sizes differ by
/// at most one (fewer parts when there are fewer items).
pub fn split_into_shards<T>(items: &[T], shards: usize) -> Vec<&[T]> {
    let parts = shards.clamp(1, items.len().max(1));
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 0..parts {
        let len = base + usize::from(part < extra);
        if len > 0 {
            out.push(&items[start..start + len]);
        }
        start += len;
    }
    out
}

/// The example indices `batch` cut into at most `shards` non-empty shards of about equal
/// cost, where a shard costs its padded tokens: examples × its longest `lengths[i]`.
/// The examples are ordered by length (ties by position in `batch`) and cut where the
/// costliest shard is cheapest, so long and short rows do not pad each other: on
/// BENCH.md's pretraining batches (8 to 30 tokens) that takes an eighth off the slower
/// of two shards. The cut depends only on the batch, never on the thread count.
pub fn split_by_padded_length(
    batch: &[usize],
    lengths: &[usize],
    shards: usize,
) -> Vec<Vec<usize>> {
    let length = |i: usize| lengths.get(i).copied().unwrap_or(0).max(1);
    let mut sorted = batch.to_vec();
    sorted.sort_by_key(|&i| length(i)); // stable: ties keep their order in `batch`
    let n = sorted.len();
    let parts = shards.clamp(1, n.max(1));
    if n == 0 {
        return Vec::new();
    }
    // best[k][j]: the least possible cost of the costliest shard when the first j
    // sorted examples form k shards; cut[k][j] is where the last of those shards starts.
    // The lengths ascend, so a shard from a to j costs (j - a) × length of example j - 1.
    let mut best = vec![vec![usize::MAX; n + 1]; parts + 1];
    let mut cut = vec![vec![0; n + 1]; parts + 1];
    best[0][0] = 0;
    for k in 1..=parts {
        for j in k..=n {
            for a in (k - 1)..j {
                if best[k - 1][a] == usize::MAX {
                    continue;
                }
                let cost = best[k - 1][a].max((j - a) * length(sorted[j - 1]));
                if cost < best[k][j] {
                    best[k][j] = cost;
                    cut[k][j] = a;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(parts);
    let mut end = n;
    for k in (1..=parts).rev() {
        let start = cut[k][end];
        out.push(sorted[start..end].to_vec());
        end = start;
    }
    out.reverse();
    out
}

/// `work(0) .. work(count - 1)`, in parallel when [`shards_run_in_parallel`], else in
/// order; results come back in index order either way.
pub fn map_shards<T: Send>(count: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if count > 1 && shards_run_in_parallel() {
        use rayon::prelude::*;
        (0..count).into_par_iter().map(&work).collect()
    } else {
        (0..count).map(work).collect()
    }
}

/// The randomness (LoRA dropout) of shard `shard` of pass `pass` of step `step`: a key
/// of its own, apart from the step's other draws (data order), and a stretch of 2^40
/// words per shard, so shards draw the same numbers whichever thread runs them.
pub fn shard_rng(seed: u64, step: usize, pass: usize, shard: usize) -> ChaCha8Rng {
    const SHARD_KEY: u64 = 0x5348_4152_4453; // "SHARDS": keeps these streams apart
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SHARD_KEY);
    rng.set_stream(step as u64);
    rng.set_word_pos(((pass as u128) << 48) | ((shard as u128) << 40));
    rng
}

/// One shard's differentiable loss, how many terms it is the mean of (scored tokens,
/// rows, pairs) and metrics that average the same way.
pub struct ShardLoss {
    pub loss: Tensor,
    pub weight: f64,
    pub metrics: Vec<(&'static str, f64)>,
}

/// The shards of one batch put back together.
pub struct CombinedShards {
    /// Each shard's loss with its share, weight / Σ weights: backpropagating the
    /// weighted sum gives the whole batch's gradient.
    pub weighted_losses: Vec<(Tensor, f64)>,
    /// The whole batch's mean loss.
    pub loss: f64,
    /// Metrics combined with the same shares.
    pub metrics: Vec<(&'static str, f64)>,
}

/// Combines shards by their weights (equally when every weight is 0, e.g. a batch
/// with nothing to score).
pub fn combine_shards(shards: &[ShardLoss]) -> candle_core::Result<CombinedShards> {
    let total: f64 = shards.iter().map(|s| s.weight).sum();
    let mut combined = CombinedShards {
        weighted_losses: Vec::with_capacity(shards.len()),
        loss: 0.0,
        metrics: Vec::new(),
    };
    for shard in shards {
        let share = if total > 0.0 {
            shard.weight / total
        } else {
            1.0 / shards.len() as f64
        };
        combined.loss += share * shard.loss.to_scalar::<f32>()? as f64;
        for (name, value) in &shard.metrics {
            match combined.metrics.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => *v += share * value,
                None => combined.metrics.push((name, share * value)),
            }
        }
        combined.weighted_losses.push((shard.loss.clone(), share));
    }
    Ok(combined)
}

/// Backpropagates each `(loss, weight)` as `loss × weight` (in parallel, as
/// [`map_shards`]) and sums the gradients of `vars`, in shard order so the sum is the
/// same however the shards ran. With them, for each of `vars`, Σ g² of its gradient
/// where summing the shards computed it (`weight_grads::total_gradient`), for
/// `optim::grad_norm_with`.
pub fn weighted_backward(
    losses: &[(Tensor, f64)],
    vars: &[Var],
) -> candle_core::Result<(GradStore, Vec<Option<f64>>)> {
    use crate::model::weight_grads::{backward, total_gradient, PassGradient};
    let passes = map_shards(losses.len(), |k| {
        let (loss, weight) = &losses[k];
        backward(&(loss * *weight)?)
    });
    let mut passes = passes
        .into_iter()
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Each variable's share of every pass, moved out so the sums below own them.
    let parts: Vec<Mutex<Vec<PassGradient>>> = vars
        .iter()
        .map(|var| {
            let shares = passes
                .iter_mut()
                .map(|(store, grads)| PassGradient::take(var.as_tensor(), store, grads))
                .collect();
            Mutex::new(shares)
        })
        .collect();
    // One sum per variable, the variables spread over the threads.
    let totals = map_shards(vars.len(), |v| {
        let shares = parts[v]
            .lock()
            .map(|mut shares| std::mem::take(&mut *shares))
            .unwrap_or_default();
        total_gradient(vars[v].as_tensor(), shares)
    });
    let mut sum = GradStore::default();
    let mut squares = Vec::with_capacity(vars.len());
    for (var, total) in vars.iter().zip(totals) {
        let (total, var_squares) = total?;
        if let Some(total) = total {
            sum.insert(var.as_tensor(), total);
        }
        squares.push(var_squares);
    }
    Ok((sum, squares))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn shards_are_contiguous_nearly_equal_and_never_empty() {
        let items: Vec<usize> = (0..7).collect();
        let parts = split_into_shards(&items, 3);
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4], &[5, 6]]);
        assert_eq!(split_into_shards(&items[..2], 4), vec![&[0][..], &[1]]);
        assert_eq!(split_into_shards(&items, 1), vec![&items[..]]);
        assert!(split_into_shards::<usize>(&[], 2).is_empty());
    }

    #[test]
    fn padded_length_shards_keep_long_rows_together_and_balance_cost() {
        // Rows 0..8 with lengths 30, 8, 9, 29, 10, 8, 31, 9.
        let lengths = [30, 8, 9, 29, 10, 8, 31, 9];
        let batch: Vec<usize> = (0..8).collect();
        let shards = split_by_padded_length(&batch, &lengths, 2);
        // Sorted: 1, 5 (8), 2, 7 (9), 4 (10), 3 (29), 0 (30), 6 (31). Cutting after the
        // five short rows costs max(5 × 10, 3 × 31) = 93; halves in batch order cost
        // 4 × 30 = 120 and 4 × 31 = 124.
        assert_eq!(shards, vec![vec![1, 5, 2, 7, 4], vec![3, 0, 6]]);
        let mut all: Vec<usize> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, batch);
        // Equal lengths split into near-equal counts, in batch order.
        let flat = split_by_padded_length(&[4, 2, 7, 1, 0], &[5; 8], 2);
        assert_eq!(flat, vec![vec![4, 2], vec![7, 1, 0]]);
        assert_eq!(split_by_padded_length(&[3], &lengths, 4), vec![vec![3]]);
        assert!(split_by_padded_length(&[], &lengths, 2).is_empty());
    }

    #[test]
    fn shard_results_come_back_in_index_order() {
        assert_eq!(map_shards(5, |k| k * 10), vec![0, 10, 20, 30, 40]);
    }

    #[test]
    fn shards_combine_by_weight_and_fall_back_to_equal_shares() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let shard = |loss: f32, weight: f64, accuracy: f64| -> candle_core::Result<ShardLoss> {
            Ok(ShardLoss {
                loss: Tensor::new(loss, &device)?,
                weight,
                metrics: vec![("accuracy", accuracy)],
            })
        };
        let combined = combine_shards(&[shard(1.0, 3.0, 1.0)?, shard(2.0, 1.0, 0.0)?])?;
        assert!((combined.loss - 1.25).abs() < 1e-9);
        assert_eq!(combined.metrics, vec![("accuracy", 0.75)]);
        assert_eq!(combined.weighted_losses[1].1, 0.25);
        let unweighted = combine_shards(&[shard(1.0, 0.0, 1.0)?, shard(2.0, 0.0, 0.0)?])?;
        assert!((unweighted.loss - 1.5).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn shard_streams_differ_and_do_not_depend_on_order() {
        use rand::Rng;
        let draw = |step, pass, shard| shard_rng(7, step, pass, shard).random::<u64>();
        assert_eq!(draw(3, 0, 1), draw(3, 0, 1));
        let all = [draw(3, 0, 0), draw(3, 0, 1), draw(3, 1, 0), draw(4, 0, 0)];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
    }

    #[test]
    fn weighted_shard_gradients_equal_the_whole_batch_gradient() -> candle_core::Result<()> {
        // mean over 5 values of (w·x)², split 3 + 2 and weighted by shard size / 5.
        let device = Device::Cpu;
        let w = Var::new(&[0.5f32, -1.5], &device)?;
        let x = Tensor::new(
            &[[1f32, 2.], [3., -1.], [0.5, 0.5], [2., 2.], [-1., 4.]],
            &device,
        )?;
        let loss_of = |rows: &Tensor| -> candle_core::Result<Tensor> {
            rows.broadcast_mul(w.as_tensor())?.sum(1)?.sqr()?.mean_all()
        };
        let whole = loss_of(&x)?.backward()?;
        let shards = vec![
            (loss_of(&x.narrow(0, 0, 3)?)?, 3.0 / 5.0),
            (loss_of(&x.narrow(0, 3, 2)?)?, 2.0 / 5.0),
        ];
        let (summed, _) = weighted_backward(&shards, &[w.clone()])?;
        let expected = whole.get(w.as_tensor()).expect("grad").to_vec1::<f32>()?;
        let got = summed.get(w.as_tensor()).expect("grad").to_vec1::<f32>()?;
        for (e, g) in expected.iter().zip(&got) {
            assert!((e - g).abs() < 1e-5, "{expected:?} vs {got:?}");
        }
        Ok(())
    }

    #[test]
    fn deposited_weight_gradients_sum_over_shards() -> candle_core::Result<()> {
        // The fused projection hands its weight's gradient to the collector of each
        // shard's backward (model::weight_grads); the shards' deposits must sum to the
        // whole batch's gradient as candle's store entries do. The bias goes through
        // candle's store in the same passes.
        let device = Device::Cpu;
        let w = Var::new(&[[0.5f32, -1.5], [1.0, 0.25], [-0.5, 2.0]], &device)?;
        let bias = Var::new(&[0.1f32, -0.2, 0.3], &device)?;
        let x = Tensor::new(
            &[[1f32, 2.], [3., -1.], [0.5, 0.5], [2., 2.], [-1., 4.]],
            &device,
        )?;
        let loss_of = |rows: &Tensor| -> candle_core::Result<Tensor> {
            let projected = crate::model::fused::linear(rows, w.as_tensor())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            projected.broadcast_add(bias.as_tensor())?.sqr()?.mean_all()
        };
        let whole = loss_of(&x)?.backward()?;
        let shards = vec![
            (loss_of(&x.narrow(0, 0, 3)?)?, 3.0 / 5.0),
            (loss_of(&x.narrow(0, 3, 2)?)?, 2.0 / 5.0),
        ];
        let (summed, squares) = weighted_backward(&shards, &[w.clone(), bias.clone()])?;
        for var in [&w, &bias] {
            let expected = whole.get(var.as_tensor()).expect("grad");
            let got = summed.get(var.as_tensor()).expect("grad");
            let difference = (expected - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(difference < 1e-5, "differs by {difference}");
        }
        // The deposited weight's Σ g² came with its sum, as the norm would compute it;
        // the bias (candle's store) has none.
        let w_grad = summed.get(w.as_tensor()).expect("grad").flatten_all()?;
        let w_squares: f64 = w_grad
            .to_vec1::<f32>()?
            .iter()
            .map(|&g| f64::from(g).powi(2))
            .sum();
        let got = squares[0].expect("squares of the deposits");
        assert!(
            (got - w_squares).abs() <= 1e-12 * w_squares,
            "{got} vs {w_squares}"
        );
        assert_eq!(squares[1], None);
        let norm =
            crate::algo::optim::grad_norm(&[w.clone(), bias.clone()], &summed).expect("norm");
        let with = crate::algo::optim::grad_norm_with(&[w, bias], &summed, &squares).expect("norm");
        assert_eq!(norm.to_bits(), with.to_bits());
        Ok(())
    }
}
