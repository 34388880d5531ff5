//! What the gemm tests share.

/// A value in [-1, 1) from an index, different for every (index, salt).
pub fn value(index: usize, salt: usize) -> f32 {
    let x = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt as u64) << 32;
    let x = x ^ (x >> 29);
    ((x.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}
