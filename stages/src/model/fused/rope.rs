//! Rotary position embeddings as one fused pass with a hand-written backward, optionally
//! splitting a projection's output into heads on the way (no transposed copy).

use super::kernels::{contiguous_f32, rope_rows, RopeDirection, RopeGeometry};
use super::{fusable, CandleResult};
use crate::model::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

/// `x * cos + rotate_half(x) * sin`: x (b, h, t, d), cos/sin (b or 1, 1, t, d).
/// Gradient to x only (the tables are constants).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let heads = x.dim(1)?;
    let geometry = rope_geometry(x, cos, sin, false, heads)?;
    match geometry {
        Some(geometry) => Ok(x.apply_op3(cos, sin, RopeOp { geometry })?),
        None => rope_reference(x, cos, sin),
    }
}

/// Splits x (b, t, heads*d) into heads and rotates them in one pass: → (b, heads, t, d),
/// equal to `rope(x.reshape((b, t, heads, d)).transpose(1, 2), cos, sin)`.
pub fn rope_split_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    match rope_geometry(x, cos, sin, true, heads)? {
        Some(geometry) => Ok(x.apply_op3(cos, sin, RopeOp { geometry })?),
        None => {
            let (batch, time, width) = x.dims3()?;
            let split = x
                .reshape((batch, time, heads, width / heads.max(1)))?
                .transpose(1, 2)?
                .contiguous()?; // (b, h, t, d)
            rope_reference(&split, cos, sin)
        }
    }
}

/// The kernel's view of x, or None when it must take the composite path.
pub(super) fn rope_geometry(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    token_major: bool,
    heads: usize,
) -> Result<Option<RopeGeometry>> {
    if !fusable(&[x, cos, sin]) || !x.is_contiguous() || !cos.is_contiguous() {
        return Ok(None);
    }
    if !sin.is_contiguous() || cos.dims() != sin.dims() || cos.rank() != 4 {
        return Ok(None);
    }
    let (table_batch, _, table_time, head_dim) = cos.dims4()?;
    let (batch, time, width) = if token_major {
        x.dims3()?
    } else {
        let (b, h, t, d) = x.dims4()?;
        (b, t, h * d)
    };
    let fits = heads > 0
        && head_dim % 2 == 0
        && width == heads * head_dim
        && table_time == time
        && (table_batch == 1 || table_batch == batch);
    Ok(fits.then_some(RopeGeometry {
        batch,
        heads,
        time,
        head_dim,
        table_batch,
        token_major,
    }))
}

/// The composite rotary embedding, x (b, h, t, d).
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = head_dim / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?; // (b, h, t, d)
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

pub(super) struct RopeOp {
    pub(super) geometry: RopeGeometry,
}

impl RopeOp {
    fn run(
        &self,
        direction: RopeDirection,
        input: (&CpuStorage, &Layout),
        cos: (&CpuStorage, &Layout),
        sin: (&CpuStorage, &Layout),
    ) -> CandleResult<(CpuStorage, Shape)> {
        let name = "fused-rope";
        let input = contiguous_f32(input.0, input.1, name)?;
        let cos = contiguous_f32(cos.0, cos.1, name)?;
        let sin = contiguous_f32(sin.0, sin.1, name)?;
        let g = &self.geometry;
        let out = rope_rows(input, cos, sin, g, direction);
        let shape = match (direction, g.token_major) {
            (RopeDirection::Backward, true) => Shape::from((g.batch, g.time, g.heads * g.head_dim)),
            _ => Shape::from((g.batch, g.heads, g.time, g.head_dim)),
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        self.run(RopeDirection::Forward, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> CandleResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = RopeBackwardOp {
            forward: RopeOp {
                geometry: self.geometry,
            },
        };
        Ok((Some(grad.apply_op3_no_bwd(cos, sin, &op)?), None, None))
    }
}

struct RopeBackwardOp {
    forward: RopeOp,
}

impl CustomOp3 for RopeBackwardOp {
    fn name(&self) -> &'static str {
        "fused-rope-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CandleResult<(CpuStorage, Shape)> {
        self.forward
            .run(RopeDirection::Backward, (s1, l1), (s2, l2), (s3, l3))
    }
}
