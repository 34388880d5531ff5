//! # peft-lora
//!
//! LoRA (Hu et al., 2021) for burn models: `y = base(x) + s · B(A(dropout(x)))` computed on
//! the side path, so training never rebuilds the dense weight.
//!
//! - [`LoraLinear`]: a frozen linear with any number of named LoRA adapters; use it directly
//!   in your own burn model.
//! - [`LoraConfig`]: the Hugging Face PEFT `LoraConfig` (same JSON fields; unknown ones kept).
//! - [`peft_core::tuner::Tuner`] for [`LoraConfig`]: whole-model LoRA on any
//!   [`peft_sites::SiteHost`], a model that exposes its linear sites by Hugging Face path (the
//!   `peft-models` architectures do).
//! - DoRA (`use_dora`): a magnitude per output row on a LoRA adapter (`peft_sites::dora`).
//! - [`adalora`]: AdaLoRA's SVD-form update, orthogonality penalty and rank budget.
//! - [`relora`]: ReLoRA's cycles of merge and restart.
//! - [`convert`]: PiSSA / OLoRA adapters as plain LoRA adapters of the original base.
//! - [`combine`]: weighted combinations of LoRA adapters (PEFT's `add_weighted_adapter`).
//! - [`lorahub`]: LoRAHub, adapters of other tasks composed for a new one from a few examples.
//!
//! ```
//! use burn::tensor::{Device, Tensor, Distribution};
//! use peft_lora::{LoraInit, LoraLayer, LoraLinear};
//!
//! let device = Device::flex();
//! let base = Tensor::<2>::random([16, 8], Distribution::Default, &device);
//! let mut layer = LoraLinear::new(base, None);
//! layer.add_adapter("default", 4, 8.0, false, 0.0, LoraInit::Default);
//! let y = layer.forward(Tensor::<3>::ones([2, 3, 16], &device));
//! assert_eq!(y.dims(), [2, 3, 8]);
//! ```

pub mod adalora;
pub mod combine;
mod config;
pub mod convert;
mod layer;
pub mod linalg;
pub mod lorahub;
mod model;
pub mod relora;

/// Merge the active adapters of every method and drop all adapters (`peft_sites::merge_and_unload`).
pub use peft_sites::merge_and_unload as merge_and_unload_state;
pub use peft_sites::unmerge_all;
pub use peft_sites::{LoraAdapter, SiteHost};

pub use adalora::{AdaLoraConfig, RankAllocator};
pub use combine::{
    AdapterToCombine, Combination, CombineSpec, MajoritySign, combine, combine_with_masks,
};
pub use config::{InitLoraWeights, LoraConfig};
pub use layer::{BaseInit, LoraInit, LoraLayer, LoraLinear};
pub use model::{dequantize_base, param_report, quantize_base, quantized_footprint};
pub use relora::{ReloraConfig, ReloraHook};
