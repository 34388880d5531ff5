//! Memory of LoRA and QLoRA training on SmolLM2-135M (CPU): bytes the model holds, and the
//! peak during a training step, counted by a global allocator (the CPU backend allocates every
//! tensor through it). Run: `cargo bench -p peft-models --bench train_memory` (needs
//! `cargo xtask fetch`). Prints a table and one JSON line per method.

use burn::tensor::Device;
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, quantize_base};
use peft_models::load::load_causal_lm;
use peft_models::train::{Example, lm_batch_loss};
use peft_quant::{BaseLinear, QuantSpec};

#[global_allocator]
static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;

const MB: f64 = 1024.0 * 1024.0;

struct Measured {
    method: &'static str,
    linear_weights: usize,
    linear_bytes: usize,
    model_bytes: usize,
    step_peak: usize,
}

fn measure(method: &'static str, quant: Option<QuantSpec>) -> Measured {
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} missing: run `cargo xtask fetch` first",
        gguf.display()
    );
    let device = Device::flex().autodiff();
    device.seed(0);
    let model = load_causal_lm(&gguf, &device).expect("load SmolLM2").model;
    let model = match quant {
        Some(spec) => quantize_base(model, spec).expect("quantize"),
        None => model,
    };
    let (mut linear_weights, mut linear_bytes) = (0, 0);
    for (path, s) in model.linears() {
        if path == "lm_head" {
            continue;
        }
        linear_weights += s.base.d_input() * s.base.d_output();
        linear_bytes += match &s.base {
            BaseLinear::Quant4(q) => q.quantized().storage_bytes(),
            BaseLinear::Dense(_) => s.base.d_input() * s.base.d_output() * 4,
        };
    }
    let model = LoraConfig::new(16, 32.0, &["q_proj", "v_proj"])
        .apply(model, "default")
        .expect("apply");
    let model_bytes = peft_core::alloc::live_bytes();
    // Batch 4 x 128 tokens, as in the Python comparison in shared DESIGN.md.
    let data: Vec<Example> = (0..8u32)
        .map(|b| Example {
            tokens: (0..128).map(|i| (i * 31 + b * 977) % 49152).collect(),
            loss_mask: vec![1.0; 128],
        })
        .collect();
    let config = TrainConfig {
        steps: 3,
        batch_size: 4,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config);
    // The first step creates the optimizer state; measure the second.
    trainer.step(&data, |m, b| lm_batch_loss(m, b, 0));
    peft_core::alloc::reset_peak();
    trainer.step(&data, |m, b| lm_batch_loss(m, b, 0));
    let step_peak = peft_core::alloc::peak_bytes();
    Measured {
        method,
        linear_weights,
        linear_bytes,
        model_bytes,
        step_peak,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: skip the slow work.
    if !std::env::args().any(|a| a == "--bench") {
        println!("train_memory: run with `cargo bench -p peft-models --bench train_memory`");
        return;
    }
    let runs = [
        measure("lora", None),
        measure("qlora", Some(QuantSpec::default())),
    ];
    println!(
        "| method | linear weights | their bytes | bits/weight | model resident | peak in a step (batch 4x128) |"
    );
    println!("|---|---|---|---|---|---|");
    for m in &runs {
        println!(
            "| {} | {} | {:.1} MiB | {:.2} | {:.1} MiB | {:.1} MiB |",
            m.method,
            m.linear_weights,
            m.linear_bytes as f64 / MB,
            m.linear_bytes as f64 * 8.0 / m.linear_weights as f64,
            m.model_bytes as f64 / MB,
            m.step_peak as f64 / MB
        );
    }
    for m in &runs {
        println!(
            "{}",
            serde_json::json!({"bench": "train_memory", "method": m.method, "linear_weights": m.linear_weights,
                "linear_bytes": m.linear_bytes, "model_bytes": m.model_bytes, "step_peak_bytes": m.step_peak})
        );
    }
}
