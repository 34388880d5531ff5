//! One entry point per reader of outside files, each taking the file's bytes. Shared by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/`) and the malformed-input tests
//! (`crates/peft-models/tests/malformed.rs`, which includes this file). An entry point returns
//! `Ok` or the reader's error message; a panic, an abort or a hang is the bug being looked for.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_models::bert::BertConfig;
use peft_models::config::LlamaConfig;
use peft_models::gguf::GgufFile;
use peft_models::llama::LlamaForCausalLM;
use peft_models::tokenizer::TextTokenizer;

/// For the fuzz targets: libFuzzer's panic hook aborts on every panic, even one that is caught.
/// The `tokenizers` crate panics on some malformed files and `TextTokenizer` catches that and
/// returns an error (see `peft_models::tokenizer`), so only panics raised inside that crate are
/// let through to the catch; any other panic still aborts, which is how the fuzzer reports it.
pub fn tolerate_caught_tokenizers_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tokenizers = info
                .location()
                .is_some_and(|l| l.file().contains("/tokenizers-"));
            if !in_tokenizers {
                fuzzer_hook(info);
            }
        }));
    });
}

/// What a reader made of its input: nothing, or its one-line error.
pub type Outcome = Result<(), String>;

/// Every reader by name (the fuzz target of the same name calls it).
pub const READERS: &[(&str, fn(&[u8]) -> Outcome)] = &[
    ("safetensors", safetensors),
    ("llama_checkpoint", llama_checkpoint),
    ("gguf", gguf),
    ("llama_config", llama_config),
    ("bert_config", bert_config),
    ("tokenizer", tokenizer),
    ("adapter_config", adapter_config),
    ("quant_state", quant_state),
    ("jsonl", jsonl),
    ("csv", csv),
    ("chatterbot_yaml", chatterbot_yaml),
    ("sparse_adapter", sparse_adapter),
];

/// The repository's `fixtures/` folder, found upwards from the crate being built.
pub fn fixtures() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("fixtures/lora_tiny").is_dir() {
        assert!(
            dir.pop(),
            "fixtures/ not found above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
    dir.join("fixtures")
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The tiny Llama (2 layers, hidden 64) the model-level readers load into.
fn tiny_config() -> &'static LlamaConfig {
    static C: OnceLock<LlamaConfig> = OnceLock::new();
    C.get_or_init(|| {
        LlamaConfig::from_file(&fixtures().join("lora_tiny/base_plain/config.json"))
            .expect("tiny config")
    })
}

fn tiny_tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        TextTokenizer::from_file(
            &fixtures().join("lora_tiny/base_plain/tokenizer.json"),
            vec![2],
        )
        .expect("tiny tokenizer")
    })
}

/// The tiny Llama built from its fixture tensors (`path` names the file being read in errors).
fn tiny_llama(path: &Path) -> Result<LlamaForCausalLM, String> {
    LlamaForCausalLM::from_tensors(
        tiny_config().clone(),
        tiny_tensors().clone(),
        path,
        &Device::flex(),
    )
    .map_err(err)
}

fn tiny_tensors() -> &'static TensorMap {
    static T: OnceLock<TensorMap> = OnceLock::new();
    T.get_or_init(|| {
        TensorMap::read_safetensors(&fixtures().join("lora_tiny/base_plain/model.safetensors"))
            .expect("tiny weights")
    })
}

fn bnb_tensors() -> &'static TensorMap {
    static T: OnceLock<TensorMap> = OnceLock::new();
    T.get_or_init(|| {
        TensorMap::read_safetensors(&fixtures().join("bnb_llama/nf4_dq/model.safetensors"))
            .expect("4-bit weights")
    })
}

/// A safetensors file, parsed.
pub fn safetensors(bytes: &[u8]) -> Outcome {
    TensorMap::from_safetensors_bytes(Path::new("fuzz.safetensors"), bytes)
        .map(drop)
        .map_err(err)
}

/// A model checkpoint: safetensors bytes loaded into the tiny Llama (plain or bitsandbytes
/// 4-bit keys), so shapes and dtypes under the model's keys are checked.
pub fn llama_checkpoint(bytes: &[u8]) -> Outcome {
    let path = Path::new("model.safetensors");
    let tensors = TensorMap::from_safetensors_bytes(path, bytes).map_err(err)?;
    LlamaForCausalLM::from_tensors(tiny_config().clone(), tensors, path, &Device::flex())
        .map(drop)
        .map_err(err)
}

/// A GGUF file: header, metadata, the Llama config and tokenizer it describes, every tensor.
pub fn gguf(bytes: &[u8]) -> Outcome {
    let file = GgufFile::from_bytes(Path::new("fuzz.gguf"), bytes.to_vec()).map_err(err)?;
    let config = LlamaConfig::from_gguf(&file).map_err(err);
    let tokenizer = TextTokenizer::from_gguf(&file).map_err(err);
    for name in file.tensors.keys() {
        file.tensor(name).map_err(err)?;
    }
    config?;
    let tokenizer = tokenizer?;
    tokenizer
        .encode("What is the capital of France?")
        .map_err(err)?;
    Ok(())
}

/// A Llama `config.json`.
pub fn llama_config(bytes: &[u8]) -> Outcome {
    let text = std::str::from_utf8(bytes).map_err(err)?;
    LlamaConfig::from_json_str(Path::new("config.json"), text)
        .map(drop)
        .map_err(err)
}

/// A BERT `config.json`.
pub fn bert_config(bytes: &[u8]) -> Outcome {
    let text = std::str::from_utf8(bytes).map_err(err)?;
    BertConfig::from_json_str(Path::new("config.json"), text)
        .map(drop)
        .map_err(err)
}

/// A `tokenizer.json`, then a round trip of a sentence through it.
pub fn tokenizer(bytes: &[u8]) -> Outcome {
    let tok = TextTokenizer::from_bytes(Path::new("tokenizer.json"), bytes, vec![]).map_err(err)?;
    let ids = tok.encode("the capital of france is paris").map_err(err)?;
    tok.decode(&ids).map(drop).map_err(err)
}

/// An `adapter_config.json`, parsed as the CLI parses it and applied to the tiny Llama: a
/// LoRA config, or AdapterHub's (a bottleneck adapter, or a fusion over two adapters `a` and
/// `b` the model holds).
pub fn adapter_config(bytes: &[u8]) -> Outcome {
    let path = Path::new("adapter_config.json");
    let value = peft_core::adapter_io::parse_config(path, bytes).map_err(err)?;
    let model = tiny_llama(path)?;
    if !peft_core::adapter_io::is_adapterhub_config(&value) {
        let config = peft_lora::LoraConfig::from_json(&value).map_err(err)?;
        return config.apply(model, "default").map(drop).map_err(err);
    }
    if value.get("adapter_names").is_some() {
        let fusion = peft_adapter::FusionConfig::from_json(&value).map_err(err)?;
        let bn = peft_adapter::BottleneckConfig::preset("seq_bn").map_err(err)?;
        let model = bn.apply(model, "a").map_err(err)?;
        let model = bn.apply(model, "b").map_err(err)?;
        let fusion = peft_adapter::FusionConfig {
            loaded_as: Some(vec!["a".into(), "b".into()]),
            ..fusion
        };
        return fusion.apply(model, "f").map(drop).map_err(err);
    }
    let config = peft_adapter::BottleneckConfig::from_json(&value).map_err(err)?;
    config.apply(model, "default").map(drop).map_err(err)
}

/// A sparse adapter's tensors (PEFT `SUPERTUNING`: values and I32 indices per linear) loaded
/// onto the tiny Llama with the PaFi fixture's config, and then as our `SUPERTUNING_PACKED`
/// (U8 LEB128 gaps): indices past a weight, counts that differ, cut or overlong gaps, wrong
/// dtypes and unknown keys must each be one line.
pub fn sparse_adapter(bytes: &[u8]) -> Outcome {
    let path = Path::new("adapter_model.safetensors");
    let tensors = TensorMap::from_safetensors_bytes(path, bytes).map_err(err)?;
    let config_bytes = fixture("methods_tiny/pafi_llama/adapter/adapter_config.json");
    let value = peft_core::adapter_io::parse_config(path, &config_bytes).map_err(err)?;
    let config = peft_select::SparseConfig::from_json(&value).map_err(err)?;
    let flat = (|| {
        let model = config.apply(tiny_llama(path)?, "default").map_err(err)?;
        config
            .load_state(model, "default", tensors.clone(), path)
            .map(drop)
            .map_err(err)
    })();
    let packed = config.packed(true);
    let model = packed.apply(tiny_llama(path)?, "default").map_err(err)?;
    packed
        .load_state(model, "default", tensors, path)
        .map(drop)
        .map_err(err)
        .or(flat)
}

/// A bitsandbytes quant-state JSON, in place of the one of a real 4-bit weight.
pub fn quant_state(bytes: &[u8]) -> Outcome {
    let key = "model.layers.0.mlp.up_proj.weight";
    let mut t = bnb_tensors().clone();
    let state = format!("{key}.quant_state.bitsandbytes__nf4");
    t.insert(
        state,
        peft_core::tensors::HostTensor::from_bytes(vec![bytes.len()], bytes),
    );
    let (out, inp) = (tiny_config().intermediate_size, tiny_config().hidden_size);
    peft_quant::checkpoint::take_4bit(&mut t, Path::new("model.safetensors"), key, out, inp)
        .map(drop)
        .map_err(err)
}

/// A JSONL data file, tokenized with the tiny model's tokenizer.
pub fn jsonl(bytes: &[u8]) -> Outcome {
    peft_models::data::jsonl_examples(Path::new("data.jsonl"), bytes, tiny_tokenizer(), 32)
        .map(drop)
        .map_err(err)
}

/// A CSV of texts and labels.
pub fn csv(bytes: &[u8]) -> Outcome {
    peft_models::data::labeled_csv_from(Path::new("data.csv"), bytes, "text", "label")
        .map(drop)
        .map_err(err)
}

/// A chatterbot YAML file.
pub fn chatterbot_yaml(bytes: &[u8]) -> Outcome {
    peft_models::data::chatterbot_file_pairs(Path::new("corpus.yml"), bytes)
        .map(drop)
        .map_err(err)
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).expect("fixture")
}

/// Real files (and one small generated GGUF) each reader is seeded with: the mutation test's
/// inputs and the cargo-fuzz seeds (`cargo xtask fuzz` writes them into the corpus).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let state = {
        let t = peft_core::tensors::TensorMap::read_safetensors(
            &fixtures().join("bnb_llama/nf4_dq/model.safetensors"),
        )
        .unwrap();
        t.get("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
            .unwrap()
            .bytes
            .clone()
    };
    vec![
        ("safetensors", fixture("lora_tiny/list_rslora/adapter/adapter_model.safetensors")),
        ("llama_checkpoint", fixture("lora_tiny/base_plain/model.safetensors")),
        ("llama_checkpoint", fixture("bnb_llama/nf4_dq/model.safetensors")),
        ("gguf", tiny_gguf()),
        ("llama_config", fixture("lora_tiny/base_plain/config.json")),
        ("bert_config", fixture("bert_tiny/model/config.json")),
        ("tokenizer", fixture("lora_tiny/base_plain/tokenizer.json")),
        ("adapter_config", fixture("lora_tiny/list_rslora/adapter/adapter_config.json")),
        ("adapter_config", fixture("lora_tiny/regex_patterns/adapter/adapter_config.json")),
        ("adapter_config", fixture("adapterhub_tiny/custom_llama/adapter/adapter_config.json")),
        ("adapter_config", fixture("adapterhub_tiny/fusion_llama/fusion/adapter_fusion_config.json")),
        ("quant_state", state),
        ("jsonl", b"{\"question\": \"the capital\", \"answer\": \"paris\"}\n{\"text\": \"the cat is good\"}\n{\"instruction\": \"what\", \"input\": \"day\", \"output\": \"good\"}\n".to_vec()),
        ("csv", b"text,label\n\"the, cat\",positive\ndog,negative\n".to_vec()),
        ("sparse_adapter", fixture("methods_tiny/pafi_llama/adapter/adapter_model.safetensors")),
        ("sparse_adapter", packed_sparse_seed()),
        ("chatterbot_yaml", b"categories:\n- x\nconversations:\n- - Hi\n  - Hello\n- - What is 2?\n  - 2\n".to_vec()),
    ]
}

/// The PaFi fixture in our packed layout (`SUPERTUNING_PACKED`: U8 LEB128 gaps).
fn packed_sparse_seed() -> Vec<u8> {
    let path = Path::new("adapter_model.safetensors");
    let dir = "methods_tiny/pafi_llama/adapter";
    let config = fixture(&format!("{dir}/adapter_config.json"));
    let value = peft_core::adapter_io::parse_config(path, &config).expect("fixture config");
    let config = peft_select::SparseConfig::from_json(&value).expect("fixture config");
    let weights = fixture(&format!("{dir}/adapter_model.safetensors"));
    let tensors = TensorMap::from_safetensors_bytes(path, &weights).expect("fixture weights");
    let model = config
        .apply(tiny_llama(path).expect("tiny"), "default")
        .expect("apply");
    let model = config
        .load_state(model, "default", tensors, path)
        .expect("fixture loads");
    let packed = config.packed(true);
    packed
        .state(&model, "default")
        .and_then(|t| t.to_safetensors_bytes(&[]))
        .expect("packed seed")
}

/// A small valid GGUF file (Llama metadata, a gpt2 tokenizer, F32/F16/Q8_0/Q4_0/Q4_1 tensors):
/// a seed for the GGUF reader that is fast to mutate.
pub fn tiny_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    enum V<'a> {
        U32(u32),
        F32(f32),
        Str(&'a str),
        Strs(&'a [&'a str]),
        I32s(&'a [i32]),
    }
    let kv: Vec<(&str, V)> = vec![
        ("general.architecture", V::Str("llama")),
        ("general.alignment", V::U32(32)),
        ("llama.embedding_length", V::U32(32)),
        ("llama.feed_forward_length", V::U32(64)),
        ("llama.block_count", V::U32(1)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.context_length", V::U32(64)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.pre", V::Str("smollm")),
        (
            "tokenizer.ggml.tokens",
            V::Strs(&["<|im_end|>", "a", "b", "ab", "Ġ", "c"]),
        ),
        ("tokenizer.ggml.merges", V::Strs(&["a b"])),
        ("tokenizer.ggml.token_type", V::I32s(&[3, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.eos_token_id", V::U32(0)),
    ];
    // (name, dims fastest first, type, bytes)
    let tensors: Vec<(&str, Vec<u64>, u32, usize)> = vec![
        ("token_embd.weight", vec![32, 6], 0, 32 * 6 * 4),
        ("output_norm.weight", vec![32], 1, 32 * 2),
        ("blk.0.attn_q.weight", vec![32, 32], 8, 32 * 34),
        ("blk.0.attn_k.weight", vec![32, 16], 2, 16 * 18),
        ("blk.0.ffn_up.weight", vec![32, 64], 3, 64 * 20),
    ];
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in &kv {
        string(&mut out, k);
        match v {
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            V::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in *items {
                    string(&mut out, s);
                }
            }
            V::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for x in *items {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, len) in &tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (*len as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (i, (_, _, _, len)) in tensors.iter().enumerate() {
        let start = out.len();
        out.extend((0..*len).map(|j| ((i * 31 + j * 7) % 13) as u8));
        out.resize(start + len.div_ceil(32) * 32, 0);
    }
    out
}
