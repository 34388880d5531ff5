//! `LoraConfig` with the field names and defaults of Hugging Face PEFT 0.21.

use indexmap::IndexMap;
use peft_core::target::{LayerIndices, LayersPattern, ModuleSelector, TargetSpec};
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

use crate::layer::{BaseInit, LoraInit};

/// `init_lora_weights`: `true`, `false` or a method name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Flag(bool),
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Flag(true)
    }
}

impl InitLoraWeights {
    /// How A and B are drawn before any initialisation from the base ([`Self::base_init`]).
    pub fn to_init(&self) -> Result<LoraInit> {
        self.base_init()?;
        match self {
            InitLoraWeights::Flag(true) => Ok(LoraInit::Default),
            InitLoraWeights::Flag(false) => Ok(LoraInit::Random),
            InitLoraWeights::Method(m) if m == "gaussian" => Ok(LoraInit::Gaussian),
            // Replaced by the base's factors.
            InitLoraWeights::Method(_) => Ok(LoraInit::Default),
        }
    }

    /// An initialisation from the base weight, which also changes the base (PiSSA, OLoRA).
    pub fn base_init(&self) -> Result<Option<BaseInit>> {
        let InitLoraWeights::Method(m) = self else {
            return Ok(None);
        };
        Ok(match m.as_str() {
            "gaussian" => None,
            "pissa" => Some(BaseInit::Pissa { niter: None }),
            "olora" => Some(BaseInit::Olora),
            // PEFT's LoftQConfig defaults; `LoraConfig::base_init` reads `loftq_config`.
            "loftq" => Some(BaseInit::Loftq { bits: 4, iter: 1 }),
            other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                Some(Ok(n)) => Some(BaseInit::Pissa { niter: Some(n) }),
                _ => {
                    return Err(PeftError::Config(format!(
                        "init_lora_weights = \"{m}\" is not supported (use true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\" or \"loftq\")"
                    )));
                }
            },
        })
    }
}

fn lora_type() -> String {
    "LORA".into()
}
fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn none_bias() -> String {
    "none".into()
}

/// Python writes `lora_alpha: 16`, not `16.0`: keep whole numbers integral in the JSON.
fn as_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        serde_json::Value::from(v as i64)
    } else {
        serde_json::Value::from(v)
    }
}

fn whole_as_int<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    as_number(*v).serialize(s)
}

fn whole_map_as_int<S: serde::Serializer>(
    m: &IndexMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    m.iter()
        .map(|(k, v)| (k.clone(), as_number(*v)))
        .collect::<IndexMap<_, _>>()
        .serialize(s)
}

/// Hugging Face PEFT `LoraConfig`. Keys this crate does not know are kept in `extra` and
/// written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default = "eight")]
    pub r: usize,
    #[serde(default = "eight_f", serialize_with = "whole_as_int")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// `none`, `all` or `lora_only`.
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// LoftQ's settings (`loftq_bits`, `loftq_iter`) with `init_lora_weights = "loftq"`;
    /// empty otherwise (PEFT writes `{}`).
    #[serde(default)]
    pub loftq_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub rank_pattern: IndexMap<String, usize>,
    #[serde(default, serialize_with = "whole_map_as_int")]
    pub alpha_pattern: IndexMap<String, f64>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Fields of newer PEFT versions, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl LoraConfig {
    /// A config with rank `r`, `lora_alpha` and a list of target module names.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(ModuleSelector::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let config: Self = peft_core::error::from_json_value(value.clone())
            .map_err(|e| PeftError::Config(format!("adapter_config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The initialisation from the base weight, if any (PiSSA, OLoRA, LoftQ with this config's
    /// `loftq_config`: PEFT's `loftq_bits` and `loftq_iter`, both required with `loftq`, as
    /// PEFT requires `loftq_config`).
    pub fn base_init(&self) -> Result<Option<BaseInit>> {
        let init = self.init_lora_weights.base_init()?;
        if !matches!(init, Some(BaseInit::Loftq { .. })) {
            return Ok(init);
        }
        let field = |key: &str| -> Result<u64> {
            let c = (!self.loftq_config.is_empty())
                .then_some(&self.loftq_config)
                .ok_or_else(|| {
                PeftError::Config(
                    "init_lora_weights = \"loftq\" needs loftq_config (e.g. {\"loftq_bits\": 4, \"loftq_iter\": 1})".into(),
                )
            })?;
            c.get(key).and_then(|v| v.as_u64()).ok_or_else(|| {
                PeftError::Config(format!(
                    "loftq_config.{key}: expected a non-negative integer, got {}",
                    c.get(key).map_or("nothing".into(), |v| v.to_string())
                ))
            })
        };
        Ok(Some(BaseInit::Loftq {
            bits: field("loftq_bits")? as u32,
            iter: field("loftq_iter")? as usize,
        }))
    }

    /// Check the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(PeftError::Config(format!(
                "peft_type is `{}`, this is a LoRA config (`LORA`)",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(PeftError::Config("r must be positive".into()));
        }
        self.base_init()?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            )));
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return Err(PeftError::Config(format!(
                "bias = \"{}\": expected \"none\", \"all\" or \"lora_only\"",
                self.bias
            )));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::Config(
                "fan_in_fan_out = true (GPT-2 Conv1D layers) is not supported by these models"
                    .into(),
            ));
        }
        if self.target_modules.is_none() {
            return Err(PeftError::Config(
                "target_modules is required (a list of module names, a regex, or \"all-linear\")"
                    .into(),
            ));
        }
        if self.rank_pattern.values().any(|r| *r == 0) {
            return Err(PeftError::Config(
                "rank_pattern ranks must be positive".into(),
            ));
        }
        self.init_lora_weights.to_init()?;
        Ok(())
    }

    /// The target part of the config.
    pub fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            modules_to_save: self.modules_to_save.clone().unwrap_or_default(),
        }
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    /// Rank and alpha for the module at `path` (`rank_pattern`/`alpha_pattern` win; their first
    /// matching key in the config's order, as in PEFT).
    pub fn rank_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = peft_core::target::pattern_value(&self.rank_pattern, path)?
            .copied()
            .unwrap_or(self.r);
        let alpha = peft_core::target::pattern_value(&self.alpha_pattern, path)?
            .copied()
            .unwrap_or(self.lora_alpha);
        Ok((r, alpha))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_defaults_and_unknown_keys() {
        let json = serde_json::json!({
            "peft_type": "LORA", "target_modules": ["q_proj"], "a_new_field": {"x": 1}
        });
        let c = LoraConfig::from_json(&json).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.bias.as_str()), (8, 8.0, "none"));
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["a_new_field"], serde_json::json!({"x": 1}));
    }

    #[test]
    fn another_method_is_refused() {
        let json = serde_json::json!({"peft_type": "IA3", "target_modules": ["k_proj"]});
        let err = LoraConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("IA3"), "{err}");
    }

    #[test]
    fn rank_pattern_wins() {
        let mut c = LoraConfig::new(8, 16.0, &["q_proj"]);
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
        c.alpha_pattern.insert("q_proj".into(), 4.0);
        assert_eq!(
            c.rank_alpha("model.layers.1.self_attn.q_proj").unwrap(),
            (2, 4.0)
        );
        assert_eq!(
            c.rank_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (8, 4.0)
        );
    }
}
