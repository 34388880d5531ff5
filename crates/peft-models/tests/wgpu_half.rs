//! QLoRA on a GPU with an f16 compute type (wgpu; lavapipe where no GPU is present), the way
//! bitsandbytes' `bnb_4bit_compute_dtype` and Hugging Face PEFT run it: the 4-bit base and the
//! activations in f16, the norms, softmax and loss in f32, the LoRA weights and their AdamW
//! state in f32. Its own test binary: a device's default float type is set once per process.
#![cfg(feature = "wgpu")]

use burn::tensor::{DType, Device};
use peft_core::device::{device_by_name, with_compute_dtype};
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, quantize_base};
use peft_models::config::LlamaConfig;
use peft_models::llama::LlamaForCausalLM;
use peft_models::train::{Example, lm_batch_loss};

fn tiny_llama() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": false
    }))
    .unwrap()
}

/// QLoRA with LoRA r=8 on q, v, o, 20 AdamW steps on one batch: the losses, checking on the way
/// that the base computes in `compute` and the adapters in f32.
fn train(device: &Device, compute: DType) -> Vec<f64> {
    Device::flex().seed(5);
    let model = LlamaForCausalLM::random(tiny_llama(), device).unwrap();
    let model = quantize_base(model, peft_quant::QuantSpec::default()).unwrap();
    let model = LoraConfig::new(8, 16.0, &["q_proj", "v_proj", "o_proj"])
        .apply(model, "default")
        .unwrap();
    assert_eq!(
        model.model.norm.base.weight.val().dtype(),
        compute,
        "the base's compute type"
    );
    let slots = model.linears();
    let adapted: Vec<_> = slots
        .iter()
        .filter_map(|(path, slot)| Some((path, slot.lora("default")?)))
        .collect();
    assert_eq!(adapted.len(), 6, "q, v and o of both layers");
    for (path, adapter) in adapted {
        assert_eq!(
            (adapter.a.val().dtype(), adapter.b.val().dtype()),
            (DType::F32, DType::F32),
            "{path}: adapters stay f32"
        );
    }
    let data: Vec<Example> = (0..4u32)
        .map(|b| Example {
            tokens: (0..16u32).map(|i| (i * 7 + b * 3) % 64).collect(),
            loss_mask: vec![1.0; 16],
        })
        .collect();
    let config = TrainConfig {
        learning_rate: 1e-2,
        warmup_steps: 0,
        steps: 20,
        batch_size: 4,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config);
    (0..20)
        .map(|_| trainer.step(&data, |m, b| lm_batch_loss(m, b, 0)).loss)
        .collect()
}

/// The f16 run's losses stay finite, fall, and track the f32 run on the CPU (same model, same
/// data; the LoRA A draws differ between the devices' generators).
#[test]
fn qlora_trains_with_an_f16_compute_type_on_wgpu() {
    let gpu = with_compute_dtype(device_by_name("wgpu").unwrap(), "f16").unwrap();
    let half = train(&gpu.autodiff(), DType::F16);
    let full = train(&Device::flex().autodiff(), DType::F32);
    eprintln!("f16 on wgpu: {half:?}\nf32 on cpu: {full:?}");
    assert!(half.iter().all(|l| l.is_finite()), "{half:?}");
    assert!(half[19] < half[0] - 0.3, "the f16 run must learn: {half:?}");
    for (step, (h, f)) in half.iter().zip(&full).enumerate() {
        assert!(
            (h - f).abs() < 0.03 * f,
            "step {step}: f16 loss {h} vs f32 loss {f}"
        );
    }
}
