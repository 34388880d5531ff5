//! (IA)^3 against Hugging Face PEFT 0.21.2: adapters saved by Python load here with the same
//! logits and greedy text (tiny Llama, tiny BERT classifier), ours save under the same keys and
//! config, merge exactly, and train (fixtures: scripts/make_fixtures.py, `methods_tiny`).

mod common;

use common::{bert, fixtures, llama};

use burn::tensor::{Device, Tensor};
use peft_adapter::Ia3Config;
use peft_core::adapter_io::load_adapter;
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::generate::greedy;
use peft_models::load::load_causal_lm;
use peft_models::reference::{Expected, max_abs_diff};
use peft_quant::BaseLinear;
use peft_sites::{LinearPart, SiteHost};

/// The fixture adapter of `case` applied and loaded onto `model`.
fn loaded<M: SiteHost>(case: &str, model: M) -> (M, Ia3Config) {
    let files = load_adapter(&fixtures().join("methods_tiny").join(case).join("adapter")).unwrap();
    let config = Ia3Config::from_json(&files.config).unwrap();
    (
        config.apply_and_load(model, "default", files).unwrap(),
        config,
    )
}

fn expected(case: &str) -> Expected {
    Expected::read(
        &fixtures()
            .join("methods_tiny")
            .join(case)
            .join("expected.safetensors"),
    )
    .unwrap()
}

fn bert_logits(
    model: &BertForSequenceClassification,
    exp: &Expected,
    device: &Device,
) -> Tensor<2> {
    let (ids, mask) = exp.padded_batch(device);
    model.forward(ids, mask)
}

#[test]
fn python_llama_adapter_gives_the_same_logits_and_greedy_text() {
    let device = Device::flex();
    let exp = expected("ia3_llama");
    let base_err = max_abs_diff(
        llama(&device).forward(exp.ids(&device), None),
        exp.logits(&device),
    );
    assert!(
        base_err > 1e-3,
        "the adapter must change the output ({base_err})"
    );
    let (model, _) = loaded("ia3_llama", llama(&device));
    let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);
}

#[test]
fn python_bert_adapter_with_its_classifier_gives_the_same_logits() {
    let device = Device::flex();
    let exp = expected("ia3_bert");
    let (model, config) = loaded("ia3_bert", bert(&device));
    assert_eq!(
        config.modules_to_save.as_deref(),
        Some(&["classifier".to_string(), "score".to_string()][..])
    );
    let err = max_abs_diff(bert_logits(&model, &exp, &device), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    // The suffix rule of PEFT: "output.dense" takes attention.output.dense too, input-scaled.
    let s = model
        .linears()
        .into_iter()
        .find(|(p, _)| p == "bert.encoder.layer.0.attention.output.dense")
        .unwrap()
        .1;
    assert!(matches!(s.part("default"), Some(LinearPart::InputScale(_))));
}

#[test]
fn saved_adapter_has_the_python_keys_shapes_and_config() {
    let device = Device::flex();
    for (case, model) in [("ia3_llama", None), ("ia3_bert", Some(bert(&device)))] {
        let dir = fixtures().join("methods_tiny").join(case).join("adapter");
        let theirs = load_adapter(&dir).unwrap();
        let out = tempfile::tempdir().unwrap();
        match model {
            None => {
                let (m, config) = loaded(case, llama(&device));
                config.save(&m, "default", out.path()).unwrap();
            }
            Some(b) => {
                let (m, config) = loaded(case, b);
                config.save(&m, "default", out.path()).unwrap();
            }
        }
        let ours = load_adapter(out.path()).unwrap();
        let shapes = |f: &peft_core::adapter_io::AdapterFiles| -> Vec<(String, Vec<usize>)> {
            f.tensors
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.shape.clone()))
                .collect()
        };
        assert_eq!(shapes(&ours), shapes(&theirs), "{case}");
        for (k, t) in &theirs.tensors.tensors {
            assert_eq!(
                ours.tensors.get(k).unwrap().data,
                t.data,
                "{case}: {k} round-trips bit for bit"
            );
        }
        for field in [
            "peft_type",
            "feedforward_modules",
            "target_modules",
            "task_type",
            "modules_to_save",
        ] {
            let norm = |v: &serde_json::Value| match v.as_array() {
                Some(a) => {
                    let mut a: Vec<String> = a.iter().map(|x| x.to_string()).collect();
                    a.sort();
                    serde_json::json!(a)
                }
                None => v.clone(),
            };
            assert_eq!(
                norm(&ours.config[field]),
                norm(&theirs.config[field]),
                "{case}: {field}"
            );
        }
    }
}

#[test]
fn defaults_start_as_the_base_train_only_the_vectors_and_merge_exactly() {
    let device = Device::flex().autodiff();
    let exp = expected("ia3_llama");
    let base_logits = llama(&device).forward(exp.ids(&device), None);
    let config = Ia3Config::default();
    let model = config.apply(llama(&device), "default").unwrap();
    let start = model.forward(exp.ids(&device), None);
    assert_eq!(
        max_abs_diff(start, base_logits.clone()),
        0.0,
        "vectors of ones leave the model unchanged"
    );
    // k, v, down in 2 layers: 2 * (32 + 32 + 128) values.
    assert_eq!(ParamReport::of(&model).trainable, 2 * (32 + 32 + 128));
    let grads = model.forward(exp.ids(&device), None).sum().backward();
    for (path, s) in model.linears() {
        let BaseLinear::Dense(d) = &s.base else {
            unreachable!()
        };
        assert!(
            d.weight.val().grad(&grads).is_none(),
            "{path}: base weight got a gradient"
        );
    }

    let (model, config) = loaded("ia3_llama", llama(&Device::flex()));
    let unmerged = model.forward(exp.ids(&Device::flex()), None);
    let merged = config.merge(model, "default").unwrap();
    let err = max_abs_diff(merged.forward(exp.ids(&Device::flex()), None), unmerged);
    assert!(err < 1e-4, "merged vs unmerged: {err}");
}

/// SmolLM2-135M-Instruct with PEFT's IA3 adapter (vectors moved by 10% noise): the last
/// position's logits within 1e-3 (the base model's own parity with transformers,
/// `peft-models/tests/smollm2.rs`) and the same greedy answer.
#[test]
fn python_smollm2_adapter_gives_the_same_answer() {
    let device = Device::flex();
    let gguf = peft_models::assets::SMOLLM2
        .ensure(&peft_models::assets::models_dir())
        .unwrap();
    let exp = expected("ia3_smollm2");
    let base = load_causal_lm(&gguf, &device).unwrap();
    let eos = base.tokenizer.eos_ids.clone();
    let (model, _) = loaded("ia3_smollm2", base.model);
    let [_, s] = exp.ids_shape;
    let last = model.forward(exp.ids(&device), None).narrow(1, s - 1, 1);
    let err = max_abs_diff(last, exp.logits(&device));
    assert!(err < 1e-3, "max |ours - PEFT| = {err}");
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &eos)
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);
}
