//! Loading Hugging Face folders (f32/f16/bf16, sharded) and GGUF files, and the errors for
//! bad input.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::tensors::{StoredDtype, TensorMap};
use peft_models::config::LlamaConfig;
use peft_models::gguf::GgufFile;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_causal_lm, read_safetensors_folder};

fn base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora_tiny/base_plain")
}

fn logits(model: &LlamaForCausalLM, device: &Device) -> Tensor<3> {
    let ids: Vec<i64> = (0..10).map(|i| (i * 13 % 128) as i64).collect();
    model.forward(
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 10]), device),
        None,
    )
}

fn load_dir(dir: &Path, device: &Device) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    LlamaForCausalLM::from_tensors(config, read_safetensors_folder(dir).unwrap(), dir, device)
        .unwrap()
}

#[test]
fn half_precision_and_sharded_checkpoints_load() {
    let device = Device::flex();
    let reference = logits(&load_dir(&base_dir(), &device), &device);
    let all = read_safetensors_folder(&base_dir()).unwrap();
    for dtype in [StoredDtype::F16, StoredDtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            base_dir().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        // Two shards, as large checkpoints come.
        let (mut a, mut b) = (TensorMap::new(), TensorMap::new());
        for (i, (k, t)) in all.tensors.iter().enumerate() {
            let shard = if i % 2 == 0 { &mut a } else { &mut b };
            shard.insert(k.clone(), t.clone().with_dtype(dtype));
        }
        a.write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"))
            .unwrap();
        b.write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"))
            .unwrap();
        let ours = logits(&load_dir(dir.path(), &device), &device);
        let err: f32 = (ours - reference.clone()).abs().max().into_scalar();
        let tol = if dtype == StoredDtype::F16 { 0.02 } else { 0.1 };
        assert!(err < tol, "{dtype:?}: {err}");
    }
}

#[test]
fn missing_config_and_weights_are_named() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let err = load_causal_lm(dir.path(), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        base_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_causal_lm(dir.path(), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
    let err = load_causal_lm(&dir.path().join("nope.gguf"), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.gguf"), "{err}");
}

#[test]
fn a_tensor_with_the_wrong_shape_is_named() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        base_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut all = read_safetensors_folder(&base_dir()).unwrap();
    let key = "model.layers.1.mlp.up_proj.weight";
    let t = all.remove(key).unwrap();
    all.insert(
        key,
        peft_core::tensors::HostTensor::new(vec![t.shape[1], t.shape[0]], t.data),
    );
    all.write_safetensors(&dir.path().join("model.safetensors"))
        .unwrap();
    let config = LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
    let err = LlamaForCausalLM::from_tensors(
        config,
        read_safetensors_folder(dir.path()).unwrap(),
        dir.path(),
        &device,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains(key) && err.contains("[64, 128]"), "{err}");
}

/// A minimal GGUF v3 file with one tensor of ggml type `ty` (raw bytes given).
fn write_gguf(path: &Path, ty: u32, dims: &[u64], data: &[u8]) {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // kv
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "blk.0.ffn_up.weight");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(data);
    std::fs::File::create(path).unwrap().write_all(&b).unwrap();
}

#[test]
fn gguf_tensors_and_unsupported_types() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    // Q8_0: one block of 32 values, scale 0.5.
    let mut q = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q.extend((0..32).map(|i| i as u8));
    write_gguf(&p, 8, &[32, 1], &q);
    let f = GgufFile::open(&p).unwrap();
    let t = f.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(t.shape, vec![1, 32]);
    assert_eq!(t.data[3], 1.5);
    // Q6_K (type 14) is not supported: the error names the file, tensor and type.
    write_gguf(&p, 14, &[256, 1], &[0u8; 210]);
    let err = GgufFile::open(&p)
        .unwrap()
        .tensor("blk.0.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.gguf") && err.contains("blk.0.ffn_up.weight") && err.contains("Q6_K"),
        "{err}"
    );
    // Truncated data is an error, not a crash.
    write_gguf(&p, 8, &[64, 1], &q);
    let err = GgufFile::open(&p)
        .unwrap()
        .tensor("blk.0.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the end"), "{err}");
    // Missing llama metadata is named.
    let err = load_causal_lm(&p, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("t.gguf: missing metadata `"), "{err}");
}

/// `LlamaForCausalLM::random` builds the tiny fixture's architecture with every weight frozen;
/// `unfreeze_all` makes all of them trainable (full fine-tuning), and the model trains.
#[test]
fn random_model_builds_and_unfreezes_for_full_fine_tuning() {
    use peft_core::params::{ParamReport, unfreeze_all};
    use peft_core::train::{TrainConfig, Trainer};
    use peft_models::train::{Example, lm_batch_loss};

    let config = LlamaConfig::from_file(&base_dir().join("config.json")).unwrap();
    let device = Device::flex().autodiff();
    Device::flex().seed(3);
    let model = LlamaForCausalLM::random(config.clone(), &device).unwrap();
    let expected_all: usize = load_dir(&base_dir(), &device).to_tensors().keys().count();
    assert_eq!(
        model.to_tensors().keys().count(),
        expected_all,
        "same tensors as the checkpoint"
    );
    let report = ParamReport::of(&model);
    assert_eq!(report.trainable, 0, "a freshly built model is frozen");
    let embed = model
        .to_tensors()
        .get("model.embed_tokens.weight")
        .unwrap()
        .data
        .clone();
    let std = (embed.iter().map(|v| v * v).sum::<f32>() / embed.len() as f32).sqrt();
    assert!(
        (std - 0.02).abs() < 0.002,
        "weights drawn with std 0.02, got {std}"
    );
    assert_eq!(logits(&model, &device).dims(), [1, 10, config.vocab_size]);

    let model = unfreeze_all(model);
    let report = ParamReport::of(&model);
    assert_eq!(report.trainable, report.all);
    let data = vec![Example {
        tokens: (0..16).map(|i| i * 7 % 128).collect(),
        loss_mask: vec![1.0; 16],
    }];
    let config = TrainConfig {
        learning_rate: 1e-2,
        warmup_steps: 0,
        steps: 8,
        batch_size: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config);
    let first = trainer.step(&data, |m, b| lm_batch_loss(m, b, 0)).loss;
    let mut last = first;
    while !trainer.is_done() {
        last = trainer.step(&data, |m, b| lm_batch_loss(m, b, 0)).loss;
    }
    assert!(
        last < first * 0.8,
        "full fine-tuning did not lower the loss: {first} -> {last}"
    );
}
