//! The `peft` binary end to end on the tiny Llama fixture (word-level tokenizer).

mod common;

use std::path::Path;

use common::{adapter_values, data, eval_loss, peft, s, sentiment_csv, stderr, tiny};

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--r",
        "4",
        "--alpha",
        "8",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--warmup",
        "1",
        "--save-every",
        "3",
        "--max-len",
        "32",
    ]
}

#[test]
fn train_writes_adapter_metrics_plot_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let o = peft(&train_args(s(&model), s(&data), s(&full)));
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint/trainer_state.json",
    ] {
        assert!(full.join(f).exists(), "missing {f}");
    }
    let metrics = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    assert!(metrics.lines().last().unwrap().contains("eval_loss"));

    // Interrupted after 3 steps, then resumed: same adapter as the uninterrupted run.
    let mut args = train_args(s(&model), s(&data), s(&part));
    args.extend(["--stop-after", "3"]);
    assert!(peft(&args).status.success());
    assert!(!part.join("adapter_model.safetensors").exists());
    let mut args = train_args(s(&model), s(&data), s(&part));
    args.push("--resume");
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (adapter_values(&full), adapter_values(&part));
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-6, "resumed adapter differs by {diff}");
    assert_eq!(
        std::fs::read_to_string(part.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        6
    );

    // The trained adapter works with the other commands.
    let o = peft(&["inspect", s(&full)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("LORA") && text.contains("q_proj"),
        "{text}"
    );
    let o = peft(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&full),
        "--data",
        s(&data),
    ]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("perplexity"),
        "{}",
        stderr(&o)
    );
    let o = peft(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&full),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = tmp.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&full),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The merged folder loads as a plain model and gives the adapter's held-out loss.
    let eval = |args: &[&str]| -> f64 {
        let o = peft(args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let with_adapter = eval(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&full),
        "--data",
        s(&data),
    ]);
    let merged_loss = eval(&["eval", "--model", s(&merged), "--data", s(&data)]);
    assert!(
        (with_adapter - merged_loss).abs() < 1e-4,
        "{with_adapter} vs {merged_loss}"
    );
}

#[test]
fn config_file_gives_the_same_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let out = tmp.path().join("run");
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nr = 2\nalpha = 4.0\nsteps = 2\nbatch_size = 2\ntarget = [\"q_proj\", \"k_proj\"]\n",
        s(&tiny()),
        s(&data),
        s(&out)
    );
    std::fs::write(tmp.path().join("run.toml"), toml).unwrap();
    let o = peft(&["train", "--config", s(&tmp.path().join("run.toml"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 2);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "k_proj"])
    );
}

#[test]
fn user_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"hi\", \"answer\": \"hello\"}\n{\"nope\": 1}\n",
    )
    .unwrap();
    let out = tmp.path().join("o");
    let merged_out = tmp.path().join("m");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--bogus"], "--bogus"),
        (
            vec![
                "train",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--method",
                "magic",
            ],
            "--method magic: unknown method",
        ),
        (
            vec![
                "train",
                "--model",
                s(&model),
                "--data",
                s(&bad),
                "--out",
                s(&out),
            ],
            "bad.jsonl:2",
        ),
        (
            vec![
                "train",
                "--model",
                s(tmp.path()),
                "--data",
                s(&data),
                "--out",
                s(&out),
            ],
            "config.json",
        ),
        (
            vec![
                "train",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(tmp.path()),
            ],
            "--overwrite",
        ),
        (
            vec![
                "train",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--target",
                "nothing",
            ],
            "matched no module",
        ),
        (
            vec![
                "generate",
                "--model",
                s(&model),
                "--prompt",
                "x",
                "--device",
                "tpu",
            ],
            "unknown device `tpu`",
        ),
        (
            vec!["convert", s(&data), "--out", s(&out)],
            "expected a .gguf file",
        ),
        (
            vec![
                "merge",
                "--model",
                s(&model),
                "--adapter",
                s(tmp.path()),
                "--out",
                s(&merged_out),
            ],
            "adapter_config.json",
        ),
    ];
    for (args, needle) in cases {
        let o = peft(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        // Progress lines may precede it, but the error itself is one line, with no backtrace.
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.contains(needle) && last.starts_with("error"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("backtrace") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn classification_trains_the_head_and_reports_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny/model");
    let data = sentiment_csv(tmp.path());
    let out = tmp.path().join("cls");
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--r",
        "4",
        "--alpha",
        "8",
        "--steps",
        "60",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--warmup",
        "3",
        "--save-every",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert!(
        files
            .tensors
            .get("base_model.model.classifier.weight")
            .is_some()
    );
    assert_eq!(
        files.config["modules_to_save"],
        serde_json::json!(["classifier"])
    );
    assert!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .contains("eval_accuracy")
    );
    let o = peft(&[
        "eval",
        "--task",
        "classification",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--data",
        s(&data),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scores: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(scores["accuracy"].as_f64().unwrap() > 0.9, "{scores}");
    // A missing column is named, with the columns that exist.
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("x")),
        "--label-column",
        "sentiment",
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("no column `sentiment`") && err.contains("text, label"),
        "{err}"
    );
}

#[test]
fn qlora_trains_resumes_quantizes_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let mut args = train_args(s(&model), s(&data), s(&full));
    args.extend(["--method", "qlora"]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("quantized to nf4 with double quantization"),
        "{}",
        stderr(&o)
    );
    // Resume over a 4-bit base is exact too (quantization is deterministic).
    let mut args = train_args(s(&model), s(&data), s(&part));
    args.extend(["--method", "qlora", "--stop-after", "3"]);
    assert!(peft(&args).status.success());
    let mut args = train_args(s(&model), s(&data), s(&part));
    args.extend(["--method", "qlora", "--resume"]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(adapter_values(&full), adapter_values(&part));

    // A 4-bit checkpoint of the base, and the adapter on it.
    let q = tmp.path().join("q");
    let o = peft(&["quantize", s(&model), "--out", s(&q)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let qlora = eval_loss(&q, Some(&full), &data);

    // Merging into a 4-bit base writes full precision by default, exactly base + adapter.
    let merged = tmp.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        s(&q),
        "--adapter",
        s(&full),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("full-precision"), "{}", stderr(&o));
    assert!((eval_loss(&merged, None, &data) - qlora).abs() < 1e-4);

    // ... or 4-bit again, with the rounding warning.
    let merged4 = tmp.path().join("merged4");
    let o = peft(&[
        "merge",
        "--model",
        s(&q),
        "--adapter",
        s(&full),
        "--out",
        s(&merged4),
        "--quantize",
        "nf4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: re-quantizing"),
        "{}",
        stderr(&o)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged4.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["load_in_4bit"], true);
    let rounded = eval_loss(&merged4, None, &data);
    assert!(
        (rounded - qlora).abs() < 0.05 * qlora,
        "{rounded} vs {qlora}"
    );

    // Computing in f16 (the base and activations; norms, softmax, loss and the adapter in f32)
    // tracks the f32 run and still saves an f32 adapter.
    let half = tmp.path().join("half");
    let mut args = train_args(s(&model), s(&data), s(&half));
    args.extend(["--method", "qlora", "--compute-dtype", "f16"]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // The safetensors header: an 8-byte length, then JSON naming each tensor's dtype.
    let bytes = std::fs::read(half.join("adapter_model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let dtypes: Vec<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| *d == "F32"),
        "{dtypes:?}"
    );
    let (h, f) = (eval_loss(&q, Some(&half), &data), qlora);
    assert!((h - f).abs() < 0.01 * f, "f16 run {h} vs f32 run {f}");

    // Bad 4-bit options are one-line errors naming the option.
    for (extra, needle) in [
        (vec!["--quantize", "int3"], "--quantize int3"),
        (
            vec!["--quantize", "nf4", "--quant-blocksize", "48"],
            "--quant-blocksize 48",
        ),
        (vec!["--double-quant"], "--double-quant"),
        (vec!["--compute-dtype", "f8"], "unknown compute dtype `f8`"),
    ] {
        let mut args = train_args(s(&model), s(&data), s(&part));
        args.push("--overwrite");
        args.extend(extra);
        let o = peft(&args);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}

/// `peft quantize` on a BERT folder writes the encoder in bitsandbytes' 4-bit layout (the same
/// bytes transformers + bitsandbytes write), keeps the classifier dense, and the folder loads
/// back 4-bit.
#[test]
fn quantize_writes_a_bitsandbytes_bert_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bnb_bert");
    let out = tmp.path().join("q");
    let o = peft(&["quantize", s(&fixtures.join("base")), "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("quantized to nf4"), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(
        config["quantization_config"]["llm_int8_skip_modules"],
        serde_json::json!(["classifier"])
    );
    assert!(out.join("tokenizer.json").exists());
    let ours =
        peft_core::tensors::TensorMap::read_safetensors(&out.join("model.safetensors")).unwrap();
    let theirs =
        peft_core::tensors::TensorMap::read_safetensors(&fixtures.join("nf4_dq/model.safetensors"))
            .unwrap();
    for key in [
        "bert.encoder.layer.1.intermediate.dense.weight",
        "bert.encoder.layer.0.attention.self.query.weight.absmax",
    ] {
        assert_eq!(ours.get(key), theirs.get(key), "{key}");
    }
    assert_eq!(ours.get("classifier.weight").unwrap().shape, vec![3, 64]);
    let (model, _) =
        peft_models::load::load_bert_classifier(&out, 3, &burn::tensor::Device::flex()).unwrap();
    assert!(
        peft_lora::SiteHost::linears(&model)
            .iter()
            .all(|(p, s)| s.base.is_quantized() == (p != "classifier"))
    );
    // Writing into an existing folder needs --overwrite.
    let o = peft(&["quantize", s(&fixtures.join("base")), "--out", s(&out)]);
    assert!(
        !o.status.success() && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
    // A bad type is named by the option that gave it.
    let o = peft(&[
        "quantize",
        s(&fixtures.join("base")),
        "--out",
        s(&tmp.path().join("q2")),
        "--quant-type",
        "int3",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--quant-type int3: unknown 4-bit type"),
        "{}",
        stderr(&o)
    );
}
