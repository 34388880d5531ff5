//! 4-bit options shared by `peft train`, `peft merge` and `peft quantize`.

use anyhow::Result;

use clap::Args;
use peft_cli::usage;
use peft_quant::{BLOCK_SIZES, QuantSpec, QuantType};

/// A 4-bit setting from the command line: `kind` nf4 or fp4 (given as option `option`, which
/// errors name), values per scale, whether the scales are quantized too.
pub fn spec(option: &str, kind: &str, blocksize: usize, double_quant: bool) -> Result<QuantSpec> {
    let Some(qtype) = QuantType::from_name(kind) else {
        return Err(usage!(
            "{option} {kind}: unknown 4-bit type (supported: nf4, fp4)"
        ));
    };
    if !BLOCK_SIZES.contains(&blocksize) {
        return Err(usage!(
            "--quant-blocksize {blocksize}: must be one of {BLOCK_SIZES:?}"
        ));
    }
    Ok(QuantSpec {
        qtype,
        blocksize,
        double_quant,
    })
}

/// How `peft merge --quantize` and `peft quantize` lay out the 4-bit weights they write.
#[derive(Args, Debug)]
pub struct WriteOptions {
    /// Weights per scale, 32..4096.
    #[arg(long, default_value_t = 64)]
    pub quant_blocksize: usize,
    /// Keep the scales in f32 instead of quantizing them too (4.5 instead of ~4.13 bits per
    /// weight).
    #[arg(long)]
    pub no_double_quant: bool,
}

impl WriteOptions {
    /// The setting for 4-bit type `kind`, given as option `option`.
    pub fn spec(&self, option: &str, kind: &str) -> Result<QuantSpec> {
        spec(option, kind, self.quant_blocksize, !self.no_double_quant)
    }
}
