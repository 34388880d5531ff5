//! # peft-prompt
//!
//! Virtual-token methods, interchangeable with Hugging Face PEFT 0.21:
//!
//! - [`PromptTuningConfig`] (`PROMPT_TUNING`): trainable embeddings before the input
//!   embeddings, initialised at random, from a text's token embeddings, or from sampled
//!   vocabulary rows.
//! - [`PromptEncoderConfig`] (`P_TUNING`): the same virtual tokens produced by an MLP or a
//!   bidirectional LSTM over trainable embeddings.
//! - [`PrefixTuningConfig`] (`PREFIX_TUNING`, P-tuning v2): trainable keys and values in every
//!   attention layer, optionally produced by a two-layer projection.
//!
//! Each attaches to a model's virtual-token sites ([`peft_sites::PromptSite`]). The saved file
//! is PEFT's: one tensor `prompt_embeddings` holding the encoder's output. The encoder's own
//! weights, which PEFT does not keep, travel in a run's checkpoint
//! ([`peft_core::tuner::Tuner::training_extras`]) so a run resumes exactly.

pub mod config;
pub mod encoder;
pub mod model;

pub use config::{
    PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig,
};
