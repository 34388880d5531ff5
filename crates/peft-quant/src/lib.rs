//! # peft-quant
//!
//! 4-bit NF4/FP4 blockwise quantization with double quantization of the scales, bit-exact
//! with bitsandbytes 0.50 (same codebooks, the same rounding at the midpoints between codes,
//! two values per byte with the first in the high nibble).
//!
//! [`Linear4bit`] is a frozen linear layer with a 4-bit weight; [`BaseLinear`] is the base a
//! tunable slot (e.g. a LoRA linear) wraps, dense or 4-bit. On the CPU its products run in
//! [`kernel`]'s tiled kernels through a burn backend operation ([`ops`]) whose backward pass
//! keeps only the packed weight.
//!
//! ```
//! use peft_quant::{QuantType, Quantized4bit};
//! let w: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 50.0).collect();
//! let q = Quantized4bit::quantize(&w, &[16, 16], QuantType::Nf4, 64, true).unwrap();
//! let back = q.dequantize();
//! // Half of NF4's widest gap (0.152) times the block scale (2.56), plus the 8-bit scale error.
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.45));
//! ```

mod blockwise;
pub mod checkpoint;
mod code_lut;
mod codebook;
mod decode;
mod encode;
#[cfg(feature = "cube")]
mod gpu;
pub mod kernel;
pub mod linear;
pub mod ops;

pub use blockwise::{
    Absmax, BLOCK_SIZES, Quantized4bit, dequantize_4bit, dequantize_blockwise_8bit, quantize_4bit,
    quantize_blockwise_8bit, torch_sum_f32,
};
pub use codebook::{QuantType, dynamic_map};
pub use linear::{BaseLinear, Linear4bit, QuantSpec};
