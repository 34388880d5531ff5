//! `IA3Config` with the field names and defaults of Hugging Face PEFT 0.21.

use peft_core::target::{ModuleSelector, TargetSpec};
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

fn ia3_type() -> String {
    "IA3".into()
}

fn yes() -> bool {
    true
}

/// Hugging Face PEFT `IA3Config`. Keys this crate does not know are kept in `extra` and
/// written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    #[serde(default = "ia3_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules whose output (or, for feed-forward ones, input) is scaled; `None`: the model
    /// type's default ([`Ia3Config::with_defaults`]).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Targets whose input is scaled instead of their output.
    #[serde(default)]
    pub feedforward_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: vectors start at 1 (the model is unchanged); `false`: random (for tests).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Fields of newer PEFT versions, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Hugging Face's default targets and feed-forward modules per `model_type`
/// (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and its feed-forward twin).
pub fn default_targets(
    model_type: &str,
) -> Option<(&'static [&'static str], &'static [&'static str])> {
    match model_type {
        "llama" | "mistral" => Some((&["k_proj", "v_proj", "down_proj"], &["down_proj"])),
        "bert" | "roberta" => Some((&["key", "value", "output.dense"], &["output.dense"])),
        _ => None,
    }
}

fn list(names: &[&str]) -> ModuleSelector {
    ModuleSelector::List(names.iter().map(|s| s.to_string()).collect())
}

impl Ia3Config {
    /// A config with these targets and feed-forward modules.
    pub fn new(targets: &[&str], feedforward: &[&str]) -> Self {
        Self {
            target_modules: Some(list(targets)),
            feedforward_modules: Some(list(feedforward)),
            ..Default::default()
        }
    }

    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let config: Self = peft_core::adapter_io::method_config(value, "IA3", "an IA3")?;
        config.validate()?;
        Ok(config)
    }

    /// Fill unset `target_modules` / `feedforward_modules` with Hugging Face's defaults for
    /// `model_type` (what Python PEFT writes into the saved config too).
    pub fn with_defaults(&self, model_type: &str) -> Result<Self> {
        let mut c = self.clone();
        if c.target_modules.is_none() {
            let (targets, ff) = default_targets(model_type).ok_or_else(|| {
                PeftError::Config(format!(
                    "IA3 has no default target_modules for model type `{model_type}`; give target_modules and feedforward_modules"
                ))
            })?;
            c.target_modules = Some(list(targets));
            if c.feedforward_modules.is_none() {
                c.feedforward_modules = Some(list(ff));
            }
        }
        if c.feedforward_modules.is_none() {
            c.feedforward_modules = Some(ModuleSelector::List(Vec::new()));
        }
        Ok(c)
    }

    /// Check the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "IA3" {
            return Err(PeftError::Config(format!(
                "peft_type is `{}`, this is an IA3 config (`IA3`)",
                self.peft_type
            )));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::Config(
                "fan_in_fan_out = true (GPT-2 Conv1D layers) is not supported by these models"
                    .into(),
            ));
        }
        // As PEFT checks it: only when both are lists.
        if let (Some(ModuleSelector::List(t)), Some(ModuleSelector::List(f))) =
            (&self.target_modules, &self.feedforward_modules)
            && let Some(extra) = f.iter().find(|m| !t.contains(m))
        {
            return Err(PeftError::Config(format!(
                "feedforward_modules must be a subset of target_modules: `{extra}` is not a target"
            )));
        }
        Ok(())
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    /// The target part of the config.
    pub fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.saved_modules(),
            ..Default::default()
        }
    }

    /// Whether the target at `path` is a feed-forward one (its input is scaled).
    pub fn is_feedforward(&self, path: &str) -> Result<bool> {
        match &self.feedforward_modules {
            Some(f) => f.matches(path),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_model_type_and_checks() {
        let c = Ia3Config::default().with_defaults("llama").unwrap();
        assert_eq!(
            c.target_modules,
            Some(list(&["k_proj", "v_proj", "down_proj"]))
        );
        assert!(c.is_feedforward("model.layers.0.mlp.down_proj").unwrap());
        assert!(!c.is_feedforward("model.layers.0.self_attn.k_proj").unwrap());
        // BERT's "output.dense" also takes attention.output.dense, as in PEFT.
        let b = Ia3Config::default().with_defaults("bert").unwrap();
        assert!(
            b.is_feedforward("bert.encoder.layer.0.attention.output.dense")
                .unwrap()
        );
        let err = Ia3Config::default()
            .with_defaults("gpt9")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gpt9") && err.contains("target_modules"),
            "{err}"
        );
        let err = Ia3Config::new(&["k_proj"], &["down_proj"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("down_proj"), "{err}");
        let err = Ia3Config::from_json(&serde_json::json!({"peft_type": "LORA"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("LORA"), "{err}");
        let err = Ia3Config::from_json(
            &serde_json::json!({"peft_type": "IA3", "init_ia3_weights": "yes"}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("init_ia3_weights"), "{err}");
    }
}
