//! # peft-select
//!
//! Methods that train a chosen part of the model's own parameters.
//!
//! - [`LnTuningConfig`]: LayerNorm tuning (Zhao et al., 2023), Hugging Face `LN_TUNING`: a
//!   trainable copy of each targeted norm (RMSNorm or LayerNorm) replaces it. On your own
//!   burn model, use a [`peft_sites::TunedNorm`] and its `add_copy`.

pub mod ln_tuning;

pub use ln_tuning::LnTuningConfig;
