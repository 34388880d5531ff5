//! The patched gemm's x86 microkernels (vendor/gemm-f32/src/kernel.rs) against a plain
//! triple loop: every tile shape of the AVX2 + FMA and the AVX-512 kernel tables, with full
//! and partial tiles, the three layouts of the right operand (contiguous depth as an
//! activation, contiguous columns as a packed panel, neither), both destination layouts and
//! the three ways of writing back (`alpha_status` 0, 1, 2).

#![cfg(target_arch = "x86_64")]

type Kernel = gemm_common::microkernel::MicroKernelFn<f32>;

mod common;
use common::value;

/// Checks one kernel of tile `mr × nr` (`lanes` floats per vector) on every case.
fn check_kernel(name: &str, kernel: Kernel, mr: usize, nr: usize) {
    for k in [0usize, 1, 3, 4, 5, 8, 13, 33] {
        for (m, n) in [(mr, nr), (mr - 1, nr), (mr, nr - 1), (1, 1)] {
            if m == 0 || n == 0 {
                continue;
            }
            // Right operand (k × nr): (row stride, column stride).
            let rhs_layouts: [(isize, isize); 3] = [
                (1, k as isize + 3),     // contiguous depth (an activation row per column)
                (nr as isize + 1, 1),    // contiguous columns (a packed panel)
                (2, 2 * k as isize + 5), // neither
            ];
            for (rhs_rs, rhs_cs) in rhs_layouts {
                // Destination (m × n): column-major tile or row-major.
                for (dst_rs, dst_cs) in [(1isize, mr as isize + 2), (n as isize + 1, 1)] {
                    for alpha_status in [0u8, 1, 2] {
                        check_case(
                            name,
                            kernel,
                            (mr, nr),
                            k,
                            m,
                            n,
                            rhs_rs,
                            rhs_cs,
                            dst_rs,
                            dst_cs,
                            alpha_status,
                        );
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_case(
    name: &str,
    kernel: Kernel,
    (mr, nr): (usize, usize),
    k: usize,
    m: usize,
    n: usize,
    rhs_rs: isize,
    rhs_cs: isize,
    dst_rs: isize,
    dst_cs: isize,
    alpha_status: u8,
) {
    let lhs_cs = mr + 4; // packed lhs: depth step of a panel, with a gap
    let lhs: Vec<f32> = (0..lhs_cs * k.max(1)).map(|i| value(i, 1)).collect();
    // A kernel reads all `nr` columns (and `mr` rows of the packed lhs) whatever of the tile
    // it writes back.
    let rhs_len = (k.max(1) - 1) * rhs_rs as usize + (nr - 1) * rhs_cs as usize + 1;
    let rhs: Vec<f32> = (0..rhs_len).map(|i| value(i, 2)).collect();
    let dst_len = (m - 1) * dst_rs as usize + (n - 1) * dst_cs as usize + 1;
    let before: Vec<f32> = (0..dst_len).map(|i| value(i, 3)).collect();
    let (alpha, beta) = (0.75f32, -1.5f32);

    let mut dst = before.clone();
    unsafe {
        kernel(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            lhs.as_ptr(),
            rhs.as_ptr(),
            dst_cs,
            dst_rs,
            lhs_cs as isize,
            rhs_rs,
            rhs_cs,
            alpha,
            beta,
            alpha_status,
            false,
            false,
            false,
            lhs.as_ptr(),
        )
    };

    let mut expected: Vec<f64> = before.iter().map(|&v| v as f64).collect();
    for i in 0..m {
        for j in 0..n {
            let acc: f64 = (0..k)
                .map(|p| {
                    lhs[p * lhs_cs + i] as f64
                        * rhs[p * rhs_rs as usize + j * rhs_cs as usize] as f64
                })
                .sum();
            let at = i * dst_rs as usize + j * dst_cs as usize;
            let old = before[at] as f64;
            expected[at] = match alpha_status {
                2 => alpha as f64 * old + beta as f64 * acc,
                1 => old + beta as f64 * acc,
                _ => beta as f64 * acc,
            };
        }
    }
    for (at, (&got, &want)) in dst.iter().zip(&expected).enumerate() {
        assert!(
            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs() * k as f64),
            "{name}: k {k}, tile {m}x{n}, rhs strides ({rhs_rs}, {rhs_cs}), dst strides \
             ({dst_rs}, {dst_cs}), alpha_status {alpha_status}: value {at} is {got}, want {want}"
        );
    }
}

/// Checks every kernel of a table: row `i` holds tiles of `(i + 1)·lanes` rows, column `j`
/// tiles of `j + 1` columns.
fn check_table<const COLS: usize>(isa: &str, table: &[[Kernel; COLS]], lanes: usize) {
    assert!(COLS > 0 && !table.is_empty(), "{isa}: no kernels");
    for (mi, row) in table.iter().enumerate() {
        for (ni, &kernel) in row.iter().enumerate() {
            let name = format!("{isa} x{}x{}", mi + 1, ni + 1);
            check_kernel(&name, kernel, (mi + 1) * lanes, ni + 1);
        }
    }
}

#[test]
fn avx2_fma_kernels_match_a_triple_loop() {
    if std::arch::is_x86_feature_detected!("fma") {
        check_table("fma", &gemm_f32::microkernel::fma::f32::UKR, 8);
    }
}

#[test]
fn avx512_kernels_match_a_triple_loop() {
    if std::arch::is_x86_feature_detected!("avx512f") {
        check_table("avx512", &gemm_f32::microkernel::avx512f::f32::UKR, 16);
    }
}
