//! CPU kernels for a 4-bit weight `W [n, k]` (Hugging Face `[out, in]` layout): products with
//! `W` that dequantize one tile of it at a time into a cache-sized buffer and multiply it
//! there, so the full f32 weight never exists. Each tile writes its own columns of the result.

use rayon::prelude::*;

use crate::blockwise::Quantized4bit;
use crate::codebook::dynamic_map;
use crate::decode::decode_nibbles;

/// f32 values per dequantized tile for few input rows: 128 KiB, well inside a core's L2 (the
/// product is bound by reading the packed weight).
const TILE_VALUES: usize = 32 * 1024;
/// ... and for many input rows: 2 MiB, so each tile's GEMM is large enough to run at full
/// speed and the input is re-read fewer times.
const TILE_VALUES_BATCHED: usize = 512 * 1024;

/// Values `start .. start + out.len()` of `w` (flat row-major index), dequantized into `out`.
/// Identical to the matching slice of [`Quantized4bit::dequantize`].
pub fn dequantize_range(w: &Quantized4bit, start: usize, out: &mut [f32]) {
    decode_range(w, &dynamic_map(), start, out);
}

/// Columns `c0 .. c0 + c` of every row of `w [n, k]`, dequantized into `out [n, c]`.
pub fn dequantize_columns(w: &Quantized4bit, c0: usize, c: usize, out: &mut [f32]) {
    let (n, k) = dims(w);
    assert_eq!(
        out.len(),
        n * c,
        "a column window of {n} rows x {c} columns"
    );
    let dmap = dynamic_map();
    for (r, row) in out.chunks_exact_mut(c.max(1)).enumerate() {
        decode_range(w, &dmap, r * k + c0, row);
    }
}

/// [`dequantize_range`] with the scales' code book (`dmap`, [`dynamic_map`]) given.
fn decode_range(w: &Quantized4bit, dmap: &[f32; 256], start: usize, out: &mut [f32]) {
    let code = w.qtype.code();
    let bs = w.blocksize;
    let end = start + out.len();
    let mut idx = start;
    while idx < end {
        let b = idx / bs;
        let seg_end = ((b + 1) * bs).min(end);
        let scale = w.absmax.scale(b, dmap);
        let table = code.map(|c| c * scale);
        decode_nibbles(
            &w.packed,
            idx,
            &table,
            &mut out[idx - start..seg_end - start],
        );
        idx = seg_end;
    }
}

/// Rows of `W` per tile (about [`TILE_VALUES`] or [`TILE_VALUES_BATCHED`] values for `m`
/// input rows), with at least 4 tiles per thread when the matrix is big enough to share out.
fn rows_per_tile(m: usize, n: usize, k: usize) -> usize {
    let values = if m >= 32 {
        TILE_VALUES_BATCHED
    } else {
        TILE_VALUES
    };
    let by_cache = (values / k.max(1)).max(1);
    let by_threads = n.div_ceil(4 * rayon::current_num_threads()).max(1);
    by_cache.min(by_threads)
}

/// `dst[m, c] (+)= lhs[m, inner] · rhs[inner, c]` with explicit strides (row, column), on one
/// thread (the callers already run tiles in parallel): [`peft_core::matmul::product_into`],
/// which also counts the arithmetic.
///
/// # Safety
/// Every element the sizes and strides address must lie inside the buffers, and no other
/// thread may write the addressed elements of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    c: usize,
    inner: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
) {
    unsafe {
        peft_core::matmul::product_into(
            (m, c, inner),
            dst,
            dst_rs as usize,
            accumulate,
            (lhs, lhs_rs, lhs_cs),
            (rhs, rhs_rs, rhs_cs),
            1.0,
            false,
        );
    }
}

/// `x [m, k] · Wᵀ -> [m, n]` (a linear layer's forward pass).
pub fn matmul_4bit(x: &[f32], m: usize, w: &Quantized4bit) -> Vec<f32> {
    let (n, k) = dims(w);
    assert_eq!(x.len(), m * k, "input is not [{m}, {k}]");
    if k == 0 {
        return vec![0f32; m * n];
    }
    let rows = rows_per_tile(m, n, k);
    // Not zeroed: the tiles overwrite every element.
    let mut y = Vec::with_capacity(m * n);
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(rows)).into_par_iter().for_each_init(
        || vec![0f32; rows * k],
        |buf, t| {
            let r0 = t * rows;
            let r = rows.min(n - r0);
            let tile = &mut buf[..r * k];
            dequantize_range(w, r0 * k, tile);
            // y[:, r0..r0+r] = x [m, k] · tileᵀ [k, r]; tiles write disjoint columns of y.
            // SAFETY: columns r0..r0+r of the m x n output belong to this tile alone, and
            // `y` outlives the parallel loop.
            unsafe {
                gemm_f32(
                    m,
                    r,
                    k,
                    out.at(r0),
                    n as isize,
                    false,
                    x.as_ptr(),
                    k as isize,
                    1,
                    tile.as_ptr(),
                    1,
                    k as isize,
                )
            };
        },
    );
    // SAFETY: the tiles cover every column, and each wrote all m rows of its columns.
    unsafe { y.set_len(m * n) };
    y
}

/// The output pointer shared by the tasks of a product, each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// The element at offset `i` (a method, so closures capture the `Sync` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the output buffer.
        unsafe { self.0.add(i) }
    }
}
// SAFETY: the tasks write disjoint elements (see the products).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `g [m, n] · W -> [m, k]` (the gradient of a linear layer's input). Tiles of columns of `W`
/// (all `n` rows), so each tile owns its columns of the result: no partial sums to add up.
pub fn matmul_4bit_transposed(g: &[f32], m: usize, w: &Quantized4bit) -> Vec<f32> {
    let (n, k) = dims(w);
    assert_eq!(g.len(), m * n, "gradient is not [{m}, {n}]");
    if n == 0 {
        return vec![0f32; m * k];
    }
    let cols = cols_per_tile(m, n, k, w.blocksize);
    let mut dx = Vec::with_capacity(m * k);
    let out = OutPtr(dx.as_mut_ptr());
    (0..k.div_ceil(cols)).into_par_iter().for_each_init(
        || vec![0f32; n * cols],
        |buf, t| {
            let c0 = t * cols;
            let c = cols.min(k - c0);
            let tile = &mut buf[..n * c];
            dequantize_columns(w, c0, c, tile);
            // dx[:, c0..c0+c] = g [m, n] · tile [n, c]
            // SAFETY: columns c0..c0+c of the m x k result belong to this tile alone; `dx` has
            // room for m * k values and outlives the parallel loop.
            unsafe {
                gemm_f32(
                    m,
                    c,
                    n,
                    out.at(c0),
                    k as isize,
                    false,
                    g.as_ptr(),
                    n as isize,
                    1,
                    tile.as_ptr(),
                    c as isize,
                    1,
                )
            };
        },
    );
    // SAFETY: the tiles cover every column, and each wrote all m rows of its columns.
    unsafe { dx.set_len(m * k) };
    dx
}

/// Columns of `W` per tile for [`matmul_4bit_transposed`]: like [`rows_per_tile`] with the
/// roles of `n` and `k` swapped, and at least a block wide (a narrower row segment would
/// decode its block's scale for only a few values).
fn cols_per_tile(m: usize, n: usize, k: usize, blocksize: usize) -> usize {
    rows_per_tile(m, k, n).max(blocksize.min(k))
}

fn dims(w: &Quantized4bit) -> (usize, usize) {
    match w.shape[..] {
        [n, k] => (n, k),
        _ => panic!("a 4-bit linear weight must be 2-D, got shape {:?}", w.shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantType;
    use proptest::prelude::*;

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        if rows == 1 || cols == 1 {
            return a.to_vec();
        }
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(rows).enumerate().for_each(|(c, o)| {
            for (r, v) in o.iter_mut().enumerate() {
                *v = a[r * cols + c];
            }
        });
        out
    }

    fn dense_matmul(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The tiled products equal the products with the fully dequantized weight, for shapes
        /// whose rows straddle blocks and tiles, and for both scale encodings.
        #[test]
        fn tiled_products_match_dense(m in 1usize..9, n in 1usize..70, k in 1usize..150, dq in any::<bool>(), fp4 in any::<bool>(), seed in 0u32..1000) {
            let qtype = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
            let wv: Vec<f32> = (0..n * k).map(|i| ((i as f32 + seed as f32) * 0.731).sin()).collect();
            let w = Quantized4bit::quantize(&wv, &[n, k], qtype, 32, dq).unwrap();
            let dense = w.dequantize();
            let mut part = vec![0f32; 37.min(n * k)];
            dequantize_range(&w, n * k - part.len(), &mut part);
            prop_assert_eq!(&part[..], &dense[n * k - part.len()..]);

            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 + 3) as f32 * 0.113).cos()).collect();
            prop_assert!(close(&matmul_4bit(&x, m, &w), &dense_matmul(&x, m, &dense, n, k)));

            let g: Vec<f32> = (0..m * n).map(|i| ((i * 5 + 1) as f32 * 0.217).sin()).collect();
            let wt: Vec<f32> = transpose(&dense, n, k);
            prop_assert!(close(&matmul_4bit_transposed(&g, m, &w), &dense_matmul(&g, m, &wt, k, n)));
        }
    }
}
