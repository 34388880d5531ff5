//! Loading a causal LM and its tokenizer from a Hugging Face folder or a GGUF file.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};

use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::TextTokenizer;

/// A model ready to use with its tokenizer.
pub struct LoadedModel {
    pub model: LlamaForCausalLM,
    pub tokenizer: TextTokenizer,
}

/// Load `path`: a `.gguf` file, or a folder with `config.json`, `*.safetensors` and
/// `tokenizer.json`.
pub fn load_causal_lm(path: &Path, device: &Device) -> Result<LoadedModel> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let tensors = gguf_llama_tensors(&file, &config)?;
        let tokenizer = TextTokenizer::from_gguf(&file)?;
        let model = LlamaForCausalLM::from_tensors(config, tensors, path, device)?;
        return Ok(LoadedModel { model, tokenizer });
    }
    if !path.is_dir() {
        return Err(PeftError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "expected a model folder or a .gguf file",
            ),
        ));
    }
    let config = LlamaConfig::from_file(&path.join("config.json"))?;
    let tensors = read_safetensors_folder(path)?;
    let tokenizer = TextTokenizer::from_file(&path.join("tokenizer.json"), config.eos_ids())?;
    let model = LlamaForCausalLM::from_tensors(config, tensors, path, device)?;
    Ok(LoadedModel { model, tokenizer })
}

/// Every `*.safetensors` file of a folder (sharded checkpoints included) in one map.
pub fn read_safetensors_folder(dir: &Path) -> Result<TensorMap> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PeftError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("adapter_")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PeftError::format(
            dir,
            "no *.safetensors weights in the model folder",
        ));
    }
    let mut all = TensorMap::new();
    for f in files {
        all.tensors
            .extend(TensorMap::read_safetensors_weights(&f)?.tensors);
    }
    Ok(all)
}

/// Undo llama.cpp's q/k row permutation (it interleaves the two RoPE halves of each head).
fn unpermute(t: HostTensor, n_head: usize) -> HostTensor {
    let (out, inp) = (t.shape[0], t.shape[1]);
    let half = out / n_head / 2;
    let mut data = vec![0f32; t.data.len()];
    // GGUF row (h, i, j) with i < half, j < 2 holds HF row (h, j, i).
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * half * 2 + i * 2 + j) * inp;
                let dst = (h * 2 * half + j * half + i) * inp;
                data[dst..dst + inp].copy_from_slice(&t.data[src..src + inp]);
            }
        }
    }
    HostTensor::new(t.shape, data)
}

/// The tensors of a llama GGUF under their Hugging Face names.
fn gguf_llama_tensors(file: &GgufFile, config: &LlamaConfig) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for name in file.tensors.keys() {
        let hf = if let Some(rest) = name.strip_prefix("blk.") {
            let (idx, part) = rest.split_once('.').unwrap_or((rest, ""));
            let module = match part {
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                _ => {
                    return Err(PeftError::format(
                        &file.path,
                        format!("unexpected tensor `{name}` in a llama GGUF"),
                    ));
                }
            };
            format!("model.layers.{idx}.{module}")
        } else {
            match name.as_str() {
                "token_embd.weight" => "model.embed_tokens.weight".into(),
                "output_norm.weight" => "model.norm.weight".into(),
                "output.weight" => "lm_head.weight".into(),
                "rope_freqs.weight" => continue,
                _ => {
                    return Err(PeftError::format(
                        &file.path,
                        format!("unexpected tensor `{name}` in a llama GGUF"),
                    ));
                }
            }
        };
        let mut t = file.tensor(name)?;
        if hf.ends_with("q_proj.weight") {
            t = unpermute(t, config.num_attention_heads);
        } else if hf.ends_with("k_proj.weight") {
            t = unpermute(t, config.kv_heads());
        }
        out.insert(hf, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // llama.cpp permute: w.reshape(n_head, 2, out/n_head/2, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, out, inp) = (2, 8, 3);
        let hf: Vec<f32> = (0..out * inp).map(|v| v as f32).collect();
        let half = out / n_head / 2;
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    let src = (h * 2 * half + j * half + i) * inp;
                    let dst = (h * half * 2 + i * 2 + j) * inp;
                    permuted[dst..dst + inp].copy_from_slice(&hf[src..src + inp]);
                }
            }
        }
        let back = unpermute(HostTensor::new(vec![out, inp], permuted), n_head);
        assert_eq!(back.data, hf);
    }
}

/// Load a BERT folder (`config.json`, `*.safetensors`, `tokenizer.json`) with a
/// `num_labels`-class head.
pub fn load_bert_classifier(
    dir: &Path,
    num_labels: usize,
    device: &Device,
) -> Result<(crate::bert::BertForSequenceClassification, TextTokenizer)> {
    let config = crate::bert::BertConfig::from_file(&dir.join("config.json"))?;
    let tensors = read_safetensors_folder(dir)?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), vec![])?;
    let model = crate::bert::BertForSequenceClassification::from_tensors(
        config, num_labels, tensors, dir, device,
    )?;
    Ok((model, tokenizer))
}
