//! The patched gemm's packing of a left operand whose depth is contiguous and whose rows are
//! strided (vendor/gemm-common/src/transpose_pack.rs: 8x8 transposes), through whole `gemm`
//! calls against a plain triple loop: panel counts with and without a partial last panel,
//! depths below, at and beyond a multiple of 8 and beyond one depth block, on one thread and
//! on the pool.

/// A value in [-1, 1) from an index, different for every (index, salt).
fn value(index: usize, salt: usize) -> f32 {
    let x = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt as u64) << 32;
    let x = x ^ (x >> 29);
    ((x.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// `dst = lhs·rhs` with `lhs` `m × k` stored row by row (rows `k + 3` apart, so the depth is
/// contiguous and the rows are not), `rhs` `k × n` row by row and `dst` column by column
/// (so that gemm keeps `lhs` on the left), checked value by value.
fn check(m: usize, n: usize, k: usize, parallel: bool) {
    let lhs_rs = k + 3;
    let lhs: Vec<f32> = (0..m * lhs_rs).map(|i| value(i, 1)).collect();
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
            1,
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
                .map(|d| lhs[i * lhs_rs + d] as f64 * rhs[d * n + j] as f64)
                .sum();
            let got = dst[j * m + i] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                "m {m} n {n} k {k} parallel {parallel}: dst[{i}, {j}] = {got}, want {want}"
            );
        }
    }
}

#[test]
fn left_operands_read_down_their_columns_pack_exactly() {
    for m in [3usize, 8, 16, 24, 63, 64, 65, 130, 200] {
        for k in [3usize, 7, 8, 9, 31, 64, 301, 700] {
            for n in [3usize, 37] {
                check(m, n, k, false);
            }
        }
    }
}

#[test]
fn left_operands_read_down_their_columns_pack_exactly_on_the_pool() {
    for (m, n, k) in [(512usize, 512usize, 512usize), (520, 300, 777), (1376, 64, 512)] {
        check(m, n, k, true);
    }
}
