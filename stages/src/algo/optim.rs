//! Gradient-norm clipping and an AdamW whose state can be saved and restored.
//!
//! `candle_nn::AdamW` computes the same update as `torch.optim.AdamW` (tests/algo_optim.rs
//! checks both against PyTorch), but keeps its moments and step count private, so a run
//! cannot checkpoint and resume it. [`AdamW`] here is the same algorithm with its state
//! exposed through [`AdamW::state_tensors`], [`AdamW::save`] and [`AdamW::load`].

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use candle_nn::VarMap;

use super::error::{at, AlgoError};
use crate::parallel::map_shards;
use crate::simd::multiversion;

/// Scales all gradients of `vars` in place so that their global L2 norm is at most
/// `max_norm`; returns the norm before clipping.
///
/// Matches `torch.nn.utils.clip_grad_norm_(params, max_norm)` (norm type 2): the total
/// norm is `sqrt(Σ_p ‖g_p‖²)`, and every gradient is multiplied by
/// `min(1, max_norm / (total + 1e-6))`. Variables without a gradient are skipped.
/// A non-finite norm is returned as is and gradients are left unchanged; the caller decides
/// (training stages stop on it). Training loops use [`grad_norm`] and
/// [`AdamW::step_clipped`] instead, which scale each gradient as the update reads it.
pub fn clip_grad_norm(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
) -> Result<f64, AlgoError> {
    let f = at("clip_grad_norm");
    let total_norm = grad_norm(vars, grads)?;
    if let Some(coefficient) = clip_coefficient(total_norm, max_norm) {
        let present: Vec<(&Var, Tensor)> = vars
            .iter()
            .filter_map(|var| Some((var, grads.get(var.as_tensor())?.clone())))
            .collect();
        let scaled = map_shards(present.len(), |i| {
            scale_in_place(&present[i].1, coefficient)
        });
        for ((var, grad), done) in present.iter().zip(scaled) {
            if !done.map_err(&f)? {
                let scaled = grad.affine(coefficient, 0.0).map_err(&f)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(total_norm)
}

/// The global L2 norm `sqrt(Σ_p ‖g_p‖²)` of the gradients of `vars` in `grads`
/// (variables without a gradient are skipped), summed in f64.
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64, AlgoError> {
    grad_norm_with(vars, grads, &[])
}

/// [`grad_norm`], taking `known[i]` as Σ g² of `vars[i]` where it is given (computed as
/// the gradient was summed, `parallel::weighted_backward`): the same total.
pub fn grad_norm_with(
    vars: &[Var],
    grads: &GradStore,
    known: &[Option<f64>],
) -> Result<f64, AlgoError> {
    let f = at("grad_norm");
    // Each variable's sum on its own thread, then added in variable order: the same
    // total whatever the thread count.
    let sums = map_shards(vars.len(), |i| match grads.get(vars[i].as_tensor()) {
        None => Ok(None),
        Some(grad) => match known.get(i).copied().flatten() {
            Some(sum) => Ok(Some(sum)),
            None => squared_sum(grad).map(Some),
        },
    });
    let mut squared_total = 0f64;
    for sum in sums {
        if let Some(sum) = sum.map_err(&f)? {
            squared_total += sum;
        }
    }
    Ok(squared_total.sqrt())
}

/// The factor [`clip_grad_norm`] multiplies gradients by for a norm of `total_norm`:
/// `max_norm / (total_norm + 1e-6)` when that is below 1, `None` (no clipping) otherwise
/// or when the norm is not finite.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> Option<f64> {
    let coefficient = max_norm / (total_norm + 1e-6);
    (total_norm.is_finite() && coefficient < 1.0).then_some(coefficient)
}

multiversion! {
    /// Σ x² in f64 over eight interleaved partial sums (one chain of dependent adds
    /// would wait on every add's latency; this vectorises).
    fn f64_squared_sum(values: &[f32]) -> f64 {
        let mut lanes = [0f64; 8];
        let chunks = values.chunks_exact(8);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                let x = f64::from(x);
                *lane += x * x;
            }
        }
        let mut sum = lanes.iter().sum::<f64>();
        for &x in tail {
            let x = f64::from(x);
            sum += x * x;
        }
        sum
    }
}

multiversion! {
    /// `sum += other` element by element, returning Σ sum² of the result in f64: the
    /// lanes and order of [`f64_squared_sum`], so the same bits as summing first and
    /// calling it, in one pass instead of two (the shards' gradients are summed this way
    /// as the gradient norm is taken).
    pub(crate) fn add_and_squared_sum(sum: &mut [f32], other: &[f32]) -> f64 {
        let n = sum.len().min(other.len());
        let (sum, other) = (&mut sum[..n], &other[..n]);
        let mut lanes = [0f64; 8];
        let body = n / 8 * 8;
        for (chunk, add) in sum[..body].chunks_exact_mut(8).zip(other[..body].chunks_exact(8)) {
            for ((lane, s), &o) in lanes.iter_mut().zip(chunk.iter_mut()).zip(add) {
                *s += o;
                let x = f64::from(*s);
                *lane += x * x;
            }
        }
        let mut total = lanes.iter().sum::<f64>();
        for (s, &o) in sum[body..].iter_mut().zip(&other[body..]) {
            *s += o;
            let x = f64::from(*s);
            total += x * x;
        }
        total
    }
}

/// Σ g² in f64: one pass over contiguous f32 CPU data, else tensor ops.
fn squared_sum(grad: &Tensor) -> candle_core::Result<f64> {
    {
        let (storage, layout) = grad.storage_and_layout();
        if let Some(values) = f32_slice(&storage, layout) {
            return Ok(f64_squared_sum(values));
        }
    }
    grad.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()
}

/// `grad ← grad × coefficient` in place, rounded as candle's `affine(coefficient, 0)`;
/// false, touching nothing, when the data is not contiguous f32 on the CPU.
fn scale_in_place(grad: &Tensor, coefficient: f64) -> candle_core::Result<bool> {
    let coefficient = coefficient as f32;
    let done = with_f32_data_mut(grad, |values| {
        for x in values.iter_mut() {
            *x = *x * coefficient + 0.0;
        }
    })?;
    Ok(done.is_some())
}

/// AdamW hyper-parameters; the defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One trainable variable with its first and second moment estimates.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    first_moment: Tensor,
    second_moment: Tensor,
    /// Updates this variable received; torch counts per parameter, so a variable that
    /// missed a step keeps its own bias correction.
    updates: usize,
}

/// The scalars of one variable's update.
struct UpdateCoefficients {
    /// The clipping factor the gradient is multiplied by first, if any.
    grad_scale: Option<f64>,
    /// 1 - lr × weight decay (decoupled decay).
    decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    inverse_bias_correction2_sqrt: f64,
    /// lr / (1 - beta1^t).
    step_size: f64,
}

/// One update with tensor ops (any dtype or device): ten intermediate tensors.
fn tensor_update(
    slot: &mut Slot,
    grad: &Tensor,
    c: &UpdateCoefficients,
) -> candle_core::Result<()> {
    let scaled;
    let grad = match c.grad_scale {
        Some(scale) => {
            scaled = grad.affine(scale, 0.0)?;
            &scaled
        }
        None => grad,
    };
    let theta = slot.var.as_tensor();
    let decayed = theta.affine(c.decay, 0.0)?;
    let first = (slot.first_moment.affine(c.beta1, 0.0)? + grad.affine(1.0 - c.beta1, 0.0)?)?;
    let second =
        (slot.second_moment.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denominator = second
        .sqrt()?
        .affine(c.inverse_bias_correction2_sqrt, c.eps)?;
    let update = (&first / denominator)?.affine(c.step_size, 0.0)?;
    slot.var.set(&(decayed - update)?)?;
    slot.first_moment = first;
    slot.second_moment = second;
    Ok(())
}

/// The contiguous f32 CPU data behind a storage guard and layout, if that is what it is.
fn f32_slice<'a>(
    storage: &'a candle_core::StorageRef<'_>,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    match &**storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok()?.get(start..end),
        _ => None,
    }
}

/// Runs `update` on the contiguous f32 CPU data of `tensor`, in place; `None`, touching
/// nothing, for any other dtype, device or layout.
fn with_f32_data_mut<R>(
    tensor: &Tensor,
    update: impl FnOnce(&mut [f32]) -> R,
) -> candle_core::Result<Option<R>> {
    struct InPlace<F, R> {
        update: Cell<Option<F>>,
        result: Cell<Option<R>>,
    }
    impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for InPlace<F, R> {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            if let (CpuStorage::F32(data), Some((start, end))) =
                (storage, layout.contiguous_offsets())
            {
                if let Some(update) = self.update.take() {
                    self.result.set(Some(update(&mut data[start..end])));
                }
            }
            Ok(())
        }
    }
    if !tensor.device().is_cpu() {
        return Ok(None);
    }
    let op = InPlace {
        update: Cell::new(Some(update)),
        result: Cell::new(None),
    };
    tensor.inplace_op1(&op)?;
    Ok(op.result.into_inner())
}

/// The coefficients of [`UpdateCoefficients`] in f32, as the tensor ops round them.
#[derive(Clone, Copy)]
struct F32Coefficients {
    /// 1 when there is no clipping: `g * 1 + 0` is g but for the sign of a zero, which
    /// no later operation keeps (each term of the update adds +0).
    grad_scale: f32,
    decay: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inverse_bias_correction2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

impl From<&UpdateCoefficients> for F32Coefficients {
    fn from(c: &UpdateCoefficients) -> Self {
        let f = |x: f64| x as f32;
        Self {
            grad_scale: c.grad_scale.map_or(1.0, f),
            decay: f(c.decay),
            beta1: f(c.beta1),
            one_minus_beta1: f(1.0 - c.beta1),
            beta2: f(c.beta2),
            one_minus_beta2: f(1.0 - c.beta2),
            inverse_bias_correction2_sqrt: f(c.inverse_bias_correction2_sqrt),
            eps: f(c.eps),
            step_size: f(c.step_size),
        }
    }
}

multiversion! {
    /// One AdamW update of every element, in place: [`tensor_update`]'s f32 operations in
    /// its order (candle's `affine(m, a)` is `x * m + a`; the `+ 0.0` turns -0 into +0
    /// as it does), so the result is bitwise the same.
    fn adamw_in_place(
        theta: &mut [f32],
        first: &mut [f32],
        second: &mut [f32],
        grad: &[f32],
        c: F32Coefficients,
    ) -> () {
        let moments = first.iter_mut().zip(second.iter_mut());
        for ((t, (m, v)), &g) in theta.iter_mut().zip(moments).zip(grad) {
            // Clipping as `clip_grad_norm`'s in-place scaling rounds it.
            let g = g * c.grad_scale + 0.0;
            let new_m = (*m * c.beta1 + 0.0) + (g * c.one_minus_beta1 + 0.0);
            let new_v = (*v * c.beta2 + 0.0) + ((g * g) * c.one_minus_beta2 + 0.0);
            let denominator = new_v.sqrt() * c.inverse_bias_correction2_sqrt + c.eps;
            let update = (new_m / denominator) * c.step_size + 0.0;
            *t = (*t * c.decay + 0.0) - update;
            *m = new_m;
            *v = new_v;
        }
    }
}

/// [`tensor_update`] in one pass, in place, over contiguous f32 CPU tensors (AdamW took
/// about 14 % of a full-model training step with tensor ops, and 12 % when it still
/// allocated three new buffers per variable). Returns false, touching nothing, for
/// other inputs.
fn fused_update(slot: &Slot, grad: &Tensor, c: &UpdateCoefficients) -> candle_core::Result<bool> {
    let (grad_storage, grad_layout) = grad.storage_and_layout();
    let Some(g) = f32_slice(&grad_storage, grad_layout) else {
        return Ok(false);
    };
    let coefficients = F32Coefficients::from(c);
    let updated = with_f32_data_mut(slot.var.as_tensor(), |theta| {
        with_f32_data_mut(&slot.first_moment, |first| {
            with_f32_data_mut(&slot.second_moment, |second| {
                let n = theta.len();
                let fits = first.len() == n && second.len() == n && g.len() == n;
                if fits {
                    adamw_in_place(theta, first, second, g, coefficients);
                }
                fits
            })
        })
    })?;
    Ok(matches!(updated, Some(Ok(Some(Ok(Some(true)))))))
}

/// AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) as `torch.optim.AdamW` computes it:
///
/// ```text
/// θ ← θ·(1 - lr·λ)
/// m ← β1·m + (1-β1)·g          v ← β2·v + (1-β2)·g²
/// θ ← θ - lr/(1-β1^k) · m / (sqrt(v)/sqrt(1-β2^k) + ε)
/// ```
///
/// `k` counts the updates of each variable. Variables are named (for checkpoints); a
/// variable without a gradient in a step is left untouched, moments and `k` included, as in
/// torch (`candle_nn::AdamW` uses one global `k`, which differs after such a skip).
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step: usize,
    config: AdamWConfig,
}

const STEP_KEY: &str = "adamw.step";

/// Reads a non-negative count stored as an `i64` tensor of shape `(1,)`.
fn read_count(tensor: &Tensor, function: &'static str) -> Result<Option<usize>, AlgoError> {
    let f = at(function);
    let values = tensor
        .to_dtype(DType::I64)
        .map_err(&f)?
        .flatten_all()
        .map_err(&f)?
        .to_vec1::<i64>()
        .map_err(&f)?;
    Ok(values
        .first()
        .copied()
        .filter(|v| *v >= 0)
        .map(|v| v as usize))
}

impl AdamW {
    /// An optimiser over `named_vars` (floating-point only) with zeroed moments.
    pub fn new(named_vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self, AlgoError> {
        let f = at("AdamW::new");
        let mut slots = Vec::with_capacity(named_vars.len());
        for (name, var) in named_vars
            .into_iter()
            .filter(|(_, var)| var.dtype().is_float())
        {
            let first_moment = var.zeros_like().map_err(&f)?;
            let second_moment = var.zeros_like().map_err(&f)?;
            slots.push(Slot {
                name,
                var,
                first_moment,
                second_moment,
                updates: 0,
            });
        }
        Ok(Self {
            slots,
            step: 0,
            config,
        })
    }

    /// An optimiser over every variable of `var_map`, in name order.
    pub fn from_var_map(var_map: &VarMap, config: AdamWConfig) -> Result<Self, AlgoError> {
        let data = var_map.data().lock().map_err(|_| AlgoError::Parameter {
            function: "AdamW::from_var_map",
            name: "var_map",
            value: f64::NAN,
            expected: "a VarMap whose lock is not poisoned",
        })?;
        let mut named: Vec<(String, Var)> = data
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(named, config)
    }

    /// Number of [`Self::step`] calls so far (what a learning-rate schedule needs).
    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    pub fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.config.learning_rate = learning_rate;
    }

    /// Applies one update from `grads` to every variable that has a gradient there.
    pub fn step(&mut self, grads: &GradStore) -> Result<(), AlgoError> {
        self.step_clipped(grads, None)
    }

    /// [`Self::step`] on the gradients multiplied by `grad_scale` (a
    /// [`clip_coefficient`]): the same update as [`clip_grad_norm`] followed by
    /// [`Self::step`], bit for bit, without a pass that writes the scaled gradients.
    pub fn step_clipped(
        &mut self,
        grads: &GradStore,
        grad_scale: Option<f64>,
    ) -> Result<(), AlgoError> {
        let f = at("AdamW::step");
        self.step += 1;
        let AdamWConfig {
            learning_rate,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let mut jobs = Vec::with_capacity(self.slots.len());
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.updates += 1;
            let bias_correction1 = 1.0 - beta1.powi(slot.updates as i32);
            let bias_correction2_sqrt = (1.0 - beta2.powi(slot.updates as i32)).sqrt();
            let coefficients = UpdateCoefficients {
                grad_scale,
                decay: 1.0 - learning_rate * weight_decay,
                beta1,
                beta2,
                eps,
                inverse_bias_correction2_sqrt: 1.0 / bias_correction2_sqrt,
                step_size: learning_rate / bias_correction1,
            };
            jobs.push((index, grad.detach(), coefficients));
        }
        // Variables update independently, so they share the compute threads; on one
        // thread the loop would leave the other cores idle for a tenth of a full-model step.
        let fused = map_shards(jobs.len(), |j| {
            let (index, grad, coefficients) = &jobs[j];
            fused_update(&self.slots[*index], grad, coefficients)
        });
        for ((index, grad, coefficients), fused) in jobs.iter().zip(fused) {
            if !fused.map_err(&f)? {
                tensor_update(&mut self.slots[*index], grad, coefficients).map_err(&f)?;
            }
        }
        Ok(())
    }

    /// The state as named tensors, ready for a safetensors file: `adamw.m.<name>`,
    /// `adamw.v.<name>`, `adamw.updates.<name>` and `adamw.step` (counts as `i64`, `(1,)`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>, AlgoError> {
        let f = at("AdamW::state_tensors");
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let count = |n: usize| Tensor::new(&[n as i64], &device).map_err(&f);
        let mut state = HashMap::with_capacity(3 * self.slots.len() + 1);
        for slot in &self.slots {
            // Copies: the moments are updated in place by later steps.
            state.insert(
                format!("adamw.m.{}", slot.name),
                slot.first_moment.copy().map_err(&f)?,
            );
            state.insert(
                format!("adamw.v.{}", slot.name),
                slot.second_moment.copy().map_err(&f)?,
            );
            state.insert(format!("adamw.updates.{}", slot.name), count(slot.updates)?);
        }
        state.insert(STEP_KEY.to_string(), count(self.step)?);
        Ok(state)
    }

    /// Restores state produced by [`Self::state_tensors`]; `origin` names where it came
    /// from in errors. Every variable must find moments of its own shape; nothing changes
    /// unless all of them do.
    pub fn load_state_tensors(
        &mut self,
        state: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), AlgoError> {
        let function = "AdamW::load_state_tensors";
        let f = at(function);
        let problem = |detail: String| AlgoError::OptimizerState {
            function,
            path: origin.to_string(),
            detail,
        };
        let entry = |key: &str| {
            state
                .get(key)
                .ok_or_else(|| problem(format!("no `{key}` entry")))
        };
        let step = read_count(entry(STEP_KEY)?, function)?
            .ok_or_else(|| problem(format!("`{STEP_KEY}` is empty or negative")))?;
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let moment = |kind: &str| -> Result<Tensor, AlgoError> {
                let key = format!("adamw.{kind}.{}", slot.name);
                let tensor = entry(&key)?;
                if tensor.dims() != slot.var.dims() {
                    return Err(problem(format!(
                        "`{key}` has shape {:?}, the variable {:?}",
                        tensor.dims(),
                        slot.var.dims()
                    )));
                }
                tensor
                    .to_dtype(slot.var.dtype())
                    .map_err(&f)?
                    .to_device(slot.var.device())
                    .map_err(&f)?
                    // Owned: the moments are updated in place, the caller keeps its map.
                    .copy()
                    .map_err(&f)
            };
            let updates_key = format!("adamw.updates.{}", slot.name);
            let updates = read_count(entry(&updates_key)?, function)?
                .ok_or_else(|| problem(format!("`{updates_key}` is empty or negative")))?;
            restored.push((moment("m")?, moment("v")?, updates));
        }
        for (slot, (first, second, updates)) in self.slots.iter_mut().zip(restored) {
            slot.first_moment = first;
            slot.second_moment = second;
            slot.updates = updates;
        }
        self.step = step;
        Ok(())
    }

    /// Writes the state to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), AlgoError> {
        candle_core::safetensors::save(&self.state_tensors()?, path).map_err(|source| {
            AlgoError::OptimizerState {
                function: "AdamW::save",
                path: path.display().to_string(),
                detail: source.to_string(),
            }
        })
    }

    /// Reads the state from a safetensors file written by [`Self::save`].
    pub fn load(&mut self, path: &Path) -> Result<(), AlgoError> {
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let state = candle_core::safetensors::load(path, &device).map_err(|source| {
            AlgoError::OptimizerState {
                function: "AdamW::load",
                path: path.display().to_string(),
                detail: source.to_string(),
            }
        })?;
        self.load_state_tensors(&state, &path.display().to_string())
    }
}

#[cfg(test)]
mod fused_update_tests {
    use super::*;
    use candle_core::Device;

    fn slot(values: &[f32]) -> Slot {
        let var = Var::new(values, &Device::Cpu).expect("var");
        Slot {
            name: "w".into(),
            first_moment: var.zeros_like().expect("zeros"),
            second_moment: var.zeros_like().expect("zeros"),
            var,
            updates: 0,
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec1::<f32>()
            .expect("values")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn the_one_pass_update_is_bitwise_the_tensor_op_update() {
        // Long enough for the vector body and a scalar tail, with signed zeros in both.
        let mut start = vec![0.3f32, -1.7, 0.0, 2.5e-3, 41.0, -0.0, 7.25];
        start.extend((0..30).map(|i| {
            if i % 9 == 4 {
                -0.0
            } else {
                (i as f32 - 13.0) * 0.21
            }
        }));
        let (fused, mut reference) = (slot(&start), slot(&start));
        for step in 1..=5 {
            let grad: Vec<f32> = (0..start.len())
                .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.37 - 1.6)
                .collect();
            let grad = Tensor::new(grad, &Device::Cpu).expect("grad");
            // Every other step with a clipping factor, folded into the update.
            let c = UpdateCoefficients {
                grad_scale: (step % 2 == 0).then_some(0.37),
                decay: 1.0 - 1e-3 * 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                inverse_bias_correction2_sqrt: 1.0 / (1.0 - 0.999f64.powi(step as i32)).sqrt(),
                step_size: 1e-3 / (1.0 - 0.9f64.powi(step as i32)),
            };
            assert!(fused_update(&fused, &grad, &c).expect("fused"));
            tensor_update(&mut reference, &grad, &c).expect("reference");
            assert_eq!(bits(fused.var.as_tensor()), bits(reference.var.as_tensor()));
            assert_eq!(bits(&fused.first_moment), bits(&reference.first_moment));
            assert_eq!(bits(&fused.second_moment), bits(&reference.second_moment));
        }
        assert_ne!(
            bits(fused.var.as_tensor()),
            bits(&Tensor::new(start.as_slice(), &Device::Cpu).expect("t"))
        );
    }

    #[test]
    fn other_dtypes_take_the_tensor_op_path() {
        let var = Var::new(&[1.0f64, 2.0], &Device::Cpu).expect("var");
        let slot = Slot {
            name: "w".into(),
            first_moment: var.zeros_like().expect("zeros"),
            second_moment: var.zeros_like().expect("zeros"),
            var,
            updates: 0,
        };
        let grad = Tensor::new(&[0.5f64, -0.5], &Device::Cpu).expect("grad");
        let c = UpdateCoefficients {
            grad_scale: None,
            decay: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            inverse_bias_correction2_sqrt: 1.0,
            step_size: 1e-3,
        };
        assert!(!fused_update(&slot, &grad, &c).expect("fused"));
    }

    #[test]
    fn saved_state_does_not_move_with_later_in_place_steps() {
        let var = Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).expect("var");
        let mut optimizer =
            AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).expect("optimiser");
        let step = |optimizer: &mut AdamW| {
            let grads = (var.as_tensor() * 3.0)
                .expect("loss")
                .sum_all()
                .expect("sum")
                .backward();
            optimizer.step(&grads.expect("grads")).expect("step");
        };
        step(&mut optimizer);
        let saved = optimizer.state_tensors().expect("state");
        let first = saved["adamw.m.w"].to_vec1::<f32>().expect("m");
        step(&mut optimizer);
        assert_eq!(saved["adamw.m.w"].to_vec1::<f32>().expect("m"), first);
        optimizer
            .load_state_tensors(&saved, "memory")
            .expect("load");
        step(&mut optimizer);
        assert_eq!(saved["adamw.m.w"].to_vec1::<f32>().expect("m"), first);
        assert_ne!(
            optimizer.state_tensors().expect("state")["adamw.m.w"]
                .to_vec1::<f32>()
                .expect("m"),
            first
        );
    }
}

#[cfg(test)]
mod clipped_step_tests {
    use super::*;
    use candle_core::Device;

    fn bits(var: &Var) -> Vec<u32> {
        let values = var.as_tensor().flatten_all().expect("flat");
        let values = values.to_vec1::<f32>().expect("values");
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Three steps of a two-variable model, clipping at `max_norm`: either scaling the
    /// gradients in place then stepping, or stepping with the clip factor folded in.
    fn train(max_norm: f64, folded: bool) -> Vec<Vec<u32>> {
        let a = Var::new(&[[0.5f32, -1.25, 3.0], [0.0, 2.0, -0.75]], &Device::Cpu).expect("a");
        let b = Var::new(&[1.5f32, -0.5], &Device::Cpu).expect("b");
        let vars = vec![a.clone(), b.clone()];
        let named = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut optimizer = AdamW::new(named, AdamWConfig::default()).expect("optimiser");
        for step in 0..3 {
            let loss = (a.as_tensor().sqr().expect("sqr").sum_all().expect("sum") * 3.0)
                .expect("scale")
                .add(
                    &(b.as_tensor() * (step as f64 + 2.0))
                        .expect("b")
                        .sum_all()
                        .expect("sum"),
                )
                .expect("loss");
            let mut grads = loss.backward().expect("grads");
            if folded {
                let norm = grad_norm(&vars, &grads).expect("norm");
                let scale = clip_coefficient(norm, max_norm);
                optimizer.step_clipped(&grads, scale).expect("step");
            } else {
                clip_grad_norm(&vars, &mut grads, max_norm).expect("clip");
                optimizer.step(&grads).expect("step");
            }
        }
        vec![bits(&a), bits(&b)]
    }

    #[test]
    fn a_clipped_step_is_bitwise_clipping_then_stepping() {
        // The norm is about 20 here: clipped at 1, untouched at 1000.
        for max_norm in [1.0, 1000.0] {
            assert_eq!(
                train(max_norm, true),
                train(max_norm, false),
                "max_norm {max_norm}"
            );
        }
        assert_ne!(
            train(1.0, true),
            train(1000.0, true),
            "clipping changed nothing"
        );
    }

    #[test]
    fn the_clip_factor_is_torchs() {
        assert_eq!(clip_coefficient(0.5, 1.0), None);
        assert_eq!(clip_coefficient(4.0, 2.0), Some(2.0 / (4.0 + 1e-6)));
        assert_eq!(clip_coefficient(f64::NAN, 1.0), None);
        assert_eq!(clip_coefficient(f64::INFINITY, 1.0), None);
        assert_eq!(clip_coefficient(3.0, f64::INFINITY), None);
    }
}

#[cfg(test)]
mod clip_fast_path_tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize) -> Tensor {
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 37 + 11) % 101) as f32 * 0.173 - 8.1)
            .collect();
        Tensor::new(data, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn adding_and_squaring_in_one_pass_is_bitwise_adding_then_squaring() {
        for n in [0, 5, 8, 37] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos() - 0.2).collect();
            let mut fused = a.clone();
            let squares = add_and_squared_sum(&mut fused, &b);
            let summed: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(fused, summed, "n {n}");
            assert_eq!(
                squares.to_bits(),
                f64_squared_sum(&summed).to_bits(),
                "n {n}"
            );
        }
    }

    #[test]
    fn squared_sum_matches_candles_f64_sum() {
        let grad = values(1003);
        let reference = grad
            .to_dtype(DType::F64)
            .and_then(|g| g.sqr())
            .and_then(|g| g.sum_all())
            .and_then(|g| g.to_scalar::<f64>())
            .expect("reference");
        let fast = squared_sum(&grad).expect("sum");
        assert!(
            (fast - reference).abs() <= 1e-12 * reference,
            "{fast} vs {reference}"
        );
        // A strided view takes the tensor-op path and agrees.
        let matrix = values(12).reshape((3, 4)).expect("reshape");
        let strided = matrix.t().expect("transpose");
        let expected = squared_sum(&matrix).expect("sum");
        assert!((squared_sum(&strided).expect("sum") - expected).abs() <= 1e-12 * expected);
    }

    #[test]
    fn scaling_in_place_is_bitwise_affine() {
        let grad = values(531);
        let reference = grad
            .affine(0.37, 0.0)
            .expect("affine")
            .to_vec1::<f32>()
            .expect("v");
        let copy = grad.copy().expect("copy");
        assert!(scale_in_place(&copy, 0.37).expect("scale"));
        let scaled = copy.to_vec1::<f32>().expect("v");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&scaled), bits(&reference));
        let strided = values(12).reshape((3, 4)).expect("r").t().expect("t");
        assert!(!scale_in_place(&strided, 0.5).expect("strided"));
    }
}
