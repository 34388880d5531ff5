//! 4-bit options shared by `peft train`, `peft merge` and `peft quantize`.

use anyhow::{Result, bail};
use peft_quant::{QuantSpec, QuantType};

/// The bitsandbytes block sizes.
const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// A 4-bit setting from the command line: `kind` nf4 or fp4, values per scale, whether the
/// scales are quantized too.
pub fn spec(kind: &str, blocksize: usize, double_quant: bool) -> Result<QuantSpec> {
    let Some(qtype) = QuantType::from_name(kind) else {
        bail!("--quantize {kind}: unknown 4-bit type (supported: nf4, fp4)");
    };
    if !BLOCK_SIZES.contains(&blocksize) {
        bail!("--quant-blocksize {blocksize}: must be one of {BLOCK_SIZES:?}");
    }
    Ok(QuantSpec { qtype, blocksize, double_quant })
}

/// Bytes the 4-bit weights of `model` take, and how many weights that is.
pub fn footprint<M: peft_lora::LoraHost>(model: &M) -> (usize, usize) {
    let (mut values, mut bytes) = (0usize, 0usize);
    for (_, s) in model.lora_slots() {
        if let peft_quant::BaseLinear::Quant4(q) = &s.base {
            values += q.quantized().numel();
            bytes += q.quantized().storage_bytes();
        }
    }
    (values, bytes)
}
