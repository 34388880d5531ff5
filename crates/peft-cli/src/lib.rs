//! The library side of the `peft` command, shared with `cargo xtask`:
//!
//! - [`methods`]: the method registry (`--method` names, `peft_type`s, configs).
//! - [`usage`]: usage errors (exit code 2) and option range checks.

pub mod usage;

pub mod methods;
