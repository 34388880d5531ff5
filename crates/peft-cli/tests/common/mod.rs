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

/// The tiny BERT classifier's folder.
pub fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny/model")
}

/// Sixty-four `text,label` rows (positive/negative by one word), as `dir/data.csv`.
pub fn sentiment_csv(dir: &Path) -> PathBuf {
    let (pos, neg) = (
        ["good", "happy", "hot", "yes"],
        ["bad", "sad", "cold", "no"],
    );
    let fill = ["the", "day", "is", "a", "cat", "dog", "sun", "moon"];
    let mut csv = String::from("text,label\n");
    for i in 0..64 {
        let (word, label) = if i % 2 == 0 {
            (pos[i % 4], "positive")
        } else {
            (neg[i % 4], "negative")
        };
        csv.push_str(&format!(
            "{} {} {},{label}\n",
            fill[i % 8],
            word,
            fill[(i * 3 + 1) % 8]
        ));
    }
    let data = dir.join("data.csv");
    std::fs::write(&data, csv).unwrap();
    data
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

/// The reference venv's Python (`PEFT_REF_PYTHON`, which scripts/ref_venv.sh prints), if set.
pub fn reference_python() -> Option<PathBuf> {
    std::env::var_os("PEFT_REF_PYTHON").map(PathBuf::from)
}

/// Load the adapter folder `adapter` onto `base` here (any method, through the registry),
/// write our logits for the token ids `ids` (`shape` rows × length) and 8 greedy tokens after
/// the first row (stopping at `eos`), then have
/// Python PEFT load the same folder and compare within `tol` (`scripts/make_fixtures.py
/// --verify-method`; `gguf`: the base is that GGUF file, else the tiny Llama). Panics with what Python said when they disagree; returns it otherwise.
pub fn agrees_in_python(
    python: &Path,
    adapter: &Path,
    base: &Path,
    ids: &[i64],
    shape: [usize; 2],
    eos: &[u32],
    gguf_and_tol: Option<(&Path, &str)>,
) -> String {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let device = Device::flex();
    let loaded = peft_models::load::load_causal_lm(base, &device).unwrap();
    let files = peft_core::adapter_io::load_adapter(adapter).unwrap();
    let config = peft_cli::methods::MethodConfig::from_json(&files.config).unwrap();
    let model = config
        .tuner()
        .apply_and_load(loaded.model, "default", files)
        .unwrap();
    let n = shape[1];
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &device);
    let logits = model.forward(input, None);
    let prompt: Vec<u32> = ids[..n].iter().map(|&t| t as u32).collect();
    let ours = peft_models::reference::Expected {
        input_ids: ids.to_vec(),
        ids_shape: shape,
        logits: peft_core::tensors::HostTensor::from_tensor(logits.clone()).data,
        logits_shape: logits.dims().to_vec(),
        greedy: Some(
            peft_models::generate::greedy(&model, &prompt, 8, eos)
                .into_iter()
                .map(i64::from)
                .collect(),
        ),
    };
    let expected = adapter.with_extension("expected.safetensors");
    ours.write(&expected).unwrap();
    let extra = gguf_and_tol.map(|(gguf, tol)| [s(gguf), tol]);
    python_verifies(
        python,
        adapter,
        &expected,
        extra.as_ref().map_or(&[][..], |e| &e[..]),
    )
}

/// [`agrees_in_python`] on the tiny Llama with the token ids of the IA3 fixture (two rows; the
/// first one the greedy prompt), where `PEFT_REF_PYTHON` is set; prints what Python said.
pub fn agrees_on_tiny_in_python(adapter: &Path, eos: &[u32]) {
    let Some(python) = reference_python() else {
        return;
    };
    let fixture = peft_models::reference::Expected::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/methods_tiny/ia3_llama/expected.safetensors"),
    )
    .unwrap();
    let said = agrees_in_python(
        &python,
        adapter,
        &tiny(),
        &fixture.input_ids,
        fixture.ids_shape,
        eos,
        None,
    );
    eprintln!("{}", said.trim());
}

/// Have Python PEFT load the adapter folder `adapter` and compare its outputs with ours in
/// `expected` (`scripts/make_fixtures.py --verify-method ADAPTER EXPECTED [extra...]`). Panics
/// with what Python said when they disagree; returns it otherwise.
pub fn python_verifies(python: &Path, adapter: &Path, expected: &Path, extra: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make_fixtures.py");
    let o = Command::new(python)
        .arg(script)
        .args(["--verify-method", s(adapter), s(expected)])
        .args(extra)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}: {said}{}",
        adapter.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    said
}

/// `peft generate` on the tiny Llama with `adapter` answers, `peft inspect` names `method`,
/// and `peft merge` refuses (what is not a weight update cannot be merged) and writes nothing
/// under `tmp`. Returns what inspect printed.
pub fn generates_inspects_and_refuses_merge(adapter: &Path, method: &str, tmp: &Path) -> String {
    let model = tiny();
    let o = peft(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(adapter),
        "--prompt",
        "hello what",
        "--raw",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{method}: {}", stderr(&o));
    let o = peft(&["inspect", s(adapter)]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && text.contains(method), "{text}");
    let merged = tmp.join("merged");
    let o = peft(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(adapter),
        "--out",
        s(&merged),
    ]);
    assert!(!o.status.success(), "{method}: merge must refuse");
    assert!(stderr(&o).contains("cannot be merged"), "{}", stderr(&o));
    assert!(!merged.exists());
    text
}
