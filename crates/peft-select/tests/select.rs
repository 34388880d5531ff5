//! Layer and module selection on the tiny fixture models: exactly the selected weights move in
//! training (every other tensor bit-identical), the saved state holds them under their own keys
//! and loads back to the same model, the groups split BERT's linears as its layers do, and bad
//! selections are clear errors.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::params::ParamReport;
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::reference::max_abs_diff;
use peft_select::SelectConfig;

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
    let ids: Vec<i64> = (0..18).map(|i| if i % 2 == 0 { 17 } else { 42 }).collect();
    Tensor::from_data(TensorData::new(ids, [2, 9]), device)
}

/// `steps` AdamW steps (weight decay on) of the causal-LM loss on two rows alternating two
/// words; the first and last losses and the model.
fn train(model: LlamaForCausalLM, steps: usize) -> (f64, f64, LlamaForCausalLM) {
    let device = model.device();
    let batch = vec![(ids(&device), Tensor::<2>::ones([2, 9], &device))];
    let loss_fn = |m: &LlamaForCausalLM, b: &[(Tensor<2, Int>, Tensor<2>)]| {
        (m.causal_lm_loss(b[0].0.clone(), b[0].1.clone()), 18)
    };
    let config = TrainConfig {
        learning_rate: 1e-2,
        warmup_steps: 0,
        weight_decay: 0.1,
        steps,
        batch_size: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config);
    let first = trainer.step(&batch, loss_fn).loss;
    let mut last = first;
    while !trainer.is_done() {
        last = trainer.step(&batch, loss_fn).loss;
    }
    (first, last, trainer.into_model())
}

#[test]
fn only_the_selected_layers_modules_move() {
    let device = Device::flex().autodiff();
    let config = SelectConfig::new(&["attention", "norms"], &[1]);
    let base = llama(&device).to_tensors();
    let model = config.apply(llama(&device), "default").unwrap();
    // Layer 1's q and o (64x64), k and v (32x64, two key/value heads) and its two norms.
    assert_eq!(
        ParamReport::of(&model).trainable,
        2 * 64 * 64 + 2 * 32 * 64 + 2 * 64
    );

    let (first, last, model) = train(model, 6);
    assert!(last < first, "loss {first} -> {last}");
    let after = model.to_tensors();
    let selected = |k: &str| {
        k.starts_with("model.layers.1.self_attn.")
            || k.starts_with("model.layers.1.") && k.contains("layernorm")
    };
    let mut moved = 0;
    for (key, before) in base.tensors.iter() {
        let now = &after.tensors[key];
        if selected(key) {
            assert_ne!(before.data, now.data, "{key} did not train");
            moved += 1;
        } else {
            assert_eq!(before.data, now.data, "{key} moved but is not selected");
        }
    }
    assert_eq!(moved, 6);

    // Saved under the modules' own keys; loads back to the same model.
    let state = config.state(&model, "default").unwrap();
    let mut keys: Vec<&String> = state.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 6);
    assert_eq!(
        keys[0],
        "base_model.model.model.layers.1.input_layernorm.weight"
    );
    assert!(
        keys.iter()
            .all(|k| k.starts_with("base_model.model.model.layers.1."))
    );
    let fresh = config.apply(llama(&device), "default").unwrap();
    let loaded = config
        .load_state(fresh, "default", state, Path::new("mem"))
        .unwrap();
    let err = max_abs_diff(
        loaded.forward(ids(&device), None),
        model.forward(ids(&device), None),
    );
    assert_eq!(err, 0.0);
    // The weights are the model's own: merging changes nothing.
    let merged = config.merge(loaded, "default").unwrap();
    assert_eq!(
        max_abs_diff(
            merged.forward(ids(&device), None),
            model.forward(ids(&device), None)
        ),
        0.0
    );
}

#[test]
fn groups_split_berts_linears_as_its_layers_do() {
    let device = Device::flex().autodiff();
    let (h, inter, layers) = (32, 64, 2);
    let m = SelectConfig::new(&["mlp"], &[])
        .apply(bert(&device), "default")
        .unwrap();
    // intermediate.dense and output.dense, weights and biases; not attention.output.dense.
    assert_eq!(
        ParamReport::of(&m).trainable,
        layers * (inter * h + inter + h * inter + h)
    );
    let m = SelectConfig::new(&["attention"], &[])
        .apply(bert(&device), "default")
        .unwrap();
    assert_eq!(ParamReport::of(&m).trainable, layers * 4 * (h * h + h));
    // Biases only, as BitFit: every linear's and LayerNorm's bias (the pooler and head too).
    let m = SelectConfig::new(&["biases"], &[])
        .apply(bert(&device), "default")
        .unwrap();
    let norms = 1 + 2 * layers;
    let biases = layers * (4 * h + inter + h) + h + 3 + norms * h;
    assert_eq!(ParamReport::of(&m).trainable, biases);
}

#[test]
fn bad_selections_are_clear_errors() {
    let device = Device::flex();
    let err = |c: SelectConfig| c.apply(llama(&device), "default").unwrap_err().to_string();

    let e = err(SelectConfig::new(&["attn"], &[]));
    assert!(e.contains("`attn`") && e.contains("attention, mlp"), "{e}");
    let e = err(SelectConfig::new(&["attention"], &[99]));
    assert!(e.contains("layer 99") && e.contains("0..=1"), "{e}");
    // The tiny Llama has no biases.
    let e = err(SelectConfig::new(&["biases"], &[]));
    assert!(e.contains("no module"), "{e}");
    let e = err(SelectConfig::new(&[], &[]));
    assert!(e.contains("module_groups or target_modules"), "{e}");

    let json = serde_json::json!({"peft_type": "SELECT", "module_groups": ["mlp", "embedding"]});
    let e = SelectConfig::from_json(&json).unwrap_err().to_string();
    assert!(e.contains("`embedding`") && e.contains("embeddings"), "{e}");
    let json = serde_json::json!({"peft_type": "LORA"});
    assert!(SelectConfig::from_json(&json).is_err());
}

/// Child-Tuning-F's hook on the tiny Llama's layer-1 attention: each gradient entry is either 0
/// or the full gradient over `density`, about `density` of them are kept, the same step draws
/// the same mask (exact resume) and another step another one.
#[test]
fn child_tuning_f_masks_gradients_with_a_fresh_mask_per_step() {
    use burn::optim::GradientsParams;
    use peft_core::train::TrainHook;
    use peft_quant::BaseLinear;

    let device = Device::flex().autodiff();
    let config = SelectConfig {
        density: Some(0.25),
        ..SelectConfig::new(&["attention"], &[1])
    };
    let model = config.apply(llama(&device), "default").unwrap();
    let grads = || {
        let loss = model.causal_lm_loss(ids(&device), Tensor::ones([2, 9], &device));
        GradientsParams::from_grads(loss.backward(), &model)
    };
    let q = &model.model.layers[1].self_attn.q_proj;
    let BaseLinear::Dense(q) = &q.base else {
        unreachable!("dense tiny Llama")
    };
    let id = q.weight.id;
    let full: Vec<f32> = grads()
        .get::<2>(id)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    // The CPU backend's host loop, and the device generator other devices use.
    for device_rng in [false, true] {
        let masked = |step: usize| -> Vec<f32> {
            let mut g = grads();
            let mut hook = config.gradient_mask(&model, 7).unwrap().unwrap();
            if device_rng {
                hook = hook.with_device_rng();
            }
            hook.on_gradients(&model, &mut g, step);
            g.get::<2>(id)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        let step3 = masked(3);
        let mut kept = 0;
        for (m, f) in step3.iter().zip(&full) {
            if *m != 0.0 {
                assert!(
                    (m - f / 0.25).abs() <= 1e-6 * f.abs().max(1e-3),
                    "{m} vs {f}/0.25"
                );
                kept += 1;
            }
        }
        let share = kept as f64 / full.len() as f64;
        assert!(
            (share - 0.25).abs() < 0.05,
            "kept {share} (device rng: {device_rng})"
        );
        assert_eq!(masked(3), step3, "the same step draws the same mask");
        assert_ne!(masked(4), step3, "another step draws another mask");
    }

    let bad = SelectConfig {
        density: Some(0.0),
        ..SelectConfig::default()
    };
    let e = bad.apply(llama(&Device::flex()), "default").unwrap_err();
    assert!(e.to_string().contains("density 0"), "{e}");
}

#[test]
fn a_layer_past_the_model_is_named_with_the_range() {
    let device = Device::flex();
    let err = SelectConfig::new(&["attention"], &[1, 7])
        .apply(llama(&device), "default")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 7") && err.contains("2 layers") && err.contains("0..=1"),
        "{err}"
    );
}

/// The `embeddings` group: the embedding tables train whole (Llama's `embed_tokens`, BERT's
/// three tables), every other tensor stays bit-identical, and the saved state loads back.
#[test]
fn the_embeddings_group_trains_the_tables_only() {
    let device = Device::flex().autodiff();
    let config = SelectConfig::new(&["embeddings"], &[]);
    let base = llama(&device).to_tensors();
    let model = config.apply(llama(&device), "default").unwrap();
    assert_eq!(ParamReport::of(&model).trainable, 128 * 64);
    let (first, last, model) = train(model, 4);
    assert!(last < first, "loss {first} -> {last}");
    let after = model.to_tensors();
    for (k, t) in &base.tensors {
        let same = after.get(k).unwrap().data == t.data;
        assert_eq!(same, k != "model.embed_tokens.weight", "{k}");
    }
    let state = config.state(&model, "default").unwrap();
    let keys: Vec<&String> = state.keys().collect();
    assert_eq!(keys, ["base_model.model.model.embed_tokens.weight"]);
    let loaded = config
        .load_state(
            config.apply(llama(&device), "default").unwrap(),
            "default",
            state,
            Path::new("adapter_model.safetensors"),
        )
        .unwrap();
    let err = max_abs_diff(
        loaded.forward(ids(&device), None),
        model.forward(ids(&device), None),
    );
    assert_eq!(err, 0.0);

    let m = config.apply(bert(&device), "default").unwrap();
    let c = &m.config;
    let tables = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size;
    assert_eq!(ParamReport::of(&m).trainable, tables);
}
