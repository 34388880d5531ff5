//! Layer and module selection: chosen existing weights of the model train in full, nothing is
//! added. Saved under the trained parameters' own keys (`base_model.model.<path>.weight`,
//! `.bias`) in a folder whose `peft_type` is `SELECT` (Hugging Face PEFT has no such type);
//! `peft merge` writes the model with them.
//!
//! What trains is the union of the module groups of `module_groups` and the modules of
//! `target_modules`, less `exclude_modules`, within `layers_to_transform` when it is set
//! (Hugging Face's semantics: a module outside the numbered layers is then never selected).

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::trainable;
use peft_core::target::{LayerIndices, LayersPattern, ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{Site, SiteHost, SiteKind, SiteMut, saved};
use serde::{Deserialize, Serialize};

fn select_type() -> String {
    "SELECT".into()
}

fn default_groups() -> Vec<String> {
    ["attention", "mlp", "norms"].map(String::from).to_vec()
}

/// The module groups `module_groups` may name.
pub const GROUPS: [&str; 6] = ["attention", "mlp", "norms", "biases", "head", "embeddings"];

/// Layer and module selection's config, in the shape of a Hugging Face PEFT config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectConfig {
    #[serde(default = "select_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Groups of modules whose weights (and biases) train, of [`GROUPS`]: the attention
    /// projections, the feed-forward linears, the norms, every bias (only the biases, as
    /// BitFit), the output head, the embedding tables (outside the numbered layers, so not
    /// with `layers_to_transform`). Default: attention, mlp and norms.
    #[serde(default = "default_groups")]
    pub module_groups: Vec<String>,
    /// More modules that train in full (suffix match or regex), beyond the groups.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Only modules in these layers train (Hugging Face's `layers_to_transform`).
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Child-Tuning-F: at every training step each gradient entry of the selected weights is
    /// kept with this probability and scaled by its inverse ([`crate::child_tuning`]). Unset:
    /// plain selection. The saved adapter is the same either way.
    #[serde(default)]
    pub density: Option<f64>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// What of a selected module trains.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// Weight and bias.
    Whole,
    /// The bias only (the `biases` group).
    Bias,
}

/// The group (`attention` or `mlp`) of the linear at `path` of a `model_type` model, if any;
/// `None` for a model type whose groups are not known.
fn linear_group(model_type: &str, path: &str) -> Option<Option<&'static str>> {
    let group = match model_type {
        "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" => {
            if path.contains(".self_attn.") {
                Some("attention")
            } else if path.contains(".mlp.") {
                Some("mlp")
            } else {
                None
            }
        }
        "bert" => {
            if path.contains(".attention.") {
                Some("attention")
            } else if path.ends_with(".intermediate.dense") || path.ends_with(".output.dense") {
                Some("mlp")
            } else {
                None
            }
        }
        _ => return None,
    };
    Some(group)
}

fn key(path: &str, param: &str) -> String {
    format!("{KEY_PREFIX}{path}.{param}")
}

impl SelectConfig {
    /// A config training the module groups `groups` of the layers `layers` (all when empty).
    pub fn new(groups: &[&str], layers: &[usize]) -> Self {
        Self {
            module_groups: groups.iter().map(|g| g.to_string()).collect(),
            layers_to_transform: (!layers.is_empty()).then(|| LayerIndices::Many(layers.to_vec())),
            ..Default::default()
        }
    }

    /// Parse an `adapter_config.json` value; fields of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let config: Self = peft_core::adapter_io::method_config(value, "SELECT", "a selection")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(g) = self
            .module_groups
            .iter()
            .find(|g| !GROUPS.contains(&g.as_str()))
        {
            return Err(PeftError::Config(format!(
                "module_groups: unknown group `{g}` (groups: {})",
                GROUPS.join(", ")
            )));
        }
        if let Some(d) = self.density
            && !(d > 0.0 && d <= 1.0)
        {
            return Err(PeftError::Config(format!(
                "density {d}: the probability of keeping a gradient entry must be in (0, 1]"
            )));
        }
        if self.module_groups.is_empty() && self.target_modules.is_none() {
            return Err(PeftError::Config(
                "selection: nothing to train; give module_groups or target_modules".into(),
            ));
        }
        Ok(())
    }

    /// Child-Tuning-F's trainer hook when `density` is set: masks drawn from `seed` and the
    /// step over the selected modules of `model`.
    pub fn gradient_mask<M: SiteHost>(
        &self,
        model: &M,
        seed: u64,
    ) -> Result<Option<crate::child_tuning::GradientMask>> {
        let Some(density) = self.density else {
            return Ok(None);
        };
        let mut paths: Vec<String> = self.selected(model)?.into_iter().map(|(p, _)| p).collect();
        paths.extend(self.selected_embeddings(model)?);
        Ok(Some(crate::child_tuning::GradientMask::new(
            density, seed, paths,
        )))
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            modules_to_save: self.saved_modules(),
        }
    }

    fn has(&self, group: &str) -> bool {
        self.module_groups.iter().any(|g| g == group)
    }

    /// The selected sites (linears, head, norms) with what of each trains, in model order.
    fn selected<M: SiteHost>(&self, model: &M) -> Result<Vec<(String, Part)>> {
        self.validate()?;
        let spec = self.spec();
        let model_type = model.model_type();
        let wants_linear_groups = self.has("attention") || self.has("mlp");
        if wants_linear_groups && linear_group(model_type, "").is_none() {
            return Err(PeftError::Config(format!(
                "module_groups attention and mlp are not known for `{model_type}` models; \
                 name the modules with target_modules"
            )));
        }
        if let Some(max) = self.layers_to_transform.as_ref().and_then(|l| l.max()) {
            let layers = model.num_layers();
            if max >= layers {
                return Err(PeftError::Config(format!(
                    "layers_to_transform: layer {max} is past this {model_type} model's {layers} \
                     layers (0..={})",
                    layers.saturating_sub(1)
                )));
            }
        }
        let mut out = Vec::new();
        for (path, site) in model.sites() {
            let kind = site.kind();
            if matches!(kind, SiteKind::Prompt | SiteKind::Sublayer) {
                continue;
            }
            let excluded = match &self.exclude_modules {
                Some(ex) => ex.matches(&path)?,
                None => false,
            };
            if excluded
                || peft_core::target::in_saved_module(&path, &spec.modules_to_save)
                || !spec.layer_allowed(&path)?
            {
                continue;
            }
            let in_group = match kind {
                SiteKind::Linear => linear_group(model_type, &path)
                    .flatten()
                    .is_some_and(|g| self.has(g)),
                SiteKind::Head => self.has("head"),
                SiteKind::Norm => self.has("norms"),
                SiteKind::Prompt | SiteKind::Sublayer => false,
            };
            let targeted = match &self.target_modules {
                Some(t) => t.matches(&path)?,
                None => false,
            };
            // Bias-only selection of a module without a bias would train nothing.
            let has_bias = match &site {
                Site::Linear(l) | Site::Head(l) => l.base.bias().is_some(),
                Site::Norm(n) => n.base.bias.is_some(),
                Site::Prompt(_) | Site::Sublayer(_) => false,
            };
            if in_group || targeted {
                out.push((path, Part::Whole));
            } else if self.has("biases") && has_bias {
                out.push((path, Part::Bias));
            }
        }
        if out.is_empty() && self.selected_embeddings(model)?.is_empty() {
            return Err(PeftError::Config(format!(
                "selection: no module of this {model_type} model is selected by module_groups \
                 {:?}, target_modules {:?} and layers_to_transform {:?}",
                self.module_groups,
                self.target_modules.as_ref().map(|t| t.to_string()),
                self.layers_to_transform
            )));
        }
        Ok(out)
    }

    /// The embedding tables selected (the `embeddings` group), by path.
    fn selected_embeddings<M: SiteHost>(&self, model: &M) -> Result<Vec<String>> {
        if !self.has("embeddings") {
            return Ok(Vec::new());
        }
        let spec = self.spec();
        let mut out = Vec::new();
        for (path, _) in model.embeddings() {
            let excluded = match &self.exclude_modules {
                Some(ex) => ex.matches(&path)?,
                None => false,
            };
            if !excluded
                && !peft_core::target::in_saved_module(&path, &spec.modules_to_save)
                && spec.layer_allowed(&path)?
            {
                out.push(path);
            }
        }
        Ok(out)
    }
}

impl<M: SiteHost> Tuner<M> for SelectConfig {
    fn peft_type(&self) -> &'static str {
        "SELECT"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("SelectConfig serialises")
    }

    fn apply(&self, mut model: M, _name: &str) -> Result<M> {
        let selected = self.selected(&model)?;
        for (path, site) in model.sites_mut() {
            let Some((_, part)) = selected.iter().find(|(p, _)| *p == path) else {
                continue;
            };
            match site {
                SiteMut::Linear(l) | SiteMut::Head(l) => {
                    l.claim_bias(&path, "selection")?;
                    if *part == Part::Whole {
                        if l.base.is_quantized() {
                            return Err(PeftError::Config(format!(
                                "selection: `{path}` has a 4-bit base, whose weights cannot train; \
                                 load the model unquantized"
                            )));
                        }
                        let w = l.base.dense_weight(&l.base.device());
                        l.base.set_weight(w, true)?;
                    }
                }
                SiteMut::Norm(n) => {
                    if n.base.bias.as_ref().is_some_and(|b| b.is_require_grad()) {
                        return Err(PeftError::Config(format!(
                            "selection: the bias of `{path}` is already trained by another method on this model"
                        )));
                    }
                    if *part == Part::Whole {
                        n.base.weight = trainable(n.base.weight.val().detach());
                    }
                    if let Some(b) = n.base.bias.take() {
                        n.base.bias = Some(trainable(b.val().detach()));
                    }
                }
                SiteMut::Prompt(_) | SiteMut::Sublayer(_) => {}
            }
        }
        let embeddings = self.selected_embeddings(&model)?;
        for (path, table) in model.embeddings_mut() {
            if embeddings.contains(&path) {
                *table = trainable(table.val().detach());
            }
        }
        saved::train_whole(&mut model, &self.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, _name: &str) -> Result<TensorMap> {
        let selected = self.selected(model)?;
        let mut out = TensorMap::new();
        for (path, site) in model.sites() {
            let Some((_, part)) = selected.iter().find(|(p, _)| *p == path) else {
                continue;
            };
            let (weight, bias) = match site {
                Site::Linear(l) | Site::Head(l) => {
                    (l.base.weight_hf(), l.base.bias().map(|b| b.val()))
                }
                Site::Norm(n) => (
                    HostTensor::from_tensor(n.base.weight.val()),
                    n.base.bias.as_ref().map(|b| b.val()),
                ),
                Site::Prompt(_) | Site::Sublayer(_) => continue,
            };
            if *part == Part::Whole {
                out.insert(key(&path, "weight"), weight);
            }
            if let Some(b) = bias {
                out.insert(key(&path, "bias"), HostTensor::from_tensor(b));
            }
        }
        let embeddings = self.selected_embeddings(model)?;
        for (path, table) in model.embeddings() {
            if embeddings.contains(&path) {
                out.insert(key(&path, "weight"), HostTensor::from_tensor(table.val()));
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
            let Some((_, part)) = selected.iter().find(|(p, _)| *p == path) else {
                continue;
            };
            let whole = *part == Part::Whole;
            match site {
                SiteMut::Linear(l) | SiteMut::Head(l) => {
                    let device = l.base.device();
                    let (d_in, d_out) = (l.base.d_input(), l.base.d_output());
                    if whole {
                        let w = tensors.take_shaped(file, &key(&path, "weight"), &[d_out, d_in])?;
                        l.base.set_weight(w.transposed().to_tensor(&device), true)?;
                    }
                    if l.base.bias().is_some() {
                        let b = tensors.take_shaped(file, &key(&path, "bias"), &[d_out])?;
                        *l.base.bias_mut() = Some(trainable(b.to_tensor(&device)));
                    }
                }
                SiteMut::Norm(n) => {
                    let device = n.base.weight.device();
                    let len = n.base.weight.val().dims()[0];
                    if whole {
                        let w = tensors.take_shaped(file, &key(&path, "weight"), &[len])?;
                        n.base.weight = trainable(w.to_tensor(&device));
                    }
                    if n.base.bias.is_some() {
                        let b = tensors.take_shaped(file, &key(&path, "bias"), &[len])?;
                        n.base.bias = Some(trainable(b.to_tensor(&device)));
                    }
                }
                SiteMut::Prompt(_) | SiteMut::Sublayer(_) => {}
            }
        }
        let embeddings = self.selected_embeddings(&model)?;
        for (path, table) in model.embeddings_mut() {
            if embeddings.contains(&path) {
                let (device, dims) = (table.device(), table.val().dims());
                let t = tensors.take_shaped(file, &key(&path, "weight"), &dims)?;
                *table = trainable(t.to_tensor(&device));
            }
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// The trained weights are the model's own: nothing to fold.
    fn merge(&self, model: M, _name: &str) -> Result<M> {
        Ok(model)
    }
}
