//! LoRA training parity with PyTorch + Hugging Face PEFT 0.21.2 (fixtures/lora_train from
//! `scripts/make_fixtures.sh --only train`): the masked causal-LM loss, the LoRA gradients, and
//! five steps of our `Trainer` (AdamW with PyTorch's settings, global-norm clipping, warmup +
//! cosine schedule) against `torch.optim.AdamW` + `clip_grad_norm_` on the same batch.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use peft_core::adapter_io::{KEY_PREFIX, WEIGHTS_FILE, load_adapter};
use peft_core::tensors::HostTensor;
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost};
use peft_models::config::LlamaConfig;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::read_safetensors_folder;
use peft_models::train::{Example, batch, lm_batch_loss};
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny base with PEFT's initial (random A and B) adapter, on an autodiff CPU device.
fn initial_model(device: &Device) -> (LlamaForCausalLM, LoraConfig) {
    let dir = fixtures().join("lora_tiny/base_plain");
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let base = LlamaForCausalLM::from_tensors(
        config,
        read_safetensors_folder(&dir).unwrap(),
        &dir,
        device,
    )
    .unwrap();
    let files = load_adapter(&fixtures().join("lora_train/adapter_init")).unwrap();
    let lora = LoraConfig::from_json(&files.config).unwrap();
    let model = lora.apply(base, "default").unwrap();
    let model = lora
        .load_state(
            model,
            "default",
            files.tensors,
            &files.dir.join(WEIGHTS_FILE),
        )
        .unwrap();
    (model, lora)
}

/// The fixture's tensors, each as f64 values with its shape.
struct Expected(Vec<u8>);

impl Expected {
    fn load() -> Self {
        Self(std::fs::read(fixtures().join("lora_train/expected.safetensors")).unwrap())
    }

    fn get(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("expected.safetensors: {key}: {e}"));
        let values = match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{key}: unexpected dtype {other:?}"),
        };
        (t.shape().to_vec(), values)
    }

    /// The two training rows: right-padded tokens become shorter examples, as a user's data would.
    fn examples(&self) -> Vec<Example> {
        let (shape, ids) = self.get("input_ids");
        let (_, mask) = self.get("loss_mask");
        let seq = shape[1];
        (0..shape[0])
            .map(|row| {
                let ids = &ids[row * seq..(row + 1) * seq];
                let mask = &mask[row * seq..(row + 1) * seq];
                // Padding is the trailing run of id 0 outside the loss.
                let len = (0..seq)
                    .rev()
                    .find(|&i| ids[i] != 0.0 || mask[i] != 0.0)
                    .map_or(0, |i| i + 1);
                Example {
                    tokens: ids[..len].iter().map(|&t| t as u32).collect(),
                    loss_mask: mask[..len].iter().map(|&m| m as f32).collect(),
                }
            })
            .collect()
    }
}

/// Largest |a - b| relative to the largest |b|.
fn relative_error(ours: &[f32], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    err / scale.max(1e-30)
}

#[test]
fn loss_and_lora_gradients_match_pytorch() {
    let device = Device::flex().autodiff();
    let expected = Expected::load();
    let examples = expected.examples();
    assert_eq!(
        examples[1].tokens.len(),
        11,
        "the fixture's second row is padded"
    );
    let (model, _) = initial_model(&device);
    let (ids, mask) = batch(&examples, 0, &device);
    let loss = model.causal_lm_loss(ids, mask);
    let value: f32 = loss.clone().into_scalar();
    let theirs = expected.get("losses").1[0];
    assert!(
        (value as f64 - theirs).abs() < 1e-5 * theirs,
        "loss {value} vs PyTorch {theirs}"
    );

    let grads = loss.backward();
    let mut checked = 0;
    for (path, slot) in model.linears() {
        let Some(adapter) = slot.lora("default") else {
            continue;
        };
        // Ours are [in, r] and [r, out]; PyTorch's are the transposes.
        for (name, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let key = format!("grad.{KEY_PREFIX}{path}.{name}.weight");
            let grad: Tensor<2> = param
                .val()
                .grad(&grads)
                .unwrap_or_else(|| panic!("{key}: no gradient"));
            let ours = HostTensor::from_tensor(grad).transposed();
            let (shape, theirs) = expected.get(&key);
            assert_eq!(ours.shape, shape, "{key}");
            let err = relative_error(&ours.data, &theirs);
            assert!(err < 1e-4, "{key}: relative error {err}");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 3 * 2, "q, v and down in both layers, A and B");
}

#[test]
fn five_trainer_steps_match_torch_adamw() {
    let device = Device::flex().autodiff();
    let expected = Expected::load();
    let examples = expected.examples();
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora_train/train.json")).unwrap(),
    )
    .unwrap();
    let (model, lora) = initial_model(&device);
    let steps = settings["steps"].as_u64().unwrap() as usize;
    let config = TrainConfig {
        learning_rate: settings["lr"].as_f64().unwrap(),
        weight_decay: settings["weight_decay"].as_f64().unwrap(),
        warmup_steps: settings["warmup"].as_u64().unwrap() as usize,
        steps,
        // The whole fixture batch every step, so the data order cannot matter.
        batch_size: examples.len(),
        grad_accum: 1,
        max_grad_norm: settings["max_grad_norm"].as_f64(),
        seed: 0,
        // The fixture's schedule: warmup, cosine to 10% of the peak.
        ..Default::default()
    };
    let (losses, norms, lrs) = (
        expected.get("losses").1,
        expected.get("grad_norms").1,
        expected.get("learning_rates").1,
    );
    let max_norm = config.max_grad_norm.unwrap();
    assert!(
        norms.iter().any(|&n| n > max_norm) && norms.iter().any(|&n| n < max_norm),
        "the fixture should exercise both clipped and unclipped steps: {norms:?}"
    );
    let mut trainer = Trainer::new(model, config);
    for step in 0..steps {
        let r = trainer.step(&examples, |m, b| lm_batch_loss(m, b, 0));
        assert!(
            (r.learning_rate - lrs[step]).abs() < 1e-12,
            "step {step}: lr {} vs {}",
            r.learning_rate,
            lrs[step]
        );
        assert!(
            (r.loss - losses[step]).abs() < 1e-5 * losses[step],
            "step {step}: loss {} vs PyTorch {}",
            r.loss,
            losses[step]
        );
        assert!(
            (r.grad_norm - norms[step]).abs() < 1e-4 * norms[step],
            "step {step}: |g| {} vs PyTorch {}",
            r.grad_norm,
            norms[step]
        );
    }

    let ours = lora.state(trainer.model(), "default").unwrap();
    let theirs = load_adapter(&fixtures().join("lora_train/adapter_final"))
        .unwrap()
        .tensors;
    let init = load_adapter(&fixtures().join("lora_train/adapter_init"))
        .unwrap()
        .tensors;
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (key, t) in &theirs.tensors {
        let o = ours.get(key).unwrap();
        let start = init.get(key).unwrap();
        // Each weight moved by about lr per step; ours must land where PyTorch's did.
        let moved = t
            .data
            .iter()
            .zip(&start.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let err = o
            .data
            .iter()
            .zip(&t.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            moved > 1e-2,
            "{key}: PyTorch's training barely moved it ({moved})"
        );
        assert!(
            err < 1e-3 * moved,
            "{key}: trained weights differ from PyTorch's by {err} (they moved {moved})"
        );
    }
}
