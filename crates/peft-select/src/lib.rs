//! # peft-select
//!
//! Methods that train a chosen part of the model's own parameters.
//!
//! - [`LnTuningConfig`]: LayerNorm tuning (Zhao et al., 2023), Hugging Face `LN_TUNING`: a
//!   trainable copy of each targeted norm (RMSNorm or LayerNorm) replaces it. On your own
//!   burn model, use a [`peft_sites::TunedNorm`] and its `add_copy`.
//! - [`BitFitConfig`]: BitFit (Ben Zaken et al., 2022): only the model's biases train; saved
//!   under their own keys, `peft_type` `BITFIT`.
//! - [`BeftConfig`]: Hugging Face `BEFT`: new zero-initialised biases on target linears, for
//!   bias tuning on models without biases (Llama). On your own model, put a
//!   [`peft_sites::LinearPart::Bias`] on a [`peft_sites::TunedLinear`].
//! - [`SelectConfig`]: layer and module selection: chosen existing weights (module groups,
//!   target modules, `layers_to_transform`) train in full; `peft_type` `SELECT`. With
//!   `density`, Child-Tuning-F ([`child_tuning`]): a fresh Bernoulli mask on their gradients
//!   every step.
//! - [`SparseConfig`]: fixed masks saved as sparse adapters (Hugging Face `SUPERTUNING`):
//!   PaFi (smallest magnitudes), FishMask and Child-Tuning-D (largest Fisher information,
//!   [`fisher`]), Super-Tuning (largest magnitudes). Only the selected entries train and
//!   have optimizer state.

pub mod beft;
pub mod bitfit;
pub mod child_tuning;
pub mod fisher;
pub mod ln_tuning;
pub mod select;
pub mod sparse;

pub use beft::BeftConfig;
pub use bitfit::BitFitConfig;
pub use ln_tuning::LnTuningConfig;
pub use select::SelectConfig;
pub use sparse::{Selection, SparseConfig};
