//! The two halves of a decoder layer as one graph node each, whose only input is the
//! residual stream x:
//! - attention: `x + o(attention(rope(q(n)), rope(k(n)), v(n)))`, `n = rms_norm(x)`;
//! - MLP: `x + down(silu(gate(n)) * up(n))`, `n = rms_norm(x)`.
//!
//! Why: as separate fused ops candle keeps five to eight nodes per half, and in
//! backward gives each of their inputs a zero-filled gradient buffer and an add (the
//! normed rows three times over for q, k and v, the projections, the rotated heads, the
//! (rows, intermediate) hidden rows, the residual), per layer and shard. Here the
//! weights are not graph inputs (a custom op takes at most three): their gradients go to
//! the running [`weight_grads::backward`] as deposits, which is why the ops are used only
//! inside [`weight_grads::forward_for_backward`]. The MLP half computes the separate
//! ops' float operations in their order, so the same bits; the attention half sums the
//! normed rows' three gradients in another order (gemm accumulates them as it writes),
//! so it agrees to rounding.

use super::attention::{AttentionOp, Geometry};
use super::kernels::{
    contiguous_f32, rms_norm_rows, rms_norm_rows_backward, rope_rows, silu_mul_rows,
    silu_mul_rows_backward_in_place, with_f32, RopeDirection, RopeGeometry,
};
use super::mlp::gate_up_rows;
use super::products::{self, MatrixView};
use super::{fusable, residual_plus_projection, CandleResult};
use crate::model::weight_grads;
use crate::model::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Tensor, D};
use std::sync::Mutex;

/// The weights of the MLP half of a layer: the post-attention norm and the three
/// projections (no bias, no adapter).
pub struct MlpBlockWeights<'a> {
    /// (hidden,)
    pub norm: &'a Tensor,
    pub eps: f64,
    /// (inter, hidden)
    pub gate: &'a Tensor,
    /// (inter, hidden)
    pub up: &'a Tensor,
    /// (hidden, inter)
    pub down: &'a Tensor,
}

/// `x + down(silu(gate(n)) * up(n))`, `n = rms_norm(x)`, x (..., hidden): one node when
/// [`weight_grads::forward_for_backward`] is running and every weight is f32 on the
/// CPU and either frozen or a variable; `None` otherwise (the caller composes the
/// separate ops).
pub fn mlp_block(x: &Tensor, w: &MlpBlockWeights) -> Result<Option<Tensor>> {
    let weights = [w.norm, w.gate, w.up, w.down];
    let fits = weight_grads::whole_blocks_allowed()
        && fusable(&[x, w.norm, w.gate, w.up, w.down])
        && x.is_contiguous()
        && weights.iter().all(|t| t.is_contiguous())
        && weights.iter().all(|t| !t.track_op() || t.is_variable())
        && x.rank() >= 1
        && w.gate.rank() == 2
        && w.up.dims() == w.gate.dims()
        && w.down.dims() == [w.gate.dim(1)?, w.gate.dim(0)?]
        && w.norm.dims() == [x.dim(D::Minus1)?]
        && w.gate.dim(1)? == x.dim(D::Minus1)?;
    if !fits {
        return Ok(None);
    }
    let op = MlpBlockOp {
        norm: w.norm.clone(),
        eps: w.eps as f32,
        gate: w.gate.clone(),
        up: w.up.clone(),
        down: w.down.clone(),
        kept: Mutex::new(None),
    };
    Ok(Some(x.apply_op1(op)?))
}

struct MlpBlockOp {
    norm: Tensor,
    eps: f32,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// The forward's intermediates, for the backward.
    kept: Mutex<Option<Kept>>,
}

/// What the backward reuses from the forward.
struct Kept {
    /// rms_norm(x), (rows, hidden)
    normed: Vec<f32>,
    /// [n Wg^T | n Wu^T], (rows, 2 inter)
    gate_up: Vec<f32>,
    /// silu(gate) * up, (rows, inter)
    hidden: Vec<f32>,
}

impl MlpBlockOp {
    fn dims(&self) -> CandleResult<(usize, usize)> {
        self.gate.dims2() // (inter, hidden)
    }

    /// The forward's intermediates from x's rows.
    fn intermediates(&self, x: &[f32]) -> CandleResult<Kept> {
        let name = self.name();
        let (inter, hidden_dim) = self.dims()?;
        let rows = x.len() / hidden_dim.max(1);
        let normed = with_f32(&self.norm, name, |norm| {
            Ok(rms_norm_rows(x, norm, self.eps))
        })?;
        let gate_up = with_f32(&self.gate, name, |gate| {
            with_f32(&self.up, name, |up| {
                gate_up_rows(
                    MatrixView::row_major(&normed, rows, hidden_dim),
                    MatrixView::row_major(gate, inter, hidden_dim),
                    MatrixView::row_major(up, inter, hidden_dim),
                )
            })
        })?;
        let hidden = silu_mul_rows(&gate_up, inter);
        Ok(Kept {
            normed,
            gate_up,
            hidden,
        })
    }
}

/// Hands the gradient of a trained `weight` to the running [`weight_grads::backward`]:
/// `first` computes it, `add` adds it onto an earlier deposit. Nothing for a frozen
/// weight; an error when no backward is collecting (a plain `Tensor::backward`).
fn deposit_gradient(
    weight: &Tensor,
    first: impl FnOnce() -> CandleResult<Vec<f32>>,
    add: impl FnOnce(&mut [f32]) -> CandleResult<()>,
) -> CandleResult<()> {
    if !weight.track_op() {
        return Ok(());
    }
    if !weight_grads::deposit(weight, first, add)? {
        candle_core::bail!(
            "a fused decoder block: a graph built under weight_grads::forward_for_backward must \
             be backpropagated with weight_grads::backward (its weights' gradients are deposits)"
        );
    }
    Ok(())
}

impl CustomOp1 for MlpBlockOp {
    fn name(&self) -> &'static str {
        "fused-mlp-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CandleResult<(CpuStorage, Shape)> {
        let (inter, hidden_dim) = self.dims()?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let rows = x.len() / hidden_dim.max(1);
        let kept = self.intermediates(x)?;
        let y = with_f32(&self.down, self.name(), |down| {
            residual_plus_projection(
                x,
                MatrixView::row_major(&kept.hidden, rows, inter),
                MatrixView::row_major(down, hidden_dim, inter),
                self.name(),
            )
        })?;
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(kept);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> CandleResult<Option<Tensor>> {
        let name = self.name();
        let (inter, hidden_dim) = self.dims()?;
        let rows = x.elem_count() / hidden_dim.max(1);
        let x_data = x.detach().contiguous()?;
        let grad = grad.detach().contiguous()?;
        let kept = self.kept.lock().ok().and_then(|mut slot| slot.take());
        with_f32(&x_data, name, |x_rows| {
            with_f32(&grad, name, |grad| {
                let Kept {
                    normed,
                    mut gate_up,
                    hidden,
                } = match kept {
                    Some(kept) => kept,
                    None => self.intermediates(x_rows)?,
                };
                let g = MatrixView::row_major(grad, rows, hidden_dim);
                let normed_rows = MatrixView::row_major(&normed, rows, hidden_dim);
                // down: y = x + hidden Wd^T.
                let hidden_rows = MatrixView::row_major(&hidden, rows, inter);
                deposit_gradient(
                    &self.down,
                    || products::matmul(g.t(), hidden_rows),
                    |dst| products::matmul_into(dst, inter, g.t(), hidden_rows, true),
                )?;
                let dhidden = with_f32(&self.down, name, |down| {
                    products::matmul(g, MatrixView::row_major(down, hidden_dim, inter))
                })?;
                // The gated product, in place: [gate | up] becomes [dgate | dup].
                silu_mul_rows_backward_in_place(&mut gate_up, &dhidden, inter);
                let dgate_up = MatrixView::row_major(&gate_up, rows, 2 * inter);
                let (dgate, dup) = (dgate_up.columns(0, inter), dgate_up.columns(inter, inter));
                let dnormed = with_f32(&self.gate, name, |gate| {
                    with_f32(&self.up, name, |up| {
                        let mut dn = products::matmul(
                            dgate,
                            MatrixView::row_major(gate, inter, hidden_dim),
                        )?;
                        let up = MatrixView::row_major(up, inter, hidden_dim);
                        products::matmul_into(&mut dn, hidden_dim, dup, up, true)?;
                        Ok(dn)
                    })
                })?;
                for (weight, d) in [(&self.gate, dgate), (&self.up, dup)] {
                    deposit_gradient(
                        weight,
                        || products::matmul(d.t(), normed_rows),
                        |dst| products::matmul_into(dst, hidden_dim, d.t(), normed_rows, true),
                    )?;
                }
                norm_backward_with_residual(x, x_rows, grad, &dnormed, &self.norm, self.eps, name)
            })
        })
    }
}

/// The weights and tables of the attention half of a layer: the input norm, the four
/// projections (no bias, no adapter), rotary tables and the additive mask.
pub struct AttentionBlockWeights<'a> {
    /// (hidden,)
    pub norm: &'a Tensor,
    pub eps: f64,
    /// (heads * head_dim, hidden)
    pub q: &'a Tensor,
    /// (kv_heads * head_dim, hidden)
    pub k: &'a Tensor,
    /// (kv_heads * head_dim, hidden)
    pub v: &'a Tensor,
    /// (hidden, heads * head_dim)
    pub o: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    /// (b or 1, 1, t, head_dim)
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// (b or 1, 1, t, t), added to the scores
    pub mask: &'a Tensor,
    pub scale: f64,
}

/// `x + o(attention(rope(q(n)), rope(k(n)), v(n)))`, `n = rms_norm(x)`, x (b, t,
/// hidden): one node on the same conditions as [`mlp_block`]; `None` otherwise.
pub fn attention_block(x: &Tensor, w: &AttentionBlockWeights) -> Result<Option<Tensor>> {
    let weights = [w.norm, w.q, w.k, w.v, w.o];
    let tables = [w.cos, w.sin, w.mask];
    if !weight_grads::whole_blocks_allowed()
        || !fusable(&[x, w.norm, w.q, w.k, w.v, w.o, w.cos, w.sin, w.mask])
        || !x.is_contiguous()
        || !weights.iter().chain(&tables).all(|t| t.is_contiguous())
        || !weights.iter().all(|t| !t.track_op() || t.is_variable())
        || x.rank() != 3
        || w.q.rank() != 2
        || w.cos.rank() != 4
        || w.mask.rank() != 4
        || w.heads == 0
        || w.kv_heads == 0
        || w.heads % w.kv_heads != 0
    {
        return Ok(None);
    }
    let (batch, time, hidden) = x.dims3()?;
    let head_dim = w.q.dim(0)? / w.heads;
    let (table_batch, _, table_time, table_dim) = w.cos.dims4()?;
    let (mask_batch, _, mask_time, mask_keys) = w.mask.dims4()?;
    let fits = w.q.dims() == [w.heads * head_dim, hidden]
        && w.k.dims() == [w.kv_heads * head_dim, hidden]
        && w.v.dims() == [w.kv_heads * head_dim, hidden]
        && w.o.dims() == [hidden, w.heads * head_dim]
        && w.norm.dims() == [hidden]
        && w.sin.dims() == w.cos.dims()
        && head_dim % 2 == 0
        && table_dim == head_dim
        && table_time == time
        && (table_batch == 1 || table_batch == batch)
        && (mask_batch == 1 || mask_batch == batch)
        && mask_time == time
        && mask_keys == time;
    if !fits {
        return Ok(None);
    }
    let rope = |heads| RopeGeometry {
        batch,
        heads,
        time,
        head_dim,
        table_batch,
        token_major: true,
    };
    let geometry = Geometry {
        batch,
        heads: w.heads,
        kv_heads: w.kv_heads,
        time,
        keys: time,
        head_dim,
    };
    let op = AttentionBlockOp {
        norm: w.norm.clone(),
        eps: w.eps as f32,
        q: w.q.clone(),
        k: w.k.clone(),
        v: w.v.clone(),
        o: w.o.clone(),
        cos: w.cos.clone(),
        sin: w.sin.clone(),
        q_rope: rope(w.heads),
        k_rope: rope(w.kv_heads),
        attention: AttentionOp::new(geometry, w.mask, w.scale, true)?,
        geometry,
        kept: Mutex::new(None),
    };
    Ok(Some(x.apply_op1(op)?))
}

struct AttentionBlockOp {
    norm: Tensor,
    eps: f32,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_rope: RopeGeometry,
    k_rope: RopeGeometry,
    /// The attention core (its forward keeps the probabilities for the backward).
    attention: AttentionOp,
    geometry: Geometry,
    kept: Mutex<Option<AttentionKept>>,
}

/// What the backward reuses from the forward.
struct AttentionKept {
    /// rms_norm(x), (rows, hidden)
    normed: Vec<f32>,
    /// Rotated heads (b, heads, t, d) and (b, kv_heads, t, d); v as projected (b, t,
    /// kv_heads*d); the attention's output (b, t, heads*d).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    context: Tensor,
}

impl AttentionBlockOp {
    fn rows_and_hidden(&self) -> (usize, usize) {
        let g = &self.geometry;
        (g.batch * g.time, self.norm.elem_count())
    }

    /// Everything up to the output projection, from x's rows.
    fn intermediates(&self, x: &[f32]) -> CandleResult<AttentionKept> {
        let name = self.name();
        let g = self.geometry;
        let (rows, hidden) = self.rows_and_hidden();
        let (q_width, kv_width) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
        let normed = with_f32(&self.norm, name, |norm| {
            Ok(rms_norm_rows(x, norm, self.eps))
        })?;
        let n = MatrixView::row_major(&normed, rows, hidden);
        let project = |weight: &Tensor, width: usize| {
            with_f32(weight, name, |w| {
                products::matmul(n, MatrixView::row_major(w, width, hidden).t())
            })
        };
        let (q_lin, k_lin, v) = (
            project(&self.q, q_width)?,
            project(&self.k, kv_width)?,
            project(&self.v, kv_width)?,
        );
        let (q, k) = with_f32(&self.cos, name, |cos| {
            with_f32(&self.sin, name, |sin| {
                Ok((
                    rope_rows(&q_lin, cos, sin, &self.q_rope, RopeDirection::Forward),
                    rope_rows(&k_lin, cos, sin, &self.k_rope, RopeDirection::Forward),
                ))
            })
        })?;
        let q_shape = Shape::from((g.batch, g.heads, g.time, g.head_dim));
        let k_shape = Shape::from((g.batch, g.kv_heads, g.time, g.head_dim));
        let v_shape = Shape::from((g.batch, g.time, kv_width));
        let (q_storage, k_storage, v_storage) =
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v));
        let (context, context_shape) = self.attention.cpu_fwd(
            &q_storage,
            &Layout::contiguous(&q_shape),
            &k_storage,
            &Layout::contiguous(&k_shape),
            &v_storage,
            &Layout::contiguous(&v_shape),
        )?;
        let tensor = |storage: CpuStorage, shape: Shape| -> CandleResult<Tensor> {
            let CpuStorage::F32(values) = storage else {
                candle_core::bail!("{name}: not f32");
            };
            Tensor::from_vec(values, shape, &Device::Cpu)
        };
        Ok(AttentionKept {
            normed,
            q: tensor(q_storage, q_shape)?,
            k: tensor(k_storage, k_shape)?,
            v: tensor(v_storage, v_shape)?,
            context: tensor(context, context_shape)?,
        })
    }
}

impl CustomOp1 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "fused-attention-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CandleResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (rows, hidden) = self.rows_and_hidden();
        if x.len() != rows * hidden {
            candle_core::bail!("{}: x does not match the block's geometry", self.name());
        }
        let width = self.geometry.heads * self.geometry.head_dim;
        let kept = self.intermediates(x)?;
        let y = with_f32(&kept.context, self.name(), |context| {
            with_f32(&self.o, self.name(), |o| {
                residual_plus_projection(
                    x,
                    MatrixView::row_major(context, rows, width),
                    MatrixView::row_major(o, hidden, width),
                    self.name(),
                )
            })
        })?;
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(kept);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> CandleResult<Option<Tensor>> {
        let name = self.name();
        let g = self.geometry;
        let (rows, hidden) = self.rows_and_hidden();
        let (q_width, kv_width) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
        let x_data = x.detach().contiguous()?;
        let grad = grad.detach().contiguous()?;
        let kept = self.kept.lock().ok().and_then(|mut slot| slot.take());
        with_f32(&x_data, name, |x_rows| {
            let kept = match kept {
                Some(kept) => kept,
                None => self.intermediates(x_rows)?,
            };
            with_f32(&grad, name, |grad| {
                let out_grad = MatrixView::row_major(grad, rows, hidden);
                // o: y = x + context Wo^T.
                let dcontext = with_f32(&kept.context, name, |context| {
                    let context = MatrixView::row_major(context, rows, q_width);
                    deposit_gradient(
                        &self.o,
                        || products::matmul(out_grad.t(), context),
                        |dst| products::matmul_into(dst, q_width, out_grad.t(), context, true),
                    )?;
                    with_f32(&self.o, name, |o| {
                        products::matmul(out_grad, MatrixView::row_major(o, hidden, q_width))
                    })
                })?;
                let dcontext = Tensor::from_vec(dcontext, kept.context.shape(), x.device())?;
                let (dq, dk, dv) =
                    self.attention
                        .bwd(&kept.q, &kept.k, &kept.v, &kept.context, &dcontext)?;
                let (Some(dq), Some(dk), Some(dv)) = (dq, dk, dv) else {
                    candle_core::bail!("{name}: the attention gave no gradient");
                };
                let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
                // Un-rotate the heads back into the projections' (rows, width) layout.
                let (dq_lin, dk_lin) = with_f32(&self.cos, name, |cos| {
                    with_f32(&self.sin, name, |sin| {
                        let back = |d: &Tensor, geometry: &RopeGeometry| {
                            with_f32(d, name, |d| {
                                Ok(rope_rows(d, cos, sin, geometry, RopeDirection::Backward))
                            })
                        };
                        Ok((back(&dq, &self.q_rope)?, back(&dk, &self.k_rope)?))
                    })
                })?;
                let n = MatrixView::row_major(&kept.normed, rows, hidden);
                // The three projections' shares of the normed rows' gradient: the first
                // product fills the buffer, gemm adds the others as it writes.
                let mut dnormed: Vec<f32> = Vec::new();
                with_f32(&dv, name, |dv| {
                    let parts = [
                        (
                            &self.q,
                            q_width,
                            MatrixView::row_major(&dq_lin, rows, q_width),
                        ),
                        (
                            &self.k,
                            kv_width,
                            MatrixView::row_major(&dk_lin, rows, kv_width),
                        ),
                        (&self.v, kv_width, MatrixView::row_major(dv, rows, kv_width)),
                    ];
                    for (weight, width, d) in parts {
                        with_f32(weight, name, |w| {
                            let w = MatrixView::row_major(w, width, hidden);
                            if dnormed.is_empty() {
                                dnormed = products::matmul(d, w)?;
                                Ok(())
                            } else {
                                products::matmul_into(&mut dnormed, hidden, d, w, true)
                            }
                        })?;
                        deposit_gradient(
                            weight,
                            || products::matmul(d.t(), n),
                            |dst| products::matmul_into(dst, hidden, d.t(), n, true),
                        )?;
                    }
                    Ok(())
                })?;
                norm_backward_with_residual(x, x_rows, grad, &dnormed, &self.norm, self.eps, name)
            })
        })
    }
}

/// The input norm's backward plus the residual: dx = rms_norm'(x)^T dnormed + grad,
/// added as candle adds the two paths' gradients; the norm weight's gradient is
/// deposited when it is trained. `None` when x takes no gradient.
fn norm_backward_with_residual(
    x: &Tensor,
    x_rows: &[f32],
    grad: &[f32],
    dnormed: &[f32],
    norm: &Tensor,
    eps: f32,
    name: &'static str,
) -> CandleResult<Option<Tensor>> {
    let want_norm = norm.track_op();
    let mut dx_and_norm = with_f32(norm, name, |weight| {
        Ok(rms_norm_rows_backward(
            x_rows, weight, dnormed, eps, want_norm,
        ))
    })?;
    let dnorm = dx_and_norm.split_off(x_rows.len());
    deposit_gradient(
        norm,
        || Ok(dnorm.clone()),
        |dst| {
            dst.iter_mut().zip(&dnorm).for_each(|(s, d)| *s += d);
            Ok(())
        },
    )?;
    if !x.track_op() {
        return Ok(None);
    }
    for (dx, g) in dx_and_norm.iter_mut().zip(grad) {
        *dx = g + *dx;
    }
    Ok(Some(Tensor::from_vec(dx_and_norm, x.shape(), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::{gated_mlp_input, linear_add, rms_norm};
    use crate::model::weight_grads::{forward_for_backward, gradients_through_deposits};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// x (2, 5, 6), norm (6), gate and up (7, 6), down (6, 7); trained as variables or
    /// frozen.
    fn setup(trained: bool) -> (Var, Vec<Tensor>) {
        let x = Var::from_tensor(&random(&[2, 5, 6], 1)).unwrap();
        let shapes: [&[usize]; 4] = [&[6], &[7, 6], &[7, 6], &[6, 7]];
        let weights = shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let t = random(shape, 10 + i as u64);
                if trained {
                    Var::from_tensor(&t).unwrap().as_tensor().clone()
                } else {
                    t
                }
            })
            .collect();
        (x, weights)
    }

    fn block(x: &Tensor, w: &[Tensor]) -> Result<Option<Tensor>> {
        let weights = MlpBlockWeights {
            norm: &w[0],
            eps: 1e-5,
            gate: &w[1],
            up: &w[2],
            down: &w[3],
        };
        mlp_block(x, &weights)
    }

    /// The separate fused ops the block replaces.
    fn separate(x: &Tensor, w: &[Tensor]) -> Result<Tensor> {
        let normed = rms_norm(x, &w[0], 1e-5)?;
        linear_add(&gated_mlp_input(&normed, &w[1], &w[2])?, &w[3], x)
    }

    /// The output and the gradients of x and the weights, through weight_grads.
    fn run(fused: bool, trained: bool) -> (Tensor, Vec<Option<Tensor>>) {
        let (x, weights) = setup(trained);
        let y = if fused {
            forward_for_backward(|| block(x.as_tensor(), &weights))
                .unwrap()
                .expect("the block fuses")
        } else {
            separate(x.as_tensor(), &weights).unwrap()
        };
        let loss = (&y * random(y.dims(), 99)).unwrap().sum_all().unwrap();
        let tensors: Vec<&Tensor> = std::iter::once(x.as_tensor()).chain(&weights).collect();
        (y, gradients_through_deposits(&loss, &tensors).unwrap())
    }

    #[test]
    fn the_block_gives_the_separate_ops_bits_and_gradients() {
        for trained in [true, false] {
            let (y_fused, g_fused) = run(true, trained);
            let (y_separate, g_separate) = run(false, trained);
            assert_eq!(
                bits(&y_fused),
                bits(&y_separate),
                "output, trained {trained}"
            );
            for (i, (f, s)) in g_fused.iter().zip(&g_separate).enumerate() {
                match (f, s) {
                    (Some(f), Some(s)) => assert_eq!(bits(f), bits(s), "gradient {i}"),
                    (None, None) => assert!(!trained && i > 0, "gradient {i} missing"),
                    _ => panic!("gradient {i} on one path only (trained {trained})"),
                }
            }
        }
    }

    #[test]
    fn the_block_fuses_only_for_a_backward_that_collects_deposits() {
        let (x, weights) = setup(true);
        assert!(block(x.as_tensor(), &weights).unwrap().is_none());
        let y = forward_for_backward(|| block(x.as_tensor(), &weights))
            .unwrap()
            .expect("fused");
        let error = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(error.contains("weight_grads::backward"), "{error}");
        // A weight that is computed (trained but not a variable) is left to the
        // separate ops.
        let mut scaled = weights.clone();
        scaled[3] = (&weights[3] * 2.0).unwrap();
        let fused = forward_for_backward(|| block(x.as_tensor(), &scaled)).unwrap();
        assert!(fused.is_none());
    }
}
