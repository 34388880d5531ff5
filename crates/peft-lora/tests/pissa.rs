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

/// PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`: the trained adapter
/// and the initial one (`initial/`) give PEFT's converted rank-2r adapter (`converted/`) bit for
/// bit, and that adapter on the original base answers as the PiSSA / OLoRA model does.
#[test]
fn conversion_to_plain_lora_is_peft_s_and_applies_to_the_original_base() {
    let device = Device::flex();
    for case in ["pissa_llama", "olora_llama"] {
        let dir = fixtures().join("methods_tiny").join(case);
        let trained = load_adapter(&dir.join("adapter")).unwrap();
        let initial = load_adapter(&dir.join("initial")).unwrap();
        let peft = load_adapter(&dir.join("converted")).unwrap();
        let config = LoraConfig::from_json(&trained.config).unwrap();
        let (ours, tensors) =
            peft_lora::convert::to_plain_lora(&config, &trained.tensors, &initial.tensors).unwrap();

        let theirs = LoraConfig::from_json(&peft.config).unwrap();
        assert_eq!(
            (ours.r, ours.lora_alpha, &ours.init_lora_weights),
            (theirs.r, theirs.lora_alpha, &theirs.init_lora_weights),
            "{case}"
        );
        let keys: Vec<_> = tensors.keys().collect();
        assert_eq!(keys, peft.tensors.keys().collect::<Vec<_>>(), "{case}");
        for (key, t) in &tensors.tensors {
            let p = peft.tensors.get(key).unwrap();
            assert_eq!(t.shape, p.shape, "{case} {key}");
            assert!(
                t.data
                    .iter()
                    .zip(&p.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{case} {key}: not PEFT's values"
            );
        }

        // A plain LoRA on the unchanged base: the same logits as the PiSSA / OLoRA model.
        let exp = Expected::read(&dir.join("expected.safetensors")).unwrap();
        let model = ours.apply(llama(&device), "default").unwrap();
        let model = ours
            .load_state(model, "default", tensors, &dir.join("converted"))
            .unwrap();
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-4, "{case}: max |converted - PEFT's PiSSA| = {err}");
    }
}

/// Our own initialisation (including the randomized SVD) converts the same way: after a change
/// of the factors, the converted adapter on the original base gives the trained model's output.
#[test]
fn our_adapters_convert_to_the_same_model() {
    let device = Device::flex();
    let exp =
        Expected::read(&fixtures().join("methods_tiny/pissa_llama/expected.safetensors")).unwrap();
    for init in ["pissa", "pissa_niter_4", "olora"] {
        let c = config(init);
        let model = c.apply(llama(&device), "default").unwrap();
        let initial = c.state(&model, "default").unwrap();
        // "Training": every factor moves.
        let mut trained = initial.clone();
        for (i, t) in trained.tensors.values_mut().enumerate() {
            for (j, x) in t.data.iter_mut().enumerate() {
                *x += 0.05 * (((i * 31 + j * 17) % 13) as f32 / 13.0 - 0.5);
            }
        }
        let model = c
            .load_state(model, "default", trained.clone(), "trained".as_ref())
            .unwrap();
        let want = model.forward(exp.ids(&device), None);

        let (plain, tensors) = peft_lora::convert::to_plain_lora(&c, &trained, &initial).unwrap();
        assert_eq!((plain.r, plain.lora_alpha), (8, 16.0));
        let converted = plain.apply(llama(&device), "default").unwrap();
        let converted = plain
            .load_state(converted, "default", tensors, "converted".as_ref())
            .unwrap();
        let err = max_abs_diff(converted.forward(exp.ids(&device), None), want);
        assert!(err < 1e-4, "{init}: max |converted - trained| = {err}");
    }
}
