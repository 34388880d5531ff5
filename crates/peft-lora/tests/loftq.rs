//! LoftQ (`init_lora_weights = "loftq"` with `loftq_config`) against Hugging Face PEFT 0.21.2's
//! `loftq_init` (run on the CPU by the fixture script, with bitsandbytes' NF4): the base becomes
//! the NF4 values bit for bit, `B·A` is the rank-r SVD of what NF4 lost, and PEFT's saved
//! adapters give the same logits. Fixtures: `scripts/make_fixtures.py --only loftq`.

mod common;

use burn::tensor::Device;
use common::{fixtures, llama};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, quantize_base};
use peft_models::reference::{Expected, max_abs_diff};
use peft_quant::QuantSpec;

#[test]
fn loftq_matches_peft_base_factors_and_logits() {
    let device = Device::flex();
    // One round: the SVD is of W − NF4(W), the same on both sides up to rounding; two rounds
    // quantize W − B·A, where rounding can move a value across an NF4 boundary.
    for (case, ba_tol) in [("loftq_llama", 1e-4f32), ("loftq2_llama", 1e-3)] {
        let dir = fixtures().join("methods_tiny").join(case);
        let files = load_adapter(&dir.join("adapter")).unwrap();
        let config = LoraConfig::from_json(&files.config).unwrap();
        let init = TensorMap::read_safetensors(&dir.join("init.safetensors")).unwrap();
        let model = config.apply(llama(&device), "default").unwrap();
        let mut checked = 0;
        let mut base_off = 0usize;
        for (path, s) in model.linears() {
            let Some(adapter) = s.lora("default") else {
                continue;
            };
            let key = format!("base_model.model.{path}");
            let want = init.get(&format!("{key}.base")).unwrap();
            let got = s.base.weight_hf();
            assert_eq!(got.shape, want.shape, "{case}: {path}");
            // Values that differ by an NF4 step (`loftq2`) are counted, not hidden.
            base_off += got
                .data
                .iter()
                .zip(&want.data)
                .filter(|(a, b)| (*a - *b).abs() > 1e-6)
                .count();
            let ba = adapter.a.val().matmul(adapter.b.val()); // [in, out] = (B·A)ᵀ
            let ba = peft_core::tensors::HostTensor::from_tensor(ba).transposed();
            let want = init.get(&format!("{key}.ba")).unwrap();
            let scale = want.data.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = ba
                .data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= ba_tol * scale,
                "{case}: {path}: B·A differs by {err} (largest entry {scale})"
            );
            checked += 1;
        }
        assert_eq!(checked, 6, "{case}: q, v and down of two layers");
        if case == "loftq_llama" {
            assert_eq!(
                base_off, 0,
                "{case}: the NF4 base is bitsandbytes' bit for bit"
            );
        } else {
            let total = 6 * 64 * 96; // about: the six weights' entries
            assert!(
                base_off * 1000 < total,
                "{case}: {base_off} base values off"
            );
        }
        let exp = Expected::read(&dir.join("expected.safetensors")).unwrap();
        let model = config
            .load_state(
                model,
                "default",
                files.tensors,
                &files.dir.join(WEIGHTS_FILE),
            )
            .unwrap();
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-4, "{case}: logits differ from PEFT's by {err}");
    }
}

#[test]
fn loftq_settings_and_bases_it_cannot_take_are_errors() {
    let base = serde_json::json!({
        "peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": "loftq"
    });
    let err = LoraConfig::from_json(&base).unwrap_err().to_string();
    assert!(err.contains("needs loftq_config"), "{err}");
    let mut eight = base.clone();
    eight["loftq_config"] = serde_json::json!({"loftq_bits": 8, "loftq_iter": 1});
    let c = LoraConfig::from_json(&eight).unwrap();
    let device = Device::flex();
    let err = c.apply(llama(&device), "d").unwrap_err().to_string();
    assert!(err.contains("loftq_bits 8"), "{err}");
    let mut bad = base.clone();
    bad["loftq_config"] = serde_json::json!({"loftq_bits": 4, "loftq_iter": "one"});
    let err = LoraConfig::from_json(&bad).unwrap_err().to_string();
    assert!(err.contains("loftq_config.loftq_iter"), "{err}");
    let mut ok = base;
    ok["loftq_config"] = serde_json::json!({"loftq_bits": 4, "loftq_iter": 1});
    let c = LoraConfig::from_json(&ok).unwrap();
    let q = quantize_base(llama(&device), QuantSpec::default()).unwrap();
    let err = c.apply(q, "d").unwrap_err().to_string();
    assert!(err.contains("full-precision"), "{err}");
}

/// LoftQ + QLoRA (`peft train --quantize nf4` with LoftQ): the base LoftQ leaves holds NF4
/// values, so quantizing it to NF4 with blocks of 64 keeps every value; double quantization
/// only rounds the block scales (8-bit).
#[test]
fn the_loftq_base_quantizes_to_itself() {
    let device = Device::flex();
    let config = LoraConfig::from_json(&serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}
    }))
    .unwrap();
    let bases = |m: &peft_models::llama::LlamaForCausalLM| -> Vec<Vec<f32>> {
        m.linears()
            .into_iter()
            .filter(|(_, s)| s.lora("default").is_some())
            .map(|(_, s)| s.base.weight_hf().data)
            .collect()
    };
    let before = bases(&config.apply(llama(&device), "default").unwrap());
    let plain = QuantSpec {
        double_quant: false,
        ..QuantSpec::default()
    };
    for spec in [plain, QuantSpec::default()] {
        let q = quantize_base(config.apply(llama(&device), "default").unwrap(), spec).unwrap();
        let after: Vec<Vec<f32>> = q
            .linears()
            .into_iter()
            .filter(|(_, s)| s.lora("default").is_some())
            .map(|(_, s)| {
                assert!(s.base.is_quantized());
                s.base.weight_hf().data
            })
            .collect();
        if spec.double_quant {
            for (a, b) in after.iter().zip(&before) {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 0.01 * scale,
                    "double quantization moved a value by {err}"
                );
            }
        } else {
            assert_eq!(after, before, "NF4 values survive quantization");
        }
    }
}
