//! DoRA (`use_dora`) against Hugging Face PEFT 0.21.2: adapters saved by Python load here
//! with the same logits, greedy text and gradients (tiny Llama; tiny BERT classifier with
//! biases), ours save under the same keys, merge exactly, and work over a 4-bit base (QDoRA)
//! as PEFT's does: on the dequantized weight. Fixtures: `scripts/make_fixtures.py --only dora`.

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor};
use common::{fixtures, llama};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, dequantize_base, merge_and_unload_state, quantize_base};
use peft_models::bert::BertForSequenceClassification;
use peft_models::generate::greedy;
use peft_models::load::load_bert_classifier;
use peft_models::reference::{Expected, max_abs_diff};
use peft_quant::QuantSpec;

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("methods_tiny").join(case)
}

fn bert(device: &Device) -> BertForSequenceClassification {
    load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, device)
        .unwrap()
        .0
}

/// The fixture adapter of `case` applied and loaded onto `model`.
fn loaded<M: SiteHost>(case: &str, model: M) -> (M, LoraConfig) {
    let files = load_adapter(&case_dir(case).join("adapter")).unwrap();
    let config = LoraConfig::from_json(&files.config).unwrap();
    assert!(config.use_dora);
    let model = config.apply(model, "default").unwrap();
    let model = config
        .load_state(
            model,
            "default",
            files.tensors,
            &files.dir.join(WEIGHTS_FILE),
        )
        .unwrap();
    (model, config)
}

fn expected(case: &str) -> Expected {
    Expected::read(&case_dir(case).join("expected.safetensors")).unwrap()
}

#[test]
fn python_llama_dora_gives_the_same_logits_and_greedy_text() {
    let device = Device::flex();
    let exp = expected("dora_llama");
    let base_err = max_abs_diff(
        llama(&device).forward(exp.ids(&device), None),
        exp.logits(&device),
    );
    assert!(
        base_err > 1e-3,
        "the adapter must change the output ({base_err})"
    );
    let (model, _) = loaded("dora_llama", llama(&device));
    let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    // The tiny config's end-of-sequence token is 2: Python stops there.
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[2])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);
}

#[test]
fn python_bert_dora_with_biases_and_its_classifier_gives_the_same_logits() {
    let device = Device::flex();
    let exp = expected("dora_bert");
    let (model, _) = loaded("dora_bert", bert(&device));
    let (ids, mask) = exp.padded_batch(&device);
    let err = max_abs_diff(model.forward(ids, mask), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
}

/// Relative error `max |a − b| / max |b|`.
fn relative(ours: Tensor<1>, theirs: Tensor<1>) -> f32 {
    let scale: f32 = theirs.clone().abs().max().into_scalar();
    let diff: f32 = (ours - theirs).abs().max().into_scalar();
    diff / scale.max(1e-12)
}

#[test]
fn loss_and_gradients_match_pytorch_with_the_norm_detached() {
    let device = Device::flex().autodiff();
    let (model, _) = loaded("dora_llama", llama(&device));
    let grads_file = case_dir("dora_llama").join("grads.safetensors");
    let theirs = TensorMap::read_safetensors(&grads_file).unwrap();
    let exp = expected("dora_llama");
    let ids: Tensor<2, Int> = exp.ids(&device);
    let loss = model.causal_lm_loss(ids.clone(), Tensor::ones(ids.dims(), &device));
    let their_loss = theirs.get("loss").unwrap().to_tensor::<1>(&Device::flex());
    let loss_err = relative(loss.clone().inner(), their_loss);
    assert!(loss_err < 1e-5, "loss differs by {loss_err} (relative)");
    let grads = loss.backward();
    let mut checked = 0;
    for (path, s) in model.linears() {
        let Some(a) = s.lora("default") else { continue };
        let key = |name: &str| format!("base_model.model.{path}.{name}.default.weight");
        let theirs = |name: &str| {
            theirs
                .get(&key(name))
                .unwrap_or_else(|| panic!("no {}", key(name)))
                .clone()
        };
        let flat = |t: Tensor<2>| {
            let n = t.shape().num_elements();
            t.reshape([n])
        };
        let cpu = Device::flex();
        let ga = a.a.val().grad(&grads).unwrap();
        let gb = a.b.val().grad(&grads).unwrap();
        let m = a.magnitude.as_ref().expect("DoRA");
        let gm = m.value.val().grad(&grads).unwrap();
        let pairs = [
            (
                "lora_A",
                flat(ga),
                flat(theirs("lora_A").transposed().to_tensor(&cpu)),
            ),
            (
                "lora_B",
                flat(gb),
                flat(theirs("lora_B").transposed().to_tensor(&cpu)),
            ),
            (
                "lora_magnitude_vector",
                gm,
                theirs("lora_magnitude_vector").to_tensor(&cpu),
            ),
        ];
        for (name, ours, theirs) in pairs {
            let err = relative(ours, theirs);
            assert!(
                err < 1e-4,
                "{path}.{name}: gradient differs by {err} (relative)"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 18,
        "every A, B and magnitude of the 6 adapted layers"
    );
}

#[test]
fn saved_dora_has_the_python_keys_shapes_and_values() {
    let device = Device::flex();
    let theirs = load_adapter(&case_dir("dora_llama").join("adapter")).unwrap();
    let (model, config) = loaded("dora_llama", llama(&device));
    let out = tempfile::tempdir().unwrap();
    config.save(&model, "default", out.path()).unwrap();
    let ours = load_adapter(out.path()).unwrap();
    assert_eq!(ours.tensors.tensors.len(), theirs.tensors.tensors.len());
    for (k, t) in &theirs.tensors.tensors {
        let mine = ours
            .tensors
            .get(k)
            .unwrap_or_else(|| panic!("we did not save {k}"));
        assert_eq!(mine.shape, t.shape, "{k}");
        assert_eq!(mine.data, t.data, "{k} round-trips bit for bit");
    }
    assert_eq!(ours.config["use_dora"], serde_json::json!(true));
}

#[test]
fn new_dora_starts_as_the_base_and_merges_exactly() {
    let device = Device::flex();
    let exp = expected("dora_llama");
    let base = llama(&device);
    let base_logits = base.forward(exp.ids(&device), None);
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    config.use_dora = true;
    let fresh = config.apply(llama(&device), "default").unwrap();
    let err = max_abs_diff(fresh.forward(exp.ids(&device), None), base_logits.clone());
    assert!(err < 1e-5, "B = 0 and m = ‖W‖: the base ({err})");

    let (model, _) = loaded("dora_llama", llama(&device));
    let side = model.forward(exp.ids(&device), None);
    let merged = merge_and_unload_state(model).unwrap();
    assert!(merged.linears().iter().all(|(_, s)| s.parts.is_empty()));
    let err = max_abs_diff(merged.forward(exp.ids(&device), None), side);
    assert!(
        err < 1e-5,
        "merged DoRA differs from the side path by {err}"
    );
}

#[test]
fn qdora_computes_on_the_dequantized_base() {
    let device = Device::flex();
    let exp = expected("dora_llama");
    let spec = QuantSpec::default();
    let q = quantize_base(llama(&device), spec).unwrap();
    let (q, _) = loaded("dora_llama", q);
    let dense = dequantize_base(quantize_base(llama(&device), spec).unwrap()).unwrap();
    let (dense, _) = loaded("dora_llama", dense);
    let err = max_abs_diff(
        q.forward(exp.ids(&device), None),
        dense.forward(exp.ids(&device), None),
    );
    assert!(
        err < 1e-4,
        "QDoRA vs DoRA on the dequantized weights: {err}"
    );
    let near = max_abs_diff(q.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(near < 0.5, "4-bit rounding only ({near})");
}
