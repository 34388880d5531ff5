//! # peft-sites
//!
//! The places a parameter-efficient method attaches to a model, below both the reference
//! models (`peft-models`) and the method crates, so neither depends on the other:
//!
//! - [`TunedLinear`]: a frozen linear (dense or 4-bit) with named [`LinearPart`]s: LoRA (and
//!   DoRA, [`dora`]), input/output scales ((IA)^3), added biases, sparse deltas at fixed
//!   positions of the weight ([`sparse`]: parameter selection).
//! - [`TunedNorm`]: a frozen norm with named trainable copies (LN tuning).
//! - [`PromptSite`]: virtual tokens before the input embeddings (prompt tuning, P-tuning) or
//!   as keys/values of every attention layer (prefix tuning), from named [`PromptEncoder`]s.
//! - [`SublayerSite`]: the output of a layer's attention or feed-forward block, with named
//!   [`Bottleneck`] adapters (AdapterHub's bottleneck adapters).
//! - [`FusionLayer`]: AdapterFusion's attention over several bottleneck adapters at a site.
//! - [`SiteHost`]: a model's sites by Hugging Face path, declared once per module type with
//!   [`site_table!`].
//!
//! A site with nothing attached runs the base alone.

pub mod bottleneck;
pub mod dora;
pub mod feature_scale;
pub mod fusion;
pub mod fusion_attention;
pub mod host;
pub mod linear;
pub mod mixed;
pub mod norm;
pub mod ops;
pub mod prompt;
pub mod saved;
pub mod sparse;
#[cfg(test)]
mod test_support;

pub use bottleneck::{
    AdapterNorm, BnActivation, BnInit, BnScaling, BnShape, BnWiring, Bottleneck, ResidualFrom,
    SubNorm, SublayerPlace, SublayerSite,
};
pub use dora::Magnitude;
pub use fusion::{FusionDense, FusionLayer, FusionTemperature, FusionWiring};
pub use host::{Site, SiteHost, SiteKind, SiteMut, merge_and_unload, unmerge_all};
pub use linear::{
    ADAPTER_DTYPE, FeatureVector, LinearPart, LoraAdapter, ScaleShift, Singular, TunedLinear,
};
pub use mixed::{BASE_ROW, set_row_adapters};
pub use norm::{NormWeights, TunedNorm};
pub use prompt::{PromptEncoder, PromptPlace, PromptSite};
pub use sparse::{SparseDelta, Support};
