//! Prompt tuning (TEXT init), P-tuning (LSTM) and prefix tuning (projected) through the `peft`
//! binary on the tiny Llama: train (lowering the held-out loss), resume exactly (the encoder's
//! network travels in the checkpoint), generate (several prompts in one padded batch), inspect,
//! a clear refusal to merge; BERT classification; composition with LoRA. The Python direction
//! of these methods is checked with the others' in tests/methods.rs.

mod common;

use std::path::Path;

use common::{
    adapter_values, data, eval_loss, generates_inspects_and_refuses_merge, peft, s, sentiment_csv,
    stderr, tiny, tiny_bert,
};
use peft_models::reference::Expected;

/// `--method`, its `peft_type`, its options, a learning rate that moves it.
const METHODS: [(&str, &str, &[&str], &str); 3] = [
    (
        "prompt-tuning",
        "PROMPT_TUNING",
        &[
            "prompt_tuning_init=TEXT",
            "prompt_tuning_init_text=hello what is your name",
        ],
        "0.1",
    ),
    (
        "p-tuning",
        "P_TUNING",
        &[
            "encoder_reparameterization_type=LSTM",
            "encoder_hidden_size=16",
        ],
        "0.01",
    ),
    (
        "prefix-tuning",
        "PREFIX_TUNING",
        &["prefix_projection=true", "encoder_hidden_size=32"],
        "0.01",
    ),
];

fn train(method: &str, options: &[&str], lr: &str, data: &Path, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--method",
        method,
        "--model",
        s(&tiny()),
        "--data",
        s(data),
        "--out",
        s(out),
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
        "--set",
        "num_virtual_tokens=4",
    ]
    .map(String::from)
    .to_vec();
    for o in options {
        args.extend(["--set".to_string(), o.to_string()]);
    }
    args
}

fn run(args: &[String]) -> std::process::Output {
    peft(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn prompt_methods_train_resume_generate_and_refuse_to_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base_loss = eval_loss(&tiny(), None, &data);
    for (method, peft_type, options, lr) in METHODS {
        let full = tmp.path().join(format!("{method}-full"));
        let o = run(&train(method, options, lr, &data, &full));
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let files = peft_core::adapter_io::load_adapter(&full).unwrap();
        assert_eq!(files.config["peft_type"], peft_type);
        assert_eq!(
            files.config["token_dim"],
            if method == "prefix-tuning" { 32 } else { 64 }
        );
        assert_eq!(files.config["num_virtual_tokens"], 4);
        assert_eq!(
            files.tensors.keys().collect::<Vec<_>>(),
            ["prompt_embeddings"]
        );
        let loss = eval_loss(&tiny(), Some(&full), &data);
        assert!(
            loss < base_loss - 0.01,
            "{method}: loss {loss} vs base {base_loss}"
        );

        // Interrupted at step 4 and resumed: the same adapter as the uninterrupted run.
        let part = tmp.path().join(format!("{method}-part"));
        let mut args = train(method, options, lr, &data, &part);
        args.extend(["--stop-after".into(), "4".into()]);
        assert!(run(&args).status.success());
        if method != "prompt-tuning" {
            assert!(
                part.join("checkpoint/training_extras.safetensors").exists(),
                "{method}: the encoder's network is checkpointed"
            );
        }
        let mut args = train(method, options, lr, &data, &part);
        args.push("--resume".into());
        let o = run(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(
            adapter_values(&part),
            adapter_values(&full),
            "{method}: resume is exact"
        );

        generates_inspects_and_refuses_merge(&full, peft_type, tmp.path());
    }
    // Prompt methods attach to no modules.
    let o = peft(&[
        "train",
        "--method",
        "prefix-tuning",
        "--model",
        s(&tiny()),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("x")),
        "--target",
        "q_proj",
    ]);
    assert!(stderr(&o).contains("--target"), "{}", stderr(&o));
}

/// `peft train --task classification --method METHOD` on the tiny BERT with `data` into `out`
/// (batch 8, rate 0.05), with the further arguments `extra`.
fn train_bert(method: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny_bert();
    let mut args = vec![
        "train",
        "--task",
        "classification",
        "--method",
        method,
        "--model",
        s(&model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--batch-size",
        "8",
        "--lr",
        "0.05",
    ];
    args.extend(extra);
    peft(&args)
}

/// On the tiny BERT classifier: prompt tuning and prefix tuning train with the new head
/// (saved as PEFT saves it for prompt methods, `base_model.classifier.*`) and `peft eval`
/// scores the folder.
#[test]
fn prompt_methods_train_a_bert_classifier() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sentiment_csv(tmp.path());
    for method in ["prompt-tuning", "prefix-tuning"] {
        let out = tmp.path().join(method);
        let o = train_bert(
            method,
            &data,
            &out,
            &[
                "--steps",
                "60",
                "--warmup",
                "3",
                "--save-every",
                "20",
                "--set",
                "num_virtual_tokens=4",
            ],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let files = peft_core::adapter_io::load_adapter(&out).unwrap();
        let mut keys: Vec<_> = files.tensors.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "base_model.classifier.bias",
                "base_model.classifier.weight",
                "prompt_embeddings"
            ],
            "{method}"
        );
        assert_eq!(files.config["task_type"], "SEQ_CLS");
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
        eprintln!("{method}: {scores}");
        assert!(
            scores["accuracy"].as_f64().unwrap() > 0.9,
            "{method}: {scores}"
        );
    }
    // Virtual tokens take positions: the tiny BERT has 64, so 4 virtual tokens leave 60.
    let o = train_bert(
        "prompt-tuning",
        &data,
        &tmp.path().join("long"),
        &["--set", "num_virtual_tokens=4", "--max-len", "62"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-len 62") && err.contains("less 4 virtual tokens"),
        "{err}"
    );
}

/// Prompt tuning and LoRA on one model: both act (the output differs from LoRA alone), each
/// saves its own folder in its reference format, and loading both into a fresh model gives
/// the same logits.
#[test]
fn prompt_tuning_and_lora_compose_on_one_model() {
    use burn::tensor::Device;
    use peft_core::tuner::Tuner;
    use peft_models::reference::max_abs_diff;
    let device = Device::flex();
    let fixture = Expected::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/methods_tiny/ia3_llama/expected.safetensors"),
    )
    .unwrap();
    let base = || {
        peft_models::load::load_causal_lm(&tiny(), &device)
            .unwrap()
            .model
    };
    let lora = peft_lora::LoraConfig {
        init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
        ..peft_lora::LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])
    };
    let prompt = peft_prompt::PromptTuningConfig::default();
    let both = prompt
        .apply(lora.apply(base(), "lora").unwrap(), "prompt")
        .unwrap();
    let logits = |m: &peft_models::llama::LlamaForCausalLM| m.forward(fixture.ids(&device), None);
    let together = logits(&both);
    let tmp = tempfile::tempdir().unwrap();
    lora.save(&both, "lora", tmp.path()).unwrap();
    prompt.save(&both, "prompt", tmp.path()).unwrap();
    let load = |name: &str| peft_core::adapter_io::load_adapter(&tmp.path().join(name)).unwrap();
    assert_eq!(load("prompt").config["peft_type"], "PROMPT_TUNING");
    let lora_only = lora.apply_and_load(base(), "lora", load("lora")).unwrap();
    let reloaded = prompt
        .apply_and_load(
            lora.apply_and_load(base(), "lora", load("lora")).unwrap(),
            "prompt",
            load("prompt"),
        )
        .unwrap();
    assert_eq!(max_abs_diff(logits(&reloaded), together.clone()), 0.0);
    let apart = max_abs_diff(logits(&lora_only), together);
    assert!(
        apart > 1e-3,
        "the prompt must change the LoRA model's output ({apart})"
    );
}

/// `peft generate` with several prompts answers them in one padded batch, each line what the
/// prompt gets alone (here with PEFT's prefix adapter).
#[test]
fn several_prompts_are_answered_together_as_each_alone() {
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/prompts_tiny/prefix_llama/adapter");
    let prompts = ["hello what is your name", "good day", "the cat is"];
    let model = tiny();
    let generate = |ps: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--raw",
            "--max-new-tokens",
            "5",
        ];
        for p in ps {
            args.extend(["--prompt", p]);
        }
        let o = peft(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let alone: String = prompts.iter().map(|p| generate(&[p])).collect();
    assert_eq!(generate(&prompts), alone);
    assert_eq!(alone.lines().count(), 3);
}

/// Prompt, P-tuning and prefix adapters trained here on the tiny BERT classifier (three labels,
/// as the fixture's config) load in Python PEFT with the same logits
/// (`make_fixtures.py --verify-method`; only where `PEFT_REF_PYTHON` is set).
#[test]
fn bert_prompt_adapters_trained_here_load_in_python_peft() {
    let Some(python) = common::reference_python() else {
        eprintln!("PEFT_REF_PYTHON is not set: the Python direction is not checked");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let words = ["good", "bad", "cat"];
    let mut csv = String::from("text,label\n");
    for i in 0..48 {
        csv.push_str(&format!(
            "the {} day,{}\n",
            words[i % 3],
            ["a", "b", "c"][i % 3]
        ));
    }
    let data = tmp.path().join("three.csv");
    std::fs::write(&data, csv).unwrap();
    let fixture = Expected::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/bert_tiny/expected.safetensors"),
    )
    .unwrap();
    let device = burn::tensor::Device::flex();
    for method in ["prompt-tuning", "p-tuning", "prefix-tuning"] {
        let out = tmp.path().join(method);
        let o = train_bert(
            method,
            &data,
            &out,
            &[
                "--steps",
                "6",
                "--warmup",
                "1",
                "--set",
                "num_virtual_tokens=3",
            ],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let files = peft_core::adapter_io::load_adapter(&out).unwrap();
        let config = peft_cli::methods::MethodConfig::from_json(&files.config).unwrap();
        let base = peft_models::load::load_bert_classifier(&tiny_bert(), 3, &device)
            .unwrap()
            .0;
        let model = config
            .tuner()
            .apply_and_load(base, "default", files)
            .unwrap();
        let (ids, mask) = fixture.padded_batch(&device);
        let logits = model.forward(ids, mask);
        let ours = Expected {
            logits: peft_core::tensors::HostTensor::from_tensor(logits.clone()).data,
            logits_shape: logits.dims().to_vec(),
            greedy: None,
            ..fixture.clone()
        };
        let expected = tmp.path().join(format!("{method}.expected.safetensors"));
        ours.write(&expected).unwrap();
        let said = common::python_verifies(&python, &out, &expected, &[]);
        eprintln!("BERT {}", said.trim());
    }
}
