//! BEFT (Hugging Face PEFT `BEFT`): new zero-initialised biases added to target linears,
//! `y = base(x) + b`, key `base_model.model.<path>.beft_bias` of shape `[1, out]`. The way to
//! bias-only tuning on a model without biases (Llama), in a format Python PEFT loads.

use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use peft_core::adapter_io::KEY_PREFIX;
use peft_core::target::{ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{FeatureVector, LinearPart, SiteHost, saved};
use serde::{Deserialize, Serialize};

fn beft_type() -> String {
    "BEFT".into()
}

fn yes() -> bool {
    true
}

/// Hugging Face PEFT `BeftConfig`. Keys this crate does not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeftConfig {
    #[serde(default = "beft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Linears that get a bias; `None`: the model type's default (value projections).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: biases start at zero (the model is unchanged); `false`: random (for tests).
    #[serde(default = "yes")]
    pub init_weights: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for BeftConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

fn key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.beft_bias")
}

impl BeftConfig {
    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        peft_core::adapter_io::method_config(value, "BEFT", "a BEFT")
    }

    /// Fill unset `target_modules` with Hugging Face's default for `model_type`.
    pub fn with_defaults(&self, model_type: &str) -> Result<Self> {
        let mut c = self.clone();
        if c.target_modules.is_none() {
            let name = match model_type {
                "llama" | "mistral" => "v_proj",
                "bert" | "roberta" => "value",
                other => {
                    return Err(PeftError::Config(format!(
                        "BEFT has no default target_modules for model type `{other}`; give target_modules"
                    )));
                }
            };
            c.target_modules = Some(ModuleSelector::List(vec![name.into()]));
        }
        Ok(c)
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
}

fn adapted<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|(_, s)| matches!(s.part(name), Some(LinearPart::Bias(_))))
        .map(|(p, _)| p)
        .collect()
}

impl<M: SiteHost> Tuner<M> for BeftConfig {
    fn peft_type(&self) -> &'static str {
        "BEFT"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("BeftConfig serialises")
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        let config = self.with_defaults(model.model_type())?;
        let spec = TargetSpec {
            target_modules: config.target_modules.clone(),
            exclude_modules: config.exclude_modules.clone(),
            modules_to_save: config.saved_modules(),
            ..Default::default()
        };
        let modules = model.module_paths();
        for path in spec.select(modules.iter().map(|(p, k)| (p.as_str(), *k)))? {
            let site = model
                .linear_mut(&path)
                .expect("selected from the model's linears");
            let (n, device) = (site.base.d_output(), site.base.device());
            let init = if config.init_weights {
                Tensor::zeros([n], &device)
            } else {
                Tensor::random([n], Distribution::Normal(0.0, 0.1), &device)
            };
            site.add_part(name, LinearPart::Bias(FeatureVector::new(init)));
        }
        saved::train_whole(&mut model, &config.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.linears() {
            if let Some(LinearPart::Bias(b)) = site.part(name) {
                out.insert(
                    key(&path),
                    HostTensor::new(
                        vec![1, b.len()],
                        HostTensor::from_tensor(b.value.val()).data,
                    ),
                );
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
        for path in adapted(&model, name) {
            let site = model.linear_mut(&path).expect("listed");
            let device = site.base.device();
            let Some(LinearPart::Bias(b)) = site.part_mut(name) else {
                unreachable!()
            };
            let n = b.len();
            let t = tensors.take_shaped(file, &key(&path), &[1, n])?;
            *b = FeatureVector::new(HostTensor::new(vec![n], t.data).to_tensor(&device));
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// `bias += b`; like PEFT, refused for a layer without a bias (the model's own config
    /// could not hold one).
    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let paths = adapted(&model, name);
        if paths.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        if let Some(p) = paths.iter().find(|p| {
            model
                .linears()
                .iter()
                .any(|(q, s)| q == *p && s.base.bias().is_none())
        }) {
            return Err(PeftError::Other(format!(
                "BEFT: `{p}` has no bias to merge into; use the adapter unmerged"
            )));
        }
        for path in paths {
            model.linear_mut(&path).expect("listed").merge(name)?;
        }
        Ok(model)
    }
}
