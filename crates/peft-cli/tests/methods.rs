//! Every method of the registry through the `peft` binary on the tiny fixtures: train (lowering
//! the held-out loss), resume exactly, merge, generate, inspect, options by reference name; and,
//! with the reference venv (`PEFT_REF_PYTHON`), the trained adapters load in Python PEFT with
//! the same logits and greedy text.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{
    adapter_values, agrees_in_python, agrees_on_tiny_in_python, data, eval_loss, peft,
    reference_python, s, stderr, tiny,
};
use peft_models::load::load_causal_lm;
use peft_models::reference::Expected;
use peft_sites::SiteHost;

/// The methods other than LoRA (which cli.rs covers), with a learning rate that moves them.
const METHODS: [(&str, &str, &str); 5] = [
    ("ia3", "IA3", "0.05"),
    ("ln-tuning", "LN_TUNING", "0.05"),
    ("dora", "LORA", "0.01"),
    ("pissa", "LORA", "0.01"),
    ("olora", "LORA", "0.01"),
];

/// The tiny Llama's folder as a string (it lives as long as the tests).
fn model() -> &'static str {
    static MODEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| s(&tiny()).to_string())
}

fn train<'a>(method: &'a str, lr: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--method",
        method,
        "--model",
        model(),
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--lr",
        lr,
        "--warmup",
        "1",
        "--save-every",
        "4",
        "--max-len",
        "32",
    ]
}

#[test]
fn each_method_trains_resumes_merges_generates_and_inspects() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    for (method, peft_type, lr) in METHODS {
        let full = tmp.path().join(format!("{method}-full"));
        let o = peft(&train(method, lr, s(&data), s(&full)));
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let files = peft_core::adapter_io::load_adapter(&full).unwrap();
        assert_eq!(files.config["peft_type"], peft_type);
        assert!(
            files.config["target_modules"].is_array(),
            "{method}: the model's default targets are saved"
        );
        let loss = eval_loss(&tiny(), Some(&full), &data);
        assert!(
            loss < base_loss - 0.01,
            "{method}: loss {loss} vs base {base_loss}"
        );

        // Interrupted at step 4 and resumed: the same adapter as the uninterrupted run.
        let part = tmp.path().join(format!("{method}-part"));
        let mut args = train(method, lr, s(&data), s(&part));
        args.extend(["--stop-after", "4"]);
        assert!(peft(&args).status.success());
        let mut args = train(method, lr, s(&data), s(&part));
        args.push("--resume");
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(
            adapter_values(&part),
            adapter_values(&full),
            "{method}: resume is exact"
        );

        // Merged into a Hugging Face folder: the same loss as base + adapter.
        let merged = tmp.path().join(format!("{method}-merged"));
        let model = tiny();
        let o = peft(&[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&full),
            "--out",
            s(&merged),
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let o = peft(&[
            "eval",
            "--model",
            s(&merged),
            "--data",
            s(&data),
            "--max-len",
            "32",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let merged_loss = v["loss"].as_f64().unwrap();
        assert!(
            (merged_loss - loss).abs() < 1e-4,
            "{method}: merged {merged_loss} vs {loss}"
        );

        let o = peft(&[
            "generate",
            "--model",
            s(&model),
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
            o.status.success() && text.contains(peft_type) && text.contains("target_modules"),
            "{text}"
        );
    }
}

#[test]
fn options_take_reference_names_from_the_command_line_or_a_method_table() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let cli = tmp.path().join("cli");
    let mut args = train("ia3", "0.05", s(&data), s(&cli));
    args.extend([
        "--set",
        "init_ia3_weights=false",
        "--set",
        r#"target_modules=["v_proj","down_proj"]"#,
        "--set",
        r#"feedforward_modules=["down_proj"]"#,
    ]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let config = peft_core::adapter_io::load_adapter(&cli).unwrap().config;
    assert_eq!(config["init_ia3_weights"], false);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["v_proj", "down_proj"])
    );

    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 1\nbatch_size = 4\nlr = 0.05\nwarmup = 1\nmax_len = 32\n\n[method]\nname = \"ia3\"\ninit_ia3_weights = false\ntarget_modules = [\"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]\n",
        s(&tiny()),
        s(&data),
        s(&tmp.path().join("file"))
    );
    std::fs::write(tmp.path().join("run.toml"), toml).unwrap();
    let o = peft(&["train", "--config", s(&tmp.path().join("run.toml"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_file = peft_core::adapter_io::load_adapter(&tmp.path().join("file"))
        .unwrap()
        .config;
    for k in [
        "init_ia3_weights",
        "target_modules",
        "feedforward_modules",
        "peft_type",
    ] {
        assert_eq!(from_file[k], config[k], "{k}");
    }

    // Unknown keys list the valid ones; LoRA flags on another method, bad values and unknown
    // methods are usage errors (exit code 2).
    for (extra, expected) in [
        (vec!["--set", "rank=4"], vec!["`rank`", "init_ia3_weights"]),
        (vec!["--r", "4"], vec!["--r", "--set"]),
        (
            vec!["--set", "init_ia3_weights=maybe"],
            vec!["init_ia3_weights"],
        ),
        (vec!["--set", "noequals"], vec!["key=value"]),
    ] {
        let bad = tmp.path().join("bad");
        let mut args = train("ia3", "0.05", s(&data), s(&bad));
        args.extend(extra);
        let o = peft(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            expected.iter().all(|e| err.contains(e)) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let o = peft(&train("vera", "0.05", s(&data), s(&tmp.path().join("bad"))));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(
            "lora, qlora, dora, pissa, olora, relora, adalora, ia3, ln-tuning, bitfit, beft"
        ),
        "{}",
        stderr(&o)
    );
    let o = peft(&["methods"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("LN_TUNING"));
}

/// `--method select` on layer 1's attention and norms: the held-out loss drops, the folder
/// holds those tensors under their own keys, resume is exact, and the merged model differs
/// from the base in exactly those tensors.
#[test]
fn select_trains_chosen_layers_modules_and_merges_into_them_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    let out = tmp.path().join("select");
    let mut args = train("select", "0.01", s(&data), s(&out));
    let set = [
        "--set",
        r#"module_groups=["attention","norms"]"#,
        "--set",
        "layers_to_transform=[1]",
    ];
    args.extend(set);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert_eq!(files.config["peft_type"], "SELECT");
    assert_eq!(files.config["layers_to_transform"], serde_json::json!([1]));
    let selected = |k: &str| {
        k.starts_with("model.layers.1.self_attn.")
            || (k.starts_with("model.layers.1.") && k.contains("layernorm"))
    };
    let mut keys: Vec<&String> = files.tensors.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| selected(k.trim_start_matches("base_model.model."))),
        "{keys:?}"
    );
    let loss = eval_loss(&tiny(), Some(&out), &data);
    assert!(loss < base_loss - 0.01, "loss {loss} vs base {base_loss}");

    // Stopped after the checkpoint at step 4 and resumed: the same adapter as the whole run.
    let part = tmp.path().join("select-part");
    let mut first = train("select", "0.01", s(&data), s(&part));
    first.extend(set);
    first.extend(["--stop-after", "4"]);
    let o = peft(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut resume = train("select", "0.01", s(&data), s(&part));
    resume.extend(set);
    resume.push("--resume");
    let o = peft(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(adapter_values(&part), adapter_values(&out));

    let merged = tmp.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        model(),
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |dir: &Path| {
        peft_core::tensors::TensorMap::read_safetensors(&dir.join("model.safetensors")).unwrap()
    };
    let (base, after) = (read(&tiny()), read(&merged));
    let mut changed = 0;
    for (k, t) in &base.tensors {
        let same = after.get(k).unwrap().data == t.data;
        assert_eq!(same, !selected(k), "{k}");
        changed += usize::from(!same);
    }
    assert_eq!(changed, 6);

    let bad_out = tmp.path().join("bad");
    let mut bad = train("select", "0.01", s(&data), s(&bad_out));
    bad.extend(["--set", r#"module_groups=["attn"]"#]);
    let o = peft(&bad);
    assert!(
        !o.status.success() && stderr(&o).contains("`attn`"),
        "{}",
        stderr(&o)
    );
}

/// `--method child-tuning-f`: trains every layer's attention, MLP and norms through random
/// gradient masks, saves a selection recording its density, and resumes exactly (the masks are
/// drawn from the seed and the step).
#[test]
fn child_tuning_f_trains_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    let out = tmp.path().join("ctf");
    let o = peft(&train("child-tuning-f", "0.01", s(&data), s(&out)));
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert_eq!(files.config["peft_type"], "SELECT");
    assert_eq!(files.config["density"], 0.3);
    // 2 layers x (7 linears + 2 norms), and the final norm.
    assert_eq!(files.tensors.len(), 19);
    let loss = eval_loss(&tiny(), Some(&out), &data);
    assert!(loss < base_loss - 0.01, "loss {loss} vs base {base_loss}");

    let part = tmp.path().join("ctf-part");
    let mut first = train("child-tuning-f", "0.01", s(&data), s(&part));
    first.extend(["--stop-after", "4"]);
    let o = peft(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut resume = train("child-tuning-f", "0.01", s(&data), s(&part));
    resume.push("--resume");
    let o = peft(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(adapter_values(&part), adapter_values(&out));

    // Another density moves the weights differently.
    let other = tmp.path().join("ctf-other");
    let mut args = train("child-tuning-f", "0.01", s(&data), s(&other));
    args.extend(["--set", "density=0.6"]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(adapter_values(&other), adapter_values(&out));
}

#[test]
fn bitfit_changes_only_biases_and_a_model_without_biases_is_told_to_use_beft() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let with_bias =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora_tiny/base_bias");
    let out = tmp.path().join("bitfit");
    let mut args = train("bitfit", "0.01", s(&data), s(&out));
    args[4] = s(&with_bias);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert_eq!(files.config["peft_type"], "BITFIT");
    // 2 layers x 7 linears, each with a bias, under their own keys.
    assert_eq!(files.tensors.len(), 14);
    assert!(
        files
            .tensors
            .keys()
            .all(|k| k.starts_with("base_model.model.model.layers.") && k.ends_with(".bias"))
    );

    let merged = tmp.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        s(&with_bias),
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base =
        peft_core::tensors::TensorMap::read_safetensors(&with_bias.join("model.safetensors"))
            .unwrap();
    let after =
        peft_core::tensors::TensorMap::read_safetensors(&merged.join("model.safetensors")).unwrap();
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let mut changed = 0;
    for (k, t) in &base.tensors {
        let same = after.get(k).unwrap().data == t.data;
        assert!(
            same || k.ends_with(".bias"),
            "{k} changed but is not a bias"
        );
        changed += usize::from(!same);
    }
    assert_eq!(changed, 14, "every trained bias moved");

    // The tiny Llama without biases: BitFit says to add some with BEFT, which trains and saves
    // in PEFT's format; merging it is refused as PEFT refuses it (no bias to fold into).
    let o = peft(&train(
        "bitfit",
        "0.01",
        s(&data),
        s(&tmp.path().join("none")),
    ));
    assert!(
        !o.status.success() && stderr(&o).contains("--method beft"),
        "{}",
        stderr(&o)
    );
    let beft = tmp.path().join("beft");
    let o = peft(&train("beft", "0.01", s(&data), s(&beft)));
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&beft).unwrap();
    assert_eq!(
        files.config["target_modules"],
        serde_json::json!(["v_proj"])
    );
    assert_eq!(
        files
            .tensors
            .get("base_model.model.model.layers.0.self_attn.v_proj.beft_bias")
            .unwrap()
            .shape,
        vec![1, 32]
    );
    let o = peft(&[
        "merge",
        "--model",
        model(),
        "--adapter",
        s(&beft),
        "--out",
        s(&tmp.path().join("m2")),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("no bias"),
        "{}",
        stderr(&o)
    );

    // LoRA's bias="all" and BitFit on one model both claim the biases: refused, either way.
    use peft_core::tuner::Tuner;
    let lora = peft_lora::LoraConfig {
        bias: "all".into(),
        ..peft_lora::LoraConfig::new(2, 4.0, &["q_proj"])
    };
    let device = Device::flex().autodiff();
    let m = lora
        .apply(load_causal_lm(&with_bias, &device).unwrap().model, "lora")
        .unwrap();
    let err = peft_select::BitFitConfig::default()
        .apply(m, "bitfit")
        .unwrap_err()
        .to_string();
    assert!(err.contains("already trained by another method"), "{err}");
    let m = peft_select::BitFitConfig::default()
        .apply(load_causal_lm(&with_bias, &device).unwrap().model, "bitfit")
        .unwrap();
    let err = lora.apply(m, "lora").unwrap_err().to_string();
    assert!(err.contains("already trained by another method"), "{err}");
}

#[test]
fn schedules_are_transformers_and_a_bad_name_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let out = tmp.path().join("linear");
    let mut args = train("ia3", "0.04", s(&data), s(&out));
    args.extend(["--schedule", "linear"]);
    let warmup = args.iter().position(|a| *a == "--warmup").unwrap();
    args[warmup + 1] = "2";
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let rates: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["learning_rate"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // Warmup 2 over 8 steps: 0, lr/2, lr, then linear to 0 at step 8.
    let expected = [
        0.0,
        0.02,
        0.04,
        0.04 * 5.0 / 6.0,
        0.04 * 4.0 / 6.0,
        0.04 * 3.0 / 6.0,
        0.04 * 2.0 / 6.0,
        0.04 / 6.0,
    ];
    for (r, e) in rates.iter().zip(expected) {
        assert!((r - e).abs() < 1e-9, "{rates:?}");
    }
    let bad = tmp.path().join("bad");
    let mut args = train("ia3", "0.04", s(&data), s(&bad));
    args.extend(["--schedule", "warm"]);
    let o = peft(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--schedule warm"), "{}", stderr(&o));
}

/// The reference venv's python (`scripts/ref_venv.sh`), when the environment names it.
#[test]
fn trained_adapters_load_in_python_peft_with_the_same_logits_and_greedy_text() {
    let Some(python) = reference_python() else {
        eprintln!(
            "PEFT_REF_PYTHON is not set (scripts/ref_venv.sh prints it): the Python direction is not checked"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let fixture = Expected::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/methods_tiny/ia3_llama/expected.safetensors"),
    )
    .unwrap();
    // The prompt methods with their encoders (tests/prompts.rs trains them more fully).
    let prompt_options: [(&str, &[&str]); 3] = [
        (
            "prompt-tuning",
            &[
                "prompt_tuning_init=TEXT",
                "prompt_tuning_init_text=hello what is",
            ],
        ),
        (
            "p-tuning",
            &[
                "encoder_reparameterization_type=LSTM",
                "encoder_hidden_size=16",
            ],
        ),
        (
            "prefix-tuning",
            &["prefix_projection=true", "encoder_hidden_size=32"],
        ),
    ];
    let runs = METHODS
        .into_iter()
        .map(|(m, _, lr)| (m, lr, &[][..]))
        .chain([("beft", "0.05", &[][..])])
        .chain([
            ("pafi", "0.05", &["density=0.05"][..]),
            (
                "fishmask",
                "0.05",
                &["density=0.05", "fisher_samples=8"][..],
            ),
        ])
        .chain(prompt_options.map(|(m, o)| (m, "0.01", o)));
    for (method, lr, options) in runs {
        let out = tmp.path().join(method);
        let mut args = train(method, lr, s(&data), s(&out));
        for o in options {
            args.extend(["--set", o]);
        }
        let o = peft(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        // The fixture's first row (the greedy prompt) and both rows' logits, as the fixture.
        let said = agrees_in_python(
            &python,
            &out,
            &tiny(),
            &fixture.input_ids,
            fixture.ids_shape,
            &[],
            None,
        );
        eprintln!("{}", said.trim());
    }
}

/// SmolLM2-135M (the GGUF transformers also reads): IA3, LN tuning, prompt tuning and prefix
/// tuning trained here for a few steps load in Python PEFT over the same GGUF with logits
/// within 1e-3 (the tolerance of the base model's own parity test,
/// `peft-models/tests/smollm2.rs`) and the same greedy tokens.
#[test]
fn smollm2_adapters_trained_here_load_in_python_peft() {
    let Some(python) = reference_python() else {
        eprintln!("PEFT_REF_PYTHON is not set: the Python direction is not checked");
        return;
    };
    let models = std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let gguf = peft_models::assets::SMOLLM2.ensure(&models).unwrap();
    let corpus = peft_models::assets::CHATTERBOT_EN.ensure(&models).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let loaded = load_causal_lm(&gguf, &device).unwrap();
    let tok = &loaded.tokenizer;
    let prompt: Vec<i64> = tok
        .encode(&tok.chat_prompt("What is the capital of France?"))
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    for (method, lr, set) in [
        ("ia3", "0.01", None),
        ("ln-tuning", "0.001", None),
        ("prompt-tuning", "0.01", Some("num_virtual_tokens=8")),
        ("prefix-tuning", "0.01", Some("num_virtual_tokens=8")),
    ] {
        let out = tmp.path().join(method);
        let mut args = vec![
            "train",
            "--method",
            method,
            "--model",
            s(&gguf),
            "--data",
            s(&corpus),
            "--out",
            s(&out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            lr,
            "--warmup",
            "1",
            "--max-len",
            "48",
        ];
        if let Some(o) = set {
            args.extend(["--set", o]);
        }
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let said = agrees_in_python(
            &python,
            &out,
            &gguf,
            &prompt,
            [1, prompt.len()],
            &tok.eos_ids,
            Some((&gguf, "1e-3")),
        );
        eprintln!("SmolLM2 {}", said.trim());
    }
}

/// Two methods on one model: LoRA and IA3 both act (the output differs from either alone),
/// each saves its own folder in its reference format, and loading both folders into a fresh
/// model gives the same logits.
#[test]
fn lora_and_ia3_compose_on_one_model_and_save_one_folder_each() {
    use peft_core::tuner::Tuner;
    let device = Device::flex();
    let fixture = Expected::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/methods_tiny/ia3_llama/expected.safetensors"),
    )
    .unwrap();
    let base = || load_causal_lm(&tiny(), &device).unwrap().model;
    let lora = peft_lora::LoraConfig {
        init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
        ..peft_lora::LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])
    };
    let ia3 = peft_adapter::Ia3Config {
        init_ia3_weights: false,
        ..Default::default()
    };
    let both = ia3
        .apply(lora.apply(base(), "lora").unwrap(), "ia3")
        .unwrap();
    let logits = |m: &peft_models::llama::LlamaForCausalLM| m.forward(fixture.ids(&device), None);
    let together = logits(&both);
    // v_proj holds both a LoRA and an IA3 part.
    let v = both
        .linears()
        .into_iter()
        .find(|(p, _)| p == "model.layers.0.self_attn.v_proj")
        .unwrap()
        .1;
    assert_eq!(v.names, vec!["lora", "ia3"]);

    let tmp = tempfile::tempdir().unwrap();
    lora.save(&both, "lora", tmp.path()).unwrap();
    ia3.save(&both, "ia3", tmp.path()).unwrap();
    let (lora_dir, ia3_dir) = (tmp.path().join("lora"), tmp.path().join("ia3"));
    let lora_files = peft_core::adapter_io::load_adapter(&lora_dir).unwrap();
    let ia3_files = peft_core::adapter_io::load_adapter(&ia3_dir).unwrap();
    assert_eq!(
        (
            lora_files.config["peft_type"].as_str(),
            ia3_files.config["peft_type"].as_str()
        ),
        (Some("LORA"), Some("IA3"))
    );
    assert!(
        lora_files.tensors.keys().all(|k| k.contains("lora_"))
            && ia3_files.tensors.keys().all(|k| k.ends_with("ia3_l"))
    );

    let lora_only = lora
        .apply_and_load(
            base(),
            "lora",
            peft_core::adapter_io::load_adapter(&lora_dir).unwrap(),
        )
        .unwrap();
    let reloaded = ia3
        .apply_and_load(
            lora.apply_and_load(base(), "lora", lora_files).unwrap(),
            "ia3",
            ia3_files,
        )
        .unwrap();
    assert_eq!(
        peft_models::reference::max_abs_diff(logits(&reloaded), together.clone()),
        0.0
    );
    let apart = peft_models::reference::max_abs_diff(logits(&lora_only), together);
    assert!(
        apart > 1e-3,
        "IA3 must change the LoRA model's output ({apart})"
    );
}

/// ReLoRA through the CLI: cycles of 3 steps in an 8-step run (restarts after steps 3 and 6),
/// saved as one plain LoRA adapter of rank 16·3 that lowers the loss, resumes exactly across a
/// restart, and loads in Python PEFT; without `relora_steps` it is a usage error.
#[test]
fn relora_trains_in_cycles_saves_one_lora_adapter_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    let options = ["--set", "relora_steps=3", "--set", "relora_warmup=1"];
    let full = tmp.path().join("relora-full");
    let mut args = train("relora", "0.01", s(&data), s(&full));
    args.extend(options);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&full).unwrap();
    assert_eq!(files.config["peft_type"], "LORA");
    assert_eq!(
        files.config["r"], 48,
        "three cycles of rank 16 (--r's default) side by side"
    );
    let loss = eval_loss(&tiny(), Some(&full), &data);
    assert!(loss < base_loss - 0.01, "loss {loss} vs base {base_loss}");

    // Stopped at step 4 (after the first restart) and resumed: the same adapter.
    let part = tmp.path().join("relora-part");
    let mut args = train("relora", "0.01", s(&data), s(&part));
    args.extend(options);
    args.extend(["--stop-after", "4"]);
    assert!(peft(&args).status.success());
    let mut args = train("relora", "0.01", s(&data), s(&part));
    args.extend([
        "--set",
        "relora_steps=4",
        "--set",
        "relora_warmup=1",
        "--resume",
    ]);
    let o = peft(&args);
    assert!(
        !o.status.success() && stderr(&o).contains("relora_steps=4"),
        "other cycles are refused: {}",
        stderr(&o)
    );
    let mut args = train("relora", "0.01", s(&data), s(&part));
    args.extend(options);
    args.push("--resume");
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        adapter_values(&part),
        adapter_values(&full),
        "resume is exact"
    );

    let o = peft(&train("relora", "0.01", s(&data), s(&tmp.path().join("x"))));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("relora_steps"), "{}", stderr(&o));

    agrees_on_tiny_in_python(&full, &[]);
}

/// AdaLoRA through the CLI: `total_step` follows `--steps`, the budget shrinks from 4 ranks per
/// module to 2 on average, the adapter is saved cut to the kept ranks with PEFT's
/// `rank_pattern`, lowers the loss, merges to the same loss, resumes exactly (the uncut factors
/// and the importance estimates are in the checkpoint), and loads in Python PEFT.
#[test]
fn adalora_allocates_its_budget_and_saves_the_kept_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    let out = tmp.path().join("adalora");
    // E starts at zero and A, B at N(0, 0.02): a high rate to move in 8 steps.
    let mut args = train("adalora", "0.2", s(&data), s(&out));
    args.extend([
        "--set",
        "init_r=4",
        "--set",
        "target_r=2",
        "--set",
        "tinit=1",
        "--set",
        "tfinal=2",
    ]);
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    assert_eq!(files.config["peft_type"], "ADALORA");
    assert_eq!(files.config["total_step"], 8);
    let pattern = files.config["rank_pattern"]
        .as_object()
        .expect("a rank pattern");
    let kept: usize = pattern
        .values()
        .map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .filter(|k| k.as_bool().unwrap())
                .count()
        })
        .sum();
    assert_eq!(
        kept,
        2 * pattern.len(),
        "the target budget: 2 ranks per module on average"
    );
    let loss = eval_loss(&tiny(), Some(&out), &data);
    assert!(loss < base_loss - 0.01, "loss {loss} vs base {base_loss}");

    let merged = tmp.path().join("adalora-merged");
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
    let merged_loss = eval_loss(&merged, None, &data);
    assert!(
        (merged_loss - loss).abs() < 1e-4,
        "merged {merged_loss} vs {loss}"
    );

    // Interrupted after step 3 (inside the cubic schedule) or step 6 (after the final masks
    // were fixed) and resumed: the same adapter, masks and pattern as the run in one go.
    for stop in ["3", "6"] {
        let part = tmp.path().join(format!("adalora-part{stop}"));
        let mut args = train("adalora", "0.2", s(&data), s(&part));
        args.extend([
            "--set",
            "init_r=4",
            "--set",
            "target_r=2",
            "--set",
            "tinit=1",
            "--set",
            "tfinal=2",
        ]);
        let mut first = args.clone();
        let every = first.iter().position(|a| *a == "--save-every").unwrap();
        first[every + 1] = "1";
        first.extend(["--stop-after", stop]);
        let o = peft(&first);
        assert!(o.status.success(), "{}", stderr(&o));
        args.push("--resume");
        let o = peft(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("resuming at step {stop}")),
            "{}",
            stderr(&o)
        );
        let resumed = peft_core::adapter_io::load_adapter(&part).unwrap();
        assert_eq!(
            resumed.config["rank_pattern"], files.config["rank_pattern"],
            "stop {stop}"
        );
        assert_eq!(
            adapter_values(&part),
            adapter_values(&out),
            "stop {stop}: resume is exact"
        );
    }

    agrees_on_tiny_in_python(&out, &[2]);
}

/// The I32 positions of every sparse delta of an adapter folder, by key.
fn sparse_indices(dir: &Path) -> Vec<(String, Vec<i32>)> {
    let files = peft_core::adapter_io::load_adapter(dir).unwrap();
    files
        .tensors
        .tensors
        .iter()
        .filter(|(k, _)| k.ends_with(".supertuning_indices"))
        .map(|(k, t)| (k.clone(), t.i32_values().collect()))
        .collect()
}

/// `--method pafi`, `fishmask` and `child-tuning-d`: 5% of every linear trains, saved as PEFT
/// SUPERTUNING sparse adapters about 5% of the dense size; they lower the loss, resume exactly
/// (the mask comes back from the checkpoint), generate, and merge into their entries only.
#[test]
fn sparse_selections_train_resume_generate_and_merge_into_their_entries_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    let runs: [(&str, &str, &[&str]); 3] = [
        ("pafi", "magnitude", &[]),
        ("fishmask", "fishmask", &["--set", "fisher_samples=16"]),
        ("child-tuning-d", "child_tuning_d", &[]),
    ];
    let mut masks = Vec::new();
    for (method, selection, extra) in runs {
        let out = tmp.path().join(method);
        let mut args = train(method, "0.05", s(&data), s(&out));
        args.extend(["--set", "density=0.05"]);
        args.extend(extra);
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let files = peft_core::adapter_io::load_adapter(&out).unwrap();
        assert_eq!(files.config["peft_type"], "SUPERTUNING");
        assert_eq!(files.config["selection"], selection);
        assert!((files.config["sparsity"].as_f64().unwrap() - 0.95).abs() < 1e-12);
        // Every linear of both layers, 5% of each: q, o 64x64 -> 204; k, v 32x64 -> 102;
        // gate, up, down 128x64 -> 409.
        let idx = sparse_indices(&out);
        assert_eq!(idx.len(), 14, "{method}");
        let total: usize = idx.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(total, 2 * (2 * 204 + 2 * 102 + 3 * 409), "{method}");
        let bytes = std::fs::metadata(out.join("adapter_model.safetensors"))
            .unwrap()
            .len() as usize;
        assert!(
            bytes < total * 8 + 8192,
            "{method}: {bytes} bytes for {total} entries"
        );
        let loss = eval_loss(&tiny(), Some(&out), &data);
        assert!(
            loss < base_loss - 0.01,
            "{method}: loss {loss} vs base {base_loss}"
        );
        masks.push(idx);

        // Stopped after the checkpoint at step 4 and resumed: the same adapter.
        let part = tmp.path().join(format!("{method}-part"));
        let mut first = train(method, "0.05", s(&data), s(&part));
        first.extend(["--set", "density=0.05"]);
        first.extend(extra);
        first.extend(["--stop-after", "4"]);
        let o = peft(&first);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let mut resume = train(method, "0.05", s(&data), s(&part));
        resume.extend(["--set", "density=0.05"]);
        resume.extend(extra);
        resume.push("--resume");
        let o = peft(&resume);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(sparse_indices(&part), sparse_indices(&out), "{method}");
        assert_eq!(adapter_values(&part), adapter_values(&out), "{method}");

        let o = peft(&[
            "generate",
            "--model",
            model(),
            "--adapter",
            s(&out),
            "--prompt",
            "hello what",
            "--max-new-tokens",
            "4",
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));

        let merged = tmp.path().join(format!("{method}-merged"));
        let o = peft(&[
            "merge",
            "--model",
            model(),
            "--adapter",
            s(&out),
            "--out",
            s(&merged),
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let read = |dir: &Path| {
            peft_core::tensors::TensorMap::read_safetensors(&dir.join("model.safetensors")).unwrap()
        };
        let (base, after) = (read(&tiny()), read(&merged));
        let mut changed = 0;
        for (k, t) in &base.tensors {
            let module = k.trim_end_matches(".weight");
            let key = format!("base_model.model.{module}.supertuning_indices");
            let mask: Vec<usize> = sparse_indices(&out)
                .into_iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.into_iter().map(|i| i as usize).collect())
                .unwrap_or_default();
            for (at, (x, y)) in t.data.iter().zip(&after.get(k).unwrap().data).enumerate() {
                if x.to_bits() != y.to_bits() {
                    assert!(
                        mask.contains(&at),
                        "{method}: {k}[{at}] moved outside the mask"
                    );
                    changed += 1;
                }
            }
        }
        assert!(
            changed > total / 2,
            "{method}: {changed} entries changed of {total}"
        );
    }
    // Three selections, three different masks.
    assert_ne!(masks[0], masks[1]);
    assert_ne!(masks[1], masks[2]);

    for (bad, said) in [
        ("density=0", "density 0"),
        ("density=1.5", "(0, 1]"),
        ("fisher_samples=1000", "fisher_samples=1000"),
    ] {
        let out = tmp.path().join("bad");
        let mut args = train("fishmask", "0.05", s(&data), s(&out));
        args.extend(["--set", bad, "--overwrite"]);
        let o = peft(&args);
        assert!(
            !o.status.success() && stderr(&o).contains(said),
            "{bad}: {}",
            stderr(&o)
        );
    }
}

/// `--set pack_indices=true`: the same PaFi run saved as our `SUPERTUNING_PACKED` (sorted
/// positions as LEB128 gaps): under 3/4 of PEFT's layout on disk, the same held-out loss and
/// merged model as the flat run (to rounding: its entries are summed in another order); it
/// resumes exactly; `peft merge` and `generate` read it; a bad value names the option.
#[test]
fn packed_sparse_adapter_trains_and_loads_like_the_flat_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = train("pafi", "0.05", s(&data), s(&out));
        args.extend(["--set", "density=0.05"]);
        args.extend(extra);
        let o = peft(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        out
    };
    let flat = run("flat", &[]);
    let packed = run("packed", &["--set", "pack_indices=true"]);
    // Stopped after the checkpoint at step 4 and resumed: the same adapter.
    let part = run("part", &["--set", "pack_indices=true", "--stop-after", "4"]);
    run("part", &["--set", "pack_indices=true", "--resume"]);
    assert_eq!(adapter_values(&part), adapter_values(&packed));
    let files = peft_core::adapter_io::load_adapter(&packed).unwrap();
    assert_eq!(files.config["peft_type"], "SUPERTUNING_PACKED");
    assert!(files.config.get("pack_indices").is_none());
    assert_eq!(
        files
            .tensors
            .keys()
            .filter(|k| k.ends_with(".supertuning_packed_indices"))
            .count(),
        14
    );
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("adapter_model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&packed) * 4 < size(&flat) * 3,
        "{} bytes packed against {} flat",
        size(&packed),
        size(&flat)
    );
    let (lp, lf) = (
        eval_loss(&tiny(), Some(&packed), &data),
        eval_loss(&tiny(), Some(&flat), &data),
    );
    assert!((lp - lf).abs() < 1e-6 * lf, "{lp} against {lf}");
    let merge = |adapter: &Path, name: &str| {
        let out = tmp.path().join(name);
        let o = peft(&[
            "merge",
            "--model",
            model(),
            "--adapter",
            s(adapter),
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        peft_core::tensors::TensorMap::read_safetensors(&out.join("model.safetensors")).unwrap()
    };
    let (mp, mf) = (merge(&packed, "m-packed"), merge(&flat, "m-flat"));
    assert_eq!(mp.keys().collect::<Vec<_>>(), mf.keys().collect::<Vec<_>>());
    for (k, t) in &mf.tensors {
        let d = t.data.iter().zip(&mp.get(k).unwrap().data);
        let worst = d.map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{k}: merged weights differ by {worst}");
    }
    let o = peft(&[
        "generate",
        "--model",
        model(),
        "--adapter",
        s(&packed),
        "--prompt",
        "hello what",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let mut args = train("pafi", "0.05", s(&data), "unused");
    args.extend(["--set", "pack_indices=yes"]);
    let o = peft(&args);
    assert!(
        !o.status.success() && stderr(&o).contains("pack_indices=\"yes\": expected true or false"),
        "{}",
        stderr(&o)
    );
}

/// The Fisher-scored selections on the BERT classifier: the mask is chosen with the
/// classification loss, the head trains whole beside it, and the adapter classifies.
#[test]
fn fisher_selections_train_a_bert_classifier() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny/model");
    let data = common::sentiment_csv(tmp.path());
    for method in ["fishmask", "child-tuning-d"] {
        let out = tmp.path().join(method);
        let o = peft(&[
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
            "60",
            "--batch-size",
            "8",
            "--lr",
            "0.01",
            "--warmup",
            "3",
            "--save-every",
            "30",
            "--set",
            "density=0.1",
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("Fisher information of"),
            "{}",
            stderr(&o)
        );
        let files = peft_core::adapter_io::load_adapter(&out).unwrap();
        assert_eq!(files.config["peft_type"], "SUPERTUNING");
        assert!(
            files
                .tensors
                .get("base_model.model.classifier.weight")
                .is_some()
        );
        assert!(
            files
                .tensors
                .keys()
                .any(|k| k.ends_with("attention.self.query.supertuning_indices")),
            "{method}"
        );
        let o = peft(&[
            "eval",
            "--task",
            "classification",
            "--model",
            s(&bert),
            "--adapter",
            s(&out),
            "--data",
            s(&data),
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let scores: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            scores["accuracy"].as_f64().unwrap() > 0.9,
            "{method}: {scores}"
        );
    }
}

/// `--convert-to-lora`: a PiSSA or OLoRA run saves a plain LoRA of rank 2r for the original
/// base (PEFT's `path_initial_model_for_weight_conversion`), which gives the loss of the adapter
/// as trained; the checkpoint keeps the trained form, an interrupted run resumes to the same
/// file, and Python PEFT loads it as a plain LoRA.
#[test]
fn pissa_and_olora_save_as_plain_lora_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    for method in ["pissa", "olora"] {
        let native = tmp.path().join(format!("{method}-native"));
        let o = peft(&train(method, "0.01", s(&data), s(&native)));
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let plain = tmp.path().join(format!("{method}-plain"));
        let mut args = train(method, "0.01", s(&data), s(&plain));
        args.push("--convert-to-lora");
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("plain LoRA adapter of rank 32"),
            "{}",
            stderr(&o)
        );

        let config = peft_core::adapter_io::load_adapter(&plain).unwrap().config;
        assert_eq!(
            (
                &config["init_lora_weights"],
                &config["r"],
                &config["lora_alpha"]
            ),
            (
                &serde_json::json!(true),
                &serde_json::json!(32),
                &serde_json::json!(64)
            ),
            "{method}"
        );
        let ckpt = peft_core::adapter_io::load_adapter(&plain.join("checkpoint"))
            .unwrap()
            .config;
        assert_eq!(ckpt["init_lora_weights"], method);
        let want = eval_loss(&tiny(), Some(&native), &data);
        let got = eval_loss(&tiny(), Some(&plain), &data);
        assert!(
            (got - want).abs() < 1e-4,
            "{method}: converted {got} vs as trained {want}"
        );

        let part = tmp.path().join(format!("{method}-part"));
        let mut args = train(method, "0.01", s(&data), s(&part));
        args.extend(["--convert-to-lora", "--stop-after", "4"]);
        assert!(peft(&args).status.success());
        let mut args = train(method, "0.01", s(&data), s(&part));
        args.extend(["--convert-to-lora", "--resume"]);
        let o = peft(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(adapter_values(&part), adapter_values(&plain), "{method}");
        agrees_on_tiny_in_python(&plain, &[]);
    }

    // Methods that leave the base alone, or quantize it (LoftQ), have nothing to convert.
    for (method, extra, expected) in [
        ("lora", vec![], "init_lora_weights = true"),
        ("ia3", vec![], "--method ia3"),
        (
            "lora",
            vec![
                "--set",
                "init_lora_weights=loftq",
                "--set",
                r#"loftq_config={"loftq_bits":4,"loftq_iter":1}"#,
            ],
            "LoftQ",
        ),
    ] {
        let bad = tmp.path().join("bad");
        let mut args = train(method, "0.01", s(&data), s(&bad));
        args.push("--convert-to-lora");
        args.extend(extra);
        let o = peft(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--convert-to-lora") && err.contains(expected),
            "{err}"
        );
    }
}

/// PiSSA, OLoRA and LoftQ over a 4-bit base from the command line: initialised on the
/// full-precision weights, then the residual (LoftQ: its NF4 values) is quantized, as PEFT's
/// recipes do; training lowers the loss. On BERT the classifier, trained whole, stays dense.
#[test]
fn base_initialisations_train_over_a_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    for (name, extra) in [
        ("pissa", vec!["--method", "pissa"]),
        ("olora", vec!["--method", "olora"]),
        (
            "loftq",
            vec![
                "--method",
                "lora",
                "--set",
                "init_lora_weights=loftq",
                "--set",
                r#"loftq_config={"loftq_bits":4,"loftq_iter":1}"#,
            ],
        ),
    ] {
        let out = tmp.path().join(name);
        let mut args = train("lora", "0.01", s(&data), s(&out));
        args.splice(1..3, extra);
        args.extend(["--quantize", "nf4"]);
        let o = peft(&args);
        let err = stderr(&o);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains("quantized to nf4"), "{err}");
        let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eval_loss"].as_f64())
            .flatten()
            .collect();
        assert!(
            losses.len() >= 2 && losses[losses.len() - 1] < losses[0],
            "{name}: held-out losses {losses:?}"
        );
    }

    let bert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny/model");
    let csv = common::sentiment_csv(tmp.path());
    let out = tmp.path().join("bert-pissa");
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--method",
        "pissa",
        "--model",
        s(&bert),
        "--data",
        s(&csv),
        "--out",
        s(&out),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--quantize",
        "nf4",
        "--convert-to-lora",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = peft_core::adapter_io::load_adapter(&out).unwrap();
    let head = files
        .tensors
        .get("base_model.model.classifier.weight")
        .unwrap();
    let start = peft_core::adapter_io::load_adapter(&out.join("checkpoint")).unwrap();
    assert_eq!(
        head.data,
        start
            .tensors
            .get("base_model.model.classifier.weight")
            .unwrap()
            .data,
        "the converted adapter keeps the trained head"
    );
    assert_eq!(files.config["r"], 32);
    // The head trains: after one step it is not where it ends.
    let one = tmp.path().join("bert-pissa-1");
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--method",
        "pissa",
        "--model",
        s(&bert),
        "--data",
        s(&csv),
        "--out",
        s(&one),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--quantize",
        "nf4",
        "--save-every",
        "1",
        "--stop-after",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after_one = peft_core::adapter_io::load_adapter(&one.join("checkpoint")).unwrap();
    assert_ne!(
        after_one
            .tensors
            .get("base_model.model.classifier.weight")
            .unwrap()
            .data,
        head.data
    );
}
