//! Blockwise absmax quantization: every `blocksize` consecutive values (row-major) share one
//! scale, their largest magnitude; each value becomes the code nearest to `value / scale`.

use peft_core::{PeftError, Result};
use rayon::prelude::*;

use crate::code_lut::CodeLut;
use crate::codebook::{QuantType, dynamic_map};
use crate::decode::decode_nibbles;
use crate::encode::{Slots, block_absmax, encode_blocks, slot};
use peft_core::cpu::{par_fill, zeroed};

/// Block sizes bitsandbytes accepts.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Block size of the second-level (scale) quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Values per parallel task when encoding (whole blocks).
const VALUES_PER_TASK: usize = 16384;

/// Quantize `data` to packed 4-bit codes (first value in the high nibble, an odd tail padded
/// with the code of 0) and one f32 scale per block.
pub fn quantize_4bit(
    data: &[f32],
    blocksize: usize,
    qtype: QuantType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let (bounds, order) = qtype.bounds();
    let slots = Slots { bounds, order };
    let n = data.len();
    let full = n / blocksize;
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    // Whole blocks (even-sized, so each packs into its own bytes), in parallel tasks of whole
    // blocks, each writing its own bytes (no zero-filled buffer first: for a 4096² weight that
    // was an 8 MiB memset on one thread).
    let per_task = (VALUES_PER_TASK / blocksize).max(1);
    let whole = full * blocksize;
    let tasks = data[..whole]
        .par_chunks(per_task * blocksize)
        .zip(absmax[..full].par_chunks_mut(per_task));
    let mut packed = par_fill(
        whole / 2,
        per_task * blocksize / 2,
        tasks,
        |out, (values, am)| {
            let out = zeroed(out);
            encode_blocks(values, blocksize, &slots, out, am);
            out
        },
    );
    packed.resize(n.div_ceil(2), 0);
    // The tail: the reference keeps its clamped maximum and divides by it (a whole block keeps
    // the raw maximum and multiplies by its reciprocal); an odd last value pairs with the code
    // of 0.
    if whole < n {
        let tail = &data[whole..];
        let m = block_absmax(tail).max(1e-38);
        absmax[full] = m;
        let code = |v: f32| order[slot(v / m, &bounds)];
        for (i, pair) in tail.chunks(2).enumerate() {
            let second = pair.get(1).map_or(order[slot(0.0, &bounds)], |&v| code(v));
            packed[whole / 2 + i] = (code(pair[0]) << 4) | second;
        }
    }
    Ok((packed, absmax))
}

/// Inverse of [`quantize_4bit`]: `n` values.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    qtype: QuantType,
) -> Result<Vec<f32>> {
    check_blocksize(blocksize)?;
    if packed.len() != n.div_ceil(2) || absmax.len() != n.div_ceil(blocksize) {
        return Err(PeftError::Other(format!(
            "4-bit data does not fit {n} values: {} packed bytes (expected {}), {} scales (expected {})",
            packed.len(),
            n.div_ceil(2),
            absmax.len(),
            n.div_ceil(blocksize)
        )));
    }
    let code = qtype.code();
    let mut out = vec![0f32; n];
    // Blocks start on byte boundaries (block sizes are even).
    out.par_chunks_mut(blocksize)
        .zip(absmax.par_iter())
        .enumerate()
        .for_each(|(b, (o, &scale))| {
            decode_nibbles(packed, b * blocksize, &code.map(|c| c * scale), o);
        });
    Ok(out)
}

/// 8-bit blockwise quantization with a sorted 256-value `code` spanning `[-1, 1]`, as
/// bitsandbytes' native CPU kernel does it (it is what quantizes the 4-bit scales): each
/// block's scale is its largest magnitude, each value is multiplied by the scale's reciprocal
/// and coded through the kernel's lookup table ([`CodeLut`]), and an all-zero block is coded
/// 0. Bit-exact with the native kernel, including the values near a midpoint between codes
/// where the table picks the neighbour of the exact nearest code.
pub fn quantize_blockwise_8bit(
    data: &[f32],
    blocksize: usize,
    code: &[f32; 256],
) -> (Vec<u8>, Vec<f32>) {
    let n = data.len();
    let lut = CodeLut::new(code);
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    // Tasks of several blocks: one task per block (256 values, for the nested scales) spent
    // more time handing out tasks than coding.
    let per_task = (VALUES_PER_TASK / blocksize).max(1);
    let tasks = data
        .par_chunks(per_task * blocksize)
        .zip(absmax.par_chunks_mut(per_task));
    let q = par_fill(n, per_task * blocksize, tasks, |out, (values, am)| {
        // Zeros first: a block whose maximum is 0 keeps them.
        let out = zeroed(out);
        let blocks = out.chunks_mut(blocksize).zip(values.chunks(blocksize));
        for ((out, block), am) in blocks.zip(am) {
            *am = block_absmax(block);
            if *am == 0.0 {
                continue;
            }
            let recip = 1.0 / *am;
            for (o, &v) in out.iter_mut().zip(block) {
                *o = lut.code_of(v * recip);
            }
        }
        out
    });
    (q, absmax)
}

/// Inverse of [`quantize_blockwise_8bit`].
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 256],
) -> Vec<f32> {
    q.chunks(blocksize)
        .zip(absmax)
        .flat_map(|(block, &s)| block.iter().map(move |&c| code[c as usize] * s))
        .collect()
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if !BLOCK_SIZES.contains(&blocksize) {
        return Err(PeftError::Config(format!(
            "block size {blocksize} is not one of {BLOCK_SIZES:?}"
        )));
    }
    Ok(())
}

/// The f32 sum of `x` in the order PyTorch's CPU kernel adds (its `cascade_sum`: 8-lane
/// vectors, 4 accumulators interleaved, a 4-level cascade, then the scalar tail and the
/// lanes; fewer than 8 values go through the same cascade one value wide), so that the
/// double-quantization offset `mean(absmax)` is bit-identical to the one bitsandbytes gets
/// from `torch.mean`. (Past 32768 values torch splits the sum over its threads, and its own
/// result then depends on the thread count.)
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    if x.len() < LANES {
        return row_sum::<1>(x)[0];
    }
    let vecs = x.len() / LANES;
    let lanes = row_sum::<LANES>(&x[..vecs * LANES]);
    let mut total = 0f32;
    for &e in &x[vecs * LANES..] {
        total += e;
    }
    for p in lanes {
        total += p;
    }
    total
}

/// torch's `row_sum` over `x` seen as vectors of `L` lanes: 4 interleaved accumulators
/// summed through a 4-level cascade, leftover vectors into the first, then the four added.
fn row_sum<const L: usize>(x: &[f32]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let add = |a: &mut [[f32; L]; ILP], b: &[[f32; L]; ILP]| {
        for (ra, rb) in a.iter_mut().zip(b) {
            for (va, vb) in ra.iter_mut().zip(rb) {
                *va += vb;
            }
        }
    };
    let vecs = x.len() / L;
    let groups = vecs / ILP;
    let group = |i: usize| -> [[f32; L]; ILP] {
        let mut g = [[0f32; L]; ILP];
        for (k, row) in g.iter_mut().enumerate() {
            row.copy_from_slice(&x[(i * ILP + k) * L..][..L]);
        }
        g
    };
    let ceil_log2 = |v: usize| {
        if v <= 2 {
            1
        } else {
            (usize::BITS - (v - 1).leading_zeros()) as usize
        }
    };
    let level_power = 4.max(ceil_log2(groups) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= groups {
        for _ in 0..level_step {
            add(&mut acc[0], &group(i));
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = acc[j - 1];
            add(&mut acc[j], &lower);
            acc[j - 1] = [[0f32; L]; ILP];
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < groups {
        add(&mut acc[0], &group(i));
        i += 1;
    }
    for j in 1..LEVELS {
        let level = acc[j];
        add(&mut acc[0], &level);
    }
    let mut partial = acc[0];
    for v in groups * ILP..vecs {
        for (p, &e) in partial[0].iter_mut().zip(&x[v * L..][..L]) {
            *p += e;
        }
    }
    for k in 1..ILP {
        let row = partial[k];
        for (p, e) in partial[0].iter_mut().zip(row) {
            *p += e;
        }
    }
    partial[0]
}

/// The per-block scales: plain f32, or themselves quantized (double quantization).
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// `scale = dynamic_map[q] * nested_absmax[block] + offset`, 256 scales per nested block.
    Nested {
        q: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// The f32 scales.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested { q, .. } => {
                let dmap = dynamic_map();
                (0..q.len()).map(|b| self.scale(b, &dmap)).collect()
            }
        }
    }

    /// The f32 scale of block `b`, decoded on its own so a double-quantized weight can keep its
    /// ~4.13 bits per value in memory; `dmap` is [`dynamic_map`], passed in so loops build it once.
    #[inline]
    pub fn scale(&self, b: usize, dmap: &[f32; 256]) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested {
                q,
                nested_absmax,
                offset,
            } => dmap[q[b] as usize] * nested_absmax[b / NESTED_BLOCKSIZE] + offset,
        }
    }

    /// Bytes the scales take.
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Nested {
                q, nested_absmax, ..
            } => q.len() + nested_absmax.len() * 4 + 4,
        }
    }
}

/// A tensor in 4-bit form with everything needed to restore it (a bitsandbytes `QuantState`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub shape: Vec<usize>,
    pub blocksize: usize,
    pub qtype: QuantType,
}

impl Quantized4bit {
    /// Quantize row-major `data` of `shape`; `double_quant` also quantizes the scales.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        qtype: QuantType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(PeftError::Other(format!(
                "shape {shape:?} does not hold {} values",
                data.len()
            )));
        }
        let (packed, absmax) = quantize_4bit(data, blocksize, qtype)?;
        let absmax = if double_quant {
            let offset = torch_sum_f32(&absmax) / absmax.len() as f32;
            let centered: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            let (q, nested_absmax) =
                quantize_blockwise_8bit(&centered, NESTED_BLOCKSIZE, &dynamic_map());
            Absmax::Nested {
                q,
                nested_absmax,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            packed,
            absmax,
            shape: shape.to_vec(),
            blocksize,
            qtype,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 values.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_4bit(
            &self.packed,
            &self.absmax.values(),
            self.numel(),
            self.blocksize,
            self.qtype,
        )
        .expect("consistent by construction")
    }

    /// Bytes the codes and scales take.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.nbytes()
    }

    /// Storage bits per value (codes and scales).
    pub fn bits_per_value(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / self.numel() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_code_gap() {
        let w: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 50.0).collect();
        for dq in [false, true] {
            let q = Quantized4bit::quantize(&w, &[16, 16], QuantType::Nf4, 64, dq).unwrap();
            let back = q.dequantize();
            let scales = q.absmax.values();
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let bound = 0.1520 * scales[i / 64]
                    + (scales[i / 64] - block_absmax(&w[i / 64 * 64..][..64])).abs();
                assert!(
                    (a - b).abs() <= bound + 1e-6,
                    "dq {dq}: value {i}: {a} -> {b} (scale {})",
                    scales[i / 64]
                );
            }
        }
    }
}
