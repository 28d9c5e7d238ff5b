//! Weight gradients that the fused ops write straight into, beside candle's gradient
//! store.
//!
//! Why: candle's backward gives every node's input a fresh zero-filled buffer and adds
//! each gradient onto it, so a weight's gradient costs a fill, an add and two buffers
//! beyond the product that computes it: for the projections of a training step, about
//! as much memory traffic as the whole AdamW update. While [`backward`] runs, a fused
//! op whose weight is a trained variable hands the product to [`deposit`] instead: the
//! first lands in a new buffer, any later one (a weight used twice) is added by gemm as
//! it writes. Outside [`backward`] the ops return their gradients to candle as usual.
//!
//! The collector is per thread (candle calls every op's backward on the thread that
//! runs the backward pass) and nests, so a shard's backward that rayon runs while
//! another waits on the same thread keeps its gradients apart.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Gradients deposited during one backward pass, by variable.
#[derive(Default)]
pub struct WeightGrads {
    grads: HashMap<TensorId, Vec<f32>>,
}

impl WeightGrads {
    /// The gradient deposited for `var`, as f32 values in its (contiguous) layout.
    #[cfg(test)]
    fn get(&self, var: &Tensor) -> Option<&[f32]> {
        self.grads.get(&var.id()).map(Vec::as_slice)
    }

    /// Moves the gradient deposited for `var` out.
    pub fn take(&mut self, var: &Tensor) -> Option<Vec<f32>> {
        self.grads.remove(&var.id())
    }
}

thread_local! {
    static COLLECTORS: RefCell<Vec<WeightGrads>> = const { RefCell::new(Vec::new()) };
    static WHOLE_BLOCKS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `forward` (on this thread) with the whole-block fused ops allowed
/// ([`super::fused::mlp_block`]). Their weights are not graph inputs: the weights'
/// gradients exist only as deposits, so the graph built here must be backpropagated
/// with [`backward`] (a plain `Tensor::backward` on it fails with an error saying so).
/// The training loops wrap their shards' forward passes in it.
pub fn forward_for_backward<R>(forward: impl FnOnce() -> R) -> R {
    /// Puts the flag back however `forward` ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WHOLE_BLOCKS.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(WHOLE_BLOCKS.with(|b| b.replace(true)));
    forward()
}

/// Whether [`forward_for_backward`] is running on this thread.
pub(crate) fn whole_blocks_allowed() -> bool {
    WHOLE_BLOCKS.with(Cell::get)
}

/// Backpropagates `loss`: candle's gradients, and apart from them those the fused ops
/// deposited for trained f32 weights. A variable's gradient is the sum of its entries
/// in both (see [`total_gradient`]).
pub fn backward(loss: &Tensor) -> Result<(GradStore, WeightGrads)> {
    COLLECTORS.with(|c| c.borrow_mut().push(WeightGrads::default()));
    let store = loss.backward();
    let deposited = COLLECTORS
        .with(|c| c.borrow_mut().pop())
        .unwrap_or_default();
    Ok((store?, deposited))
}

/// Hands the gradient of `weight` to the running [`backward`]: `first()` computes it
/// into a new buffer, `add(buffer)` adds it onto the one already deposited. Returns
/// false, computing nothing, when `weight` is not a variable or no [`backward`] is
/// collecting on this thread; the caller then returns the gradient to candle.
pub(crate) fn deposit(
    weight: &Tensor,
    first: impl FnOnce() -> Result<Vec<f32>>,
    add: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<bool> {
    if !weight.is_variable() || weight.dtype() != candle_core::DType::F32 {
        return Ok(false);
    }
    let collecting = COLLECTORS.with(|c| !c.borrow().is_empty());
    if !collecting {
        return Ok(false);
    }
    // Taken out of the collector while computing, so no borrow is held across the
    // product (which may run rayon work on this thread).
    let existing = COLLECTORS.with(|c| {
        c.borrow_mut()
            .last_mut()
            .and_then(|top| top.grads.remove(&weight.id()))
    });
    let grad = match existing {
        Some(mut grad) => {
            add(&mut grad)?;
            grad
        }
        None => first()?,
    };
    if grad.len() != weight.elem_count() {
        candle_core::bail!(
            "deposited gradient of {} values for a weight of {}",
            grad.len(),
            weight.elem_count()
        );
    }
    COLLECTORS.with(|c| {
        if let Some(top) = c.borrow_mut().last_mut() {
            top.grads.insert(weight.id(), grad);
        }
    });
    Ok(true)
}

/// One backward pass's share of a variable's gradient.
#[derive(Default)]
pub struct PassGradient {
    /// From candle's store.
    pub stored: Option<Tensor>,
    /// From the fused ops' deposits.
    pub deposited: Option<Vec<f32>>,
}

impl PassGradient {
    /// Moves `var`'s share out of one pass.
    pub fn take(var: &Tensor, store: &GradStore, grads: &mut WeightGrads) -> Self {
        PassGradient {
            stored: store.get(var).cloned(),
            deposited: grads.take(var),
        }
    }
}

/// The gradient of `var` over several backward passes, `None` when no pass reached it:
/// the passes' deposits summed in order, then their store entries in order. The order
/// is fixed, so the sum is the same however the passes ran. With it, Σ g² (f64, as the
/// gradient norm sums it) when the last add of the deposits computed it on the way: two
/// or more deposits and nothing in candle's store.
pub fn total_gradient(
    var: &Tensor,
    parts: Vec<PassGradient>,
) -> Result<(Option<Tensor>, Option<f64>)> {
    let mut deposited: Option<Vec<f32>> = None;
    let mut stored = Vec::new();
    let mut deposits: Vec<Vec<f32>> = Vec::new();
    for part in parts {
        stored.extend(part.stored);
        deposits.extend(part.deposited);
    }
    let count = deposits.len();
    let mut squares = None;
    for (i, grad) in deposits.into_iter().enumerate() {
        match deposited.as_mut() {
            Some(sum) if i + 1 == count && stored.is_empty() => {
                squares = Some(crate::algo::optim::add_and_squared_sum(sum, &grad));
            }
            Some(sum) => sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g),
            None => deposited = Some(grad),
        }
    }
    let mut total = match deposited {
        Some(sum) => Some(Tensor::from_vec(sum, var.shape(), var.device())?),
        None => None,
    };
    for grad in stored {
        total = Some(match total {
            Some(sum) => (sum + grad)?,
            None => grad,
        });
    }
    Ok((total, squares))
}

/// The gradients of `tensors` from `loss` through [`backward`], deposits and candle's
/// store together (one pass): what the fused blocks' tests compare.
#[cfg(test)]
pub(crate) fn gradients_through_deposits(
    loss: &Tensor,
    tensors: &[&Tensor],
) -> Result<Vec<Option<Tensor>>> {
    let (store, mut deposits) = backward(loss)?;
    tensors
        .iter()
        .map(|t| {
            let part = PassGradient::take(t, &store, &mut deposits);
            Ok(total_gradient(t, vec![part])?.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::{gated_mlp_input, linear};
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| rng.random::<f32>() - 0.5).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }

    /// x → linear(w) → gated MLP(gate, up) → linear(w) again (w used twice), and a
    /// product with `scaled` = 2 w, a tracked tensor that is not a variable.
    fn loss(x: &Tensor, w: &Var, gate: &Var, up: &Var) -> crate::model::Result<Tensor> {
        let h = linear(x, w.as_tensor())?; // (3, 5, 4)
        let mixed = gated_mlp_input(&h, gate.as_tensor(), up.as_tensor())?; // (3, 5, 6)
        let back = linear(&mixed.narrow(2, 0, 4)?.contiguous()?, w.as_tensor())?;
        let scaled = (w.as_tensor() * 2.0)?;
        let other = linear(&h, &scaled)?;
        Ok(((back.sqr()?.sum_all()? + (other * &h)?.sum_all()?)? + mixed.sum_all()?)?)
    }

    #[test]
    fn deposited_and_stored_gradients_sum_to_candles_gradients() -> crate::model::Result<()> {
        let x = random(&[3, 5, 4], 1);
        let w = Var::from_tensor(&random(&[4, 4], 2))?;
        let gate = Var::from_tensor(&random(&[6, 4], 3))?;
        let up = Var::from_tensor(&random(&[6, 4], 4))?;
        let plain = loss(&x, &w, &gate, &up)?.backward()?;
        let (store, mut deposited) = backward(&loss(&x, &w, &gate, &up)?)?;
        // The projections' weights went to the deposits, not to candle's store (except
        // through `scaled`, which is not a variable and so flowed through candle).
        assert!(deposited.get(gate.as_tensor()).is_some());
        assert!(deposited.get(up.as_tensor()).is_some());
        assert!(deposited.get(w.as_tensor()).is_some());
        assert!(store.get(gate.as_tensor()).is_none());
        assert!(
            store.get(w.as_tensor()).is_some(),
            "w's share through `scaled`"
        );
        for var in [&w, &gate, &up] {
            let var = var.as_tensor();
            let shares = vec![PassGradient::take(var, &store, &mut deposited)];
            let total = total_gradient(var, shares)?.0.expect("a gradient");
            let expected = plain.get(var).expect("candle's gradient");
            let difference = max_difference(&total, expected);
            assert!(difference < 1e-5, "differs by {difference}");
        }
        Ok(())
    }

    #[test]
    fn without_a_collector_gradients_go_to_candle_and_collectors_nest() -> crate::model::Result<()>
    {
        let x = random(&[2, 4], 5);
        let w = Var::from_tensor(&random(&[3, 4], 6))?;
        let outer_loss = linear(&x, w.as_tensor())?.sum_all()?;
        let inner_loss = (linear(&x, w.as_tensor())?.sum_all()? * 3.0)?;
        let plain = linear(&x, w.as_tensor())?.sum_all()?.backward()?;
        assert!(
            plain.get(w.as_tensor()).is_some(),
            "no collector: candle's store"
        );
        // A backward inside another (rayon running a second shard on the same thread
        // while the first waits) keeps its deposits to itself.
        COLLECTORS.with(|c| c.borrow_mut().push(WeightGrads::default()));
        let (_, inner) = backward(&inner_loss)?;
        let outer_store = outer_loss.backward()?;
        let outer = COLLECTORS
            .with(|c| c.borrow_mut().pop())
            .expect("outer collector");
        assert!(outer_store.get(w.as_tensor()).is_none());
        let (outer, inner) = (
            outer.get(w.as_tensor()).expect("outer deposit"),
            inner.get(w.as_tensor()).expect("inner deposit"),
        );
        for (o, i) in outer.iter().zip(inner) {
            assert!((3.0 * o - i).abs() < 1e-5, "{o} vs {i}");
        }
        Ok(())
    }

    #[test]
    fn passes_sum_in_order_with_their_stored_shares() -> crate::model::Result<()> {
        let var = Tensor::zeros((2,), candle_core::DType::F32, &Device::Cpu)?;
        let share = |stored: Option<[f32; 2]>, deposited: Option<[f32; 2]>| PassGradient {
            stored: stored.map(|v| Tensor::new(&v, &Device::Cpu).unwrap()),
            deposited: deposited.map(|v| v.to_vec()),
        };
        let total = total_gradient(
            &var,
            vec![
                share(None, Some([1.0, 2.0])),
                share(Some([10.0, 20.0]), Some([3.0, 4.0])),
                share(None, None),
            ],
        )?
        .0
        .expect("a gradient");
        assert_eq!(total.to_vec1::<f32>()?, vec![14.0, 26.0]);
        assert!(total_gradient(&var, vec![share(None, None)])?.0.is_none());
        Ok(())
    }
}
