//! The patched gemm's packing of the left operand (vendor/gemm-common/PATCHED.md), through
//! whole `gemm` calls against a plain triple loop: an operand whose depth is contiguous and
//! whose rows are strided (8x8 transposes), and one whose rows are contiguous (packed a step
//! of depth at a time); panel counts with and without a partial last panel, depths below, at
//! and beyond a multiple of 8 and beyond one depth block, on one thread and on the pool.

mod common;
use common::value;

/// `dst = lhs·rhs` with `lhs` `m × k` stored row by row (rows `k + 3` apart, so the depth is
/// contiguous and the rows are not) or, when `rows_contiguous`, column by column (columns
/// `m + 3` apart), `rhs` `k × n` row by row and `dst` column by column (so that gemm keeps
/// `lhs` on the left), checked value by value.
fn check(m: usize, n: usize, k: usize, parallel: bool, rows_contiguous: bool) {
    let (lhs_rs, lhs_cs) = if rows_contiguous {
        (1, m + 3)
    } else {
        (k + 3, 1)
    };
    let lhs: Vec<f32> = (0..(m + 3) * (k + 3)).map(|i| value(i, 1)).collect();
    let rhs: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
    let mut dst = vec![f32::NAN; m * n];
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every operand's strides stay inside its vector; `dst` is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            m as isize,
            1,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|d| lhs[i * lhs_rs + d * lhs_cs] as f64 * rhs[d * n + j] as f64)
                .sum();
            let got = dst[j * m + i] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                "m {m} n {n} k {k} parallel {parallel} rows contiguous {rows_contiguous}: dst[{i}, {j}] = {got}, want {want}"
            );
        }
    }
}

/// Panel counts (both kernel tables: panels of 16 and 64 rows), depths, and widths on both
/// sides of gemm's threshold for packing the left operand at all (8 tiles of 6 columns).
const SHAPES: ([usize; 9], [usize; 8], [usize; 3]) = (
    [3, 8, 16, 24, 63, 64, 65, 130, 200],
    [3, 7, 8, 9, 31, 64, 301, 700],
    [3, 37, 61],
);

/// Runs [`check`] on one thread for every shape of [`SHAPES`].
fn check_every_shape(rows_contiguous: bool) {
    for m in SHAPES.0 {
        for k in SHAPES.1 {
            for n in SHAPES.2 {
                check(m, n, k, false, rows_contiguous);
            }
        }
    }
}

#[test]
fn left_operands_read_down_their_columns_pack_exactly() {
    check_every_shape(false);
}

#[test]
fn left_operands_with_contiguous_rows_pack_exactly() {
    check_every_shape(true);
}

#[test]
fn left_operands_pack_exactly_on_the_pool() {
    for (m, n, k) in [
        (512usize, 512usize, 512usize),
        (520, 300, 777),
        (1376, 64, 512),
    ] {
        check(m, n, k, true, false);
        check(m, n, k, true, true);
    }
}
