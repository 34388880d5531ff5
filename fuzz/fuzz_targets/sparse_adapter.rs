#![no_main]
//! Fuzz target: the sparse adapter (`SUPERTUNING`) reader (see ../readers.rs).

#[path = "../readers.rs"]
mod readers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    readers::tolerate_caught_tokenizers_panics();
    let _ = readers::sparse_adapter(data);
});
