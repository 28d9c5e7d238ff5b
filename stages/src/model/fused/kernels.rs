//! The loops behind `fused`: plain single-threaded passes over contiguous f32 rows,
//! shaped (zipped slices, lane-split sums, a branch-free `exp`) so LLVM vectorises them.

use candle_core::{CpuStorage, Layout, Tensor};

use crate::simd::multiversion;

type CandleResult<T> = candle_core::Result<T>;

/// The f32 data of a contiguous operand.
pub(super) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> CandleResult<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operand must be contiguous"),
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor (for an op's backward, which gets
/// tensors rather than storages).
pub(super) fn with_f32<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> CandleResult<R>,
) -> CandleResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor");
    };
    f(contiguous_f32(storage, layout, op)?)
}

/// Storage offsets of each row (all but the last dim) when the last dim has stride 1.
pub(super) fn row_starts(layout: &Layout) -> Option<Vec<usize>> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let rank = dims.len();
    if rank == 0 || (dims[rank - 1] > 1 && strides[rank - 1] != 1) {
        return None;
    }
    let rows: usize = dims[..rank - 1].iter().product();
    let mut starts = Vec::with_capacity(rows);
    let mut index = vec![0usize; rank - 1];
    for _ in 0..rows {
        let offset: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
        starts.push(layout.start_offset() + offset);
        for k in (0..rank - 1).rev() {
            index[k] += 1;
            if index[k] < dims[k] {
                break;
            }
            index[k] = 0;
        }
    }
    Some(starts)
}

/// `e^x` within ~2 ulp (Cephes' expf), branch-free so that loops calling it vectorise
/// (libm's `expf` is a call per element). Saturates at e^88 above; 0 below e^-87.3.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_54;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let clamped = x.clamp(LOWEST, 88.0);
    // ROUND + n, n = round(x log2 e): at this magnitude one ulp is 1, so n also sits in
    // the low bits, which gives 2^n below without a float-to-int conversion (Rust's
    // saturating `as i32` is a scalar compare-and-convert per lane: a quarter of the
    // SiLU backward's time before).
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * 0.693_359_4) - n * -2.121_944_4e-4; // x - n ln 2, in two parts
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let mantissa = p * r * r + r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()); // n, two's complement
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < LOWEST {
        0.0
    } else {
        mantissa * scale
    }
}

/// Σ a_i b_i with eight partial sums (vectorisable, unlike a serial f32 sum).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let a8 = a.chunks_exact(8);
    let tail: f32 = a8.remainder().iter().sum();
    for x in a8 {
        for lane in 0..8 {
            lanes[lane] += x[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(a: &[f32]) -> f32 {
    a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The root mean square of one row, in the composite's order of operations (sum of
/// squares, times 1/d, plus eps; callers divide by it), so the fused norm agrees with it
/// and with the KV-cache path to an ulp or so.
#[inline(always)]
fn row_rms(row: &[f32], inv_dim: f32, eps: f32) -> f32 {
    let sum_squares = row.iter().fold(0f32, |s, v| s + v * v);
    (sum_squares * inv_dim + eps).sqrt()
}

multiversion! {
pub(super) fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len().max(1);
    let inv_dim = (1.0 / dim as f64) as f32;
    // Filled row by row as computed: a zero-filled buffer would be written twice.
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let rms = row_rms(row, inv_dim, eps);
        out.extend(row.iter().zip(weight).map(|(v, w)| v / rms * w));
    }
    out.resize(x.len(), 0.0);
    out
}
}

multiversion! {
/// dx (rows, d) then, when `want_weight`, dweight (d) appended:
/// dx = g w / r - x (Σ g w x) / (d r^3), dweight = Σ_rows g x / r.
pub(super) fn rms_norm_rows_backward(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    eps: f32,
    want_weight: bool,
) -> Vec<f32> {
    let dim = weight.len().max(1);
    let inv_dim = (1.0 / dim as f64) as f32;
    let extra = if want_weight { dim } else { 0 };
    let mut out = vec![0f32; x.len() + extra];
    let (dx_all, dweight) = out.split_at_mut(x.len());
    let mut scaled = vec![0f32; dim]; // g w of one row
    let rows = dx_all
        .chunks_exact_mut(dim)
        .zip(x.chunks_exact(dim))
        .zip(grad.chunks_exact(dim));
    for ((dx, row), g) in rows {
        let inv_rms = 1.0 / row_rms(row, inv_dim, eps);
        for ((s, g), w) in scaled.iter_mut().zip(g).zip(weight) {
            *s = g * w;
        }
        let coefficient = dot(&scaled, row) * inv_rms * inv_rms * inv_rms * inv_dim;
        for ((dx, s), v) in dx.iter_mut().zip(&scaled).zip(row) {
            *dx = s * inv_rms - v * coefficient;
        }
        if want_weight {
            for ((dw, g), v) in dweight.iter_mut().zip(g).zip(row) {
                *dw += g * v * inv_rms;
            }
        }
    }
    out
}
}

multiversion! {
pub(super) fn silu_mul_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    silu_mul_into(gate, up, &mut out);
    out
}
}

#[inline(always)]
fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((y, g), u) in out.iter_mut().zip(gate).zip(up) {
        *y = g / (1.0 + exp_f32(-g)) * u;
    }
}

multiversion! {
/// dgate then dup, each n long: with s = σ(g), dgate = grad u s (1 + g (1 - s)),
/// dup = grad g s.
pub(super) fn silu_mul_backward(gate: &[f32], up: &[f32], grad: &[f32]) -> Vec<f32> {
    // [gate | up] as one row, turned into [dgate | dup] by the row kernel.
    let n = gate.len().min(up.len());
    let mut out = Vec::with_capacity(2 * n);
    out.extend_from_slice(&gate[..n]);
    out.extend_from_slice(&up[..n]);
    silu_mul_rows_backward_in_place(&mut out, grad, n);
    out
}
}

multiversion! {
/// silu(gate) * up for rows laid out [gate (inter) | up (inter)] → rows of `inter`.
pub(super) fn silu_mul_rows(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let inter = inter.max(1);
    let mut out = vec![0f32; gate_up.len() / 2];
    for (y, row) in out
        .chunks_exact_mut(inter)
        .zip(gate_up.chunks_exact(2 * inter))
    {
        let (gate, up) = row.split_at(inter);
        silu_mul_into(gate, up, y);
    }
    out
}
}

multiversion! {
/// The gradient of [`silu_mul_rows`], in place: rows [gate | up] become rows
/// [dgate | dup], given rows of `grad` (inter). The forward's buffer is the backward's
/// output, so the largest gradient of the MLP needs no buffer of its own.
pub(super) fn silu_mul_rows_backward_in_place(gate_up: &mut [f32], grad: &[f32], inter: usize) -> () {
    let inter = inter.max(1);
    for (row, d) in gate_up.chunks_exact_mut(2 * inter).zip(grad.chunks_exact(inter)) {
        let (gate, up) = row.split_at_mut(inter);
        let (gate, up) = (&mut gate[..inter], &mut up[..inter]);
        for i in 0..inter {
            let (g, u, d) = (gate[i], up[i], d[i]);
            let s = 1.0 / (1.0 + exp_f32(-g));
            up[i] = d * g * s;
            gate[i] = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}
}

/// softmax(x * scale + mask) per row of `keys`; row r uses mask row `r % time`.
pub(super) fn masked_softmax_rows(
    scores: &[f32],
    mask: &[f32],
    time: usize,
    keys: usize,
    scale: f32,
    out: &mut [f32],
) {
    out.copy_from_slice(scores);
    masked_softmax_in_place(out, mask, time, keys, scale);
}

multiversion! {
/// As [`masked_softmax_rows`], over the scores in `rows` themselves. A row whose every
/// entry is -inf becomes all zeros rather than NaN.
pub(super) fn masked_softmax_in_place(
    rows: &mut [f32],
    mask: &[f32],
    time: usize,
    keys: usize,
    scale: f32,
) -> () {
    let keys = keys.max(1);
    for (r, y) in rows.chunks_exact_mut(keys).enumerate() {
        let m = &mask[(r % time) * keys..][..keys];
        for (y, m) in y.iter_mut().zip(m) {
            *y = *y * scale + m;
        }
        let top = max(y);
        if top == f32::NEG_INFINITY {
            y.fill(0.0);
            continue;
        }
        for y in y.iter_mut() {
            *y = exp_f32(*y - top);
        }
        let total = sum(y);
        for y in y.iter_mut() {
            *y /= total;
        }
    }
}
}

multiversion! {
/// `scale * y * (g - Σ g y)` per row.
pub(super) fn softmax_rows_backward(
    probs: &[f32],
    grad: &[f32],
    keys: usize,
    scale: f32,
) -> Vec<f32> {
    let keys = keys.max(1);
    let mut out = vec![0f32; probs.len()];
    let rows = out
        .chunks_exact_mut(keys)
        .zip(probs.chunks_exact(keys))
        .zip(grad.chunks_exact(keys));
    for ((dx, y), g) in rows {
        let inner = dot(y, g);
        for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
            *dx = scale * y * (g - inner);
        }
    }
    out
}
}

#[derive(Clone, Copy, Debug)]
pub(super) struct RopeGeometry {
    pub batch: usize,
    pub heads: usize,
    pub time: usize,
    pub head_dim: usize,
    /// 1 (shared tables) or `batch`.
    pub table_batch: usize,
    /// x is (b, t, heads*d) rather than (b, heads, t, d); the output is head-major always.
    pub token_major: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RopeDirection {
    /// x → x cos + rotate_half(x) sin, into head-major rows.
    Forward,
    /// head-major grad → the gradient of x, in x's layout.
    Backward,
}

multiversion! {
pub(super) fn rope_rows(
    input: &[f32],
    cos: &[f32],
    sin: &[f32],
    g: &RopeGeometry,
    direction: RopeDirection,
) -> Vec<f32> {
    let d = g.head_dim;
    let mut out = vec![0f32; g.batch * g.heads * g.time * d];
    for b in 0..g.batch {
        let table_b = if g.table_batch == 1 { 0 } else { b };
        for h in 0..g.heads {
            for t in 0..g.time {
                let head_major = ((b * g.heads + h) * g.time + t) * d;
                let x_offset = if g.token_major {
                    ((b * g.time + t) * g.heads + h) * d
                } else {
                    head_major
                };
                let table = (table_b * g.time + t) * d;
                let (c, s) = (&cos[table..][..d], &sin[table..][..d]);
                match direction {
                    RopeDirection::Forward => {
                        rotate_row(&input[x_offset..][..d], c, s, &mut out[head_major..][..d])
                    }
                    RopeDirection::Backward => rotate_row_transposed(
                        &input[head_major..][..d],
                        c,
                        s,
                        &mut out[x_offset..][..d],
                    ),
                }
            }
        }
    }
    out
}
}

/// y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves of the row).
#[inline(always)]
fn rotate_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (c1, c2) = c.split_at(half);
    let (s1, s2) = s.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
}

/// The transpose of [`rotate_row`]: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1.
#[inline(always)]
fn rotate_row_transposed(g: &[f32], c: &[f32], s: &[f32], dx: &mut [f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (c1, c2) = c.split_at(half);
    let (s1, s2) = s.split_at(half);
    let (dx1, dx2) = dx.split_at_mut(half);
    for i in 0..half {
        dx1[i] = g1[i] * c1[i] + g2[i] * s2[i];
        dx2[i] = g2[i] * c2[i] - g1[i] * s1[i];
    }
}

/// Writes exp(x - max) into `e`; returns (max, Σ e).
#[inline(always)]
fn shifted_exp(x: &[f32], e: &mut [f32]) -> (f32, f32) {
    let top = max(x);
    for (e, x) in e.iter_mut().zip(x) {
        *e = exp_f32(x - top);
    }
    (top, sum(e))
}

pub(super) fn log_softmax_gather_rows(
    logits: &[f32],
    starts: &[usize],
    vocab: usize,
    targets: &[u32],
) -> CandleResult<Vec<f32>> {
    let mut scratch = vec![0f32; vocab];
    let mut out = Vec::with_capacity(starts.len());
    for (&start, &target) in starts.iter().zip(targets) {
        let x = &logits[start..][..vocab];
        let target = target as usize;
        if target >= vocab {
            candle_core::bail!(
                "token_logprobs: target {target} is outside the vocabulary of {vocab}"
            );
        }
        let (top, total) = shifted_exp(x, &mut scratch);
        out.push((x[target] - top) - total.ln());
    }
    Ok(out)
}

multiversion! {
/// d logits = g (onehot(target) - softmax(x)), rows contiguous.
pub(super) fn log_softmax_gather_rows_backward(
    logits: &[f32],
    starts: &[usize],
    vocab: usize,
    targets: &[u32],
    grad: &[f32],
) -> Vec<f32> {
    let mut out = vec![0f32; starts.len() * vocab];
    let rows = out
        .chunks_exact_mut(vocab.max(1))
        .zip(starts)
        .zip(targets)
        .zip(grad);
    for (((dx, &start), &target), &g) in rows {
        let (_, total) = shifted_exp(&logits[start..][..vocab], dx);
        let factor = -g / total;
        for dx in dx.iter_mut() {
            *dx *= factor;
        }
        if let Some(slot) = dx.get_mut(target as usize) {
            *slot += g;
        }
    }
    out
}
}

multiversion! {
/// Per row: log p = (x - max) - ln Σ e; H = -Σ p log p.
pub(super) fn entropy_rows(logits: &[f32], starts: &[usize], vocab: usize) -> Vec<f32> {
    let mut scratch = vec![0f32; vocab];
    starts
        .iter()
        .map(|&start| {
            let x = &logits[start..][..vocab];
            let (top, total) = shifted_exp(x, &mut scratch);
            let log_total = total.ln();
            let inv_total = 1.0 / total;
            let weighted: f32 = scratch
                .iter()
                .zip(x)
                .map(|(e, x)| e * inv_total * ((x - top) - log_total))
                .fold(0.0, |a, b| a + b);
            -weighted
        })
        .collect()
}
}

multiversion! {
/// dx = -g p (log p + H).
pub(super) fn entropy_rows_backward(
    logits: &[f32],
    starts: &[usize],
    vocab: usize,
    entropy: &[f32],
    grad: &[f32],
) -> Vec<f32> {
    let mut out = vec![0f32; starts.len() * vocab];
    let rows = out
        .chunks_exact_mut(vocab.max(1))
        .zip(starts)
        .zip(entropy)
        .zip(grad);
    for (((dx, &start), &h), &g) in rows {
        let x = &logits[start..][..vocab];
        let (top, total) = shifted_exp(x, dx);
        let log_total = total.ln();
        let inv_total = 1.0 / total;
        for (dx, x) in dx.iter_mut().zip(x) {
            let log_p = (x - top) - log_total;
            *dx = -g * (*dx * inv_total) * (log_p + h);
        }
    }
    out
}
}
