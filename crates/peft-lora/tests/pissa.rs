//! PiSSA and OLoRA (`init_lora_weights = "pissa" | "pissa_niter_K" | "olora"`) against Hugging
//! Face PEFT 0.21.2: the factors come from the base's SVD / QR and the residual stays in the
//! base, so a new adapter starts as the base; PEFT's saved adapters (which need the same
//! initialisation on load, as in PEFT) give the same logits here. Fixtures:
//! `scripts/make_fixtures.py --only pissa`.

mod common;

use burn::tensor::Device;
use common::{fixtures, llama};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tuner::Tuner;
use peft_lora::{InitLoraWeights, LoraConfig, SiteHost, merge_and_unload_state, quantize_base};
use peft_models::reference::{Expected, max_abs_diff};
use peft_quant::QuantSpec;

fn config(init: &str) -> LoraConfig {
    LoraConfig {
        init_lora_weights: InitLoraWeights::Method(init.into()),
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
    }
}

#[test]
fn python_pissa_and_olora_adapters_give_the_same_logits() {
    let device = Device::flex();
    for case in ["pissa_llama", "olora_llama"] {
        let dir = fixtures().join("methods_tiny").join(case);
        let exp = Expected::read(&dir.join("expected.safetensors")).unwrap();
        let files = load_adapter(&dir.join("adapter")).unwrap();
        let config = LoraConfig::from_json(&files.config).unwrap();
        assert!(config.init_lora_weights.base_init().unwrap().is_some());
        let model = config.apply(llama(&device), "default").unwrap();
        let model = config
            .load_state(
                model,
                "default",
                files.tensors,
                &files.dir.join(WEIGHTS_FILE),
            )
            .unwrap();
        let base_err = max_abs_diff(
            llama(&device).forward(exp.ids(&device), None),
            exp.logits(&device),
        );
        assert!(
            base_err > 1e-3,
            "{case}: the adapter must change the output"
        );
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-4, "{case}: max |ours - PEFT| = {err}");
    }
}

#[test]
fn a_new_adapter_starts_as_the_base_and_merges_back_to_it() {
    let device = Device::flex();
    let exp =
        Expected::read(&fixtures().join("methods_tiny/pissa_llama/expected.safetensors")).unwrap();
    let base = llama(&device).forward(exp.ids(&device), None);
    for init in ["pissa", "pissa_niter_4", "olora"] {
        let c = config(init);
        let model = c.apply(llama(&device), "default").unwrap();
        // The base holds the residual: it differs from the original weights.
        let q = model
            .linears()
            .into_iter()
            .find(|(p, _)| p.ends_with("layers.0.self_attn.q_proj"))
            .unwrap()
            .1
            .base
            .weight_hf();
        let q0 = llama(&device)
            .linears()
            .into_iter()
            .find(|(p, _)| p.ends_with("layers.0.self_attn.q_proj"))
            .unwrap()
            .1
            .base
            .weight_hf();
        let moved = q
            .data
            .iter()
            .zip(&q0.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{init}: the residual is in the base ({moved})"
        );
        let err = max_abs_diff(model.forward(exp.ids(&device), None), base.clone());
        assert!(err < 1e-4, "{init}: starts as the base ({err})");
        let merged = merge_and_unload_state(model).unwrap();
        let err = max_abs_diff(merged.forward(exp.ids(&device), None), base.clone());
        assert!(err < 1e-4, "{init}: merged is the base again ({err})");
    }
}

#[test]
fn pissa_needs_a_float_base_and_bad_names_are_errors() {
    let device = Device::flex();
    let q = quantize_base(llama(&device), QuantSpec::default()).unwrap();
    let err = config("pissa").apply(q, "default").unwrap_err().to_string();
    assert!(
        err.contains("float base") && err.contains("q_proj"),
        "{err}"
    );
    // OLoRA over a 4-bit base works (dequantized, residual quantized again).
    let q = quantize_base(llama(&device), QuantSpec::default()).unwrap();
    config("olora").apply(q, "default").unwrap();
    let err = LoraConfig::from_json(&serde_json::json!({
        "peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": "pissa_niter_x"
    }))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pissa_niter_x") && err.contains("olora"),
        "{err}"
    );
}
