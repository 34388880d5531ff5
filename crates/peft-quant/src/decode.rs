//! Turning packed 4-bit codes into values through a block's 16-entry table (the code scaled by
//! the block's absmax). This is the inner loop of every CPU dequantization, so it uses the
//! CPU's table-permute instructions where it has them (AVX-512: 16 values per instruction;
//! AVX2: 8), picked at run time (`peft_core::cpu::isa`); the scalar loop is the reference and
//! the fallback.

/// `out[j] = table[nibble(first + j)]`, where value `i` of `packed` is the high nibble of byte
/// `i / 2` when `i` is even and the low nibble when it is odd (bitsandbytes' order).
pub fn decode_nibbles(packed: &[u8], first: usize, table: &[f32; 16], out: &mut [f32]) {
    let (mut first, mut out) = (first, out);
    if first % 2 == 1 {
        let Some((head, rest)) = out.split_first_mut() else {
            return;
        };
        *head = table[(packed[first / 2] & 15) as usize];
        (first, out) = (first + 1, rest);
    }
    // Now on a byte boundary.
    let byte0 = first / 2;
    let whole = out.len() / 2;
    let (pairs, tail) = out.split_at_mut(2 * whole);
    decode_bytes(&packed[byte0..byte0 + whole], table, pairs);
    if let Some(t) = tail.first_mut() {
        *t = table[(packed[byte0 + whole] >> 4) as usize];
    }
}

/// Both nibbles of every byte: `out` holds `2 * bytes.len()` values.
fn decode_bytes(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
    debug_assert_eq!(out.len(), 2 * bytes.len());
    #[cfg(target_arch = "x86_64")]
    {
        use peft_core::cpu::{Isa, isa};
        match isa() {
            // SAFETY: `isa` reports only what the CPU has (AVX-512F).
            Isa::Avx512 => return unsafe { x86::decode_avx512(bytes, table, out) },
            // SAFETY: as above (AVX2).
            Isa::Avx2 => return unsafe { x86::decode_avx2(bytes, table, out) },
            Isa::Scalar => {}
        }
    }
    decode_scalar(bytes, table, out);
}

/// The reference loop (and the tails of the vector loops).
fn decode_scalar(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = table[(b >> 4) as usize];
        pair[1] = table[(b & 15) as usize];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::decode_scalar;

    /// Bytes per vector iteration: 16 bytes, 32 values.
    const STEP: usize = 16;

    /// The nibbles of 16 bytes as two vectors of 16 byte-sized indices, in value order
    /// (high nibble first).
    #[inline]
    #[target_feature(enable = "sse2")]
    fn nibbles(v: __m128i) -> (__m128i, __m128i) {
        let mask = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
        let lo = _mm_and_si128(v, mask);
        (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo))
    }

    /// # Safety
    /// The CPU must have AVX-512F; `out.len() == 2 * bytes.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_avx512(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
        let steps = bytes.len() / STEP;
        unsafe {
            let t = _mm512_loadu_ps(table.as_ptr());
            for s in 0..steps {
                let v = _mm_loadu_si128(bytes.as_ptr().add(s * STEP).cast());
                let (a, b) = nibbles(v);
                let o = out.as_mut_ptr().add(s * 2 * STEP);
                _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(a), t));
                _mm512_storeu_ps(o.add(16), _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(b), t));
            }
        }
        decode_scalar(&bytes[steps * STEP..], table, &mut out[steps * 2 * STEP..]);
    }

    /// # Safety
    /// The CPU must have AVX2; `out.len() == 2 * bytes.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_avx2(bytes: &[u8], table: &[f32; 16], out: &mut [f32]) {
        let steps = bytes.len() / STEP;
        unsafe {
            // The table in two halves of 8; an index above 7 takes the upper half.
            let (t_lo, t_hi) = (
                _mm256_loadu_ps(table.as_ptr()),
                _mm256_loadu_ps(table.as_ptr().add(8)),
            );
            let seven = _mm256_set1_epi32(7);
            let lookup = |idx: __m256i| {
                let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                _mm256_blendv_ps(
                    _mm256_permutevar8x32_ps(t_lo, idx),
                    _mm256_permutevar8x32_ps(t_hi, idx),
                    upper,
                )
            };
            for s in 0..steps {
                let v = _mm_loadu_si128(bytes.as_ptr().add(s * STEP).cast());
                let (a, b) = nibbles(v);
                let o = out.as_mut_ptr().add(s * 2 * STEP);
                for (q, idx) in [a, _mm_srli_si128::<8>(a), b, _mm_srli_si128::<8>(b)]
                    .into_iter()
                    .enumerate()
                {
                    _mm256_storeu_ps(o.add(8 * q), lookup(_mm256_cvtepu8_epi32(idx)));
                }
            }
        }
        decode_scalar(&bytes[steps * STEP..], table, &mut out[steps * 2 * STEP..]);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Each vector path (where this CPU has it) equals the scalar loop, tails included.
        #[test]
        fn vector_paths_equal_the_scalar_loop() {
            let table: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) * 0.37);
            let bytes: Vec<u8> = (0..83u32).map(|i| (i * 97 + 13) as u8).collect();
            for len in [0, 1, 15, 16, 17, 32, 83] {
                let mut want = vec![0f32; 2 * len];
                decode_scalar(&bytes[..len], &table, &mut want);
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut got = vec![f32::NAN; 2 * len];
                    unsafe { decode_avx512(&bytes[..len], &table, &mut got) };
                    assert_eq!(got, want, "avx512, {len} bytes");
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    let mut got = vec![f32::NAN; 2 * len];
                    unsafe { decode_avx2(&bytes[..len], &table, &mut got) };
                    assert_eq!(got, want, "avx2, {len} bytes");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any start and length, odd or even, decodes the same values one at a time would.
    #[test]
    fn any_range_matches_value_by_value_decoding() {
        let table: [f32; 16] = std::array::from_fn(|i| i as f32 * 1.5 - 4.0);
        let packed: Vec<u8> = (0..70u32).map(|i| (i * 37 + 5) as u8).collect();
        let value = |i: usize| {
            table[((packed[i / 2] >> if i.is_multiple_of(2) { 4 } else { 0 }) & 15) as usize]
        };
        for first in [0, 1, 2, 7, 30, 31] {
            for len in [0, 1, 2, 3, 33, 64, 65, 140 - first - 1] {
                let mut out = vec![f32::NAN; len];
                decode_nibbles(&packed, first, &table, &mut out);
                let want: Vec<f32> = (first..first + len).map(value).collect();
                assert_eq!(out, want, "first {first}, len {len}");
            }
        }
    }
}
