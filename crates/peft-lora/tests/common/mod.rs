//! What the peft-lora test files share: the fixtures folder and the tiny Llama.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::load_causal_lm;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny Llama of `fixtures/lora_tiny/base_plain` on `device`.
pub fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model
}
