//! SSF (scale and shift of features) on the tiny Llama and the tiny BERT classifier: it starts
//! as the base, trains only its vectors, saves and loads, and merges exactly, LayerNorms
//! included; a merged Llama with new biases reads back from its checkpoint with the same logits.
//! No reference implementation exists (PEFT and AdapterHub have no SSF): these are the
//! method's defining properties.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_adapter::SsfConfig;
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::reference::{Expected, max_abs_diff};
use peft_sites::{SiteHost, merge_and_unload};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model
}

fn bert(device: &Device) -> BertForSequenceClassification {
    load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, device)
        .unwrap()
        .0
}

fn ids(device: &Device) -> Tensor<2, Int> {
    Expected::read(&fixtures().join("lora_tiny/list_rslora/expected.safetensors"))
        .unwrap()
        .ids(device)
}

fn random_init() -> SsfConfig {
    SsfConfig {
        init_ssf_weights: false,
        ..Default::default()
    }
}

#[test]
fn ssf_starts_as_the_base_and_trains_only_its_vectors() {
    let device = Device::flex().autodiff();
    let base = llama(&device).forward(ids(&device), None);
    let model = SsfConfig::default()
        .apply(llama(&device), "default")
        .unwrap();
    assert_eq!(max_abs_diff(model.forward(ids(&device), None), base), 0.0);
    // q, k, v, o (64, 32, 32, 64 outputs), gate, up (128), down (64): a scale and a shift
    // each, 2 layers.
    let per_layer = 64 + 32 + 32 + 64 + 128 + 128 + 64;
    assert_eq!(ParamReport::of(&model).trainable, 2 * 2 * per_layer);
    let grads = model.forward(ids(&device), None).sum().backward();
    for (path, l) in model.linears() {
        if let peft_quant::BaseLinear::Dense(d) = &l.base {
            assert!(d.weight.val().grad(&grads).is_none(), "{path}");
        }
    }
    // Training moves the loss.
    use peft_core::train::{TrainConfig, Trainer};
    let batch: Vec<i64> = (0..18).map(|i| if i % 2 == 0 { 17 } else { 42 }).collect();
    let examples = vec![(
        Tensor::<2, Int>::from_data(TensorData::new(batch, [2, 9]), &device),
        Tensor::<2>::ones([2, 9], &device),
    )];
    let loss_fn = |m: &LlamaForCausalLM, b: &[(Tensor<2, Int>, Tensor<2>)]| {
        (m.causal_lm_loss(b[0].0.clone(), b[0].1.clone()), 18)
    };
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            learning_rate: 5e-2,
            warmup_steps: 0,
            steps: 30,
            batch_size: 1,
            ..TrainConfig::default()
        },
    );
    let first = trainer.step(&examples, &loss_fn).loss;
    let mut last = first;
    while !trainer.is_done() {
        last = trainer.step(&examples, &loss_fn).loss;
    }
    assert!(last < first * 0.8, "loss {first} -> {last}");
}

#[test]
fn llama_merges_exactly_and_its_checkpoint_holds_the_new_biases() {
    let device = Device::flex();
    device.seed(9);
    let config = random_init();
    let model = config.apply(llama(&device), "default").unwrap();
    let unmerged = model.forward(ids(&device), None);
    assert!(max_abs_diff(unmerged.clone(), llama(&device).forward(ids(&device), None)) > 1e-3);
    // Save and load: the same model.
    let state = config.state(&model, "default").unwrap();
    assert!(
        state
            .keys()
            .any(|k| k == "base_model.model.model.layers.0.self_attn.q_proj.ssf_scale")
    );
    let again = config.apply(llama(&device), "default").unwrap();
    let again = config
        .load_state(again, "default", state, Path::new("state"))
        .unwrap();
    assert_eq!(
        max_abs_diff(again.forward(ids(&device), None), unmerged.clone()),
        0.0
    );
    // Merge, drop the adapter, switch the biases on: the Hugging Face checkpoint this makes
    // reads back as the same model.
    let merged = config.merge(model, "default").unwrap();
    let plain = merge_and_unload(merged).unwrap().complete_biases().unwrap();
    assert!(plain.config.attention_bias && plain.config.mlp_bias);
    let err = max_abs_diff(plain.forward(ids(&device), None), unmerged.clone());
    assert!(err < 1e-5, "merged vs unmerged: {err}");
    let back = LlamaForCausalLM::from_tensors(
        plain.config.clone(),
        plain.to_tensors(),
        Path::new("x"),
        &device,
    )
    .unwrap();
    let err = max_abs_diff(back.forward(ids(&device), None), unmerged);
    assert!(err < 1e-5, "checkpoint vs unmerged: {err}");
}

#[test]
fn bert_layernorms_and_linears_merge_exactly() {
    let device = Device::flex();
    device.seed(4);
    let exp = Expected::read(&fixtures().join("bert_tiny/expected.safetensors")).unwrap();
    let config = random_init();
    let model = config.apply(bert(&device), "default").unwrap();
    let held = config.state(&model, "default").unwrap();
    assert!(
        held.keys()
            .any(|k| k.ends_with("attention.output.LayerNorm.ssf_shift")),
        "LayerNorms are targets"
    );
    let (i, m) = exp.padded_batch(&device);
    let unmerged = model.forward(i.clone(), m.clone());
    let merged = merge_and_unload(config.merge(model, "default").unwrap()).unwrap();
    let err = max_abs_diff(merged.forward(i, m), unmerged);
    assert!(err < 1e-5, "merged vs unmerged: {err}");
}

#[test]
fn rmsnorm_targets_and_unknown_adapters_are_clear_errors() {
    let device = Device::flex();
    let config = SsfConfig {
        target_modules: Some(peft_core::target::ModuleSelector::List(vec![
            "input_layernorm".into(),
        ])),
        ..Default::default()
    };
    let err = config
        .apply(llama(&device), "default")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.layers.0.input_layernorm") && err.contains("RMSNorm"),
        "{err}"
    );
    let err = SsfConfig::default()
        .merge(llama(&device), "nope")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
