// Patched for peft (see ../PATCHED.md): the x86 microkernels, written so that the inner loop
// has no integer work between its loads and multiply-adds.
//
// gemm_common's `microkernel!` reads right-operand column `j` at `rhs + j·rhs_cs`. When the
// right operand is not packed (`rhs_cs` is a row length), LLVM computes those six addresses
// as a chain of adds: six integer adds per step of depth beside twelve multiply-adds, on the
// ports the multiply-adds use (the AVX2 `x2x6` kernel ran a 512³ product at 0.91 of
// PyTorch's speed). Here columns 0-2 are addressed from one pointer and 3-5 from a second,
// both as `pointer + {0, 1, 2}·rhs_cs` (x86's scaled index), and when the depth is
// contiguous (`rhs_rs == 1`, the common case: a row-major activation) four steps of depth
// share one pointer update through constant displacements. Arguments, results and the
// write-back are those of gemm_common's kernels (same signature, same `alpha_status`
// meaning), checked against a plain triple loop by peft-core's tests.

macro_rules! strided_microkernel {
    ([$target: tt], $name: ident, $mr_div_n: tt, $nr: tt) => {
        #[target_feature(enable = $target)]
        // alpha_status: 0 writes `beta·acc`, 1 adds `beta·acc` to dst, 2 writes
        // `alpha·dst + beta·acc`.
        pub unsafe fn $name(
            m: usize,
            n: usize,
            k: usize,
            dst: *mut T,
            packed_lhs: *const T,
            packed_rhs: *const T,
            dst_cs: isize,
            dst_rs: isize,
            lhs_cs: isize,
            rhs_rs: isize,
            rhs_cs: isize,
            alpha: T,
            beta: T,
            alpha_status: u8,
            _conj_dst: bool,
            _conj_lhs: bool,
            _conj_rhs: bool,
            _next_lhs: *const T,
        ) {
            let mut acc = [[splat(0.0); $mr_div_n]; $nr];

            // One step of depth: the lhs panel at `lhs`, the right operand's value of column
            // `j` at `r0 + j·rhs_cs` (j < 3) or `r3 + (j-3)·rhs_cs`.
            macro_rules! step {
                ($lhs: expr, $r0: expr, $r3: expr) => {{
                    let lhs: *const T = $lhs;
                    let r0: *const T = $r0;
                    let r3: *const T = $r3;
                    let a: [Pack; $mr_div_n] = seq_macro::seq!(M in 0..$mr_div_n {
                        [#((lhs.add(M * N) as *const Pack).read_unaligned(),)*]
                    });
                    seq_macro::seq!(J in 0..$nr {{
                        let col = if J < 3 {
                            r0.wrapping_offset((J % 3) as isize * rhs_cs)
                        } else {
                            r3.wrapping_offset((J % 3) as isize * rhs_cs)
                        };
                        let b = splat(*col);
                        seq_macro::seq!(M in 0..$mr_div_n {
                            acc[J][M] = mul_add(a[M], b, acc[J][M]);
                        });
                    }});
                }};
            }

            let mut lhs = packed_lhs;
            let mut r0 = packed_rhs;
            let mut r3 = packed_rhs.wrapping_offset(3 * rhs_cs);
            if rhs_rs == 1 {
                for _ in 0..k / 4 {
                    seq_macro::seq!(U in 0..4 {
                        step!(
                            lhs.wrapping_offset(U * lhs_cs),
                            r0.wrapping_add(U),
                            r3.wrapping_add(U)
                        );
                    });
                    lhs = lhs.wrapping_offset(4 * lhs_cs);
                    r0 = r0.wrapping_add(4);
                    r3 = r3.wrapping_add(4);
                }
                for _ in 0..k % 4 {
                    step!(lhs, r0, r3);
                    lhs = lhs.wrapping_offset(lhs_cs);
                    r0 = r0.wrapping_add(1);
                    r3 = r3.wrapping_add(1);
                }
            } else {
                for _ in 0..k {
                    step!(lhs, r0, r3);
                    lhs = lhs.wrapping_offset(lhs_cs);
                    r0 = r0.wrapping_offset(rhs_rs);
                    r3 = r3.wrapping_offset(rhs_rs);
                }
            }

            if m == $mr_div_n * N && n == $nr && dst_rs == 1 {
                let alpha = splat(alpha);
                let beta = splat(beta);
                seq_macro::seq!(J in 0..$nr {
                    seq_macro::seq!(M in 0..$mr_div_n {{
                        let dst = dst.offset(M * N as isize + J * dst_cs) as *mut Pack;
                        let value = match alpha_status {
                            2 => add(mul(alpha, dst.read_unaligned()), mul(beta, acc[J][M])),
                            1 => mul_add(beta, acc[J][M], dst.read_unaligned()),
                            _ => mul(beta, acc[J][M]),
                        };
                        dst.write_unaligned(value);
                    }});
                });
            } else {
                let src = acc.as_ptr() as *const T;
                for j in 0..n {
                    let dst_j = dst.offset(dst_cs * j as isize);
                    let src_j = src.add(j * $mr_div_n * N);
                    for i in 0..m {
                        let dst_ij = dst_j.offset(dst_rs * i as isize);
                        let src_ij = *src_j.add(i);
                        *dst_ij = match alpha_status {
                            2 => scalar_add(scalar_mul(alpha, *dst_ij), scalar_mul(beta, src_ij)),
                            1 => scalar_mul_add(beta, src_ij, *dst_ij),
                            _ => scalar_mul(beta, src_ij),
                        };
                    }
                }
            }
        }
    };
}
