//! LayerNorm tuning: `LNTuningConfig` of Hugging Face PEFT 0.21 and the whole-model method.

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::trainable;
use peft_core::target::{ModuleKind, ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{SiteHost, SiteKind, saved};
use serde::{Deserialize, Serialize};

fn ln_type() -> String {
    "LN_TUNING".into()
}

/// Hugging Face PEFT `LNTuningConfig`. Keys this crate does not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LnTuningConfig {
    #[serde(default = "ln_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Norms to tune; `None`: the model type's default ([`LnTuningConfig::with_defaults`]).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Fields of newer PEFT versions, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LnTuningConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Hugging Face's default targets per `model_type` (none for BERT: give them).
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" | "gemma" => {
            Some(&["input_layernorm", "post_attention_layernorm", "norm"])
        }
        "qwen2" | "qwen3" => Some(&["post_attention_layernorm"]),
        _ => None,
    }
}

impl LnTuningConfig {
    /// A config tuning the norms named `targets`.
    pub fn new(targets: &[&str]) -> Self {
        Self {
            target_modules: Some(ModuleSelector::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        peft_core::adapter_io::method_config(value, "LN_TUNING", "a LayerNorm-tuning")
    }

    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LN_TUNING" {
            return Err(PeftError::Config(format!(
                "peft_type is `{}`, this is a LayerNorm-tuning config (`LN_TUNING`)",
                self.peft_type
            )));
        }
        Ok(())
    }

    /// Fill unset `target_modules` with Hugging Face's default for `model_type`.
    pub fn with_defaults(&self, model_type: &str) -> Result<Self> {
        let mut c = self.clone();
        if c.target_modules.is_none() {
            let names = default_targets(model_type).ok_or_else(|| {
                PeftError::Config(format!(
                    "LN tuning has no default target_modules for model type `{model_type}`; name the norms (e.g. target_modules = [\"LayerNorm\"])"
                ))
            })?;
            c.target_modules = Some(ModuleSelector::List(
                names.iter().map(|s| s.to_string()).collect(),
            ));
        }
        Ok(c)
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.saved_modules(),
            ..Default::default()
        }
    }
}

fn key(path: &str, param: &str) -> String {
    format!("{KEY_PREFIX}{path}.ln_tuning_layers.{param}")
}

fn tuned_paths<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
    model
        .norms()
        .into_iter()
        .filter(|(_, n)| n.copy(name).is_some())
        .map(|(p, _)| p)
        .collect()
}

impl<M: SiteHost> Tuner<M> for LnTuningConfig {
    fn peft_type(&self) -> &'static str {
        "LN_TUNING"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("LnTuningConfig serialises")
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        let config = self.with_defaults(model.model_type())?;
        config.validate()?;
        if config
            .target_modules
            .as_ref()
            .is_some_and(|t| t.is_all_linear())
        {
            return Err(PeftError::Config(
                "LN tuning targets norms: \"all-linear\" selects none".into(),
            ));
        }
        let norms = model.site_paths(SiteKind::Norm);
        let targets = config
            .target_spec()
            .select(norms.iter().map(|p| (p.as_str(), ModuleKind::Linear)))?;
        for path in targets {
            model
                .norm_mut(&path)
                .expect("selected from the model's norms")
                .add_copy(name);
        }
        saved::train_whole(&mut model, &config.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, n) in model.norms() {
            let Some(copy) = n.copy(name) else { continue };
            out.insert(
                key(&path, "weight"),
                HostTensor::from_tensor(copy.weight.val()),
            );
            if let Some(b) = &copy.bias {
                out.insert(key(&path, "bias"), HostTensor::from_tensor(b.val()));
            }
        }
        saved::put_whole(model, &self.saved_modules(), &mut out);
        Ok(out)
    }

    fn load_state(
        &self,
        mut model: M,
        name: &str,
        mut tensors: TensorMap,
        file: &Path,
    ) -> Result<M> {
        for path in tuned_paths(&model, name) {
            let n = model.norm_mut(&path).expect("listed");
            let copy = n.copy_mut(name).expect("tuned");
            let device = copy.weight.device();
            let size = copy.weight.shape().dims::<1>()[0];
            let w = tensors.take_shaped(file, &key(&path, "weight"), &[size])?;
            copy.weight = trainable(w.to_tensor(&device));
            if copy.bias.is_some() {
                let b = tensors.take_shaped(file, &key(&path, "bias"), &[size])?;
                copy.bias = Some(trainable(b.to_tensor(&device)));
            }
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// Swap the tuned copies into the model (Hugging Face's LN-tuning "merge").
    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let paths = tuned_paths(&model, name);
        if paths.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        for path in paths {
            model.norm_mut(&path).expect("listed").merge(name)?;
        }
        Ok(model)
    }
}
