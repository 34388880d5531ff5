//! Proxy-tuning against PyTorch (fixtures/proxy_tiny, scripts/make_fixtures.py --only proxy):
//! the tiny Llama with biases steered by the tiny Llama without plus a LoRA adapter (expert)
//! against the same without it (anti-expert), alpha 0.5.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::adapter_io::load_adapter;
use peft_core::tuner::Tuner;
use peft_lora::LoraConfig;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::load_causal_lm;
use peft_models::proxy::Proxy;
use peft_models::reference::{Expected, max_abs_diff};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tiny(name: &str, device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny").join(name), device)
        .unwrap()
        .model
}

fn expert(device: &Device) -> LlamaForCausalLM {
    let files = load_adapter(&fixtures().join("lora_tiny/list_rslora/adapter")).unwrap();
    let config = LoraConfig::from_json(&files.config).unwrap();
    config
        .apply_and_load(tiny("base_plain", device), "default", files)
        .unwrap()
}

#[test]
fn combined_logits_and_cached_greedy_decoding_match_pytorch() {
    let device = Device::flex();
    let exp = Expected::read(&fixtures().join("proxy_tiny/expected.safetensors")).unwrap();
    let (base, expert, anti) = (
        tiny("base_bias", &device),
        expert(&device),
        tiny("base_plain", &device),
    );
    let proxy = Proxy::new(&base, &expert, &anti, 0.5).unwrap();
    let logits = proxy.logits(exp.ids(&device), None);
    let err = max_abs_diff(logits.clone(), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PyTorch| = {err}");
    // The arithmetic itself, on our own three models' logits.
    let each = |m: &LlamaForCausalLM| m.forward(exp.ids(&device), None);
    let by_hand = each(&base) + (each(&expert) - each(&anti)).mul_scalar(0.5);
    assert_eq!(max_abs_diff(logits, by_hand), 0.0);
    // Decoding keeps a KV cache per model and gives PyTorch's tokens (which it got by full
    // forwards at every step).
    let ours: Vec<i64> = proxy
        .greedy(&exp.prompt(), 8, &[2])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);
    // Steering towards the expert changes the base's greedy text.
    let plain = peft_models::generate::greedy(&base, &exp.prompt(), 8, &[2]);
    assert_ne!(
        plain.iter().map(|&t| t as i64).collect::<Vec<_>>(),
        exp.greedy.clone().unwrap()
    );
}

#[test]
fn alpha_zero_is_the_base_and_alpha_one_over_itself_is_the_expert() {
    let device = Device::flex();
    let exp = Expected::read(&fixtures().join("proxy_tiny/expected.safetensors")).unwrap();
    let (base, expert) = (tiny("base_plain", &device), expert(&device));
    let ids = exp.ids(&device);
    let zero = Proxy::new(&base, &expert, &base, 0.0).unwrap();
    let err = max_abs_diff(
        zero.logits(ids.clone(), None),
        base.forward(ids.clone(), None),
    );
    assert_eq!(err, 0.0);
    // Steering a model by its own tuned copy with alpha 1 is the tuned copy.
    let one = Proxy::new(&base, &expert, &base, 1.0).unwrap();
    let err = max_abs_diff(one.logits(ids.clone(), None), expert.forward(ids, None));
    assert!(err < 1e-4, "{err}");
}

#[test]
fn models_with_other_vocabularies_are_refused_naming_both_sizes() {
    let device = Device::flex();
    let base = tiny("base_plain", &device);
    let mut config = base.config.clone();
    config.vocab_size = 96;
    let other = LlamaForCausalLM::random(config, &device).unwrap();
    let err = Proxy::new(&base, &other, &base, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("128") && err.contains("96") && err.contains("expert"),
        "{err}"
    );
    assert!(Proxy::new(&base, &base, &base, f64::NAN).is_err());
}
