//! # peft-core
//!
//! What every parameter-efficient fine-tuning method of the workspace shares:
//!
//! - [`device`]: the burn device picked by name at run time.
//! - [`error`]: one error type, naming the file, key, option or shape at fault.
//! - [`target`]: which modules a method adapts, with Hugging Face PEFT semantics
//!   (`target_modules` list/regex/`"all-linear"`, `exclude_modules`, `layers_to_transform`,
//!   `rank_pattern`/`alpha_pattern`).
//! - [`tensors`]: a named-tensor map read from and written to safetensors files
//!   (f32/f16/bf16), with atomic writes.
//! - [`folder`]: output folders written whole or not at all (temporary sibling + rename).
//! - [`adapter_io`]: the Hugging Face PEFT adapter folder (`adapter_config.json` +
//!   `adapter_model.safetensors`).
//! - [`params`]: the trainable-parameter report and helpers for frozen parameters.
//! - [`linear`]: the frozen dense linear every tunable linear slot starts from.
//! - [`optim`]: global-norm gradient clipping and the learning-rate schedule.
//! - [`train`]: the model-agnostic training loop with exact resume.
//! - [`tuner`]: the contract a method implements on a model.

pub mod adapter_io;
pub mod alloc;
pub mod cpu;
pub mod device;
pub mod error;
pub mod folder;
pub mod linear;
pub mod matmul;
pub mod optim;
pub mod params;
pub mod target;
pub mod tensors;
pub mod train;
pub mod tuner;

pub use error::{PeftError, Result};
