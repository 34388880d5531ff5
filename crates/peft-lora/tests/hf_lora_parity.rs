//! LoRA format and numerical parity with Hugging Face PEFT 0.21.2 on a small random Llama
//! (fixtures from scripts/make_fixtures.py).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData, Tolerance};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, merge_and_unload_state, unmerge_all};
use peft_models::config::LlamaConfig;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::read_safetensors_folder;

const CASES: [&str; 4] = [
    "list_rslora",
    "regex_patterns",
    "all_linear_bias_all",
    "layers_bias_lora_only",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora_tiny")
}

fn base_for(case: &str, device: &Device) -> LlamaForCausalLM {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(case).join("case.json")).unwrap(),
    )
    .unwrap();
    let dir = fixtures().join(meta["base"].as_str().unwrap());
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    LlamaForCausalLM::from_tensors(config, read_safetensors_folder(&dir).unwrap(), &dir, device)
        .unwrap()
}

fn adapted(case: &str, device: &Device) -> (LlamaForCausalLM, LoraConfig) {
    let files = load_adapter(&fixtures().join(case).join("adapter")).unwrap();
    let config = LoraConfig::from_json(&files.config).unwrap();
    let model = config.apply(base_for(case, device), "default").unwrap();
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

fn expected(case: &str, device: &Device) -> (Tensor<2, Int>, Tensor<3>) {
    let raw = std::fs::read(fixtures().join(case).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let input = Tensor::from_data(TensorData::new(ids, [2, 7]), device);
    let logits = st.tensor("logits").unwrap();
    let values: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (
        input,
        Tensor::from_data(TensorData::new(values, logits.shape().to_vec()), device),
    )
}

#[test]
fn logits_match_python_peft() {
    let device = Device::flex();
    for case in CASES {
        let (model, _) = adapted(case, &device);
        let (input, logits) = expected(case, &device);
        let ours = model.forward(input, None);
        let err: f32 = (ours - logits).abs().max().into_scalar();
        assert!(err < 1e-5, "{case}: max |ours - PEFT| = {err}");
    }
}

#[test]
fn the_adapter_changes_the_output() {
    // Guards against a parity test that would pass with the adapter ignored.
    let device = Device::flex();
    for case in CASES {
        let base = base_for(case, &device);
        let (input, logits) = expected(case, &device);
        let err: f32 = (base.forward(input, None) - logits)
            .abs()
            .max()
            .into_scalar();
        assert!(err > 1e-3, "{case}: base alone already matches ({err})");
    }
}

#[test]
fn saved_adapter_has_the_python_keys_shapes_dtypes_and_config() {
    let device = Device::flex();
    for case in CASES {
        let (model, config) = adapted(case, &device);
        let out = tempfile::tempdir().unwrap();
        config.save(&model, "default", out.path()).unwrap();
        // scripts/make_fixtures.sh --verify loads these in Python PEFT.
        if let Ok(dir) = std::env::var("PEFT_EXPORT_DIR") {
            config
                .save(&model, "default", &Path::new(&dir).join(case))
                .unwrap();
        }
        let ours = load_adapter(out.path()).unwrap();
        let theirs = load_adapter(&fixtures().join(case).join("adapter")).unwrap();
        let ours_keys: Vec<_> = ours.tensors.keys().collect();
        let their_keys: Vec<_> = theirs.tensors.keys().collect();
        assert_eq!(ours_keys, their_keys, "{case}: keys");
        for (k, t) in &theirs.tensors.tensors {
            let o = ours.tensors.get(k).unwrap();
            assert_eq!((&o.shape, o.dtype), (&t.shape, t.dtype), "{case}: {k}");
            let err = o
                .data
                .iter()
                .zip(&t.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-6, "{case}: {k} values differ by {err}");
        }
        let raw = std::fs::read(out.path().join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
        for field in [
            "peft_type",
            "r",
            "lora_alpha",
            "target_modules",
            "bias",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "layers_pattern",
            "init_lora_weights",
            "peft_version",
        ] {
            assert_eq!(
                ours.config[field], theirs.config[field],
                "{case}: config field {field}"
            );
        }
    }
}

#[test]
fn merge_matches_unmerged_and_unmerge_restores_the_base() {
    let device = Device::flex();
    let (model, config) = adapted("all_linear_bias_all", &device);
    let (input, _) = expected("all_linear_bias_all", &device);
    let before = model.forward(input.clone(), None);
    let base_q = model.model.layers[0]
        .self_attn
        .q_proj
        .base
        .dense_weight(&device);
    let merged = config.merge(model, "default").unwrap();
    let after = merged.forward(input.clone(), None);
    after
        .into_data()
        .assert_approx_eq::<f32>(&before.clone().into_data(), Tolerance::absolute(1e-5));
    let unmerged = unmerge_all(merged).unwrap();
    unmerged.model.layers[0]
        .self_attn
        .q_proj
        .base
        .dense_weight(&device)
        .into_data()
        .assert_approx_eq::<f32>(&base_q.into_data(), Tolerance::absolute(1e-5));
    // merge_and_unload gives a plain model with the same outputs, saved as safetensors.
    let plain = merge_and_unload_state(unmerged).unwrap();
    assert!(plain.linears().iter().all(|(_, s)| s.parts.is_empty()));
    let dir = tempfile::tempdir().unwrap();
    plain
        .to_tensors()
        .write_safetensors(&dir.path().join("model.safetensors"))
        .unwrap();
    let reloaded = LlamaForCausalLM::from_tensors(
        plain.config.clone(),
        read_safetensors_folder(dir.path()).unwrap(),
        dir.path(),
        &device,
    )
    .unwrap();
    reloaded
        .forward(input, None)
        .into_data()
        .assert_approx_eq::<f32>(&before.into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn several_named_adapters_switch_and_disable() {
    let device = Device::flex();
    let (model, config) = adapted("list_rslora", &device);
    let (input, logits) = expected("list_rslora", &device);
    let base_out = base_for("list_rslora", &device).forward(input.clone(), None);
    let mut model = config.apply(model, "second").unwrap();
    for (p, _) in model
        .linears()
        .into_iter()
        .map(|(p, s)| (p, s.names.clone()))
        .collect::<Vec<_>>()
    {
        let s = model.linear_mut(&p).unwrap();
        if s.lora("default").is_some() {
            s.set_active(&["default"]).unwrap();
        }
    }
    let err: f32 = (model.forward(input.clone(), None) - logits.clone())
        .abs()
        .max()
        .into_scalar();
    assert!(err < 1e-5, "default alone: {err}");
    for (p, _) in model
        .linears()
        .into_iter()
        .map(|(p, s)| (p, s.disabled))
        .collect::<Vec<_>>()
    {
        model.linear_mut(&p).unwrap().disabled = true;
    }
    let err: f32 = (model.forward(input, None) - base_out)
        .abs()
        .max()
        .into_scalar();
    assert!(err < 1e-6, "disabled: {err}");
}

#[test]
fn bad_adapters_are_clear_errors() {
    let device = Device::flex();
    // Targets that match nothing list the modules that exist.
    let config = LoraConfig::new(4, 8.0, &["query"]);
    let err = config
        .apply(base_for("list_rslora", &device), "default")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("query") && err.contains("model.layers.0.self_attn.q_proj"),
        "{err}"
    );
    // A tensor with the wrong shape is named with its file.
    let files = load_adapter(&fixtures().join("list_rslora/adapter")).unwrap();
    let mut tensors = files.tensors.clone();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let t = tensors.remove(key).unwrap();
    tensors.insert(
        key,
        peft_core::tensors::HostTensor::new(vec![2, t.data.len() / 2], t.data),
    );
    let config = LoraConfig::from_json(&files.config).unwrap();
    let model = config
        .apply(base_for("list_rslora", &device), "default")
        .unwrap();
    let err = config
        .load_state(
            model,
            "default",
            tensors,
            Path::new("adapter_model.safetensors"),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(key) && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    // An IA3 config is not a LoRA config.
    let mut json = files.config.clone();
    json["peft_type"] = "IA3".into();
    assert!(
        LoraConfig::from_json(&json)
            .unwrap_err()
            .to_string()
            .contains("IA3")
    );
}
