//! SSF (scale and shift of features) on the tiny Llama and the tiny BERT classifier: it starts
//! as the base, trains only its vectors, saves and loads, and merges exactly, LayerNorms
//! included; a merged Llama with new biases reads back from its checkpoint with the same logits.
//! No reference implementation exists (PEFT and AdapterHub have no SSF): these are the
//! method's defining properties.

mod common;

use std::path::Path;

use burn::tensor::{Device, Int, Tensor};
use common::{bert, fixtures, llama, train_alternating};
use peft_adapter::SsfConfig;
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::llama::LlamaForCausalLM;
use peft_models::reference::{Expected, max_abs_diff};
use peft_sites::{SiteHost, merge_and_unload};

fn ids(device: &Device) -> Tensor<2, Int> {
    Expected::read(&fixtures().join("lora_tiny/list_rslora/expected.safetensors"))
        .unwrap()
        .ids(device)
}

/// The model a Hugging Face checkpoint of `model` (its config and tensors) loads as.
fn read_back(model: &LlamaForCausalLM, device: &Device) -> LlamaForCausalLM {
    LlamaForCausalLM::from_tensors(
        model.config.clone(),
        model.to_tensors(),
        Path::new("x"),
        device,
    )
    .unwrap()
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
    let (first, last, _) = train_alternating(model, 5e-2, 30, |_| None);
    assert!(last < first * 0.8, "loss {first} -> {last}");
}

#[test]
fn llama_merges_exactly_and_its_checkpoint_holds_the_new_biases() {
    let device = Device::flex();
    device.seed(9);
    // The default linears and both RMSNorms of each layer.
    let mut config = random_init().with_defaults("llama").unwrap();
    if let Some(peft_core::target::ModuleSelector::List(names)) = &mut config.target_modules {
        names.extend(["input_layernorm".into(), "post_attention_layernorm".into()]);
    }
    let model = config.apply(llama(&device), "default").unwrap();
    let unmerged = model.forward(ids(&device), None);
    assert!(max_abs_diff(unmerged.clone(), llama(&device).forward(ids(&device), None)) > 1e-3);
    // Save and load: the same model.
    let state = config.state(&model, "default").unwrap();
    for key in [
        "base_model.model.model.layers.0.self_attn.q_proj.ssf_scale",
        "base_model.model.model.layers.1.post_attention_layernorm.ssf_shift",
    ] {
        assert!(state.keys().any(|k| k == key), "{key}");
    }
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
    let back = read_back(&plain, &device);
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

/// An RMSNorm's shift alone (no linear targeted): merged, it moves into the biases of the
/// linears after the norm, exactly; on the final norm it would need a bias on the output head,
/// which a Llama checkpoint cannot hold: an error naming the norm.
#[test]
fn rmsnorm_shifts_move_into_the_next_linears_and_the_final_norm_is_refused() {
    let device = Device::flex();
    device.seed(11);
    let only = |names: &[&str]| SsfConfig {
        target_modules: Some(peft_core::target::ModuleSelector::List(
            names.iter().map(|s| s.to_string()).collect(),
        )),
        init_ssf_weights: false,
        ..Default::default()
    };
    let config = only(&["input_layernorm", "post_attention_layernorm"]);
    let model = config.apply(llama(&device), "default").unwrap();
    let unmerged = model.forward(ids(&device), None);
    assert!(max_abs_diff(unmerged.clone(), llama(&device).forward(ids(&device), None)) > 1e-3);
    let plain = merge_and_unload(config.merge(model, "default").unwrap())
        .unwrap()
        .complete_biases()
        .unwrap();
    assert!(plain.config.attention_bias && plain.config.mlp_bias);
    let back = read_back(&plain, &device);
    let err = max_abs_diff(back.forward(ids(&device), None), unmerged);
    assert!(err < 1e-5, "checkpoint vs unmerged: {err}");

    let config = only(&["model.norm"]);
    let model = config.apply(llama(&device), "default").unwrap();
    let err = merge_and_unload(config.merge(model, "default").unwrap())
        .unwrap()
        .complete_biases()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.norm") && err.contains("output head"),
        "{err}"
    );
}

#[test]
fn unknown_adapters_are_clear_errors() {
    let device = Device::flex();
    let err = SsfConfig::default()
        .merge(llama(&device), "nope")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
