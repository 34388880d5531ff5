//! BERT 4-bit checkpoints: a tiny BERT classifier quantized and saved pre-quantized by
//! transformers + bitsandbytes 0.50.2 (fixtures/bnb_bert, from scripts/make_fixtures.py) loads
//! here with the same logits; quantizing the same model here gives the same encoder bytes;
//! our 4-bit BERT checkpoint reads back to the same model.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use peft_core::tensors::TensorMap;
use peft_lora::{SiteHost, quantize_base};
use peft_models::bert::{BertConfig, BertForSequenceClassification, encode_batch};
use peft_models::load::load_bert_classifier;
use peft_quant::{QuantSpec, QuantType};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Logits of `model` on the fixture batch, and the reference logits stored in `expected`.
fn logits(
    model: &BertForSequenceClassification,
    expected: &Path,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let raw = std::fs::read(expected).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let want: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let rows: Vec<Vec<u32>> = ids
        .chunks(6)
        .map(|r| r.iter().filter(|&&t| t != 0).map(|&t| t as u32).collect())
        .collect();
    let (tokens, mask) = encode_batch(&rows, device);
    (
        model.forward(tokens, mask),
        Tensor::from_data(TensorData::new(want, [2, 3]), device),
    )
}

fn max_err(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn prequantized_bert_matches_bitsandbytes() {
    let device = Device::flex();
    let (model, _) = load_bert_classifier(&fixtures().join("bnb_bert/nf4_dq"), 3, &device).unwrap();
    for (path, slot) in model.linears() {
        // The head is trained whole, so it is dense; every other linear stays 4-bit.
        assert_eq!(slot.base.is_quantized(), path != "classifier", "{path}");
    }
    let (ours, theirs) = logits(
        &model,
        &fixtures().join("bnb_bert/nf4_dq.expected.safetensors"),
        &device,
    );
    let err = max_err(ours, theirs);
    assert!(
        err < 1e-4,
        "max |ours - transformers with bitsandbytes| = {err}"
    );
}

#[test]
fn quantizing_bert_here_gives_bitsandbytes_bytes_and_round_trips() {
    let device = Device::flex();
    let (model, _) = load_bert_classifier(&fixtures().join("bnb_bert/base"), 3, &device).unwrap();
    let model = quantize_base(
        model,
        QuantSpec {
            qtype: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        },
    )
    .unwrap();
    let mine = model.to_tensors();
    let theirs =
        TensorMap::read_safetensors(&fixtures().join("bnb_bert/nf4_dq/model.safetensors")).unwrap();
    let encoder_keys = |m: &TensorMap| -> Vec<String> {
        m.keys()
            .filter(|k| !k.starts_with("classifier."))
            .cloned()
            .collect()
    };
    assert_eq!(
        encoder_keys(&mine),
        encoder_keys(&theirs),
        "same keys outside the head"
    );
    for key in encoder_keys(&theirs) {
        let (m, t) = (mine.get(&key).unwrap(), theirs.get(&key).unwrap());
        if key.contains("quant_state") {
            // Same JSON up to spacing and the printed offset's last digit.
            let (mut a, mut b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_slice(&m.bytes).unwrap(),
                serde_json::from_slice(&t.bytes).unwrap(),
            );
            let (oa, ob) = (
                a["nested_offset"].take().as_f64().unwrap(),
                b["nested_offset"].take().as_f64().unwrap(),
            );
            assert!(
                (oa - ob).abs() <= 1e-6 * ob.abs(),
                "{key}: offset {oa} vs {ob}"
            );
            assert_eq!(a, b, "{key}");
        } else {
            assert_eq!(m, t, "`{key}` differs from bitsandbytes");
        }
    }
    // The head is kept dense (written as `llm_int8_skip_modules`).
    assert_eq!(
        model.quantization_config().unwrap()["llm_int8_skip_modules"],
        serde_json::json!(["classifier"])
    );
    assert!(!model.classifier.base.is_quantized());

    // Our checkpoint reads back to the same model.
    let config = BertConfig::from_file(&fixtures().join("bnb_bert/base/config.json")).unwrap();
    let back = BertForSequenceClassification::from_tensors(
        config,
        3,
        mine.clone(),
        Path::new("mem"),
        &device,
    )
    .unwrap();
    assert_eq!(back.to_tensors(), mine, "4-bit BERT checkpoint round trip");
    let expected = fixtures().join("bnb_bert/nf4_dq.expected.safetensors");
    let (before, _) = logits(&model, &expected, &device);
    let (after, _) = logits(&back, &expected, &device);
    assert_eq!(
        max_err(before, after),
        0.0,
        "the round trip changed the logits"
    );
}
