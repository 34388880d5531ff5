//! BitFit (Ben Zaken et al., 2022): only the model's own bias terms train (and a
//! classification head saved whole). Saved under the biases' own keys
//! (`base_model.model.<path>.bias`) in a folder whose `peft_type` is `BITFIT` (Hugging Face
//! PEFT has no BitFit type; its nearest, BEFT, adds new biases: see [`crate::BeftConfig`]).

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::trainable;
use peft_core::target::{ModuleKind, ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{SiteHost, SiteMut, saved};
use serde::{Deserialize, Serialize};

fn bitfit_type() -> String {
    "BITFIT".into()
}

/// BitFit's config, in the shape of a Hugging Face PEFT config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFitConfig {
    #[serde(default = "bitfit_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules whose biases train (linears and norms, suffix match or regex); `None`: every
    /// bias of the model.
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
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for BitFitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

fn key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.bias")
}

impl BitFitConfig {
    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        peft_core::adapter_io::method_config(value, "BITFIT", "a BitFit")
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    /// The sites (linears and norms) whose biases this config trains, bias or not.
    fn selected<M: SiteHost>(&self, model: &M) -> Result<Vec<String>> {
        let paths: Vec<String> = model
            .sites()
            .into_iter()
            .filter(|(_, s)| {
                !matches!(
                    s.kind(),
                    peft_sites::SiteKind::Prompt | peft_sites::SiteKind::Sublayer
                )
            })
            .map(|(p, _)| p)
            .collect();
        let saved = self.saved_modules();
        let spec = TargetSpec {
            target_modules: Some(
                self.target_modules
                    .clone()
                    .unwrap_or(ModuleSelector::Pattern(".*".into())),
            ),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: saved,
            ..Default::default()
        };
        spec.select(paths.iter().map(|p| (p.as_str(), ModuleKind::Linear)))
    }
}

/// The bias of the site at `path`, if any, as a mutable parameter slot.
fn bias_slot<'a>(
    site: SiteMut<'a>,
) -> &'a mut Option<burn::module::Param<burn::tensor::Tensor<1>>> {
    match site {
        SiteMut::Linear(l) | SiteMut::Head(l) => l.base.bias_mut(),
        SiteMut::Norm(n) => &mut n.base.bias,
        SiteMut::Prompt(_) | SiteMut::Sublayer(_) => {
            unreachable!("BitFit selects linears and norms only")
        }
    }
}

impl<M: SiteHost> Tuner<M> for BitFitConfig {
    fn peft_type(&self) -> &'static str {
        "BITFIT"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("BitFitConfig serialises")
    }

    fn apply(&self, mut model: M, _name: &str) -> Result<M> {
        let selected = self.selected(&model)?;
        let mut trained = 0;
        for (path, site) in model.sites_mut() {
            if !selected.contains(&path) {
                continue;
            }
            let has = match site {
                SiteMut::Linear(l) | SiteMut::Head(l) => l.claim_bias(&path, "BitFit")?,
                SiteMut::Norm(n) => match &n.base.bias {
                    None => false,
                    Some(b) if b.is_require_grad() => {
                        return Err(PeftError::Config(format!(
                            "BitFit: the bias of `{path}` is already trained by another method on this model"
                        )));
                    }
                    Some(b) => {
                        n.base.bias = Some(trainable(b.val().detach()));
                        true
                    }
                },
                SiteMut::Prompt(_) | SiteMut::Sublayer(_) => false,
            };
            trained += usize::from(has);
        }
        if trained == 0 {
            return Err(PeftError::Config(format!(
                "BitFit: the selected modules of this {} model have no biases; add zero-initialised ones with --method beft (Hugging Face BEFT, `--set target_modules=[...]`)",
                model.model_type()
            )));
        }
        saved::train_whole(&mut model, &self.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, _name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        let selected = self.selected(model)?;
        for (path, site) in model.sites() {
            let bias = match site {
                peft_sites::Site::Linear(l) | peft_sites::Site::Head(l) => l.base.bias(),
                peft_sites::Site::Norm(n) => n.base.bias.as_ref(),
                peft_sites::Site::Prompt(_) | peft_sites::Site::Sublayer(_) => None,
            };
            if let Some(b) = bias.filter(|_| selected.contains(&path)) {
                out.insert(key(&path), HostTensor::from_tensor(b.val()));
            }
        }
        saved::put_whole(model, &self.saved_modules(), &mut out);
        Ok(out)
    }

    fn load_state(
        &self,
        mut model: M,
        _name: &str,
        mut tensors: TensorMap,
        file: &Path,
    ) -> Result<M> {
        let selected = self.selected(&model)?;
        for (path, site) in model.sites_mut() {
            if !selected.contains(&path) {
                continue;
            }
            let slot = bias_slot(site);
            let Some(b) = slot.as_ref() else { continue };
            let (device, n) = (b.device(), b.shape().dims::<1>()[0]);
            let value = tensors.take_shaped(file, &key(&path), &[n])?;
            *slot = Some(trainable(value.to_tensor(&device)));
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// The trained biases are the model's own: nothing to fold.
    fn merge(&self, model: M, _name: &str) -> Result<M> {
        Ok(model)
    }
}
