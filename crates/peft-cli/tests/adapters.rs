//! Bottleneck adapters (Pfeiffer, Houlsby, parallel) through the `peft` binary: train on the
//! tiny Llama into AdapterHub's layout (lowering the held-out loss), resume exactly, generate,
//! inspect, a clear refusal to merge, BERT classification with the head saved as AdapterHub's
//! static head, and one-line errors for bad options. AdapterHub itself loads these files in
//! peft-adapter's tests.

mod common;

use std::path::Path;

use common::{
    adapter_values, data, eval_loss, generates_inspects_and_refuses_merge, peft, s, sentiment_csv,
    stderr, tiny, tiny_bert,
};

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
                files.tensors.keys().any(|k| {
                    k.starts_with(&format!("model.layers.1.{site}.adapters.{method}-full."))
                })
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

        let text = generates_inspects_and_refuses_merge(
            &full,
            "BOTTLENECK (AdapterHub layout)",
            tmp.path(),
        );
        assert!(text.contains("reduction_factor: 8"), "{text}");
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
            .get("bert.encoder.layer.1.output.adapters.pfeiffer.adapter_up.weight")
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

/// `dir/name.jsonl`: question/answer lines over the tiny tokenizer's words where the answer
/// follows `rule` from the question's first word (two "topics" for two adapters).
fn topic(dir: &Path, name: &str, rule: impl Fn(usize) -> (usize, usize)) -> std::path::PathBuf {
    let words = [
        "hello", "what", "is", "the", "capital", "of", "france", "paris", "good", "day", "cat",
        "dog",
    ];
    let mut lines = String::new();
    for i in 0..40 {
        let (a, b) = rule(i);
        let q = format!(
            "{} {} {}",
            words[i % 12],
            words[(i * 5 + 1) % 12],
            words[(i * 7 + 2) % 12]
        );
        let line = serde_json::json!({"question": q, "answer": format!("{} {}", words[a % 12], words[b % 12])});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let p = dir.join(format!("{name}.jsonl"));
    std::fs::write(&p, lines).unwrap();
    p
}

/// Two Pfeiffer adapters trained on two topics, fused on the mix: the fusion trains (resuming
/// exactly), `generate` and `eval` run the fused model, and mismatched inputs are one-line
/// errors.
#[test]
fn fusion_of_two_adapters_trains_generates_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let a_data = topic(tmp.path(), "a", |i| (i, i + 1));
    let b_data = topic(tmp.path(), "b", |i| (i * 5 + 3, 7));
    let mix = tmp.path().join("mix.jsonl");
    let both =
        std::fs::read_to_string(&a_data).unwrap() + &std::fs::read_to_string(&b_data).unwrap();
    std::fs::write(&mix, both).unwrap();
    let (a, b) = (tmp.path().join("topic_a"), tmp.path().join("topic.b"));
    for (data, out) in [(&a_data, &a), (&b_data, &b)] {
        let o = train("pfeiffer", data, out, &["--set", "reduction_factor=8"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Adapters are named after their folders (AdapterHub's keys cannot hold a `.`).
    let name = |d: &Path| peft_core::adapter_io::load_adapter(d).unwrap().config["name"].clone();
    assert_eq!((name(&a), name(&b)), ("topic_a".into(), "topic_b".into()));
    let fuse = format!("{},{}", s(&a), s(&b));
    let fusion = tmp.path().join("fusion");
    let o = train("fusion", &mix, &fusion, &["--fuse", &fuse]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_fusion_config.json",
        "model_adapter_fusion.safetensors",
    ] {
        assert!(fusion.join(f).exists(), "{f}");
    }
    let files = peft_core::adapter_io::load_adapter(&fusion).unwrap();
    assert_eq!(files.config["name"], "topic_a,topic_b");
    assert!(
        files
            .tensors
            .keys()
            .all(|k| k.contains(".adapter_fusion_layer.topic_a,topic_b."))
    );
    let o = peft(&["inspect", s(&fusion)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("FUSION (AdapterHub layout)"),
        "{text}"
    );
    // Resumed: the same fusion.
    let part = tmp.path().join("fusion-part");
    assert!(
        train(
            "fusion",
            &mix,
            &part,
            &["--fuse", &fuse, "--stop-after", "4"]
        )
        .status
        .success()
    );
    let o = train("fusion", &mix, &part, &["--fuse", &fuse, "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        adapter_values(&part),
        adapter_values(&fusion),
        "resume is exact"
    );
    // AdapterHub's temperature (the scores divided by 50, then 0.05 less per forward pass):
    // another fusion, and a resumed run goes on at the temperature it had reached.
    let warm = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--fuse", fuse.as_str(), "--set", "temperature=true"];
        args.extend(extra);
        let o = train("fusion", &mix, out, &args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let (t_full, t_part) = (
        tmp.path().join("fusion-t"),
        tmp.path().join("fusion-t-part"),
    );
    warm(&t_full, &[]);
    assert_ne!(adapter_values(&t_full), adapter_values(&fusion));
    warm(&t_part, &["--stop-after", "4"]);
    warm(&t_part, &["--resume"]);
    assert_eq!(
        adapter_values(&t_part),
        adapter_values(&t_full),
        "resume with the temperature is exact"
    );

    let model = tiny();
    let run = |cmd: &str, extra: &[&str]| {
        let mut args = vec![
            cmd,
            "--model",
            s(&model),
            "--adapter",
            s(&a),
            "--adapter",
            s(&b),
        ];
        args.extend(extra);
        peft(&args)
    };
    let o = run(
        "generate",
        &[
            "--fusion",
            s(&fusion),
            "--prompt",
            "hello what",
            "--raw",
            "--max-new-tokens",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        "eval",
        &["--fusion", s(&fusion), "--data", s(&mix), "--max-len", "32"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fused: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let alone = eval_loss(&model, Some(&a), &mix);
    eprintln!("mix: fused {} vs adapter a alone {alone}", fused["loss"]);
    assert!(fused["loss"].as_f64().unwrap().is_finite());

    // A fusion whose adapters are not loaded; two adapters without --fusion; unlike adapters.
    let o = peft(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&a),
        "--fusion",
        s(&fusion),
        "--prompt",
        "hi",
    ]);
    assert!(
        stderr(&o).contains("fuses adapter `topic_b`, which no --adapter folder holds"),
        "{}",
        stderr(&o)
    );
    let o = run("eval", &["--data", s(&mix)]);
    assert!(stderr(&o).contains("--fusion"), "{}", stderr(&o));
    let h = tmp.path().join("houlsby");
    assert!(train("houlsby", &a_data, &h, &[]).status.success());
    let o = train(
        "fusion",
        &mix,
        &tmp.path().join("bad"),
        &["--fuse", &format!("{},{}", s(&a), s(&h))],
    );
    let err = stderr(&o);
    assert!(
        err.contains("differ in mh_adapter (false and true)"),
        "{err}"
    );
    let o = train("fusion", &mix, &tmp.path().join("bad"), &[]);
    assert!(stderr(&o).contains("--fuse"), "{}", stderr(&o));
}

/// SSF through the binary: trains, and `peft merge` writes a plain Hugging Face folder (with
/// the biases the shifts need switched on) whose loss equals the adapter's on the base.
#[test]
fn ssf_trains_and_merges_into_a_plain_folder_with_the_same_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let out = tmp.path().join("ssf");
    let o = train("ssf", &data, &out, &["--set", "init_ssf_weights=false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert_eq!(files.config["peft_type"], "SSF");
    let merged = tmp.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        s(&tiny()),
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["attention_bias"], true);
    assert_eq!(config["mlp_bias"], true);
    let with_adapter = eval_loss(&tiny(), Some(&out), &data);
    let folded = eval_loss(&merged, None, &data);
    assert!(
        (with_adapter - folded).abs() < 1e-5,
        "{with_adapter} vs {folded}"
    );
    assert!((eval_loss(&tiny(), None, &data) - with_adapter).abs() > 1e-4);
}

/// `peft merge` of BERT classifiers (SSF with its LayerNorm scale-shifts, and LoRA): a Hugging
/// Face folder with the run's labels whose logits equal the adapter's on the base within 1e-5.
#[test]
fn bert_classifiers_merge_into_a_folder_with_the_same_logits() {
    use burn::tensor::Device;
    let tmp = tempfile::tempdir().unwrap();
    let data = sentiment_csv(tmp.path());
    let bert = tiny_bert();
    for (method, extra) in [
        ("ssf", &["--set", "init_ssf_weights=false"][..]),
        ("lora", &["--target", "query,value"][..]),
    ] {
        let out = tmp.path().join(method);
        let mut args = vec![
            "train",
            "--task",
            "classification",
            "--method",
            method,
            "--model",
            s(&bert),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "10",
            "--batch-size",
            "8",
            "--lr",
            "0.05",
        ];
        args.extend(extra);
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let merged = tmp.path().join(format!("{method}-merged"));
        let o = peft(&[
            "merge",
            "--model",
            s(&bert),
            "--adapter",
            s(&out),
            "--out",
            s(&merged),
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["id2label"]["0"], "negative", "{config}");
        assert!(merged.join("tokenizer.json").exists());

        let device = Device::flex();
        let (ours, tok) = peft_models::load::load_bert_classifier(&merged, 2, &device).unwrap();
        let (base, _) = peft_models::load::load_bert_classifier(&bert, 2, &device).unwrap();
        let files = peft_core::adapter_io::load_adapter(&out).unwrap();
        let c = peft_cli::methods::MethodConfig::from_json(&files.config).unwrap();
        let adapted = c.tuner().apply_and_load(base, "default", files).unwrap();
        let ids: Vec<Vec<u32>> = ["the good day", "a bad moon is cold"]
            .iter()
            .map(|t| tok.encode(t).unwrap())
            .collect();
        let (ids, mask) = peft_models::bert::encode_batch(&ids, &device);
        let err = peft_models::reference::max_abs_diff(
            ours.forward(ids.clone(), mask.clone()),
            adapted.forward(ids, mask),
        );
        assert!(err < 1e-5, "{method}: merged vs adapter: {err}");
    }
}

/// AdapterFusion on the tiny BERT classifier, as the AdapterFusion paper uses it: two Pfeiffer
/// adapters trained as classifiers of their own (one with a third label), fused for the
/// sentiment task with a new classifier trained beside the fusion and saved as its static
/// head; it classifies, resumes exactly, and `peft eval` scores it over the same adapters.
#[test]
fn fusion_trains_a_bert_classifier_with_its_own_head() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sentiment_csv(tmp.path());
    // A second task with three labels: its head cannot serve the fusion's two.
    let three = tmp.path().join("three.csv");
    let text = std::fs::read_to_string(&data).unwrap();
    let mut rows: Vec<String> = text.lines().map(String::from).collect();
    for r in rows.iter_mut().skip(1).step_by(3) {
        *r = r
            .replace("negative", "neutral")
            .replace("positive", "neutral");
    }
    std::fs::write(&three, rows.join("\n") + "\n").unwrap();
    let classify = |method: &str, csv: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--task",
            "classification",
            "--method",
            method,
            "--model",
            s(&tiny_bert()).to_string().leak(),
            "--data",
            s(csv).to_string().leak(),
            "--out",
            s(out).to_string().leak(),
            "--batch-size",
            "8",
            "--lr",
            "0.01",
            "--steps",
            "40",
            "--warmup",
            "3",
            "--save-every",
            "20",
        ];
        args.extend_from_slice(extra);
        peft(&args)
    };
    let (a, b) = (tmp.path().join("task_a"), tmp.path().join("task_b"));
    for (csv, out) in [(&data, &a), (&three, &b)] {
        let o = classify("pfeiffer", csv, out, &["--set", "reduction_factor=4"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let fuse = format!("{},{}", s(&a), s(&b));
    let fusion = tmp.path().join("fusion");
    let o = classify("fusion", &data, &fusion, &["--fuse", &fuse]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_fusion_config.json",
        "model_adapter_fusion.safetensors",
        "model_head.safetensors",
        "head_config.json",
        "labels.json",
    ] {
        assert!(fusion.join(f).exists(), "{f}");
    }
    let files = peft_core::adapter_io::load_adapter(&fusion).unwrap();
    assert_eq!(
        files.tensors.get("classifier.weight").unwrap().shape,
        [2, 32]
    );
    assert!(
        files
            .tensors
            .keys()
            .any(|k| k.contains(".output.adapter_fusion_layer.task_a,task_b.query."))
    );

    let part = tmp.path().join("fusion-part");
    let o = classify(
        "fusion",
        &data,
        &part,
        &["--fuse", &fuse, "--stop-after", "20"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = classify("fusion", &data, &part, &["--fuse", &fuse, "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        adapter_values(&part),
        adapter_values(&fusion),
        "resume is exact"
    );

    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--task",
            "classification",
            "--model",
            s(&tiny_bert()).to_string().leak(),
            "--data",
            s(&data).to_string().leak(),
        ];
        args.extend_from_slice(extra);
        peft(&args)
    };
    let o = eval(&[
        "--adapter",
        s(&a),
        "--adapter",
        s(&b),
        "--fusion",
        s(&fusion),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scores: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("fusion: {scores}");
    assert!(scores["accuracy"].as_f64().unwrap() > 0.9, "{scores}");
    // The trained metrics agree with what eval computes on the same model.
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(fusion.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(last["eval_accuracy"].as_f64().is_some(), "{last}");

    // Without the fusion, two adapters are one too many; a fusion missing one of its adapters
    // names it.
    let o = eval(&["--adapter", s(&a), "--adapter", s(&b)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = eval(&["--adapter", s(&a), "--fusion", s(&fusion)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("task_b"), "{}", stderr(&o));
}
