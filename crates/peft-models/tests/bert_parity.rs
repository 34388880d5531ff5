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
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits: Vec<f32> = st
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

/// `modules_to_save = ["pooler"]` names a container: its linear child `bert.pooler.dense` is kept
/// out of the LoRA targets (even with all-linear) and is trained and saved whole, by one rule.
#[test]
fn modules_to_save_container_is_trained_and_saved_whole() {
    use peft_core::params::ParamReport;
    use peft_core::tuner::Tuner;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny");
    let device = Device::flex().autodiff();
    let trainable = |saved: &[&str]| {
        let (model, _) = load_bert_classifier(&dir.join("model"), 3, &device).unwrap();
        let mut config = peft_lora::LoraConfig::new(2, 4.0, &[]);
        config.target_modules = Some(peft_core::target::ModuleSelector::Pattern(
            "all-linear".into(),
        ));
        config.modules_to_save = Some(saved.iter().map(|s| s.to_string()).collect());
        let model = config.apply(model, "default").unwrap();
        let keys: Vec<String> = config
            .state(&model, "default")
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let n = ParamReport::of(&model).trainable;
        (model, n, keys)
    };
    let (_, head_only, _) = trainable(&["classifier"]);
    let (model, with_pooler, keys) = trainable(&["pooler", "classifier"]);
    assert!(
        model.pooler.lora("default").is_none(),
        "pooler.dense must not get LoRA"
    );
    // hidden 32: the pooler's 32x32 weight and 32 biases train whole; its r=2 LoRA (2·2·32) is gone.
    assert_eq!(with_pooler, head_only + 32 * 32 + 32 - 2 * 2 * 32);
    assert!(
        keys.contains(&"base_model.model.bert.pooler.dense.weight".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"base_model.model.classifier.weight".to_string()),
        "{keys:?}"
    );
}
