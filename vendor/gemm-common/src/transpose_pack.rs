//! peft patch (PATCHED.md): packing a left operand whose rows are strided and whose depth is
//! contiguous, by 8x8 transposes of 32-bit values with AVX.
//!
//! `pack_lhs` lays each panel of `mr` rows out as `k` groups of `mr` values (one group per
//! step of depth). Where the rows are strided and the depth contiguous, upstream gathers those
//! values one at a time; here eight rows x eight steps of depth are loaded as eight vectors,
//! transposed in registers and stored as eight groups. Only moves: the values' bits are not
//! interpreted, so any 32-bit type packs alike.

use core::arch::x86_64::*;

/// Whether [`pack_panels`] packs this operand: 32-bit values, contiguous depth, strided rows,
/// panels a multiple of 8 rows, at least 8 steps of depth, and a processor with AVX.
#[inline]
pub(crate) fn applies<T>(mr: usize, k: usize, src_cs: isize, src_rs: isize) -> bool {
    core::mem::size_of::<T>() == 4
        && src_cs == 1
        && src_rs != 1
        && mr % 8 == 0
        && k >= 8
        && std::arch::is_x86_feature_detected!("avx")
}

/// Packs `panels` full panels of `mr` rows (`k` steps of depth each): row `j`, depth `d` of
/// panel `p` is read at `src + (p·mr + j)·src_rs + d` and written at
/// `dst + p·dst_stride + d·mr + j`.
///
/// # Safety
/// AVX must be available (see [`applies`]); every address above must be valid.
#[target_feature(enable = "avx")]
pub(crate) unsafe fn pack_panels(
    panels: usize,
    mr: usize,
    k: usize,
    dst: *mut f32,
    src: *const f32,
    src_rs: isize,
    dst_stride: usize,
) {
    let k8 = k / 8 * 8;
    for p in 0..panels {
        let src = src.wrapping_offset((p * mr) as isize * src_rs);
        let dst = dst.add(p * dst_stride);
        // Eight rows at a time down the whole depth: eight sequential streams for the
        // prefetcher, not `mr`.
        let mut j = 0;
        while j < mr {
            let mut d = 0;
            while d < k8 {
                let s = src.wrapping_offset(j as isize * src_rs).add(d);
                let rows = [
                    _mm256_loadu_ps(s),
                    _mm256_loadu_ps(s.wrapping_offset(src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(2 * src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(3 * src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(4 * src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(5 * src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(6 * src_rs)),
                    _mm256_loadu_ps(s.wrapping_offset(7 * src_rs)),
                ];
                let cols = transpose8(rows);
                let out = dst.add(d * mr + j);
                for (i, c) in cols.iter().enumerate() {
                    _mm256_storeu_ps(out.add(i * mr), *c);
                }
                d += 8;
            }
            j += 8;
        }
        for d in k8..k {
            for j in 0..mr {
                *dst.add(d * mr + j) = *src.wrapping_offset(j as isize * src_rs).add(d);
            }
        }
    }
}

/// The transpose of an 8x8 block held as eight rows: element `c` of output `r` is element `r`
/// of input `c`.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | a6 b6 a7 b7), ...
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    // Quadruples: (a0 b0 c0 d0 | a4 b4 c4 d4), (a1 b1 c1 d1 | a5 b5 c5 d5), ...
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    // Halves joined: low halves give columns 0-3, high halves columns 4-7.
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}
