//! `PromptTuningConfig`, `PromptEncoderConfig` and `PrefixTuningConfig` with the field names
//! and defaults of Hugging Face PEFT 0.21, sharing `PromptLearningConfig`'s fields.

use peft_core::{PeftError, Result};
use peft_sites::PromptSite;
use serde::{Deserialize, Serialize};

/// Virtual tokens when none are given: PEFT requires the field; its examples use 20.
pub const DEFAULT_VIRTUAL_TOKENS: usize = 20;

fn default_tokens() -> Option<usize> {
    Some(DEFAULT_VIRTUAL_TOKENS)
}

/// The fields every prompt-learning config has (PEFT `PromptLearningConfig`). The model facts
/// (`token_dim`, `num_attention_heads`, `num_layers`) are filled in from the model
/// ([`PromptLearningConfig::fill_from`]) as PEFT fills them before saving. Keys this crate does
/// not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: Option<usize>,
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only and encoder-only models (2 for encoder-decoder ones, not supported).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// `true` in every saved config; a loaded adapter is its saved table alone.
    #[serde(default)]
    pub inference_mode: bool,
    /// Fields of newer PEFT versions, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl PromptLearningConfig {
    /// Number of virtual tokens (`num_virtual_tokens · num_transformer_submodules`).
    pub fn total_virtual_tokens(&self) -> Result<usize> {
        let n = self.num_virtual_tokens.ok_or_else(|| {
            PeftError::Config(format!(
                "{}: num_virtual_tokens is required",
                self.peft_type
            ))
        })?;
        if n == 0 {
            return Err(PeftError::Config(format!(
                "{}: num_virtual_tokens must be at least 1",
                self.peft_type
            )));
        }
        Ok(n * self.num_transformer_submodules.unwrap_or(1))
    }

    /// Fill the model facts from the site the method attaches to, as PEFT's
    /// `_prepare_prompt_learning_config` does; a value already there must agree with the model.
    pub fn fill_from(&mut self, site: &PromptSite) -> Result<()> {
        match self.num_transformer_submodules {
            None | Some(1) => self.num_transformer_submodules = Some(1),
            Some(n) => {
                return Err(PeftError::Config(format!(
                    "{}: num_transformer_submodules {n}: only decoder-only and encoder-only models (1) are supported",
                    self.peft_type
                )));
            }
        }
        for (field, slot, value) in [
            ("token_dim", &mut self.token_dim, site.token_dim),
            (
                "num_attention_heads",
                &mut self.num_attention_heads,
                site.heads,
            ),
            ("num_layers", &mut self.num_layers, site.layers),
        ] {
            match *slot {
                Some(v) if v != value => {
                    return Err(PeftError::Config(format!(
                        "{}: {field} is {v} in the config but {value} for this model; is the adapter for another base model?",
                        self.peft_type
                    )));
                }
                _ => *slot = Some(value),
            }
        }
        Ok(())
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
}

fn random_init() -> String {
    "RANDOM".into()
}

/// Hugging Face PEFT `PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// `RANDOM` (N(0, 1)), `TEXT` (the token embeddings of `prompt_tuning_init_text`, repeated
    /// or cut to length) or `SAMPLE_VOCAB` (rows of random vocabulary entries).
    #[serde(default = "random_init")]
    pub prompt_tuning_init: String,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    #[serde(default)]
    pub tokenizer_kwargs: Option<serde_json::Value>,
    #[serde(flatten)]
    pub base: PromptLearningConfig,
    /// The token ids of `prompt_tuning_init_text` (with the tokenizer's special tokens, as PEFT
    /// tokenizes it); whoever has the tokenizer sets them before a `TEXT` init.
    #[serde(skip)]
    pub init_token_ids: Option<Vec<u32>>,
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({"peft_type": "PROMPT_TUNING"})).expect("defaults")
    }
}

impl PromptTuningConfig {
    /// Parse an `adapter_config.json` value; a config of another method is an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let c: Self = peft_core::adapter_io::method_config(
            &with_type(value, "PROMPT_TUNING"),
            "PROMPT_TUNING",
            "a prompt tuning",
        )?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        self.check_tokenizer_kwargs()?;
        match self.prompt_tuning_init.as_str() {
            "RANDOM" | "SAMPLE_VOCAB" => Ok(()),
            "TEXT" if self.prompt_tuning_init_text.is_some() => Ok(()),
            "TEXT" => Err(PeftError::Config(
                "prompt_tuning_init TEXT needs prompt_tuning_init_text".into(),
            )),
            other => Err(PeftError::Config(format!(
                "prompt_tuning_init `{other}`: expected RANDOM, TEXT or SAMPLE_VOCAB"
            ))),
        }
    }
}

/// `tokenizer_kwargs` that only say how to find or load the tokenizer: the `TEXT` init reads
/// the model's `tokenizer.json`, so they change nothing here.
const LOADING_KWARGS: [&str; 8] = [
    "use_fast",
    "trust_remote_code",
    "revision",
    "cache_dir",
    "local_files_only",
    "token",
    "padding_side",
    "truncation_side",
];

impl PromptTuningConfig {
    /// PEFT passes `tokenizer_kwargs` to `AutoTokenizer.from_pretrained` for the `TEXT` init
    /// only, and refuses them otherwise. Options that would change how the text is tokenized
    /// are refused here, naming them, rather than silently ignored.
    fn check_tokenizer_kwargs(&self) -> Result<()> {
        let Some(kwargs) = &self.tokenizer_kwargs else {
            return Ok(());
        };
        if kwargs.is_null() {
            return Ok(());
        }
        if self.prompt_tuning_init != "TEXT" {
            return Err(PeftError::Config(format!(
                "tokenizer_kwargs is only used with prompt_tuning_init TEXT (this config's is {})",
                self.prompt_tuning_init
            )));
        }
        let serde_json::Value::Object(map) = kwargs else {
            return Err(PeftError::Config(format!(
                "tokenizer_kwargs must be an object of keyword arguments, got {kwargs}"
            )));
        };
        match map.keys().find(|k| !LOADING_KWARGS.contains(&k.as_str())) {
            Some(k) => Err(PeftError::Config(format!(
                "tokenizer_kwargs `{k}`: the TEXT init tokenizes with the model's tokenizer.json as it is; only options about loading it are accepted ({})",
                LOADING_KWARGS.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

fn mlp() -> String {
    "MLP".into()
}

fn two() -> usize {
    2
}

/// Hugging Face PEFT `PromptEncoderConfig` (P-tuning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderConfig {
    /// `MLP` or `LSTM`.
    #[serde(default = "mlp")]
    pub encoder_reparameterization_type: String,
    /// Width of the encoder; `None`: `token_dim`.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (the MLP always has three linears, as PEFT's).
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers while training.
    #[serde(default)]
    pub encoder_dropout: f64,
    #[serde(flatten)]
    pub base: PromptLearningConfig,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({"peft_type": "P_TUNING"})).expect("defaults")
    }
}

impl PromptEncoderConfig {
    /// Parse an `adapter_config.json` value; a config of another method is an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let c: Self = peft_core::adapter_io::method_config(
            &with_type(value, "P_TUNING"),
            "P_TUNING",
            "a P-tuning",
        )?;
        if !matches!(c.encoder_reparameterization_type.as_str(), "MLP" | "LSTM") {
            return Err(PeftError::Config(format!(
                "encoder_reparameterization_type `{}`: expected MLP or LSTM",
                c.encoder_reparameterization_type
            )));
        }
        if c.encoder_num_layers == 0 || !(0.0..1.0).contains(&c.encoder_dropout) {
            return Err(PeftError::Config(
                "encoder_num_layers must be at least 1 and encoder_dropout in [0, 1)".into(),
            ));
        }
        Ok(c)
    }
}

/// Hugging Face PEFT `PrefixTuningConfig` (prefix tuning, P-tuning v2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// Width of the projection; `None`: `token_dim`.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Produce the prefixes with `Linear, Tanh, Linear` over `token_dim`-wide embeddings.
    #[serde(default)]
    pub prefix_projection: bool,
    /// `None` (N(0, 1) embeddings) or `"zero"` (zero prefixes, or a zero last projection).
    #[serde(default)]
    pub init_weights: Option<String>,
    #[serde(flatten)]
    pub base: PromptLearningConfig,
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({"peft_type": "PREFIX_TUNING"})).expect("defaults")
    }
}

impl PrefixTuningConfig {
    /// Parse an `adapter_config.json` value; a config of another method is an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let c: Self = peft_core::adapter_io::method_config(
            &with_type(value, "PREFIX_TUNING"),
            "PREFIX_TUNING",
            "a prefix tuning",
        )?;
        if let Some(w) = c.init_weights.as_deref()
            && w != "zero"
        {
            return Err(PeftError::Config(format!(
                "init_weights `{w}`: expected null or \"zero\""
            )));
        }
        Ok(c)
    }
}

/// `value` with `peft_type` set when it has none (the shared fields need it).
fn with_type(value: &serde_json::Value, peft_type: &str) -> serde_json::Value {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.entry("peft_type").or_insert(peft_type.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_read_peft_files_and_refuse_other_methods_and_bad_values() {
        let c = PromptTuningConfig::from_json(&serde_json::json!({
            "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "hi", "peft_version": "0.21.2"
        }))
        .unwrap();
        assert_eq!(c.base.num_virtual_tokens, Some(8));
        assert_eq!(c.base.extra["peft_version"], "0.21.2");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["prompt_tuning_init_text"], "hi");
        assert_eq!(back["peft_version"], "0.21.2");
        assert!(
            PromptTuningConfig::from_json(&serde_json::json!({"prompt_tuning_init": "TEXT"}))
                .is_err()
        );
        // tokenizer_kwargs: with TEXT only, and only options about loading the tokenizer.
        let text = serde_json::json!({
            "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi",
            "tokenizer_kwargs": {"use_fast": true, "trust_remote_code": false}
        });
        PromptTuningConfig::from_json(&text).unwrap();
        let mut prefix_space = text.clone();
        prefix_space["tokenizer_kwargs"]["add_prefix_space"] = true.into();
        let err = PromptTuningConfig::from_json(&prefix_space)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`add_prefix_space`") && err.contains("use_fast"),
            "{err}"
        );
        let err = PromptTuningConfig::from_json(&serde_json::json!({
            "prompt_tuning_init": "RANDOM", "tokenizer_kwargs": {"use_fast": true}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("only used with prompt_tuning_init TEXT"),
            "{err}"
        );
        let err = PromptEncoderConfig::from_json(&serde_json::json!({"peft_type": "LORA"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("LORA"), "{err}");
        assert!(
            PromptEncoderConfig::from_json(
                &serde_json::json!({"encoder_reparameterization_type": "GRU"})
            )
            .is_err()
        );
        assert!(
            PrefixTuningConfig::from_json(&serde_json::json!({"init_weights": "one"})).is_err()
        );
        assert_eq!(
            PrefixTuningConfig::default().base.num_virtual_tokens,
            Some(DEFAULT_VIRTUAL_TOKENS)
        );
    }
}
