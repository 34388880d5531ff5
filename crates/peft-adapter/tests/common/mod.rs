//! What this crate's tests share: the tiny fixture models and a short training run.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::train::{TrainConfig, Trainer};
use peft_models::bert::BertForSequenceClassification;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_bert_classifier, load_causal_lm};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny Llama (lora_tiny/base_plain).
pub fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model
}

/// The tiny BERT classifier (3 labels).
pub fn bert(device: &Device) -> BertForSequenceClassification {
    load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, device)
        .unwrap()
        .0
}

/// Train `model` (on an autodiff device) `steps` steps at `lr` on two rows alternating two
/// words, a pattern a few steps learn, adding `extra` to the loss; the first and last losses
/// and the model.
pub fn train_alternating(
    model: LlamaForCausalLM,
    lr: f64,
    steps: usize,
    extra: impl Fn(&LlamaForCausalLM) -> Option<Tensor<1>>,
) -> (f64, f64, LlamaForCausalLM) {
    let device = model.device();
    let ids: Vec<i64> = (0..18).map(|i| if i % 2 == 0 { 17 } else { 42 }).collect();
    let examples = vec![(
        Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 9]), &device),
        Tensor::<2>::ones([2, 9], &device),
    )];
    let loss_fn = |m: &LlamaForCausalLM, b: &[(Tensor<2, Int>, Tensor<2>)]| {
        let loss = m.causal_lm_loss(b[0].0.clone(), b[0].1.clone());
        let loss = match extra(m) {
            Some(e) => loss + e,
            None => loss,
        };
        (loss, 18)
    };
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            learning_rate: lr,
            warmup_steps: 0,
            steps,
            batch_size: 1,
            ..TrainConfig::default()
        },
    );
    let first = trainer.step(&examples, loss_fn).loss;
    let mut last = first;
    while !trainer.is_done() {
        last = trainer.step(&examples, loss_fn).loss;
    }
    (first, last, trainer.into_model())
}
