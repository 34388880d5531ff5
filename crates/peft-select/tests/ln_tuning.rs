//! LayerNorm tuning against Hugging Face PEFT 0.21.2: adapters saved by Python load here with
//! the same logits and greedy text (tiny Llama's RMSNorms, tiny BERT's LayerNorms), ours save
//! under the same keys, only the copies train, and a merge swaps them in (fixtures:
//! scripts/make_fixtures.py, `methods_tiny`).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::adapter_io::load_adapter;
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::generate::greedy;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::reference::{Expected, max_abs_diff};
use peft_select::LnTuningConfig;
use peft_sites::SiteHost;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model
}

fn bert(device: &Device) -> BertForSequenceClassification {
    load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, device)
        .unwrap()
        .0
}

fn loaded<M: SiteHost>(case: &str, model: M) -> (M, LnTuningConfig) {
    let files = load_adapter(&fixtures().join("methods_tiny").join(case).join("adapter")).unwrap();
    let config = LnTuningConfig::from_json(&files.config).unwrap();
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

#[test]
fn python_llama_adapter_gives_the_same_logits_and_greedy_text() {
    let device = Device::flex();
    let exp = expected("ln_tuning_llama");
    let base_err = max_abs_diff(
        llama(&device).forward(exp.ids(&device), None),
        exp.logits(&device),
    );
    assert!(
        base_err > 1e-3,
        "the adapter must change the output ({base_err})"
    );
    let (model, config) = loaded("ln_tuning_llama", llama(&device));
    let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);

    // A merge swaps the copies in: same output, and the model's own tensors now hold them.
    let merged = config.merge(model, "default").unwrap();
    let err = max_abs_diff(merged.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "merged: {err}");
    let files = load_adapter(&fixtures().join("methods_tiny/ln_tuning_llama/adapter")).unwrap();
    let t = merged.to_tensors();
    let key = "base_model.model.model.norm.ln_tuning_layers.weight";
    assert_eq!(
        t.get("model.norm.weight").unwrap().data,
        files.tensors.get(key).unwrap().data
    );
}

#[test]
fn python_bert_adapter_with_its_classifier_gives_the_same_logits() {
    let device = Device::flex();
    let exp = expected("ln_tuning_bert");
    let (model, _) = loaded("ln_tuning_bert", bert(&device));
    let (ids, mask) = exp.padded_batch(&device);
    let err = max_abs_diff(model.forward(ids, mask), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    // Embeddings LayerNorm + 2 per layer, each with weight and bias.
    assert_eq!(
        model
            .norms()
            .into_iter()
            .filter(|(_, n)| n.copy("default").is_some())
            .count(),
        5
    );
}

#[test]
fn saved_adapter_has_the_python_keys_and_values() {
    let device = Device::flex();
    for case in ["ln_tuning_llama", "ln_tuning_bert"] {
        let out = tempfile::tempdir().unwrap();
        if case.ends_with("llama") {
            let (m, config) = loaded(case, llama(&device));
            config.save(&m, "default", out.path()).unwrap();
        } else {
            let (m, config) = loaded(case, bert(&device));
            config.save(&m, "default", out.path()).unwrap();
        }
        let theirs =
            load_adapter(&fixtures().join("methods_tiny").join(case).join("adapter")).unwrap();
        let ours = load_adapter(out.path()).unwrap();
        let keys =
            |f: &peft_core::adapter_io::AdapterFiles| f.tensors.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours), keys(&theirs), "{case}");
        for (k, t) in &theirs.tensors.tensors {
            assert_eq!(ours.tensors.get(k).unwrap().data, t.data, "{case}: {k}");
        }
        assert_eq!(ours.config["peft_type"], "LN_TUNING");
        assert_eq!(
            ours.config["target_modules"], theirs.config["target_modules"],
            "{case}"
        );
    }
}

#[test]
fn defaults_start_as_the_base_and_only_the_copies_train() {
    let device = Device::flex().autodiff();
    let exp = expected("ln_tuning_llama");
    let base = llama(&device).forward(exp.ids(&device), None);
    let model = LnTuningConfig::default()
        .apply(llama(&device), "default")
        .unwrap();
    assert_eq!(
        max_abs_diff(model.forward(exp.ids(&device), None), base),
        0.0
    );
    // 2 layers x 2 norms + the final norm, 64 values each.
    assert_eq!(ParamReport::of(&model).trainable, 5 * 64);
    let grads = model.forward(exp.ids(&device), None).sum().backward();
    for (path, n) in model.norms() {
        assert!(
            n.base.weight.val().grad(&grads).is_none(),
            "{path}: frozen norm got a gradient"
        );
        assert!(
            n.copy("default")
                .unwrap()
                .weight
                .val()
                .grad(&grads)
                .is_some(),
            "{path}: copy has no gradient"
        );
    }
    let err = LnTuningConfig::default()
        .apply(bert(&Device::flex()), "default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bert") && err.contains("LayerNorm"), "{err}");
}

/// SmolLM2-135M-Instruct with PEFT's LN-tuning adapter (norm copies moved by 10% noise): the last
/// position's logits within 1e-3 (the base model's own parity with transformers,
/// `peft-models/tests/smollm2.rs`) and the same greedy answer.
#[test]
fn python_smollm2_adapter_gives_the_same_answer() {
    let device = Device::flex();
    let gguf = peft_models::assets::SMOLLM2
        .ensure(&peft_models::assets::models_dir())
        .unwrap();
    let exp = expected("ln_tuning_smollm2");
    let base = load_causal_lm(&gguf, &device).unwrap();
    let eos = base.tokenizer.eos_ids.clone();
    let (model, _) = loaded("ln_tuning_smollm2", base.model);
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
