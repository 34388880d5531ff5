//! AdaLoRA (Zhang et al., 2023) as Hugging Face PEFT implements it (`peft_type` `ADALORA`):
//! the update in SVD form `P·Λ·Q` (`lora_A`, `lora_E`, `lora_B`), an orthogonality penalty on
//! `P` and `Q` in the loss, and a rank budget that shrinks on a cubic schedule from `init_r` to
//! `target_r` per module, pruning the singular values of least importance.
//!
//! - Forward: `y = base(x) + (x·Aᵀ ⊙ E)·Bᵀ · lora_alpha / (init_r + 1e-5)`.
//! - Importance of every entry: `I = |w·∂L/∂w|`, smoothed `Ī ← β₁Ī + (1−β₁)I`, uncertainty
//!   `Ū ← β₂Ū + (1−β₂)|I − Ī|`, score `Ī·Ū`; a rank's score is its `E` entry's plus the means of
//!   its row of `A` and its column of `B` ([`RankAllocator`], a trainer hook that runs after
//!   each optimizer step, as PEFT's `update_and_allocate`).
//! - Saved as PEFT saves it: keys `<path>.lora_A`, `.lora_E`, `.lora_B` (no `.weight`), cut to
//!   the kept ranks, with `rank_pattern` (a keep-mask per `lora_E` key) in the config.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor, TensorData};
use indexmap::IndexMap;
use peft_core::adapter_io::{KEY_PREFIX, adapter_dir, save_adapter};
use peft_core::params::trainable;
use peft_core::target::{LayerIndices, LayersPattern, ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::train::{ModuleOptimizer, TrainHook};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{ADAPTER_DTYPE, LinearPart, LoraAdapter, Singular, SiteHost, SiteMut, saved};
use serde::{Deserialize, Serialize};

fn adalora_type() -> String {
    "ADALORA".into()
}
fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn twelve() -> usize {
    12
}
fn one() -> usize {
    1
}
fn beta() -> f64 {
    0.85
}
fn half() -> f64 {
    0.5
}
fn yes() -> bool {
    true
}

/// Hugging Face PEFT `AdaLoraConfig` (its defaults); keys this crate does not use are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    #[serde(default = "adalora_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Ignored by AdaLoRA (PEFT warns when it is not 8); the rank is `init_r`.
    #[serde(default = "eight")]
    pub r: usize,
    #[serde(default = "eight")]
    pub target_r: usize,
    #[serde(default = "twelve")]
    pub init_r: usize,
    #[serde(default)]
    pub tinit: usize,
    #[serde(default)]
    pub tfinal: usize,
    #[serde(default = "one", rename = "deltaT")]
    pub delta_t: usize,
    #[serde(default = "beta")]
    pub beta1: f64,
    #[serde(default = "beta")]
    pub beta2: f64,
    #[serde(default = "half")]
    pub orth_reg_weight: f64,
    #[serde(default)]
    pub total_step: Option<usize>,
    /// The kept ranks of each module's `lora_E` (`<path>.lora_E`), once a budget was applied.
    #[serde(default)]
    pub rank_pattern: Option<IndexMap<String, Vec<bool>>>,
    #[serde(default = "eight_f")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl AdaLoraConfig {
    /// Parse an `adapter_config.json` value.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let c: Self = peft_core::error::from_json_value(value.clone())
            .map_err(|e| PeftError::Config(format!("adapter_config.json: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Check the values a user can get wrong (as PEFT's `AdaLoraConfig.__post_init__`).
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(PeftError::Config(m));
        if self.peft_type != "ADALORA" {
            return err(format!(
                "peft_type is `{}`, this is an AdaLoRA config",
                self.peft_type
            ));
        }
        if self.init_r == 0 {
            return err("init_r must be at least 1".into());
        }
        if self.target_r > self.init_r {
            return err(format!(
                "target_r {} is above init_r {}: the budget only shrinks",
                self.target_r, self.init_r
            ));
        }
        let Some(total) = self.total_step.filter(|t| *t > 0) else {
            return err(
                "total_step is required (the training steps the budget schedule spans)".into(),
            );
        };
        if self.tinit + self.tfinal >= total {
            return err(format!(
                "tinit ({}) + tfinal ({}) must be below total_step ({total}): no steps would remain for the budget schedule",
                self.tinit, self.tfinal
            ));
        }
        if self.delta_t == 0 {
            return err("deltaT must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            ));
        }
        Ok(())
    }

    /// The model type's default targets where none are given (PEFT's
    /// `TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`).
    pub fn with_defaults(&self, model_type: &str) -> Result<Self> {
        let mut c = self.clone();
        if c.target_modules.is_none() {
            c.target_modules = Some(peft_core::target::lora_default_targets(model_type).ok_or_else(|| {
                PeftError::Config(format!(
                    "AdaLoRA has no default target_modules for `{model_type}` models: give target_modules"
                ))
            })?);
        }
        Ok(c)
    }

    fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            modules_to_save: self.modules_to_save.clone().unwrap_or_default(),
        }
    }

    /// `lora_alpha / (init_r + 1e-5)` (PEFT's `scaling / ranknum`; `ranknum` stays `init_r`).
    pub fn scale(&self) -> f64 {
        let alpha = if self.lora_alpha > 0.0 {
            self.lora_alpha
        } else {
            self.init_r as f64
        };
        alpha / (self.init_r as f64 + 1e-5)
    }

    /// The keep-mask of `path` in `rank_pattern`, under PEFT's key (with or without the
    /// `base_model.model.` prefix).
    fn pattern_of(&self, path: &str) -> Option<&Vec<bool>> {
        let p = self.rank_pattern.as_ref()?;
        p.get(&format!("{path}.lora_E"))
            .or_else(|| p.get(&format!("{KEY_PREFIX}{path}.lora_E")))
    }

    /// The trainer hook that allocates the rank budget of adapter `name`.
    pub fn allocator(&self, name: &str) -> RankAllocator {
        RankAllocator {
            config: self.clone(),
            name: name.into(),
            grads: HashMap::new(),
            ipt: HashMap::new(),
            unc: HashMap::new(),
            final_pattern: None,
        }
    }
}

/// The AdaLoRA parts of adapter `name`, by path.
fn adapted<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|(_, s)| s.lora(name).is_some_and(|a| a.singular.is_some()))
        .map(|(p, _)| p)
        .collect()
}

impl<M: SiteHost> Tuner<M> for AdaLoraConfig {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("AdaLoraConfig serialises")
    }

    /// `lora_A`, `lora_B` ~ N(0, 0.02) and `lora_E` = 0 (PEFT's init; `init_lora_weights =
    /// false` leaves E random too), rank `init_r`, or the kept ranks of `rank_pattern`.
    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        self.validate()?;
        let config = self.with_defaults(model.model_type())?;
        let modules = model.module_paths();
        let targets = config
            .target_spec()
            .select(modules.iter().map(|(p, k)| (p.as_str(), *k)))?;
        let scale = self.scale();
        for path in &targets {
            let r = self
                .pattern_of(path)
                .map_or(self.init_r, |m| m.iter().filter(|k| **k).count());
            if r == 0 {
                // Every rank pruned: the module keeps its base alone (PEFT saves empty tensors).
                continue;
            }
            let s = model
                .linear_mut(path)
                .ok_or_else(|| PeftError::Other(format!("model has no linear module `{path}`")))?;
            let device = s.base.device();
            let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
            let on = (&device, ADAPTER_DTYPE);
            let normal = Distribution::Normal(0.0, 0.02);
            let e = if self.init_lora_weights {
                Tensor::zeros([r], on)
            } else {
                Tensor::random([r], Distribution::Normal(0.0, 1.0), on)
            };
            let adapter = LoraAdapter {
                a: trainable(Tensor::random([d_in, r], normal, on)),
                b: trainable(Tensor::random([r, d_out], normal, on)),
                dropout: burn::nn::DropoutConfig::new(self.lora_dropout).init(),
                scale,
                magnitude: None,
                singular: Some(Singular {
                    value: trainable(e),
                    keep: self.pattern_of(path).cloned(),
                }),
            };
            s.add_part(name, LinearPart::Lora(adapter));
        }
        saved::train_whole(
            &mut model,
            &self.modules_to_save.clone().unwrap_or_default(),
        )?;
        Ok(model)
    }

    /// PEFT's keys; ranks outside the last allocation's keep-mask are cut.
    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        saved::put_whole(
            model,
            &self.modules_to_save.clone().unwrap_or_default(),
            &mut out,
        );
        for (path, s) in model.linears() {
            let Some(a) = s.lora(name) else { continue };
            let Some(e) = &a.singular else { continue };
            let at = HostTensor::from_tensor(a.a.val()).transposed(); // [r, in]
            let bt = HostTensor::from_tensor(a.b.val()).transposed(); // [out, r]
            let ev = HostTensor::from_tensor(e.value.val());
            let r = ev.numel();
            let keep: Vec<bool> = match &e.keep {
                Some(k) if k.len() == r => k.clone(),
                _ => vec![true; r],
            };
            let kept: Vec<usize> = (0..r).filter(|i| keep[*i]).collect();
            let (d_in, d_out) = (at.shape[1], bt.shape[0]);
            let a_rows: Vec<f32> = kept
                .iter()
                .flat_map(|&i| at.data[i * d_in..(i + 1) * d_in].to_vec())
                .collect();
            let b_cols: Vec<f32> = (0..d_out)
                .flat_map(|o| kept.iter().map(move |&i| (o, i)))
                .map(|(o, i)| bt.data[o * r + i])
                .collect();
            let e_kept: Vec<f32> = kept.iter().map(|&i| ev.data[i]).collect();
            let k = kept.len();
            out.insert(
                format!("{KEY_PREFIX}{path}.lora_A"),
                HostTensor::new(vec![k, d_in], a_rows),
            );
            out.insert(
                format!("{KEY_PREFIX}{path}.lora_B"),
                HostTensor::new(vec![d_out, k], b_cols),
            );
            out.insert(
                format!("{KEY_PREFIX}{path}.lora_E"),
                HostTensor::new(vec![k, 1], e_kept),
            );
        }
        // Modules whose ranks were all pruned when loaded: PEFT's empty tensors.
        for (path, s) in model.linears() {
            if s.lora(name).is_none() && self.pattern_of(&path).is_some_and(|m| !m.contains(&true))
            {
                let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_A"),
                    HostTensor::new(vec![0, d_in], vec![]),
                );
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_B"),
                    HostTensor::new(vec![d_out, 0], vec![]),
                );
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_E"),
                    HostTensor::new(vec![0, 1], vec![]),
                );
            }
        }
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
            let s = model.linear_mut(&path).expect("adapted");
            let device = s.base.device();
            let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
            let Some(LinearPart::Lora(a)) = s.part_mut(name) else {
                unreachable!("adapted")
            };
            let r = a.rank();
            let ta =
                tensors.take_shaped(file, &format!("{KEY_PREFIX}{path}.lora_A"), &[r, d_in])?;
            let tb =
                tensors.take_shaped(file, &format!("{KEY_PREFIX}{path}.lora_B"), &[d_out, r])?;
            let te = tensors.take_shaped(file, &format!("{KEY_PREFIX}{path}.lora_E"), &[r, 1])?;
            a.a = trainable(ta.transposed().to_tensor(&device));
            a.b = trainable(tb.transposed().to_tensor(&device));
            let e = a.singular.as_mut().expect("adapted");
            e.value = trainable(HostTensor::new(vec![r], te.data.clone()).to_tensor(&device));
        }
        for (path, _) in model.linears() {
            if self.pattern_of(&path).is_some_and(|m| !m.contains(&true)) {
                for w in ["A", "B", "E"] {
                    let key = format!("{KEY_PREFIX}{path}.lora_{w}");
                    if tensors.get(&key).is_some_and(|t| t.numel() == 0) {
                        tensors.remove(&key);
                    }
                }
            }
        }
        saved::take_whole(
            &mut model,
            &self.modules_to_save.clone().unwrap_or_default(),
            &mut tensors,
            file,
        )?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// The uncut factors and the keep-masks (1 kept, 0 pruned): the saved adapter holds only
    /// the kept ranks, but pruned ranks keep training and can come back at the next allocation.
    fn training_extras(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, s) in model.linears() {
            let Some(a) = s.lora(name) else { continue };
            let Some(e) = &a.singular else { continue };
            let key = |w: &str| format!("{KEY_PREFIX}{path}.lora_{w}.full");
            out.insert(key("A"), HostTensor::from_tensor(a.a.val()).transposed());
            out.insert(key("B"), HostTensor::from_tensor(a.b.val()).transposed());
            let ev = HostTensor::from_tensor(e.value.val());
            let r = ev.numel();
            if let Some(keep) = &e.keep {
                let k = keep.iter().map(|k| if *k { 1.0 } else { 0.0 }).collect();
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_E.keep"),
                    HostTensor::new(vec![r], k),
                );
            }
            out.insert(key("E"), ev);
        }
        Ok(out)
    }

    /// The uncut factors and masks from [`Tuner::training_extras`] (the checkpoint's adapter
    /// file holds only the kept ranks); the whole-trained modules from the adapter file.
    fn load_checkpoint(&self, mut model: M, name: &str, dir: &Path) -> Result<M> {
        let files = peft_core::adapter_io::load_adapter(dir)?;
        let extras = dir.join(peft_core::tuner::TRAINING_EXTRAS_FILE);
        if !extras.exists() {
            return Err(PeftError::format(
                &extras,
                "missing: an AdaLoRA checkpoint keeps its uncut factors there (this one was written before resuming AdaLoRA was possible; start anew)",
            ));
        }
        let mut tensors = TensorMap::read_safetensors(&extras)?;
        for path in adapted(&model, name) {
            let s = model.linear_mut(&path).expect("adapted");
            let device = s.base.device();
            let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
            let Some(LinearPart::Lora(a)) = s.part_mut(name) else {
                unreachable!("adapted")
            };
            let r = a.rank();
            let key = |w: &str| format!("{KEY_PREFIX}{path}.lora_{w}.full");
            let ta = tensors.take_shaped(&extras, &key("A"), &[r, d_in])?;
            let tb = tensors.take_shaped(&extras, &key("B"), &[d_out, r])?;
            let te = tensors.take_shaped(&extras, &key("E"), &[r])?;
            let keep_key = format!("{KEY_PREFIX}{path}.lora_E.keep");
            let keep = match tensors.get(&keep_key) {
                Some(_) => Some(tensors.take_shaped(&extras, &keep_key, &[r])?),
                None => None,
            }
            .map(|k| k.data.iter().map(|x| *x != 0.0).collect());
            // The same parameters, new values: the optimizer state stays attached to them.
            a.a = Param::initialized(a.a.id, ta.transposed().to_tensor(&device).require_grad());
            a.b = Param::initialized(a.b.id, tb.transposed().to_tensor(&device).require_grad());
            let e = a.singular.as_mut().expect("adapted");
            e.value = Param::initialized(e.value.id, te.to_tensor(&device).require_grad());
            e.keep = keep;
        }
        saved::ensure_used(&tensors, &extras)?;
        let mut weights = files.tensors;
        saved::take_whole(
            &mut model,
            &self.modules_to_save.clone().unwrap_or_default(),
            &mut weights,
            &files.weights,
        )?;
        Ok(model)
    }

    /// `orth_reg_weight · mean over A and B of ‖P·Pᵀ − I‖_F` (not squared), as PEFT adds it.
    fn extra_loss(&self, model: &M, name: &str) -> Option<Tensor<1>> {
        if self.orth_reg_weight <= 0.0 {
            return None;
        }
        let mut terms = Vec::new();
        for (_, s) in model.linears() {
            let Some(a) = s.lora(name) else { continue };
            if a.singular.is_none() {
                continue;
            }
            // burn's a is [in, r] (Aᵀ), b is [r, out] (Bᵀ): A·Aᵀ = aᵀ·a, Bᵀ·B = b·bᵀ.
            for cov in [
                a.a.val().transpose().matmul(a.a.val()),
                a.b.val().matmul(a.b.val().transpose()),
            ] {
                let [r, _] = cov.dims();
                let eye = Tensor::<2>::eye(r, &cov.device());
                terms.push((cov - eye).powi_scalar(2).sum().sqrt());
            }
        }
        if terms.is_empty() {
            return None;
        }
        let n = terms.len() as f64;
        Some(
            Tensor::cat(terms, 0)
                .sum()
                .div_scalar(n)
                .mul_scalar(self.orth_reg_weight),
        )
    }

    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        for path in adapted(&model, name) {
            model.linear_mut(&path).expect("adapted").merge(name)?;
        }
        Ok(model)
    }

    /// Saved with `rank_pattern` from the last allocation (as PEFT mutates its config).
    fn save(&self, model: &M, name: &str, root: &Path) -> Result<()> {
        let mut config = self.clone();
        let mut pattern = self.rank_pattern.clone().unwrap_or_default();
        for (path, s) in model.linears() {
            if let Some(keep) = s
                .lora(name)
                .and_then(|a| a.singular.as_ref())
                .and_then(|e| e.keep.clone())
            {
                pattern.insert(format!("{path}.lora_E"), keep);
            }
        }
        if !pattern.is_empty() {
            config.rank_pattern = Some(pattern);
        }
        let json = serde_json::to_value(&config).expect("AdaLoraConfig serialises");
        save_adapter(&adapter_dir(root, name), &json, &self.state(model, name)?)
    }
}

/// A parameter's values on the host.
fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    HostTensor::from_tensor(t).data
}

/// PEFT's `RankAllocator`: after each optimizer step, the importance of every entry of A, E
/// and B from the step's gradients (kept by [`TrainHook::on_gradients`]) and the updated
/// weights, then, on the budget schedule, the singular values of least importance set to zero.
pub struct RankAllocator {
    config: AdaLoraConfig,
    name: String,
    /// This step's gradients, by `<path>.<A|E|B>`.
    grads: HashMap<String, Vec<f32>>,
    /// The smoothed importance `Ī` and uncertainty `Ū`, by `<path>.<A|E|B>`.
    ipt: HashMap<String, Vec<f32>>,
    unc: HashMap<String, Vec<f32>>,
    /// The keep-masks fixed at step `total_step − tfinal`.
    final_pattern: Option<HashMap<String, Vec<bool>>>,
}

impl RankAllocator {
    fn total(&self) -> usize {
        self.config.total_step.unwrap_or(0)
    }

    /// The budget at `step` and whether to mask then (PEFT's `budget_schedule`).
    pub fn budget(&self, step: usize, modules: usize) -> (usize, bool) {
        let c = &self.config;
        let init = c.init_r * modules;
        let target = c.target_r * modules;
        let end = self.total() - c.tfinal;
        if step <= c.tinit {
            (init, false)
        } else if step > end {
            (target, true)
        } else {
            let mul = 1.0 - (step - c.tinit) as f64 / (end - c.tinit) as f64;
            let b = ((init - target) as f64 * mul.powi(3) + target as f64) as usize;
            (b, step.is_multiple_of(c.delta_t))
        }
    }

    /// Update `Ī` and `Ū` from the kept gradients and the weights now.
    fn update_importance<M: SiteHost>(&mut self, model: &M) {
        let (b1, b2) = (self.config.beta1 as f32, self.config.beta2 as f32);
        for (path, s) in model.linears() {
            let Some(a) = s.lora(&self.name) else {
                continue;
            };
            let Some(e) = &a.singular else { continue };
            for (which, w) in [
                ("A", host(a.a.val())),
                ("E", host(e.value.val())),
                ("B", host(a.b.val())),
            ] {
                let key = format!("{path}.{which}");
                let Some(g) = self.grads.get(&key) else {
                    continue;
                };
                let ipt = self
                    .ipt
                    .entry(key.clone())
                    .or_insert_with(|| vec![0.0; w.len()]);
                let unc = self.unc.entry(key).or_insert_with(|| vec![0.0; w.len()]);
                for i in 0..w.len() {
                    let now = (w[i] * g[i]).abs();
                    ipt[i] = b1 * ipt[i] + (1.0 - b1) * now;
                    unc[i] = b2 * unc[i] + (1.0 - b2) * (now - ipt[i]).abs();
                }
            }
        }
    }

    /// Each module's triplet scores `s(Eᵢ) + mean s(Aᵢ·) + mean s(B·ᵢ)`, by path.
    fn triplet_scores<M: SiteHost>(&self, model: &M) -> Vec<(String, Vec<f32>)> {
        let score = |key: &str| -> Vec<f32> {
            match (self.ipt.get(key), self.unc.get(key)) {
                (Some(i), Some(u)) => i.iter().zip(u).map(|(a, b)| a * b).collect(),
                _ => Vec::new(),
            }
        };
        let mut out = Vec::new();
        for (path, s) in model.linears() {
            let Some(a) = s.lora(&self.name) else {
                continue;
            };
            if a.singular.is_none() {
                continue;
            }
            let r = a.rank();
            let [d_in, _] = a.a.val().dims();
            let [_, d_out] = a.b.val().dims();
            let (sa, se, sb) = (
                score(&format!("{path}.A")),
                score(&format!("{path}.E")),
                score(&format!("{path}.B")),
            );
            let mut t = vec![0f32; r];
            for (i, ti) in t.iter_mut().enumerate() {
                // burn's a is [in, r]: rank i is column i; b is [r, out]: rank i is row i.
                let mean_a = if sa.is_empty() {
                    0.0
                } else {
                    (0..d_in).map(|j| sa[j * r + i]).sum::<f32>() / d_in as f32
                };
                let mean_b = if sb.is_empty() {
                    0.0
                } else {
                    sb[i * d_out..(i + 1) * d_out].iter().sum::<f32>() / d_out as f32
                };
                *ti = se.get(i).copied().unwrap_or(0.0) + mean_a + mean_b;
            }
            out.push((path, t));
        }
        out
    }

    /// Zero `E` outside `keep` (per path) and remember the masks on the parts.
    fn apply_masks<M: SiteHost>(&self, model: &mut M, masks: &HashMap<String, Vec<bool>>) {
        for (path, site) in model.sites_mut() {
            let (SiteMut::Linear(s) | SiteMut::Head(s)) = site else {
                continue;
            };
            let Some(keep) = masks.get(&path) else {
                continue;
            };
            let Some(LinearPart::Lora(a)) = s.part_mut(&self.name) else {
                continue;
            };
            let Some(e) = a.singular.as_mut() else {
                continue;
            };
            let device = e.value.device();
            let mut v = host(e.value.val());
            for (x, k) in v.iter_mut().zip(keep) {
                if !k {
                    *x = 0.0;
                }
            }
            let n = v.len();
            let id = e.value.id;
            let t = Tensor::<1>::from_data(TensorData::new(v, [n]), &device).cast(ADAPTER_DTYPE);
            e.value = Param::initialized(id, t.require_grad());
            e.keep = Some(keep.clone());
        }
    }

    /// Mask to `budget` ranks over all modules: the `init − budget` lowest triplet scores (and
    /// ties with the highest of them) are cut, as PEFT's `kthvalue` threshold does.
    fn mask_to_budget<M: SiteHost>(
        &self,
        model: &mut M,
        budget: usize,
    ) -> HashMap<String, Vec<bool>> {
        let scores = self.triplet_scores(model);
        let init: usize = scores.iter().map(|(_, t)| t.len()).sum();
        let k = init.saturating_sub(budget);
        let masks: HashMap<String, Vec<bool>> = if k == 0 {
            scores
                .iter()
                .map(|(p, t)| (p.clone(), vec![true; t.len()]))
                .collect()
        } else {
            let mut all: Vec<f32> = scores.iter().flat_map(|(_, t)| t.clone()).collect();
            all.sort_by(f32::total_cmp);
            let thr = all[k - 1];
            scores
                .iter()
                .map(|(p, t)| (p.clone(), t.iter().map(|s| *s > thr).collect()))
                .collect()
        };
        self.apply_masks(model, &masks);
        masks
    }
}

/// What [`RankAllocator`] carries from step to step, for checkpoints.
#[derive(Serialize, Deserialize)]
struct AllocatorState {
    ipt: HashMap<String, Vec<f32>>,
    unc: HashMap<String, Vec<f32>>,
    final_pattern: Option<HashMap<String, Vec<bool>>>,
}

impl<M: SiteHost + Module> TrainHook<M> for RankAllocator {
    /// The smoothed importance and uncertainty of every entry, and the final masks once fixed.
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(AllocatorState {
            ipt: self.ipt.clone(),
            unc: self.unc.clone(),
            final_pattern: self.final_pattern.clone(),
        })
        .expect("allocator state serialises")
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: AllocatorState = serde_json::from_value(state.clone())
            .map_err(|e| PeftError::Config(format!("AdaLoRA rank allocator state: {e}")))?;
        (self.ipt, self.unc, self.final_pattern) = (s.ipt, s.unc, s.final_pattern);
        Ok(())
    }

    fn on_gradients(&mut self, model: &M, grads: &mut GradientsParams, step: usize) {
        self.grads.clear();
        if step >= self.total() - self.config.tfinal {
            return;
        }
        for (path, s) in model.linears() {
            let Some(a) = s.lora(&self.name) else {
                continue;
            };
            let Some(e) = &a.singular else { continue };
            if let Some(g) = grads.get::<2>(a.a.id) {
                self.grads.insert(format!("{path}.A"), host(g));
            }
            if let Some(g) = grads.get::<1>(e.value.id) {
                self.grads.insert(format!("{path}.E"), host(g));
            }
            if let Some(g) = grads.get::<2>(a.b.id) {
                self.grads.insert(format!("{path}.B"), host(g));
            }
        }
    }

    fn after_step(&mut self, mut model: M, _optim: &mut ModuleOptimizer, step: usize) -> M {
        let end = self.total() - self.config.tfinal;
        let modules = adapted(&model, &self.name).len();
        if step < end {
            self.update_importance(&model);
            let (budget, mask) = self.budget(step, modules);
            if mask {
                self.mask_to_budget(&mut model, budget);
            }
        } else if step == end {
            let (budget, _) = self.budget(step, modules);
            let masks = self.mask_to_budget(&mut model, budget);
            self.final_pattern = Some(masks);
            self.ipt.clear();
            self.unc.clear();
        } else if let Some(masks) = self.final_pattern.clone() {
            self.apply_masks(&mut model, &masks);
        }
        model
    }
}
