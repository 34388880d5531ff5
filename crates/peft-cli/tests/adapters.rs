//! Bottleneck adapters (Pfeiffer, Houlsby, parallel) through the `peft` binary: train on the
//! tiny Llama into AdapterHub's layout (lowering the held-out loss), resume exactly, generate,
//! inspect, a clear refusal to merge, BERT classification with the head saved as AdapterHub's
//! static head, and one-line errors for bad options. AdapterHub itself loads these files in
//! peft-adapter's tests.

mod common;

use std::path::Path;

use common::{adapter_values, data, eval_loss, peft, s, sentiment_csv, stderr, tiny, tiny_bert};

fn train(method: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny();
    let mut args = vec![
        "train",
        "--method",
        method,
        "--model",
        s(&model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--lr",
        "0.005",
        "--warmup",
        "1",
        "--save-every",
        "4",
        "--max-len",
        "32",
    ];
    args.extend(extra);
    peft(&args)
}

#[test]
fn bottleneck_methods_train_resume_generate_and_refuse_to_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    for (method, sites) in [
        ("pfeiffer", &["output_adapters"][..]),
        ("houlsby", &["attention_adapters", "output_adapters"][..]),
        ("parallel-adapter", &["output_adapters"][..]),
    ] {
        let full = tmp.path().join(format!("{method}-full"));
        let o = train(method, &data, &full, &["--set", "reduction_factor=8"]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        for file in ["adapter.safetensors", "adapter_config.json"] {
            assert!(full.join(file).exists(), "{method}: {file}");
        }
        let files = peft_core::adapter_io::load_adapter(&full).unwrap();
        assert_eq!(files.config["config"]["reduction_factor"], 8);
        assert_eq!(files.config["model_type"], "llama");
        assert_eq!(files.config["hidden_size"], 64);
        assert!(
            files.config.get("peft_type").is_none(),
            "AdapterHub's layout"
        );
        let mut placed: Vec<&str> = sites
            .iter()
            .filter(|site| {
                files
                    .tensors
                    .keys()
                    .any(|k| k.starts_with(&format!("model.layers.1.{site}.adapters.default.")))
            })
            .copied()
            .collect();
        placed.sort();
        assert_eq!(placed, sites, "{method}");
        assert_eq!(files.tensors.len(), 4 * 2 * sites.len(), "{method}");
        let loss = eval_loss(&tiny(), Some(&full), &data);
        assert!(
            loss < base_loss - 0.01,
            "{method}: loss {loss} vs base {base_loss}"
        );

        // Interrupted at step 4 and resumed: the same adapter as the uninterrupted run.
        let part = tmp.path().join(format!("{method}-part"));
        let o = train(
            method,
            &data,
            &part,
            &["--set", "reduction_factor=8", "--stop-after", "4"],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let o = train(
            method,
            &data,
            &part,
            &["--set", "reduction_factor=8", "--resume"],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(
            adapter_values(&part),
            adapter_values(&full),
            "{method}: resume is exact"
        );

        let o = peft(&[
            "generate",
            "--model",
            s(&tiny()),
            "--adapter",
            s(&full),
            "--prompt",
            "hello what",
            "--raw",
            "--max-new-tokens",
            "4",
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let o = peft(&["inspect", s(&full)]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("BOTTLENECK (AdapterHub layout)"),
            "{text}"
        );
        assert!(text.contains("reduction_factor: 8"), "{text}");
        let merged = tmp.path().join("merged");
        let o = peft(&[
            "merge",
            "--model",
            s(&tiny()),
            "--adapter",
            s(&full),
            "--out",
            s(&merged),
        ]);
        assert!(!o.status.success(), "{method}: merge must refuse");
        assert!(stderr(&o).contains("cannot be merged"), "{}", stderr(&o));
        assert!(!merged.exists());
    }
}

/// On the tiny BERT classifier: a Pfeiffer adapter trains with the new classifier, which is
/// saved as AdapterHub's static head (`model_head.safetensors`), and `peft eval` scores it.
#[test]
fn pfeiffer_trains_a_bert_classifier_with_adapterhubs_head_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sentiment_csv(tmp.path());
    let out = tmp.path().join("pfeiffer");
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--method",
        "pfeiffer",
        "--model",
        s(&tiny_bert()),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--steps",
        "60",
        "--warmup",
        "3",
        "--save-every",
        "20",
        "--set",
        "reduction_factor=4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for file in ["model_head.safetensors", "head_config.json"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let head: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("head_config.json")).unwrap()).unwrap();
    assert_eq!(head["model_class"], "BertForSequenceClassification");
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert!(files.tensors.get("classifier.weight").is_some());
    assert!(
        files
            .tensors
            .get("bert.encoder.layer.1.output.adapters.default.adapter_up.weight")
            .is_some()
    );
    let o = peft(&[
        "eval",
        "--task",
        "classification",
        "--model",
        s(&tiny_bert()),
        "--adapter",
        s(&out),
        "--data",
        s(&data),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scores: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("pfeiffer: {scores}");
    assert!(scores["accuracy"].as_f64().unwrap() > 0.9, "{scores}");
}

#[test]
fn bad_bottleneck_options_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    for (set, says) in [
        ("reduction_factor=128", "larger than the hidden size 64"),
        ("use_gating=true", "use_gating"),
        ("reduction=4", "valid: adapter_residual_before_ln"),
        ("non_linearity=softsign", "softsign"),
    ] {
        let o = train("houlsby", &data, &tmp.path().join("x"), &["--set", set]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{set}");
        assert!(err.contains(says), "{set}: {err}");
        assert!(err.trim().lines().count() <= 2, "{set}: {err}");
    }
    assert!(!tmp.path().join("x/adapter.safetensors").exists());
}
