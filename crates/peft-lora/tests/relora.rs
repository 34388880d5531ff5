//! ReLoRA: a restart keeps the model's output, the cycles add up to an update of rank above
//! `r`, the saved adapter is a plain LoRA adapter that gives the trained model's output on the
//! original base (in PEFT's format), and a run resumes from it.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::llama;
use peft_core::adapter_io::load_adapter;
use peft_core::train::{TrainConfig, TrainHook, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::relora::{finished_cycles, restart};
use peft_lora::{
    LoraConfig, ReloraConfig, SiteHost, linalg, merge_and_unload_state, quantize_base,
};
use peft_models::llama::LlamaForCausalLM;
use peft_models::reference::max_abs_diff;
use peft_quant::QuantSpec;

fn config(steps: usize) -> ReloraConfig {
    ReloraConfig::new(LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]), steps)
}

fn ids(device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = (0..2 * 9)
        .map(|i| if i % 3 == 0 { 17 } else { 42 + i })
        .collect();
    Tensor::from_data(TensorData::new(v, [2, 9]), device)
}

/// Train `model` `steps` steps (lr 0.05) with ReLoRA's hook on a fixed batch.
fn train(model: LlamaForCausalLM, c: &ReloraConfig, steps: usize) -> LlamaForCausalLM {
    let device = model.device();
    let examples = vec![(ids(&device), Tensor::<2>::ones([2, 9], &device))];
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            learning_rate: 0.05,
            warmup_steps: 0,
            steps,
            batch_size: 1,
            ..Default::default()
        },
    )
    .with_hook(c.hook("default", steps));
    for _ in 0..steps {
        trainer.step(
            &examples,
            |m: &LlamaForCausalLM, b: &[(Tensor<2, Int>, Tensor<2>)]| {
                (m.causal_lm_loss(b[0].0.clone(), b[0].1.clone()), 16)
            },
        );
    }
    trainer.into_model()
}

/// The singular values of `[out, in]` `ΔW` of `path` between two models (burn layout in).
fn delta_singular_values(
    after: &LlamaForCausalLM,
    before: &LlamaForCausalLM,
    path: &str,
) -> Vec<f64> {
    let w = |m: &LlamaForCausalLM| {
        m.linears()
            .into_iter()
            .find(|(p, _)| p == path)
            .unwrap()
            .1
            .base
            .weight_hf()
    };
    let (a, b) = (w(after), w(before));
    let d: Vec<f32> = a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
    linalg::svd(&d, a.shape[0], a.shape[1], a.shape[0].min(a.shape[1]))
        .unwrap()
        .s
}

#[test]
fn a_restart_keeps_the_output_and_starts_the_adapter_again() {
    let device = Device::flex().autodiff();
    for quantized in [false, true] {
        let base = if quantized {
            quantize_base(llama(&device), QuantSpec::default()).unwrap()
        } else {
            llama(&device)
        };
        let c = config(3);
        let model = train(c.apply(base, "default").unwrap(), &config(1000), 3);
        let before = model.forward(ids(&device), None);
        let mut model = model;
        restart(&mut model, "default").unwrap();
        assert_eq!(finished_cycles(&model, "default"), 1);
        let err = max_abs_diff(model.forward(ids(&device), None), before);
        assert!(
            err < 1e-5,
            "quantized {quantized}: a restart changes nothing ({err})"
        );
        for (_, s) in model.linears() {
            if let Some(a) = s.lora("default") {
                assert_eq!(
                    a.b.val().abs().sum().into_scalar::<f32>(),
                    0.0,
                    "B starts at 0"
                );
            }
        }
    }
}

#[test]
fn cycles_reach_a_rank_above_r_and_save_as_a_plain_lora_adapter() {
    let device = Device::flex().autodiff();
    let c = config(4);
    let trained = train(c.apply(llama(&device), "default").unwrap(), &c, 12);
    assert_eq!(
        finished_cycles(&trained, "default"),
        2,
        "restarts after steps 4 and 8"
    );
    let out = trained.forward(ids(&device), None);

    // The accumulated update of one layer: rank above r = 2.
    let path = "model.layers.0.self_attn.q_proj";
    let merged = merge_and_unload_state(c.merge(trained.clone(), "default").unwrap()).unwrap();
    let s = delta_singular_values(&merged, &llama(&device), path);
    let rank = s.iter().filter(|v| **v > 1e-4 * s[0]).count();
    assert!(
        rank > 2,
        "rank {rank} of the accumulated update ({:?})",
        &s[..8.min(s.len())]
    );

    // Saved: a plain LoRA adapter, rank 2·3, alpha 4·3.
    let dir = tempfile::tempdir().unwrap();
    c.save(&trained, "default", dir.path()).unwrap();
    let files = load_adapter(dir.path()).unwrap();
    assert_eq!(files.config["r"], 6);
    assert_eq!(files.config["lora_alpha"], 12);
    let plain = LoraConfig::from_json(&files.config).unwrap();
    let loaded = plain
        .apply_and_load(llama(&device), "default", load_adapter(dir.path()).unwrap())
        .unwrap();
    let err = max_abs_diff(loaded.forward(ids(&device), None), out.clone());
    assert!(
        err < 1e-5,
        "the plain LoRA adapter is the trained model ({err})"
    );

    // Resumed: the cycles come back (merged in the same order) with the live adapter last.
    let back = c.apply_and_load(llama(&device), "default", files).unwrap();
    assert_eq!(finished_cycles(&back, "default"), 2);
    let err = max_abs_diff(back.forward(ids(&device), None), out);
    assert!(err < 1e-5, "reloaded cycles ({err})");
}

#[test]
fn the_learning_rate_warms_up_after_each_restart_and_bad_settings_are_refused() {
    let mut c = config(10);
    c.relora_warmup = 4;
    let hook = c.hook("default", 100);
    let f = |s| <_ as TrainHook<LlamaForCausalLM>>::lr_factor(&hook, s);
    assert_eq!(
        [f(0), f(9), f(10), f(11), f(13), f(14)],
        [1.0, 1.0, 0.25, 0.5, 1.0, 1.0]
    );
    let mut bad = config(0);
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("relora_steps")
    );
    bad.relora_steps = 5;
    bad.lora.use_dora = true;
    assert!(bad.validate().unwrap_err().to_string().contains("use_dora"));
}
