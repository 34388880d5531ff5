//! Bottleneck adapters against AdapterHub `adapters` 1.3.0: adapters saved by AdapterHub load
//! here with the same logits and greedy text (tiny Llama, tiny BERT classifier), save back bit
//! for bit in its layout, train only themselves, and ours load in AdapterHub (fixtures:
//! scripts/adapterhub_fixtures.py, `adapterhub_tiny`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Tensor};
use common::{bert, fixtures, llama, train_alternating};
use peft_adapter::BottleneckConfig;
use peft_core::adapter_io::{AdapterFiles, load_adapter};
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::generate::greedy;
use peft_models::reference::{Expected, max_abs_diff};
use peft_sites::SiteHost;

const LLAMA_CASES: [&str; 4] = [
    "seq_bn_llama",
    "double_seq_bn_llama",
    "par_bn_llama",
    "custom_llama",
];
const BERT_CASES: [&str; 4] = [
    "seq_bn_bert",
    "double_seq_bn_bert",
    "par_bn_bert",
    "custom_bert",
];

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("adapterhub_tiny").join(case)
}

fn adapter(case: &str) -> AdapterFiles {
    load_adapter(&case_dir(case).join("adapter")).unwrap()
}

fn loaded<M: SiteHost>(case: &str, model: M) -> (M, BottleneckConfig) {
    let files = adapter(case);
    let config = BottleneckConfig::from_json(&files.config).unwrap();
    (
        config.apply_and_load(model, "default", files).unwrap(),
        config,
    )
}

fn expected(case: &str) -> Expected {
    Expected::read(&case_dir(case).join("expected.safetensors")).unwrap()
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
fn adapterhub_llama_adapters_give_the_same_logits_and_greedy_text() {
    let device = Device::flex();
    for case in LLAMA_CASES {
        let exp = expected(case);
        let base_err = max_abs_diff(
            llama(&device).forward(exp.ids(&device), None),
            exp.logits(&device),
        );
        assert!(base_err > 1e-2, "{case}: the adapter changes the output");
        let (model, _) = loaded(case, llama(&device));
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-5, "{case}: max |ours - AdapterHub| = {err}");
        let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[2])
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(Some(ours), exp.greedy, "{case}");
    }
}

#[test]
fn adapterhub_bert_adapters_give_the_same_logits() {
    let device = Device::flex();
    for case in BERT_CASES {
        let exp = expected(case);
        let (model, _) = loaded(case, bert(&device));
        let err = max_abs_diff(bert_logits(&model, &exp, &device), exp.logits(&device));
        assert!(err < 1e-5, "{case}: max |ours - AdapterHub| = {err}");
    }
}

#[test]
fn adapters_save_back_as_adapterhub_saved_them() {
    let device = Device::flex();
    for case in LLAMA_CASES.iter().chain(&BERT_CASES) {
        let theirs = adapter(case);
        let out = tempfile::tempdir().unwrap();
        if case.ends_with("llama") {
            let (m, config) = loaded(case, llama(&device));
            config.save(&m, "default", out.path()).unwrap();
        } else {
            let (m, config) = loaded(case, bert(&device));
            let config = BottleneckConfig {
                modules_to_save: Some(vec!["classifier".into()]),
                ..config
            };
            config.save(&m, "default", out.path()).unwrap();
        }
        let ours = load_adapter(out.path()).unwrap();
        assert_eq!(ours.tensors.len(), theirs.tensors.len(), "{case}");
        for (k, t) in &theirs.tensors.tensors {
            let mine = ours.tensors.get(k).unwrap_or_else(|| panic!("{case}: {k}"));
            assert_eq!(
                (&mine.shape, &mine.data),
                (&t.shape, &t.data),
                "{case}: {k}"
            );
        }
        for field in ["config", "name", "hidden_size", "model_type", "model_class"] {
            assert_eq!(ours.config[field], theirs.config[field], "{case}: {field}");
        }
    }
}

#[test]
fn training_moves_only_the_adapters_and_lowers_the_loss() {
    let device = Device::flex().autodiff();
    device.seed(11);
    for preset in ["seq_bn", "double_seq_bn", "par_bn"] {
        let config = BottleneckConfig::preset(preset).unwrap();
        let model = config.apply(llama(&device), "default").unwrap();
        let report = ParamReport::of(&model);
        // hidden 64: seq_bn rf 16 -> 4 wide, par_bn rf 2 -> 32 wide; 2 layers.
        let per = |d: usize| 64 * d + d + d * 64 + 64;
        let want = match preset {
            "seq_bn" => 2 * per(4),
            "double_seq_bn" => 4 * per(4),
            _ => 2 * per(32),
        };
        assert_eq!(report.trainable, want, "{preset}");
        let base = llama(&Device::flex()).to_tensors();
        let (first, last, model) = train_alternating(model, 1e-2, 30, |_| None);
        assert!(last < first * 0.8, "{preset}: loss {first} -> {last}");
        assert_eq!(model.to_tensors(), base, "{preset}: the base never moves");
        // State round trip.
        let state = config.state(&model, "default").unwrap();
        let fresh = config.apply(llama(&device), "default").unwrap();
        let fresh = config
            .load_state(fresh, "default", state.clone(), Path::new("state"))
            .unwrap();
        assert_eq!(config.state(&fresh, "default").unwrap(), state, "{preset}");
    }
}

#[test]
fn bad_configs_and_files_are_clear_errors() {
    let device = Device::flex();
    let with = |patch: serde_json::Value| {
        let mut json = BottleneckConfig::preset("seq_bn").unwrap().to_json();
        for (k, v) in patch.as_object().unwrap() {
            json["config"][k] = v.clone();
        }
        BottleneckConfig::from_json(&json)
    };
    let big = with(serde_json::json!({"reduction_factor": 128})).unwrap();
    let err = big
        .apply(llama(&device), "default")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reduction_factor 128") && err.contains("hidden size 64"),
        "{err}"
    );
    let err = with(serde_json::json!({"use_gating": true}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("use_gating"), "{err}");
    let err = with(serde_json::json!({"non_linearity": "softsign"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("softsign"), "{err}");
    let err = with(serde_json::json!({"reduction_factor": {"0": 4}}))
        .unwrap()
        .apply(llama(&device), "default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 1") && err.contains("default"), "{err}");
    // A Llama adapter on BERT: the shapes differ, the error names the key and the file.
    let files = adapter("seq_bn_llama");
    let config = BottleneckConfig::from_json(&files.config).unwrap();
    let model = config.apply(llama(&device), "default").unwrap();
    let mut tensors = files.tensors.clone();
    let key = "model.layers.0.output_adapters.adapters.seq_bn_llama.adapter_up.weight";
    let t = tensors.remove(key).unwrap();
    tensors.insert(
        key,
        peft_core::tensors::HostTensor::new(vec![4, 64], t.data),
    );
    let err = config
        .load_state(model, "default", tensors, &files.weights)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(key) && err.contains("adapter.safetensors"),
        "{err}"
    );
}

/// The AdapterHub venv's python (`scripts/adapters_venv.sh`), when the environment names it.
fn adapterhub_python() -> Option<PathBuf> {
    std::env::var_os("PEFT_ADAPTERS_PYTHON").map(PathBuf::from)
}

/// Write our logits for `exp`'s ids and have AdapterHub load `dir` and compare.
fn adapterhub_agrees(python: &Path, dir: &Path, expected: Expected) {
    let file = dir.join("expected.safetensors");
    expected.write(&file).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/adapterhub_fixtures.py");
    let o = Command::new(python)
        .arg(script)
        .arg("--verify")
        .arg(dir.join("adapter"))
        .arg(&file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}: {said}{}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{said}");
}

/// Adapters made here, with every option AdapterHub's files can hold (the adapter-owned norms,
/// learned scaling, a per-layer width), load in AdapterHub with the same logits and greedy
/// text. Runs where `PEFT_ADAPTERS_PYTHON` names the AdapterHub venv's python.
#[test]
fn our_adapters_load_in_adapterhub_with_the_same_logits() {
    let Some(python) = adapterhub_python() else {
        eprintln!("PEFT_ADAPTERS_PYTHON is not set: skipped");
        return;
    };
    let device = Device::flex();
    device.seed(5);
    let noisy = |mut json: serde_json::Value, patch: serde_json::Value| {
        for (k, v) in patch.as_object().unwrap() {
            json["config"][k] = v.clone();
        }
        BottleneckConfig::from_json(&json).unwrap()
    };
    let preset = |p: &str| BottleneckConfig::preset(p).unwrap().to_json();
    let cases = [
        ("seq_bn", noisy(preset("seq_bn"), serde_json::json!({}))),
        (
            "norms",
            noisy(
                preset("double_seq_bn"),
                serde_json::json!({"ln_before": true, "ln_after": true, "scaling": "learned",
                                   "reduction_factor": {"1": 4, "default": 8}}),
            ),
        ),
        (
            "par_bn",
            noisy(
                preset("par_bn"),
                serde_json::json!({"init_weights": "bert"}),
            ),
        ),
    ];
    for (what, config) in cases {
        let out = tempfile::tempdir().unwrap();
        // Llama
        let exp = expected("seq_bn_llama");
        let model = config.resolved_for(&llama(&device)).unwrap();
        let m = model.apply(llama(&device), "default").unwrap();
        let m = perturbed(m, &model);
        model
            .save(&m, "default", &out.path().join("adapter"))
            .unwrap();
        let logits = m.forward(exp.ids(&device), None);
        let greedy_ids: Vec<i64> = greedy(&m, &exp.prompt(), 8, &[2])
            .into_iter()
            .map(i64::from)
            .collect();
        let ours = Expected {
            logits: peft_core::tensors::HostTensor::from_tensor(logits.clone()).data,
            logits_shape: logits.dims().to_vec(),
            greedy: Some(greedy_ids),
            ..exp
        };
        eprintln!("{what} (llama):");
        adapterhub_agrees(&python, out.path(), ours);
        // BERT, with the classifier trained alongside.
        let out = tempfile::tempdir().unwrap();
        let exp = expected("seq_bn_bert");
        let config = BottleneckConfig {
            modules_to_save: Some(vec!["classifier".into()]),
            ..config.resolved_for(&bert(&device)).unwrap()
        };
        let m = config.apply(bert(&device), "default").unwrap();
        let m = perturbed(m, &config);
        config
            .save(&m, "default", &out.path().join("adapter"))
            .unwrap();
        let logits = bert_logits(&m, &exp, &device);
        let ours = Expected {
            logits: peft_core::tensors::HostTensor::from_tensor(logits.clone()).data,
            logits_shape: logits.dims().to_vec(),
            ..exp
        };
        eprintln!("{what} (bert):");
        adapterhub_agrees(&python, out.path(), ours);
    }
}

/// The adapter's tensors (and saved modules) moved by noise, as training would move them.
fn perturbed<M: SiteHost>(model: M, config: &BottleneckConfig) -> M {
    let mut state = config.state(&model, "default").unwrap();
    let mut seed = 1u32;
    for t in state.tensors.values_mut() {
        for v in &mut t.data {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *v += (seed >> 8) as f32 / (1u32 << 24) as f32 * 0.2 - 0.1;
        }
    }
    config
        .load_state(model, "default", state, Path::new("perturbed"))
        .unwrap()
}
