//! BEFT against Hugging Face PEFT 0.21.2: PEFT's adapter on the tiny Llama loads here with the
//! same logits and greedy tokens and saves back bit for bit (fixture: scripts/make_fixtures.py,
//! `methods_tiny/beft_llama`); the other direction is in peft-cli's methods test.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::adapter_io::load_adapter;
use peft_core::tuner::Tuner;
use peft_models::generate::greedy;
use peft_models::load::load_causal_lm;
use peft_models::reference::{Expected, max_abs_diff};
use peft_select::BeftConfig;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/methods_tiny/beft_llama")
}

#[test]
fn python_adapter_gives_the_same_logits_and_greedy_text_and_saves_back() {
    let device = Device::flex();
    let base = || {
        load_causal_lm(&fixture().join("../../lora_tiny/base_plain"), &device)
            .unwrap()
            .model
    };
    let exp = Expected::read(&fixture().join("expected.safetensors")).unwrap();
    let base_err = max_abs_diff(base().forward(exp.ids(&device), None), exp.logits(&device));
    assert!(
        base_err > 1e-3,
        "the adapter must change the output ({base_err})"
    );
    let files = load_adapter(&fixture().join("adapter")).unwrap();
    let config = BeftConfig::from_json(&files.config).unwrap();
    let theirs = files.tensors.clone();
    let model = config.apply_and_load(base(), "default", files).unwrap();
    let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);

    let out = tempfile::tempdir().unwrap();
    config.save(&model, "default", out.path()).unwrap();
    let saved = load_adapter(out.path()).unwrap();
    assert_eq!(
        saved.tensors.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, t) in &theirs.tensors {
        assert_eq!(saved.tensors.get(k).unwrap().shape, t.shape, "{k}");
        assert_eq!(saved.tensors.get(k).unwrap().data, t.data, "{k}");
    }
}
