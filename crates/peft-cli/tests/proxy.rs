//! Proxy-tuning through the `peft` binary: `generate` and `eval` with `--proxy-base` +
//! `--proxy-adapter` or `--proxy-expert` + `--proxy-anti-expert` (the combined logits are
//! checked against PyTorch in peft-models' proxy test), and one-line errors.

mod common;

use std::path::{Path, PathBuf};

use common::{data, peft, s, stderr, tiny};

fn lora_tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora_tiny")
        .join(name)
}

fn eval(extra: &[&str], data: &Path) -> f64 {
    let base = lora_tiny("base_bias");
    let mut args = vec![
        "eval",
        "--model",
        s(&base),
        "--data",
        s(data),
        "--max-len",
        "32",
    ];
    args.extend(extra);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn proxy_tuning_generates_and_scores_the_combined_distribution() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let (small, adapter) = (tiny(), lora_tiny("list_rslora/adapter"));
    let with_adapter = ["--proxy-base", s(&small), "--proxy-adapter", s(&adapter)];
    let plain = eval(&[], &data);
    let steered = eval(&with_adapter, &data);
    assert!((plain - steered).abs() > 1e-4, "{plain} vs {steered}");
    // alpha 0: the base alone.
    let mut zero = with_adapter.to_vec();
    zero.extend(["--proxy-alpha", "0"]);
    assert!((eval(&zero, &data) - plain).abs() < 1e-6);
    // The same expert as a full model folder: the same loss.
    let o = peft(&[
        "merge",
        "--model",
        s(&small),
        "--adapter",
        s(&adapter),
        "--out",
        s(&tmp.path().join("expert")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = eval(
        &[
            "--proxy-expert",
            s(&tmp.path().join("expert")),
            "--proxy-anti-expert",
            s(&small),
        ],
        &data,
    );
    assert!((full - steered).abs() < 1e-4, "{full} vs {steered}");
    let base = lora_tiny("base_bias");
    let mut args = vec![
        "generate",
        "--model",
        s(&base),
        "--raw",
        "--max-new-tokens",
        "4",
    ];
    args.extend(with_adapter);
    args.extend(["--prompt", "hello what", "--prompt", "good day"]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
}

#[test]
fn proxy_mistakes_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base = lora_tiny("base_bias");
    let run = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", s(&base), "--data", s(&data)];
        args.extend(extra);
        peft(&args)
    };
    let o = run(&["--proxy-base", s(&tiny())]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--proxy-adapter"), "{}", stderr(&o));
    let o = run(&["--proxy-alpha", "0.5"]);
    assert!(stderr(&o).contains("--proxy-alpha needs"), "{}", stderr(&o));
    // A small model with another vocabulary.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = 96.into();
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    let model = peft_models::llama::LlamaForCausalLM::random(
        serde_json::from_value(config).unwrap(),
        &burn::tensor::Device::flex(),
    )
    .unwrap();
    model
        .to_tensors()
        .write_safetensors(&other.join("model.safetensors"))
        .unwrap();
    std::fs::copy(tiny().join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
    let o = run(&[
        "--proxy-expert",
        s(&other),
        "--proxy-anti-expert",
        s(&other),
    ]);
    let err = stderr(&o);
    assert!(err.contains("128 tokens") && err.contains("96"), "{err}");
    assert!(err.trim().lines().count() <= 2, "{err}");
}
