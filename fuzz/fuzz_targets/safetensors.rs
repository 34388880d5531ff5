#![no_main]
//! Fuzz target: the `safetensors` reader (see ../readers.rs).

#[path = "../readers.rs"]
mod readers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    readers::tolerate_caught_tokenizers_panics();
    let _ = readers::safetensors(data);
});
