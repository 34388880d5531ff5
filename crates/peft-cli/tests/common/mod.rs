//! Helpers the `peft` binary's tests share: running it, the tiny Llama fixture, a small
//! question/answer data file and reading adapters back.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft")
}

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora_tiny/base_plain")
}

/// Forty question/answer lines over the tiny tokenizer's words, as `dir/data.jsonl`.
pub fn data(dir: &Path) -> PathBuf {
    let words = [
        "hello", "what", "is", "the", "capital", "of", "france", "paris", "good", "day", "cat",
        "dog",
    ];
    let mut lines = String::new();
    for i in 0..40 {
        let q = format!(
            "{} {} {}",
            words[i % 12],
            words[(i * 5 + 1) % 12],
            words[(i * 7 + 2) % 12]
        );
        let a = format!("{} {}", words[(i * 3) % 12], words[(i + 4) % 12]);
        lines.push_str(&serde_json::json!({"question": q, "answer": a}).to_string());
        lines.push('\n');
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every value of an adapter folder's tensors, in key order.
pub fn adapter_values(dir: &Path) -> Vec<f32> {
    let files = peft_core::adapter_io::load_adapter(dir).unwrap();
    files
        .tensors
        .tensors
        .values()
        .flat_map(|t| t.data.clone())
        .collect()
}

/// Held-out loss of `model` (with `adapter`) on `data`, as `peft eval` prints it (max-len 32).
pub fn eval_loss(model: &Path, adapter: Option<&Path>, data: &Path) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--max-len",
        "32",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let o = peft(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}
