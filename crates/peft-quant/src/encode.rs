//! Turning whole blocks of values into packed 4-bit codes and their scales: the inner loop of
//! every quantization. Each block's scale is its largest magnitude; each value, multiplied by
//! the scale's reciprocal, takes the slot among the 15 sorted midpoints between codes that
//! bitsandbytes' `bucketize` gives it (how many midpoints are strictly below it), mapped to the
//! code's index; two codes share a byte, the first in the high nibble.
//!
//! The scalar loop is the reference. The vector paths (picked at run time through
//! `peft_core::cpu::isa`) give the same bytes and scales: they use the same product and the
//! same strict comparisons, and find the slot by a branchless binary search over the
//! midpoints instead of counting them (the median picks a half and a blend of two constants a
//! quarter, then two table steps: 16-entry tables with AVX-512, 8-entry ones with AVX2).

/// The 15 midpoints, sorted (ties allowed), and the code index of each of the 16 slots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots {
    pub bounds: [f32; 15],
    pub order: [u8; 16],
}

/// Values per vector step: 32 values, 16 packed bytes.
const STEP: usize = 32;

/// Encode `data` (whole blocks of `blocksize` values, a multiple of 32) into `packed`
/// (`data.len() / 2` bytes) and `absmax` (one raw block maximum per block).
pub(crate) fn encode_blocks(
    data: &[f32],
    blocksize: usize,
    slots: &Slots,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    debug_assert!(blocksize % STEP == 0 && data.len() % blocksize == 0);
    debug_assert_eq!(packed.len() * 2, data.len());
    debug_assert_eq!(absmax.len() * blocksize, data.len());
    #[cfg(target_arch = "x86_64")]
    {
        use peft_core::cpu::{Isa, isa};
        match isa() {
            // SAFETY: `isa` reports only what the CPU has (AVX-512F, BW and VL come together on
            // every AVX-512 x86 processor that has the table permutes used here; checked).
            Isa::Avx512 if has_avx512bw_vl() => {
                return unsafe { x86::encode_avx512(data, blocksize, slots, packed, absmax) };
            }
            // SAFETY: as above (AVX2).
            Isa::Avx512 | Isa::Avx2 => {
                return unsafe { x86::encode_avx2(data, blocksize, slots, packed, absmax) };
            }
            Isa::Scalar => {}
        }
    }
    encode_scalar(data, blocksize, slots, packed, absmax);
}

#[cfg(target_arch = "x86_64")]
fn has_avx512bw_vl() -> bool {
    std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Each block's values, its packed bytes and its scale.
fn whole_blocks<'a>(
    data: &'a [f32],
    blocksize: usize,
    packed: &'a mut [u8],
    absmax: &'a mut [f32],
) -> impl Iterator<Item = (&'a [f32], &'a mut [u8], &'a mut f32)> {
    data.chunks_exact(blocksize)
        .zip(packed.chunks_exact_mut(blocksize / 2))
        .zip(absmax.iter_mut())
        .map(|((block, out), am)| (block, out, am))
}

/// Largest magnitude of `block`, a NaN left out (as `f32::max` does).
#[inline]
pub(crate) fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The slot of `x`: how many midpoints are strictly below it (0 for NaN).
#[inline(always)]
pub(crate) fn slot(x: f32, bounds: &[f32; 15]) -> usize {
    bounds.iter().map(|&b| (b < x) as usize).sum()
}

/// The reference loop.
fn encode_scalar(
    data: &[f32],
    blocksize: usize,
    slots: &Slots,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    for (block, out, am) in whole_blocks(data, blocksize, packed, absmax) {
        let raw = block_absmax(block);
        *am = raw;
        let recip = 1.0 / raw.max(1e-38);
        let code = |v: f32| slots.order[slot(v * recip, &slots.bounds)];
        for (o, pair) in out.iter_mut().zip(block.chunks_exact(2)) {
            *o = (code(pair[0]) << 4) | code(pair[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{STEP, Slots};

    /// The midpoints padded to 16 with +inf (never below a value, so a slot stays <= 15).
    fn table(slots: &Slots) -> [f32; 16] {
        let mut t = [f32::INFINITY; 16];
        t[..15].copy_from_slice(&slots.bounds);
        t
    }

    /// 32 slots as bytes in value order (`lo` the first 16) through `order`, paired into 16
    /// bytes (first code in the high nibble) and stored at `out`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_pairs(bytes: __m256i, order: __m256i, out: *mut u8) {
        let codes = _mm256_shuffle_epi8(order, bytes);
        // Each 16-bit lane holds (first, second) as (low, high) byte.
        let pairs = _mm256_or_si256(
            _mm256_slli_epi16::<4>(_mm256_and_si256(codes, _mm256_set1_epi16(0xff))),
            _mm256_srli_epi16::<8>(codes),
        );
        let narrowed = _mm256_packus_epi16(pairs, pairs);
        let narrowed = _mm256_permute4x64_epi64::<0b1000>(narrowed);
        unsafe { _mm_storeu_si128(out.cast(), _mm256_castsi256_si128(narrowed)) };
    }

    /// Blocks whose scales are found together: one horizontal reduction and one division for
    /// all of them instead of one each, whose latencies held up every block's encoding.
    const GROUP: usize = 8;

    /// Whole blocks in groups of up to [`GROUP`]: their values, packed bytes and scales.
    fn block_groups<'a>(
        data: &'a [f32],
        blocksize: usize,
        packed: &'a mut [u8],
        absmax: &'a mut [f32],
    ) -> impl Iterator<Item = (&'a [f32], &'a mut [u8], &'a mut [f32])> {
        data.chunks(GROUP * blocksize)
            .zip(packed.chunks_mut(GROUP * blocksize / 2))
            .zip(absmax.chunks_mut(GROUP))
            .map(|((d, p), a)| (d, p, a))
    }

    /// Lane g: the largest value of lane-wise maxima `m[g]` (non-negative, no NaN).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce8(m: [__m256; GROUP]) -> __m256 {
        // Each level takes the maximum of neighbouring lanes of two vectors at once.
        let pairs = |a, b| {
            _mm256_max_ps(
                _mm256_shuffle_ps::<0b10_00_10_00>(a, b),
                _mm256_shuffle_ps::<0b11_01_11_01>(a, b),
            )
        };
        // Lanes [m0 m1 m2 m3 | m0 m1 m2 m3] over halves of 4, then the halves combined.
        let (l0, l1) = (
            pairs(pairs(m[0], m[1]), pairs(m[2], m[3])),
            pairs(pairs(m[4], m[5]), pairs(m[6], m[7])),
        );
        _mm256_max_ps(
            _mm256_permute2f128_ps::<0x20>(l0, l1),
            _mm256_permute2f128_ps::<0x31>(l0, l1),
        )
    }

    /// A group's raw block maxima into `absmax`, and each block's `1 / max(raw, 1e-38)`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn scales(m: [__m256; GROUP], absmax: &mut [f32]) -> [f32; GROUP] {
        let raw = reduce8(m);
        let mut out = [0f32; GROUP];
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), raw) };
        absmax.copy_from_slice(&out[..absmax.len()]);
        let recip = _mm256_div_ps(
            _mm256_set1_ps(1.0),
            _mm256_max_ps(raw, _mm256_set1_ps(1e-38)),
        );
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), recip) };
        out
    }

    /// The binary search's probes for 16 values at a time: step 8 compares with t[7], step 4
    /// with t[3] or t[11] (a blend of two constants), step 2 with t[i + 1] and step 1 with t[i]
    /// (16-entry table permutes indexed by the slot found so far).
    struct Probes512 {
        median: __m512,
        low_quarter: __m512,
        high_quarter: __m512,
        next: __m512,
        at: __m512,
    }

    impl Probes512 {
        #[target_feature(enable = "avx512f")]
        unsafe fn new(t: &[f32; 16]) -> Self {
            let mut next = [f32::INFINITY; 16];
            next[..15].copy_from_slice(&t[1..]);
            unsafe {
                Self {
                    median: _mm512_set1_ps(t[7]),
                    low_quarter: _mm512_set1_ps(t[3]),
                    high_quarter: _mm512_set1_ps(t[11]),
                    next: _mm512_loadu_ps(next.as_ptr()),
                    at: _mm512_loadu_ps(t.as_ptr()),
                }
            }
        }
    }

    /// The slots of 16 scaled values: how many midpoints are strictly below each.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn slots_avx512(s: __m512, p: &Probes512) -> __m512i {
        // Each mask marks the values its probe is below; a masked add takes the step there.
        let upper = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(p.median, s);
        let i = _mm512_maskz_mov_epi32(upper, _mm512_set1_epi32(8));
        let quarter = _mm512_mask_blend_ps(upper, p.low_quarter, p.high_quarter);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(quarter, s);
        let i = _mm512_mask_add_epi32(i, below, i, _mm512_set1_epi32(4));
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_permutexvar_ps(i, p.next), s);
        let i = _mm512_mask_add_epi32(i, below, i, _mm512_set1_epi32(2));
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_permutexvar_ps(i, p.at), s);
        _mm512_mask_add_epi32(i, below, i, _mm512_set1_epi32(1))
    }

    /// # Safety
    /// The CPU must have AVX-512F, BW and VL; lengths as [`super::encode_blocks`] says.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn encode_avx512(
        data: &[f32],
        blocksize: usize,
        slots: &Slots,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        let probes = unsafe { Probes512::new(&table(slots)) };
        let order16 = unsafe { _mm_loadu_si128(slots.order.as_ptr().cast()) };
        let order = _mm256_set_m128i(order16, order16);
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        for (group, out, am) in block_groups(data, blocksize, packed, absmax) {
            let mut m = [_mm256_setzero_ps(); GROUP];
            for (block, m) in group.chunks_exact(blocksize).zip(&mut m) {
                let mut m16 = _mm512_setzero_ps();
                for c in block.chunks_exact(16) {
                    let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
                    let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
                    // maxps returns its second operand when the first is NaN: a NaN is skipped.
                    m16 = _mm512_max_ps(a, m16);
                }
                *m = _mm256_max_ps(
                    _mm512_castps512_ps256(m16),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(m16))),
                );
            }
            let recips = scales(m, am);
            let blocks = group
                .chunks_exact(blocksize)
                .zip(out.chunks_exact_mut(blocksize / 2));
            for ((block, out), &recip) in blocks.zip(&recips) {
                let recip = _mm512_set1_ps(recip);
                for (vals, o) in block.chunks_exact(STEP).zip(out.chunks_exact_mut(STEP / 2)) {
                    let (s0, s1) = unsafe {
                        (
                            _mm512_mul_ps(_mm512_loadu_ps(vals.as_ptr()), recip),
                            _mm512_mul_ps(_mm512_loadu_ps(vals.as_ptr().add(16)), recip),
                        )
                    };
                    let (i0, i1) =
                        unsafe { (slots_avx512(s0, &probes), slots_avx512(s1, &probes)) };
                    let bytes =
                        _mm256_set_m128i(_mm512_cvtepi32_epi8(i1), _mm512_cvtepi32_epi8(i0));
                    unsafe { store_pairs(bytes, order, o.as_mut_ptr()) };
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; lengths as [`super::encode_blocks`] says.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn encode_avx2(
        data: &[f32],
        blocksize: usize,
        slots: &Slots,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        let t = table(slots);
        let order16 = unsafe { _mm_loadu_si128(slots.order.as_ptr().cast()) };
        let order = _mm256_set_m128i(order16, order16);
        // The binary search's probes: step 8 compares with t[7]; step 4 with t[3] or t[11] (a
        // blend of two constants); step 2 with t[i + 1], i in {0, 4, 8, 12}, and step 1 with
        // t[i], i even: each an 8-entry table indexed by j = i / 2, which the search keeps
        // instead of i (i = 2j + the last comparison).
        let odd = _mm256_setr_ps(t[1], t[1], t[5], t[5], t[9], t[9], t[13], t[13]);
        let even = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
        let (median, low_quarter, high_quarter) = (
            _mm256_set1_ps(t[7]),
            _mm256_set1_ps(t[3]),
            _mm256_set1_ps(t[11]),
        );
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (group, out, am) in block_groups(data, blocksize, packed, absmax) {
            let mut m = [_mm256_setzero_ps(); GROUP];
            for (block, m) in group.chunks_exact(blocksize).zip(&mut m) {
                for c in block.chunks_exact(8) {
                    let a = _mm256_and_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, abs_mask);
                    // maxps returns its second operand when the first is NaN: a NaN is skipped.
                    *m = _mm256_max_ps(a, *m);
                }
            }
            let recips = scales(m, am);
            let blocks = group
                .chunks_exact(blocksize)
                .zip(out.chunks_exact_mut(blocksize / 2));
            for ((block, out), &recip) in blocks.zip(&recips) {
                let recip = _mm256_set1_ps(recip);
                for (vals, o) in block.chunks_exact(STEP).zip(out.chunks_exact_mut(STEP / 2)) {
                    let mut slot = [_mm256_setzero_si256(); 4];
                    for (q, slot) in slot.iter_mut().enumerate() {
                        let s = _mm256_mul_ps(
                            unsafe { _mm256_loadu_ps(vals.as_ptr().add(8 * q)) },
                            recip,
                        );
                        // Each comparison's mask (all ones where the probe is below), and'ed with
                        // a step, adds the step.
                        let upper = _mm256_cmp_ps::<_CMP_LT_OQ>(median, s);
                        let mut j =
                            _mm256_and_si256(_mm256_castps_si256(upper), _mm256_set1_epi32(4));
                        let quarter = _mm256_blendv_ps(low_quarter, high_quarter, upper);
                        let quarter = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(quarter, s));
                        j = _mm256_add_epi32(j, _mm256_and_si256(quarter, _mm256_set1_epi32(2)));
                        let eighth = _mm256_permutevar8x32_ps(odd, j);
                        let eighth = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(eighth, s));
                        j = _mm256_add_epi32(j, _mm256_and_si256(eighth, _mm256_set1_epi32(1)));
                        let last = _mm256_permutevar8x32_ps(even, j);
                        let last = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(last, s));
                        // i = 2j + 1 where the last probe is below (its mask is -1).
                        *slot = _mm256_sub_epi32(_mm256_add_epi32(j, j), last);
                    }
                    // Packing works within 128-bit halves: values 0-3, 8-11, 16-19, 24-27 | 4-7,
                    // 12-15, 20-23, 28-31; the dword permute puts them back in order.
                    let b = _mm256_packus_epi16(
                        _mm256_packus_epi32(slot[0], slot[1]),
                        _mm256_packus_epi32(slot[2], slot[3]),
                    );
                    let b =
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                    unsafe { store_pairs(b, order, o.as_mut_ptr()) };
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{Slots, encode_scalar};
        use super::*;
        use crate::codebook::QuantType;

        /// Values that probe every edge: random magnitudes, values exactly on midpoints (times
        /// the block's scale), zeros, a zero block, NaN, infinities, subnormals.
        fn probe(blocks: usize, blocksize: usize, scale_bounds: &[f32; 15]) -> Vec<f32> {
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut v: Vec<f32> = (0..blocks * blocksize)
                .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3)
                .collect();
            // Block 1: the midpoints themselves with a max of exactly 1.
            for (i, x) in v[blocksize..2 * blocksize].iter_mut().enumerate() {
                *x = if i == 0 { 1.0 } else { scale_bounds[i % 15] };
            }
            v[2 * blocksize..3 * blocksize].fill(0.0);
            v[3 * blocksize + 5] = f32::NAN;
            v[4 * blocksize + 7] = f32::INFINITY;
            v[5 * blocksize + 1] = f32::NEG_INFINITY;
            v[6 * blocksize + 3] = 1e-40;
            v[6 * blocksize + 4] = -0.0;
            v
        }

        /// Each vector path (where this CPU has it) gives the scalar loop's bytes and scales, in
        /// whole and partial groups of blocks.
        #[test]
        fn vector_paths_equal_the_scalar_loop() {
            for qtype in [QuantType::Nf4, QuantType::Fp4] {
                let (bounds, order) = qtype.bounds();
                let slots = Slots { bounds, order };
                // One group of blocks short of full, one full, and two full and a partial one.
                for (blocksize, blocks) in [32, 64, 256]
                    .into_iter()
                    .flat_map(|b| [(b, 7), (b, 8), (b, 19)])
                {
                    let data = probe(blocks, blocksize, &bounds);
                    let n = data.len();
                    let (mut want_p, mut want_a) = (vec![0u8; n / 2], vec![0f32; n / blocksize]);
                    encode_scalar(&data, blocksize, &slots, &mut want_p, &mut want_a);
                    let mut paths: Vec<(
                        &str,
                        unsafe fn(&[f32], usize, &Slots, &mut [u8], &mut [f32]),
                    )> = Vec::new();
                    if super::super::has_avx512bw_vl() {
                        paths.push(("avx512", encode_avx512));
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        paths.push(("avx2", encode_avx2));
                    }
                    for (name, path) in paths {
                        let (mut p, mut a) = (vec![0xAAu8; n / 2], vec![f32::NAN; n / blocksize]);
                        unsafe { path(&data, blocksize, &slots, &mut p, &mut a) };
                        let case =
                            format!("{name} {qtype:?} blocksize {blocksize}, {blocks} blocks");
                        assert_eq!(p, want_p, "{case}: codes");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&a), bits(&want_a), "{case}: scales");
                    }
                }
            }
        }
    }
}
