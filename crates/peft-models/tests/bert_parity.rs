//! The BERT classifier against transformers' `BertForSequenceClassification` on a tiny random
//! model (fixture from scripts/make_fixtures.py), padding included.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_models::bert::encode_batch;
use peft_models::load::load_bert_classifier;

#[test]
fn logits_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny");
    let device = Device::flex();
    let (model, tok) = load_bert_classifier(&dir.join("model"), 3, &device).unwrap();
    let raw = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let ids: Vec<i64> = st.tensor("input_ids").unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let logits: Vec<f32> = st.tensor("logits").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let rows: Vec<Vec<u32>> = ids.chunks(6).map(|r| r.iter().filter(|&&t| t != 0).map(|&t| t as u32).collect()).collect();
    let (tokens, mask) = encode_batch(&rows, &device);
    let ours = model.forward(tokens.clone(), mask);
    let expected = Tensor::<2>::from_data(TensorData::new(logits, [2, 3]), &device);
    let err: f32 = (ours - expected).abs().max().into_scalar();
    assert!(err < 1e-5, "max |ours - transformers| = {err}");
    let _: Tensor<2, Int> = tokens;
    // The tokenizer adds [CLS] ... [SEP] like the Python one.
    let enc = tok.encode_with_special("the a an is", 16).unwrap();
    assert_eq!(enc, vec![2, 4, 5, 6, 7, 3]);
}
