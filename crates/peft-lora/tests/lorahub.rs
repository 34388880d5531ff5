//! LoRAHub on the tiny Llama: an adapter trained on the new task's examples and one trained on
//! other text are composed for those examples; the search puts its weight on the right
//! adapter, beats the uniform average, and leaves the model holding the composition it found
//! (`Σ wᵢ·Aᵢ`, `Σ wᵢ·Bᵢ`).

mod common;

use burn::tensor::Device;
use common::llama;
use peft_core::tensors::TensorMap;
use peft_core::train::TrainConfig;
use peft_core::tuner::Tuner;
use peft_lora::lorahub::{Composer, LoraHubConfig, lorahub};
use peft_lora::{AdapterToCombine, LoraConfig};
use peft_models::llama::LlamaForCausalLM;
use peft_models::train::{Example, eval_loss, train};

/// Four sequences of a fixed pattern of tokens from `start` (a "task").
fn task(start: u32) -> Vec<Example> {
    (0..4)
        .map(|k| {
            let tokens: Vec<u32> = (0..10).map(|i| start + ((i * 7 + k) % 13)).collect();
            Example {
                loss_mask: vec![1.0; tokens.len()],
                tokens,
            }
        })
        .collect()
}

/// A LoRA adapter (rank 2 on q and v, alpha `alpha`) trained 30 steps on `data`.
fn trained(config: &LoraConfig, data: &[Example]) -> TensorMap {
    let device = Device::flex().autodiff();
    let model = config.apply(llama(&device), "default").unwrap();
    let model = train(
        model,
        data,
        &TrainConfig {
            learning_rate: 0.05,
            warmup_steps: 0,
            steps: 30,
            batch_size: 4,
            ..Default::default()
        },
        0,
        |_| {},
    );
    config.state(&model, "default").unwrap()
}

#[test]
fn lorahub_weights_the_adapter_of_the_task_and_beats_the_uniform_average() {
    let (mine, other) = (task(20), task(90));
    // Different alphas: the second adapter's scaling is folded into its B.
    let c1 = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    let c2 = LoraConfig::new(2, 8.0, &["q_proj", "v_proj"]);
    let t_mine = trained(&c1, &mine);
    let t_other = trained(&c2, &other);
    let adapters = [
        AdapterToCombine {
            label: "other",
            config: &c2,
            tensors: &t_other,
        },
        AdapterToCombine {
            label: "mine",
            config: &c1,
            tensors: &t_mine,
        },
    ];
    let composer = Composer::new(&adapters).unwrap();
    assert_eq!(
        composer.config().lora_alpha,
        8.0,
        "the first adapter's config"
    );

    let device = Device::flex();
    let loss = |m: &LlamaForCausalLM| eval_loss(m, &mine, 4, 0);
    let base_loss = loss(&llama(&device));
    let config = LoraHubConfig {
        max_evals: 60,
        ..Default::default()
    };
    let mut seen = 0;
    let (model, result) = lorahub(
        llama(&device),
        &composer,
        "hub",
        &config,
        loss,
        |e, best| {
            seen += 1;
            assert!(best.objective <= e.objective);
        },
    )
    .unwrap();
    assert_eq!(seen, result.history.len());
    assert!(
        result.history.len() <= 60,
        "{} evaluations",
        result.history.len()
    );
    for e in &result.history {
        assert!(e.weights.iter().all(|w| w.abs() <= 1.5), "{:?}", e.weights);
        assert!(result.best.objective <= e.objective);
        let penalty = 0.05 * (e.weights[0].abs() + e.weights[1].abs()) / 2.0;
        assert!((e.objective - e.loss - penalty).abs() < 1e-12);
    }
    let best = &result.best;
    // The model holds the best composition.
    assert!(
        (loss(&model) - best.loss).abs() < 1e-6,
        "{} vs {}",
        loss(&model),
        best.loss
    );
    // Its weight goes to the adapter of the task.
    assert!(
        best.weights[1] > best.weights[0].abs() + 0.3,
        "weights {:?}",
        best.weights
    );
    // Better than the uniform average and than the base.
    let uniform =
        peft_lora::lorahub::load_composition(model, &composer, "hub", &[0.5, 0.5]).unwrap();
    let uniform_loss = loss(&uniform);
    eprintln!(
        "base {base_loss:.4}, uniform {uniform_loss:.4}, LoRAHub {:.4} at {:?}",
        best.loss, best.weights
    );
    assert!(
        best.loss < uniform_loss - 0.05,
        "{} vs uniform {uniform_loss}",
        best.loss
    );
    assert!(
        best.loss < base_loss - 0.05,
        "{} vs base {base_loss}",
        best.loss
    );

    // The saved composition is Σ wᵢ·Aᵢ and Σ wᵢ·(sᵢ/s₁)·Bᵢ.
    let state = composer.config().state(&uniform, "hub").unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    for (which, rel) in [("A", [1.0f32, 1.0]), ("B", [1.0, 0.5])] {
        let k = format!("{key}.lora_{which}.weight");
        let (x, y, z) = (
            t_other.get(&k).unwrap(),
            t_mine.get(&k).unwrap(),
            state.get(&k).unwrap(),
        );
        for i in 0..z.data.len() {
            let want = 0.5 * rel[0] * x.data[i] + 0.5 * rel[1] * y.data[i];
            assert!(
                (z.data[i] - want).abs() < 1e-6,
                "{k}[{i}]: {} vs {want}",
                z.data[i]
            );
        }
    }
}

#[test]
fn adapters_that_cannot_be_composed_are_refused() {
    let c = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    let c_q = LoraConfig::new(2, 4.0, &["q_proj"]);
    let c_r4 = LoraConfig::new(4, 4.0, &["q_proj", "v_proj"]);
    let device = Device::flex();
    let state = |cfg: &LoraConfig| {
        cfg.state(&cfg.apply(llama(&device), "d").unwrap(), "d")
            .unwrap()
    };
    let (t, t_q, t_r4) = (state(&c), state(&c_q), state(&c_r4));
    let err = |x: &LoraConfig, tx: &TensorMap, y: &LoraConfig, ty: &TensorMap| {
        let adapters = [
            AdapterToCombine {
                label: "one",
                config: x,
                tensors: tx,
            },
            AdapterToCombine {
                label: "two",
                config: y,
                tensors: ty,
            },
        ];
        match Composer::new(&adapters) {
            Ok(_) => panic!("composed"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(&c, &t, &c_q, &t_q);
    assert!(e.contains("one adapts") && e.contains("v_proj"), "{e}");
    let e = err(&c, &t, &c_r4, &t_r4);
    assert!(e.contains("rank 2 in one and 4 in two"), "{e}");
    let mut pissa = c.clone();
    pissa.init_lora_weights = peft_lora::InitLoraWeights::Method("pissa".into());
    let e = err(&c, &t, &pissa, &t);
    assert!(e.contains("two: init_lora_weights"), "{e}");

    let adapters = [AdapterToCombine {
        label: "one",
        config: &c,
        tensors: &t,
    }];
    let composer = Composer::new(&adapters).unwrap();
    let e = composer.compose(&[0.5, 0.5]).unwrap_err().to_string();
    assert!(e.contains("2 weights for 1 adapters"), "{e}");
    let e = composer.compose(&[f64::NAN]).unwrap_err().to_string();
    assert!(e.contains("not a finite number"), "{e}");
}
