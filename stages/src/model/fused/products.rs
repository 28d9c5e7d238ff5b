//! f32 products straight on the `gemm` crate, for the fused ops.
//!
//! Why not candle's matmul: it zero-fills every output before gemm overwrites it (3 % of
//! a pretraining step), and it cannot write into part of a buffer or add onto one. Here
//! a product lands in fresh, unfilled memory, in a strided column block of a wider
//! buffer (the gated MLP's [gate | up] rows, without stacking the weights), or on top of
//! what a buffer holds (a LoRA delta, a second projection's share of a gradient).
//! Threads follow candle's rule, so data-parallel shards stay single-threaded.

use candle_core::Result;
use gemm::Parallelism;

/// A read-only strided view of an f32 matrix: element (i, j) is
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct MatrixView<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatrixView<'a> {
    /// `data` as a row-major (rows, cols) matrix.
    pub(super) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatrixView {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub(super) fn t(self) -> Self {
        MatrixView {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Columns `start..start + count`.
    pub(super) fn columns(self, start: usize, count: usize) -> Self {
        let offset = (start * self.col_stride).min(self.data.len());
        MatrixView {
            data: &self.data[offset..],
            cols: count,
            ..self
        }
    }

    /// Rows `start..start + count`.
    pub(super) fn rows(self, start: usize, count: usize) -> Self {
        let offset = (start * self.row_stride).min(self.data.len());
        MatrixView {
            data: &self.data[offset..],
            rows: count,
            ..self
        }
    }

    /// True when every element lies inside `data` (what makes the raw gemm call sound).
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => Parallelism::Rayon(threads),
        _ => Parallelism::None,
    }
}

/// The (m, n) product `lhs · rhs` in a new row-major buffer.
pub(super) fn matmul(lhs: MatrixView, rhs: MatrixView) -> Result<Vec<f32>> {
    let len = lhs.rows * rhs.cols;
    if lhs.cols == 0 || len == 0 {
        return Ok(vec![0.0; len]);
    }
    let mut out = Vec::with_capacity(len);
    // SAFETY: gemm with `read_dst` false writes every one of the m·n destination
    // elements (k > 0 here) before anything reads them, within the capacity reserved.
    unsafe {
        product(out.as_mut_ptr(), len, rhs.cols, lhs, rhs, false, "matmul")?;
        out.set_len(len);
    }
    Ok(out)
}

/// The products `lhs · rhs[i]` side by side in one new row-major buffer: row r holds
/// row r of each product in turn.
pub(super) fn matmul_side_by_side(lhs: MatrixView, rhs: &[MatrixView]) -> Result<Vec<f32>> {
    let width: usize = rhs.iter().map(|r| r.cols).sum();
    let len = lhs.rows * width;
    if lhs.cols == 0 || len == 0 {
        return Ok(vec![0.0; len]);
    }
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let mut column = 0;
    for &r in rhs {
        // SAFETY: each product writes its (m, cols) block, inside the reserved capacity;
        // the blocks tile the m × width buffer, so all of it is written (k > 0) before
        // the length is set.
        unsafe {
            product(
                out.as_mut_ptr().add(column),
                len - column,
                width,
                lhs,
                r,
                false,
                "matmul_side_by_side",
            )?;
        }
        column += r.cols;
    }
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Writes `lhs · rhs` into the (m, n) block of `dst` whose rows start `dst_row_stride`
/// apart, adding it to what is there when `accumulate`.
pub(super) fn matmul_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatrixView,
    rhs: MatrixView,
    accumulate: bool,
) -> Result<()> {
    let (m, n) = (lhs.rows, rhs.cols);
    if m > 0 && n > 0 && (m - 1) * dst_row_stride + n > dst.len() {
        candle_core::bail!(
            "fused gemm: a ({m}, {n}) block with row stride {dst_row_stride} does not fit a \
             buffer of {}",
            dst.len()
        );
    }
    if lhs.cols == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_row_stride..row * dst_row_stride + n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the block was checked to lie inside `dst`, and `dst` is initialised.
    unsafe {
        product(
            dst.as_mut_ptr(),
            dst.len(),
            dst_row_stride,
            lhs,
            rhs,
            accumulate,
            "matmul_into",
        )
    }
}

/// # Safety
/// `dst` must be valid for writes of an (m, n) block with rows `dst_row_stride` apart
/// (inside `dst_len` elements), and initialised when `accumulate`.
unsafe fn product(
    dst: *mut f32,
    dst_len: usize,
    dst_row_stride: usize,
    lhs: MatrixView,
    rhs: MatrixView,
    accumulate: bool,
    what: &str,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        candle_core::bail!("fused gemm ({what}): ({m}, {k}) · ({}, {n})", rhs.rows);
    }
    if !lhs.in_bounds() || !rhs.in_bounds() {
        candle_core::bail!("fused gemm ({what}): an operand view runs past its data");
    }
    if m > 0 && n > 0 && (m - 1) * dst_row_stride + n > dst_len {
        candle_core::bail!("fused gemm ({what}): the destination is too small");
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop.
    fn naive(lhs: MatrixView, rhs: MatrixView) -> Vec<f32> {
        let mut out = vec![0.0f32; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                let mut sum = 0.0f64;
                for p in 0..lhs.cols {
                    sum += lhs.data[i * lhs.row_stride + p * lhs.col_stride] as f64
                        * rhs.data[p * rhs.row_stride + j * rhs.col_stride] as f64;
                }
                out[i * rhs.cols + j] = sum as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-4, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn products_of_transposed_and_sliced_views_match_the_triple_loop() {
        let (a, b) = (data(7 * 5, 1), data(9 * 5, 2));
        let lhs = MatrixView::row_major(&a, 7, 5);
        let weight = MatrixView::row_major(&b, 9, 5); // (out, in)
        assert_close(&matmul(lhs, weight.t()).unwrap(), &naive(lhs, weight.t()));
        // lhs^T · weight-like: the weight-gradient shape.
        let grad = data(7 * 9, 3);
        let grad = MatrixView::row_major(&grad, 7, 9);
        assert_close(&matmul(grad.t(), lhs).unwrap(), &naive(grad.t(), lhs));
        // A column block of a wider matrix, and a row block.
        assert_close(
            &matmul(grad.columns(4, 5), weight.rows(2, 5)).unwrap(),
            &naive(grad.columns(4, 5), weight.rows(2, 5)),
        );
    }

    #[test]
    fn side_by_side_products_fill_their_column_blocks() {
        let (a, b, c) = (data(5 * 4, 7), data(3 * 4, 8), data(6 * 4, 9));
        let lhs = MatrixView::row_major(&a, 5, 4);
        let (first, second) = (
            MatrixView::row_major(&b, 3, 4),
            MatrixView::row_major(&c, 6, 4),
        );
        let both = matmul_side_by_side(lhs, &[first.t(), second.t()]).unwrap();
        let (want_first, want_second) = (naive(lhs, first.t()), naive(lhs, second.t()));
        for row in 0..5 {
            assert_close(
                &both[row * 9..row * 9 + 3],
                &want_first[row * 3..row * 3 + 3],
            );
            assert_close(
                &both[row * 9 + 3..row * 9 + 9],
                &want_second[row * 6..row * 6 + 6],
            );
        }
    }

    #[test]
    fn writes_into_column_blocks_and_accumulates() {
        let (a, b) = (data(6 * 4, 4), data(3 * 4, 5));
        let (lhs, rhs) = (
            MatrixView::row_major(&a, 6, 4),
            MatrixView::row_major(&b, 3, 4),
        );
        let want = naive(lhs, rhs.t()); // (6, 3)
        let mut wide = vec![7.0f32; 6 * 8];
        matmul_into(&mut wide[2..], 8, lhs, rhs.t(), false).unwrap();
        for row in 0..6 {
            assert_eq!(
                &wide[row * 8..row * 8 + 2],
                &[7.0, 7.0],
                "left of the block"
            );
            assert_close(&wide[row * 8 + 2..row * 8 + 5], &want[row * 3..row * 3 + 3]);
            assert_eq!(
                &wide[row * 8 + 5..row * 8 + 8],
                &[7.0; 3],
                "right of the block"
            );
        }
        let mut sum = vec![1.0f32; 6 * 3];
        matmul_into(&mut sum, 3, lhs, rhs.t(), true).unwrap();
        let shifted: Vec<f32> = want.iter().map(|w| w + 1.0).collect();
        assert_close(&sum, &shifted);
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_and_mismatches_are_errors() {
        let empty: Vec<f32> = Vec::new();
        let lhs = MatrixView::row_major(&empty, 3, 0);
        let rhs = MatrixView::row_major(&empty, 0, 2);
        assert_eq!(matmul(lhs, rhs).unwrap(), vec![0.0; 6]);
        let no_rows = MatrixView::row_major(&empty, 0, 3);
        let some = data(3 * 2, 10);
        let some = MatrixView::row_major(&some, 3, 2);
        assert!(matmul(no_rows, some).unwrap().is_empty());
        assert!(matmul_side_by_side(no_rows, &[some, some])
            .unwrap()
            .is_empty());
        let a = data(6, 6);
        let lhs = MatrixView::row_major(&a, 2, 3);
        assert!(matmul(lhs, lhs).is_err(), "(2, 3) · (2, 3)");
        let mut small = vec![0.0f32; 3];
        assert!(matmul_into(&mut small, 2, lhs, lhs.t(), false).is_err());
        let short = MatrixView {
            data: &a[..5],
            ..lhs
        };
        assert!(matmul(short, lhs.t()).is_err(), "a view past its data");
    }
}
