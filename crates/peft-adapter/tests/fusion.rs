//! AdapterFusion against AdapterHub `adapters` 1.3.0: two Pfeiffer adapters and their fusion
//! saved by AdapterHub (dynamic, static and with temperature, tiny Llama and tiny BERT) load here with the same
//! logits and save back bit for bit; training moves only the fusion; ours load in AdapterHub
//! (fixtures: scripts/adapterhub_fixtures.py, `adapterhub_tiny/fusion_*`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::Module;
use burn::tensor::Device;
use common::{bert, fixtures, llama, train_alternating};
use peft_adapter::{BottleneckConfig, FusionConfig};
use peft_core::adapter_io::load_adapter;
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_models::generate::greedy;
use peft_models::reference::{Expected, max_abs_diff};
use peft_sites::SiteHost;

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("adapterhub_tiny").join(case)
}

/// Adapters `a` and `b` of `dir` loaded under their AdapterHub names, then the fusion.
fn fused<M: SiteHost>(dir: &Path, mut model: M) -> (M, FusionConfig) {
    for name in ["a", "b"] {
        let files = load_adapter(&dir.join(name)).unwrap();
        let config = BottleneckConfig::from_json(&files.config).unwrap();
        assert_eq!(config.name, name);
        model = config.apply_and_load(model, name, files).unwrap();
    }
    let files = load_adapter(&dir.join("fusion")).unwrap();
    assert_eq!(files.peft_type().unwrap(), "FUSION");
    let config = FusionConfig::from_json(&files.config).unwrap();
    let model = config.apply_and_load(model, "f", files).unwrap();
    (model, config)
}

/// `temperature: true`: AdapterHub divides the scores by 50, then by 0.05 less at every
/// forward pass down to 1; a loaded fusion starts again at 50.
#[test]
fn fusion_temperature_falls_per_forward_as_in_adapterhub() {
    let device = Device::flex();
    let dir = case_dir("fusion_temperature_llama");
    let path = dir.join("expected.safetensors");
    let exp = Expected::read(&path).unwrap();
    let tensors = peft_core::tensors::TensorMap::read_safetensors_weights(&path).unwrap();
    let want = |key: &str| tensors.get(key).unwrap().to_tensor::<3>(&device);
    let (model, config) = fused(&dir, llama(&device));
    assert!(config.config.temperature);
    let ids = exp.ids(&device);
    // The logits at T = 50 (pass 1), 25 (pass 501) and 1 (pass 1001), as the fixture took them.
    let one = ids.clone().narrow(0, 0, 1).narrow(1, 0, 1);
    for (part, key) in ["logits", "logits_mid", "logits_floor"]
        .into_iter()
        .enumerate()
    {
        if part > 0 {
            for _ in 0..499 {
                model.forward(one.clone(), None);
            }
        }
        let err = max_abs_diff(model.forward(ids.clone(), None), want(key));
        assert!(err < 1e-5, "{key}: max |ours - AdapterHub| = {err}");
    }
    for (_, s) in model.sublayers() {
        if let Some(f) = s.fusion("f") {
            assert_eq!(f.temperature.current(), Some(1.0));
        }
    }
    // The temperature is not saved: loaded again, the fusion starts at 50.
    let (again, _) = fused(&dir, llama(&device));
    let err = max_abs_diff(again.forward(ids, None), exp.logits(&device));
    assert!(err < 1e-5, "reloaded: max |ours - AdapterHub| = {err}");
}

#[test]
fn adapterhub_fusions_give_the_same_logits_and_save_back() {
    let device = Device::flex();
    for case in ["fusion_llama", "fusion_static_llama"] {
        let exp = Expected::read(&case_dir(case).join("expected.safetensors")).unwrap();
        let (model, config) = fused(&case_dir(case), llama(&device));
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-5, "{case}: max |ours - AdapterHub| = {err}");
        let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[2])
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(Some(ours), exp.greedy, "{case}");
        // Without the fusion, adapter `b` alone: another output.
        let mut alone = model;
        for (_, s) in alone.sites_mut() {
            if let peft_sites::SiteMut::Sublayer(s) = s
                && s.adapter("b").is_some()
            {
                s.set_active_fusion(None).unwrap();
                s.set_active(Some("b")).unwrap();
            }
        }
        let apart = max_abs_diff(alone.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(apart > 1e-3, "{case}: the fusion matters ({apart})");
        let (model, _) = fused(&case_dir(case), llama(&device));
        let out = tempfile::tempdir().unwrap();
        config.save(&model, "f", out.path()).unwrap();
        let theirs = load_adapter(&case_dir(case).join("fusion")).unwrap();
        let ours = load_adapter(&out.path().join("f")).unwrap();
        assert_eq!(ours.tensors, theirs.tensors, "{case}: bit for bit");
        assert_eq!(ours.config, theirs.config, "{case}: the same config");
    }
    let exp = Expected::read(&case_dir("fusion_bert").join("expected.safetensors")).unwrap();
    let (model, _) = fused(&case_dir("fusion_bert"), bert(&device));
    let (ids, mask) = exp.padded_batch(&device);
    let err = max_abs_diff(model.forward(ids, mask), exp.logits(&device));
    assert!(err < 1e-5, "fusion_bert: max |ours - AdapterHub| = {err}");
}

#[test]
fn fusion_trains_only_its_layers_and_needs_its_adapters() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let dir = case_dir("fusion_llama");
    let (model, config) = fused(&dir, llama(&device));
    // The fixture's fusion is loaded trainable; the adapters are frozen.
    let report = ParamReport::of(&model);
    // q, k (weight + bias) and v (weight) of hidden 64 at the 2 output sites.
    assert_eq!(report.trainable, 2 * (2 * (64 * 64 + 64) + 64 * 64));
    let adapters_before =
        BottleneckConfig::from_json(&load_adapter(&dir.join("a")).unwrap().config)
            .unwrap()
            .state(&model, "a")
            .unwrap();
    let reg = config.clone();
    let (first, last, model) = train_alternating(model, 1e-2, 20, |m| reg.regularization(m, "f"));
    assert!(last < first, "loss {first} -> {last}");
    let a = BottleneckConfig::from_json(&load_adapter(&dir.join("a")).unwrap().config).unwrap();
    assert_eq!(
        a.state(&model, "a").unwrap(),
        adapters_before,
        "the adapters never move"
    );
    let moved = config.state(&model, "f").unwrap();
    let fixture = load_adapter(&dir.join("fusion")).unwrap().tensors;
    assert_ne!(moved, fixture, "the fusion moved");
    assert!(model.clone().valid().num_params() > 0);

    // A fusion over adapters that are not loaded.
    let lone = FusionConfig::new(&["a".into(), "zzz".into()], "dynamic").unwrap();
    let err = lone
        .apply(llama(&Device::flex()), "f")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a, zzz") && err.contains("load them first"),
        "{err}"
    );
    assert!(FusionConfig::new(&["a".into()], "dynamic").is_err());
}

/// A fusion made here, over adapters made here, loads in AdapterHub with the same logits
/// (where `PEFT_ADAPTERS_PYTHON` names the AdapterHub venv's python).
#[test]
fn our_fusions_load_in_adapterhub_with_the_same_logits() {
    let Some(python) = std::env::var_os("PEFT_ADAPTERS_PYTHON").map(PathBuf::from) else {
        eprintln!("PEFT_ADAPTERS_PYTHON is not set: skipped");
        return;
    };
    let device = Device::flex();
    let out = tempfile::tempdir().unwrap();
    let (model, config) = fused(&case_dir("fusion_llama"), llama(&device));
    // Move every fusion weight, as training would.
    let mut state = config.state(&model, "f").unwrap();
    for t in state.tensors.values_mut() {
        for (i, v) in t.data.iter_mut().enumerate() {
            *v += ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.1;
        }
    }
    let model = config
        .load_state(model, "f", state, Path::new("moved"))
        .unwrap();
    for name in ["a", "b"] {
        let files = load_adapter(&case_dir("fusion_llama").join(name)).unwrap();
        let c = BottleneckConfig::from_json(&files.config).unwrap();
        c.save(&model, name, out.path()).unwrap();
    }
    config.save(&model, "f", out.path()).unwrap();
    let exp = Expected::read(&case_dir("fusion_llama").join("expected.safetensors")).unwrap();
    let logits = model.forward(exp.ids(&device), None);
    let ours = Expected {
        logits: peft_core::tensors::HostTensor::from_tensor(logits.clone()).data,
        logits_shape: logits.dims().to_vec(),
        greedy: Some(
            greedy(&model, &exp.prompt(), 8, &[2])
                .into_iter()
                .map(i64::from)
                .collect(),
        ),
        ..exp
    };
    let file = out.path().join("expected.safetensors");
    ours.write(&file).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/adapterhub_fixtures.py");
    let o = Command::new(python)
        .arg(script)
        .arg("--verify-fusion")
        .args([
            out.path().join("a"),
            out.path().join("b"),
            out.path().join("f"),
            file,
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{said}");
}

/// Adapters trained in this process, then fused: the fusion trains (the adapters' parameters,
/// fresh from an optimizer, are frozen as new detached values).
#[test]
fn adapters_trained_here_fuse_and_the_fusion_trains() {
    let device = Device::flex().autodiff();
    device.seed(13);
    let mut model = llama(&device);
    for name in ["a", "b"] {
        let mut adapter = BottleneckConfig::preset("seq_bn").unwrap();
        adapter.name = name.into();
        model = adapter.apply(model, name).unwrap();
        model = train_alternating(model, 1e-2, 2, |_| None).2;
    }
    let fusion = FusionConfig::new(&["a".into(), "b".into()], "dynamic").unwrap();
    let model = fusion.apply(model, "f").unwrap();
    let a = BottleneckConfig {
        name: "a".into(),
        ..BottleneckConfig::preset("seq_bn").unwrap()
    };
    let a_before = a.state(&model, "a").unwrap();
    let (first, last, model) =
        train_alternating(model, 1e-2, 10, |m| fusion.regularization(m, "f"));
    assert!(last < first, "loss {first} -> {last}");
    assert_eq!(
        a.state(&model, "a").unwrap(),
        a_before,
        "the adapters stay frozen"
    );
}
