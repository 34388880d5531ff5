//! Llama-family hyper-parameters, from a Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufFile, Value};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// Sizes past these are no model's: refusing them keeps a corrupt config from asking for
/// terabytes before any weight is read.
pub(crate) const MAX_WIDTH: usize = 1 << 20;
pub(crate) const MAX_VOCAB: usize = 1 << 24;
pub(crate) const MAX_LAYERS: usize = 1 << 12;

/// `name` must be between 1 and `max`.
pub(crate) fn check_size(name: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 || value > max {
        return Err(PeftError::Config(format!(
            "{name} {value} is out of range (1..={max})"
        )));
    }
    Ok(())
}

/// The fields of a Hugging Face Llama `config.json` the model uses (others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Read `config.json`; architectures other than Llama-style decoders are refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        Self::from_json_str(path, &text)
    }

    /// Parse the text of a `config.json`; `path` only names it in errors.
    pub fn from_json_str(path: &Path, text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PeftError::format(path, format!("invalid JSON: {e}")))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("llama" | "mistral") | None => {}
            Some("qwen2") => {
                return Err(PeftError::format(
                    path,
                    "model_type `qwen2` is not supported yet (its q/k/v projections carry biases the Llama model here has no slot for)",
                ));
            }
            Some(model_type) => {
                return Err(PeftError::format(
                    path,
                    format!(
                        "model_type `{model_type}` is not a Llama-family decoder (llama, mistral)"
                    ),
                ));
            }
        }
        let config: Self =
            peft_core::error::from_json_value(value).map_err(|e| PeftError::format(path, e))?;
        config
            .validate()
            .map_err(|e| PeftError::format(path, e.to_string()))?;
        Ok(config)
    }

    /// From the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file
            .require("general.architecture")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        if arch != "llama" {
            return Err(PeftError::format(
                &file.path,
                format!("GGUF architecture `{arch}` is not supported (llama)"),
            ));
        }
        let u = |k: &str| -> Result<usize> {
            file.require(&format!("llama.{k}"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| {
                    PeftError::format(
                        &file.path,
                        format!("metadata `llama.{k}` is not an integer"),
                    )
                })
        };
        let f = |k: &str, default: f64| {
            file.meta(&format!("llama.{k}"))
                .and_then(Value::as_f64)
                .unwrap_or(default)
        };
        let vocab_size = match file.meta("llama.vocab_size").and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => file
                .require("tokenizer.ggml.tokens")?
                .as_array()
                .map(|a| a.len())
                .unwrap_or_default(),
        };
        let config = Self {
            vocab_size,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: u("attention.head_count")?,
            num_key_value_heads: u("attention.head_count_kv").ok(),
            head_dim: None,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: f("rope.freq_base", 10000.0),
            max_position_embeddings: u("context_length").unwrap_or(2048),
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: file
                .meta("tokenizer.ggml.bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as u32),
            eos_token_id: file
                .meta("tokenizer.ggml.eos_token_id")
                .and_then(Value::as_u64)
                .map(|v| serde_json::json!(v)),
        };
        config
            .validate()
            .map_err(|e| PeftError::format(&file.path, e.to_string()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        check_size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check_size("hidden_size", self.hidden_size, MAX_WIDTH)?;
        check_size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        check_size("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check_size("num_attention_heads", self.num_attention_heads, MAX_WIDTH)?;
        check_size("num_key_value_heads", self.kv_heads(), MAX_WIDTH)?;
        check_size(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_VOCAB,
        )?;
        match self.head_dim {
            Some(d) => check_size("head_dim", d, MAX_WIDTH)?,
            None if self.hidden_size % self.num_attention_heads != 0 => {
                return Err(PeftError::Config(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                )));
            }
            None => {}
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite())
            || !(self.rope_theta > 0.0 && self.rope_theta.is_finite())
        {
            return Err(PeftError::Config(format!(
                "rms_norm_eps {} and rope_theta {} must be positive",
                self.rms_norm_eps, self.rope_theta
            )));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(PeftError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(PeftError::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        Ok(())
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }
}
