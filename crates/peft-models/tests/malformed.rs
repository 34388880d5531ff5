//! Malformed input for every reader of outside files: the cases users (and corrupt downloads)
//! produce, structure-aware random mutations of real files (proptest, on stable), and every
//! input the coverage-guided fuzzer (`cargo xtask fuzz`) ever crashed on (`fuzz/regressions/`).
//! Each must end in `Ok` or one line naming what is wrong: no panic, abort or hang.

#[path = "../../../fuzz/readers.rs"]
mod readers;

use proptest::prelude::*;
use proptest::sample::Index;
use readers::{Outcome, fixtures, seeds};
use serde_json::{Value, json};

fn reader(name: &str) -> fn(&[u8]) -> Outcome {
    readers::READERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("reader")
}

/// `reader(bytes)` fails with one line containing every one of `needles`.
fn refused(name: &str, bytes: &[u8], needles: &[&str]) {
    if std::env::var_os("PEFT_COUNT_CASES").is_some() {
        eprintln!("malformed case: {name}");
    }
    match reader(name)(bytes) {
        Ok(()) => panic!(
            "{name}: accepted {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
        Err(e) => {
            assert!(
                !e.trim().is_empty() && !e.contains('\n'),
                "{name}: error is not one line: {e:?}"
            );
            for n in needles {
                assert!(e.contains(n), "{name}: `{e}` does not mention `{n}`");
            }
        }
    }
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap()
}

fn json_with(rel: &str, key: &str, value: Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&read(rel)).unwrap();
    v[key] = value;
    serde_json::to_vec(&v).unwrap()
}

/// A safetensors file from a header (JSON) and data bytes.
fn safetensors_raw(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

#[test]
fn the_seeds_are_accepted() {
    for (name, seed) in seeds() {
        assert_eq!(
            reader(name)(&seed),
            Ok(()),
            "{name}: a valid seed must load"
        );
    }
}

#[test]
fn malformed_safetensors() {
    let f32s = |n: usize| vec![0u8; 4 * n];
    refused("safetensors", b"", &["fuzz.safetensors"]);
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend(b"{}");
    refused("safetensors", &huge, &["fuzz.safetensors"]);
    // Offsets past the end, shape and byte count that disagree.
    refused(
        "safetensors",
        &safetensors_raw(
            &json!({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}),
            &f32s(4),
        ),
        &["safetensors"],
    );
    refused(
        "safetensors",
        &safetensors_raw(
            &json!({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}),
            &f32s(4),
        ),
        &["safetensors"],
    );
    refused(
        "safetensors",
        &safetensors_raw(
            &json!({"w": {"dtype": "F32", "shape": [u64::MAX, 2], "data_offsets": [0, 16]}}),
            &f32s(4),
        ),
        &["safetensors"],
    );
    // An integer dtype under a float key.
    let int = safetensors_raw(
        &json!({"model.norm.weight": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}),
        &[0; 16],
    );
    refused("safetensors", &int, &["model.norm.weight", "I64"]);
    // In a model checkpoint: a weight of the wrong shape, or of bytes where floats belong.
    let mut t = peft_core::tensors::TensorMap::read_safetensors(
        &fixtures().join("lora_tiny/base_plain/model.safetensors"),
    )
    .unwrap();
    t.insert(
        "model.norm.weight",
        peft_core::tensors::HostTensor::new(vec![3], vec![1.0; 3]),
    );
    refused(
        "llama_checkpoint",
        &t.to_safetensors_bytes(&[]).unwrap(),
        &["model.norm.weight", "[3]", "[64]"],
    );
    t.insert(
        "model.norm.weight",
        peft_core::tensors::HostTensor::from_bytes(vec![64], vec![1u8; 64]),
    );
    refused(
        "llama_checkpoint",
        &t.to_safetensors_bytes(&[]).unwrap(),
        &["model.norm.weight"],
    );
    t.remove("model.norm.weight");
    refused(
        "llama_checkpoint",
        &t.to_safetensors_bytes(&[]).unwrap(),
        &["missing tensor `model.norm.weight`"],
    );
}

/// Patch the little-endian u64 at `at` of a GGUF file.
fn patch_u64(mut bytes: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    bytes
}

#[test]
fn malformed_gguf() {
    let good = readers::tiny_gguf();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    refused("gguf", &bad_magic, &["fuzz.gguf", "magic"]);
    let mut version = good.clone();
    version[4] = 9;
    refused("gguf", &version, &["unsupported GGUF version 9"]);
    refused(
        "gguf",
        &patch_u64(good.clone(), 8, u64::MAX),
        &["fuzz.gguf"],
    ); // tensor count
    refused(
        "gguf",
        &patch_u64(good.clone(), 16, 1 << 40),
        &["fuzz.gguf"],
    ); // key/value count
    refused(
        "gguf",
        &patch_u64(good.clone(), 24, u64::MAX - 3),
        &["truncated"],
    ); // first key's length
    refused("gguf", &good[..good.len() / 2], &["fuzz.gguf"]);
    // general.alignment 0: the second key, a u32 after its 17-byte name.
    let key = b"general.alignment";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    let mut zero = good.clone();
    zero[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    refused("gguf", &zero, &["general.alignment"]);
    // A tensor offset past the end, and an unknown tensor type.
    let name = b"blk.0.ffn_up.weight";
    let info = good.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims (4) + 2 dims (16) + type (4), then the offset.
    refused(
        "gguf",
        &patch_u64(good.clone(), info + 24, 1 << 50),
        &["blk.0.ffn_up.weight", "past the end"],
    );
    let mut ty = good.clone();
    ty[info + 20..info + 24].copy_from_slice(&99u32.to_le_bytes());
    refused("gguf", &ty, &["blk.0.ffn_up.weight", "type 99"]);
    // Dimensions whose product overflows.
    let huge = patch_u64(
        patch_u64(good.clone(), info + 4, u64::MAX / 2),
        info + 12,
        4,
    );
    refused("gguf", &huge, &["blk.0.ffn_up.weight"]);
    // Arrays nested a thousand deep (a few bytes per level).
    let mut deep = good[..24].to_vec();
    deep = patch_u64(deep, 8, 0);
    deep = patch_u64(deep, 16, 1);
    deep.extend(1u64.to_le_bytes());
    deep.push(b'k');
    deep.extend(9u32.to_le_bytes());
    for _ in 0..1000 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    refused("gguf", &deep, &["nested"]);
}

#[test]
fn malformed_configs() {
    let llama = "lora_tiny/base_plain/config.json";
    let cases: Vec<(Value, &str)> = vec![
        (json!({"num_attention_heads": 0}), "num_attention_heads 0"),
        (json!({"num_key_value_heads": 0}), "num_key_value_heads 0"),
        (
            json!({"num_key_value_heads": 3}),
            "not a multiple of num_key_value_heads 3",
        ),
        (json!({"num_hidden_layers": 0}), "num_hidden_layers 0"),
        (json!({"hidden_size": -64}), "hidden_size"),
        (json!({"hidden_size": "64"}), "hidden_size"),
        (json!({"vocab_size": 1u64 << 60}), "vocab_size"),
        (json!({"intermediate_size": null}), "intermediate_size"),
        (
            json!({"head_dim": null, "hidden_size": 66}),
            "not a multiple of num_attention_heads",
        ),
        (json!({"rms_norm_eps": -1.0}), "rms_norm_eps"),
        (json!({"model_type": "qwen2"}), "qwen2"),
        (json!({"model_type": "gpt2"}), "gpt2"),
    ];
    for (patch, needle) in cases {
        let mut v: Value = serde_json::from_slice(&read(llama)).unwrap();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        refused(
            "llama_config",
            &serde_json::to_vec(&v).unwrap(),
            &["config.json", needle],
        );
    }
    refused("llama_config", b"[1, 2]", &["config.json"]);
    refused("llama_config", &[0xff, 0xfe], &[]);
    let bert = "bert_tiny/model/config.json";
    for (key, value, needle) in [
        ("num_attention_heads", json!(0), "num_attention_heads 0"),
        ("num_attention_heads", json!(5), "not a multiple"),
        ("num_hidden_layers", json!(0), "num_hidden_layers 0"),
        (
            "max_position_embeddings",
            json!(-1),
            "max_position_embeddings",
        ),
        ("layer_norm_eps", json!("small"), "layer_norm_eps"),
        ("model_type", json!("roberta"), "roberta"),
    ] {
        refused(
            "bert_config",
            &json_with(bert, key, value),
            &["config.json", needle],
        );
    }
}

#[test]
fn malformed_tokenizer_and_adapter_config() {
    refused("tokenizer", b"", &["tokenizer.json"]);
    refused("tokenizer", b"{\"model\": 3}", &["tokenizer.json"]);
    refused(
        "tokenizer",
        &json_with(
            "lora_tiny/base_plain/tokenizer.json",
            "model",
            json!({"type": "BPE", "vocab": 1}),
        ),
        &["tokenizer.json"],
    );
    let adapter = "lora_tiny/list_rslora/adapter/adapter_config.json";
    for (key, value, needle) in [
        ("r", json!(0), "r must be positive"),
        ("r", json!("8"), "r"),
        ("r", json!(-1), "r"),
        ("lora_alpha", json!([1]), "lora_alpha"),
        ("lora_dropout", json!(1.5), "lora_dropout"),
        ("target_modules", json!(7), "target_modules"),
        ("target_modules", json!("(unclosed"), "(unclosed"),
        (
            "target_modules",
            json!(["nothing_here"]),
            "matched no module",
        ),
        ("rank_pattern", json!({"q_proj": 0}), "rank_pattern"),
        ("layers_to_transform", json!("all"), "layers_to_transform"),
        ("bias", json!("some"), "bias"),
        ("peft_type", json!("NOT_A_METHOD"), "NOT_A_METHOD"),
        ("peft_type", json!(3), "peft_type"),
        ("use_dora", json!("yes"), "use_dora"),
    ] {
        refused("adapter_config", &json_with(adapter, key, value), &[needle]);
    }
    // Every peft_type Hugging Face PEFT writes: LoRA loads, the others are refused by name.
    for t in [
        "PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "IA3",
        "ADALORA",
        "LOHA",
        "LOKR",
        "OFT",
        "BOFT",
        "VERA",
        "LN_TUNING",
        "SHIRA",
    ] {
        refused(
            "adapter_config",
            &json_with(adapter, "peft_type", json!(t)),
            &[t],
        );
    }
    refused("adapter_config", b"null", &["adapter_config.json"]);
    // AdapterHub's configs: the bottleneck options inside `config`, a fusion's switches.
    let hub = |key: &str, value: Value| {
        let mut v: Value = serde_json::from_slice(&read(
            "adapterhub_tiny/custom_llama/adapter/adapter_config.json",
        ))
        .unwrap();
        v["config"][key] = value;
        serde_json::to_vec(&v).unwrap()
    };
    for (key, value, needle) in [
        ("reduction_factor", json!(0), "reduction_factor"),
        ("reduction_factor", json!("x"), "reduction_factor"),
        ("reduction_factor", json!({"1": 4}), "default"),
        (
            "reduction_factor",
            json!(1000),
            "larger than the hidden size",
        ),
        ("non_linearity", json!("softsign"), "softsign"),
        ("use_gating", json!(true), "use_gating"),
        ("phm_layer", json!(true), "phm_layer"),
        ("residual_before_ln", json!("maybe"), "residual_before_ln"),
        ("scaling", json!("huge"), "scaling"),
        ("init_weights", json!("zeros"), "init_weights"),
        ("dropout", json!(1.0), "dropout"),
        ("mh_adapter", json!(false), "output_adapter"),
        ("leave_out", json!("all"), "leave_out"),
    ] {
        let mut bytes = hub(key, value);
        if key == "mh_adapter" {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            v["config"]["output_adapter"] = json!(false);
            bytes = serde_json::to_vec(&v).unwrap();
        }
        refused("adapter_config", &bytes, &[needle]);
    }
    let fusion = |key: &str, value: Value| {
        let mut v: Value = serde_json::from_slice(&read(
            "adapterhub_tiny/fusion_llama/fusion/adapter_fusion_config.json",
        ))
        .unwrap();
        v["config"][key] = value;
        serde_json::to_vec(&v).unwrap()
    };
    refused(
        "adapter_config",
        &fusion("temperature", json!("warm")),
        &["temperature"],
    );
    refused("adapter_config", &fusion("query", json!("yes")), &["query"]);
    let mut none = fusion("query", json!(false));
    for k in ["key", "value"] {
        let mut v: Value = serde_json::from_slice(&none).unwrap();
        v["config"][k] = json!(false);
        none = serde_json::to_vec(&v).unwrap();
    }
    refused("adapter_config", &none, &["nothing to learn"]);
}

#[test]
fn malformed_sparse_adapter() {
    use peft_core::tensors::{HostTensor, TensorMap};
    let fixture = fixtures().join("methods_tiny/pafi_llama/adapter/adapter_model.safetensors");
    let base = TensorMap::read_safetensors(&fixture).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.v_proj.supertuning_indices";
    let bytes = |edit: &dyn Fn(&mut TensorMap)| {
        let mut t = base.clone();
        edit(&mut t);
        t.to_safetensors_bytes(&[]).unwrap()
    };
    // An index past the weight (another base model).
    let past = bytes(&|t| {
        let old = t.remove(key).unwrap();
        let mut v: Vec<i32> = old.i32_values().collect();
        v[3] = 1 << 20;
        t.insert(key, HostTensor::from_i32(old.shape.clone(), &v));
    });
    refused("sparse_adapter", &past, &["v_proj", "past the weight"]);
    // A negative index.
    let negative = bytes(&|t| {
        let old = t.remove(key).unwrap();
        let mut v: Vec<i32> = old.i32_values().collect();
        v[0] = -1;
        t.insert(key, HostTensor::from_i32(old.shape.clone(), &v));
    });
    refused("sparse_adapter", &negative, &["negative index -1"]);
    // Values and indices of different counts.
    let short = bytes(&|t| {
        let k = key.replace("indices", "values");
        let old = t.remove(&k).unwrap();
        t.insert(k, HostTensor::new(vec![3], old.data[..3].to_vec()));
    });
    refused("sparse_adapter", &short, &["supertuning_values", "[3]"]);
    // Indices stored as floats.
    let floats = bytes(&|t| {
        let old = t.remove(key).unwrap();
        let v: Vec<f32> = old.i32_values().map(|i| i as f32).collect();
        t.insert(key, HostTensor::new(old.shape.clone(), v));
    });
    refused("sparse_adapter", &floats, &["v_proj", "I32"]);
    // A missing tensor.
    let missing = bytes(&|t| {
        t.remove(key);
    });
    refused("sparse_adapter", &missing, &[key]);
}

#[test]
fn malformed_quant_state() {
    let state = |v: Value| serde_json::to_vec(&v).unwrap();
    let good = json!({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [128, 64],
        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0});
    assert_eq!(reader("quant_state")(&state(good.clone())), Ok(()));
    for (key, value, needle) in [
        ("quant_type", json!("int3"), "int3"),
        ("quant_type", json!("fp4"), "fp4"),
        ("blocksize", json!(0), "block size 0"),
        ("blocksize", json!(-64), "quant-state"),
        ("shape", json!([64, 128]), "shape"),
        ("shape", json!([1u64 << 62, 4]), "shape"),
        ("nested_blocksize", json!(7), "nested block size"),
        ("nested_offset", json!("x"), "quant-state"),
    ] {
        let mut v = good.clone();
        v[key] = value;
        refused(
            "quant_state",
            &state(v),
            &["model.layers.0.mlp.up_proj.weight", needle],
        );
    }
    refused("quant_state", b"\xff\x00", &["quant-state"]);
}

#[test]
fn malformed_data_files() {
    let jsonl: &[(&[u8], &str)] = &[
        (b"", "no examples"),
        (b"\n\n", "no examples"),
        (
            b"{\"question\": \"hi\", \"answer\": \"ok\xff\"}\n",
            "data.jsonl:1: not UTF-8",
        ),
        (
            b"{\"question\": \"the\", \"answer\": \"cat\"}\n{\"question\": 3, \"answer\": \"x\"}\n",
            "data.jsonl:2",
        ),
        (b"{\"question\": null, \"answer\": null}\n", "data.jsonl:1"),
        (b"[1, 2, 3]\n", "data.jsonl:1"),
        (b"{\"text\": \"\"}\n", "fewer than 2 tokens"),
        (b"{\"question\": \"the\"", "invalid JSON"),
    ];
    for (bytes, needle) in jsonl {
        refused("jsonl", bytes, &[needle]);
    }
    let deep = format!(
        "{{\"text\": {}\"x\"{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    refused("jsonl", deep.as_bytes(), &["data.jsonl:1", "recursion"]);
    let csv: &[(&[u8], &str)] = &[
        (b"", "no column `text`"),
        (b"text,label\n", "no rows"),
        (b"words,label\na,b\n", "no column `text`"),
        (b"text,label\na,b\nc\n", "line 3"),
        (b"text,label\na,b,c\n", "line 2"),
        (b"text,label\na, \n", "empty label"),
    ];
    for (bytes, needle) in csv {
        refused("csv", bytes, &["data.csv", needle]);
    }
    refused(
        "chatterbot_yaml",
        b"conversations:\n- - [unclosed\n",
        &["corpus.yml", "YAML"],
    );
    refused("chatterbot_yaml", b"\xff\xfe", &["corpus.yml", "UTF-8"]);
    let deep = format!(
        "conversations: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    refused("chatterbot_yaml", deep.as_bytes(), &["corpus.yml"]);
    // Wrong types inside a well-formed file are skipped, not fatal.
    assert_eq!(reader("chatterbot_yaml")(b"conversations: 3\n"), Ok(()));
}

/// A byte-level edit.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// A little-endian integer field set to a boundary value.
    Int(Index, u64),
    /// A JSON value replaced by one of the kind users get wrong (JSON seeds only).
    Json(Index, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let boundary = prop::sample::select(vec![
        0u64,
        1,
        2,
        255,
        1 << 31,
        u32::MAX as u64,
        1 << 40,
        i64::MAX as u64,
        u64::MAX,
    ]);
    let json_value = prop::sample::select(vec![
        json!(0),
        json!(-1),
        json!(1e308),
        json!(u64::MAX),
        json!(null),
        json!("x"),
        json!([]),
        json!({}),
        json!(true),
        json!([0, [0]]),
    ]);
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), boundary).prop_map(|(i, v)| Edit::Int(i, v)),
        (any::<Index>(), json_value).prop_map(|(i, v)| Edit::Json(i, v)),
    ]
}

/// Replace the `i`-th value (depth first) of `v` by `new`.
fn replace_nth(v: &mut Value, i: &mut usize, new: &Value) -> bool {
    if *i == 0 {
        *v = new.clone();
        return true;
    }
    *i -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| replace_nth(x, i, new)),
        Value::Object(o) => o.values_mut().any(|x| replace_nth(x, i, new)),
        _ => false,
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Flip(i, b) if !bytes.is_empty() => {
                let at = i.index(n);
                bytes[at] ^= 1 << b;
            }
            Edit::Truncate(i) => bytes.truncate(i.index(n)),
            Edit::Insert(i, b) => {
                let at = i.index(n);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Delete(i, k) if !bytes.is_empty() => {
                let at = i.index(n);
                bytes.drain(at..(at + k).min(bytes.len()));
            }
            Edit::Int(i, v) if bytes.len() >= 8 => {
                let at = i.index(bytes.len() - 7);
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            Edit::Json(i, v) => {
                if let Ok(mut doc) = serde_json::from_slice::<Value>(&bytes) {
                    let mut k = i.index(count(&doc));
                    replace_nth(&mut doc, &mut k, v);
                    bytes = serde_json::to_vec(&doc).unwrap();
                }
            }
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random edits of real files, for every reader: `Ok` or a one-line error, never a panic.
    #[test]
    fn mutated_real_files_never_panic(which in any::<Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let seeds = seeds();
        let (name, seed) = &seeds[which.index(seeds.len())];
        let input = apply(seed.clone(), &edits);
        if let Err(e) = reader(name)(&input) {
            prop_assert!(!e.trim().is_empty() && !e.contains('\n'), "{}: {:?}", name, e);
        }
    }
}

/// Inputs the coverage-guided fuzzer once crashed on (`fuzz/regressions/<reader>/*`) stay fixed.
#[test]
fn fuzz_regressions() {
    let dir = fixtures().join("../fuzz/regressions");
    let mut replayed = 0;
    for (name, f) in readers::READERS {
        let Ok(entries) = std::fs::read_dir(dir.join(name)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if let Err(e) = f(&std::fs::read(&path).unwrap()) {
                assert!(!e.contains('\n'), "{}: {e:?}", path.display());
            }
            replayed += 1;
        }
    }
    eprintln!("{replayed} fuzz regression inputs replayed");
}

/// The `tokenizers` crate panics on a `decoder` it cannot read (`expect("Helper")`); found by
/// the mutation test above. It must come back as an error naming the file.
#[test]
fn a_tokenizer_the_crate_panics_on_is_an_error() {
    let bytes =
        std::fs::read(fixtures().join("../fuzz/regressions/tokenizer/decoder_syntax_error.json"))
            .unwrap();
    refused(
        "tokenizer",
        &bytes,
        &["tokenizer.json", "rejected by the tokenizers crate"],
    );
}
