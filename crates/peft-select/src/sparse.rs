//! Fixed-mask parameter selection saved as sparse adapters: PaFi (the smallest-magnitude
//! entries), FishMask and Child-Tuning-D (the entries of largest Fisher information), and
//! Hugging Face PEFT's own `SUPERTUNING` (the largest-magnitude entries).
//!
//! Each targeted linear gets a [`SparseDelta`]: `k = ⌊numel·(1 − sparsity)⌋` trainable values
//! at fixed positions of its frozen weight, chosen per tensor by a score. Only the values
//! train, so masked entries never move and the optimizer state has `k` entries per tensor.
//! The adapter is PEFT's `SUPERTUNING` layout (`peft_type` `SUPERTUNING`; keys
//! `base_model.model.<path>.supertuning_values` f32 `[k]` and `.supertuning_indices` I32
//! `[k]`, flat positions into the `[out, in]` weight), so Python PEFT loads every one of
//! them. How the positions were chosen is kept in our own key `selection` (PEFT ignores it
//! with a warning).
//!
//! PEFT's layout costs 8 bytes per entry (an I32 position and an f32 value): a 1% mask is
//! 2% of the f32 weights it selects from. Our own `peft_type` `SUPERTUNING_PACKED` (the same
//! config otherwise; [`SparseConfig::packed`], `--set pack_indices=true`) stores the positions
//! sorted, as LEB128 gaps in a U8 tensor `<path>.supertuning_packed_indices`, the values in
//! that order: about 5.3 bytes per entry at 1% density. Python PEFT refuses that type by name
//! rather than misreading it.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use peft_core::adapter_io::KEY_PREFIX;
use peft_core::target::{ModuleSelector, TargetSpec};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{LinearPart, SiteHost, SparseDelta, Support, saved};
use serde::{Deserialize, Serialize};

/// PEFT's type: I32 positions.
pub const SUPERTUNING: &str = "SUPERTUNING";
/// Ours: the same adapter with its positions packed ([`Support::to_packed`]).
pub const SUPERTUNING_PACKED: &str = "SUPERTUNING_PACKED";

fn supertuning_type() -> String {
    SUPERTUNING.into()
}

fn default_sparsity() -> f64 {
    0.99
}

fn yes() -> bool {
    true
}

/// How the positions are chosen (our key `selection`; PEFT knows only magnitude).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// By `|w|`: the largest with `select_top` (PEFT's Super-Tuning), the smallest without
    /// (PaFi).
    #[default]
    Magnitude,
    /// FishMask (Sung et al., 2021): the largest empirical Fisher information, from the
    /// squared gradients of single examples.
    Fishmask,
    /// Child-Tuning-D (Xu et al., 2021): the largest Fisher information, from the squared
    /// gradients of training batches over the data.
    ChildTuningD,
}

impl Selection {
    /// Whether the scores come from gradients on data ([`crate::fisher`]).
    pub fn needs_fisher(self) -> bool {
        !matches!(self, Selection::Magnitude)
    }
}

/// Hugging Face PEFT's `SupertuningConfig`, plus how the mask was chosen. Keys this crate does
/// not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseConfig {
    #[serde(default = "supertuning_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Linears that get a sparse delta; `None`: PEFT's default for the model type (LoRA's).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The fraction of each weight that stays frozen: `k = ⌊numel·(1 − sparsity)⌋` entries
    /// train. In `[0, 1)`; a density `d` is `sparsity = 1 − d`.
    #[serde(default = "default_sparsity")]
    pub sparsity: f64,
    /// Keep the largest scores (`true`) or the smallest (`false`, PaFi).
    #[serde(default = "yes")]
    pub select_top: bool,
    /// PEFT's "Supra" LoRA rank beside the sparse values: not supported here (must be null).
    #[serde(default)]
    pub r: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub lora_dropout: f64,
    /// `true`: values start at zero (the model is unchanged); `false`: N(0, 1) (for tests).
    #[serde(default = "yes")]
    pub init_weights: bool,
    /// Save the positions (PEFT's default). Without them a load recomputes magnitude masks
    /// from the base, which only works for magnitude selection on the same base.
    #[serde(default = "yes")]
    pub save_precomputed_indices: bool,
    /// Ours: how the positions were chosen.
    #[serde(default)]
    pub selection: Selection,
    /// Ours: the examples of the Fisher estimate: FishMask's single examples (unset: 64, or
    /// all of a smaller training set), Child-Tuning-D's first examples (unset: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher_samples: Option<usize>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for SparseConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

fn values_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.supertuning_values")
}

fn indices_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.supertuning_indices")
}

fn packed_indices_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.supertuning_packed_indices")
}

/// Scores in the Hugging Face layout `[out·in]` per linear path (Fisher information).
pub type Scores = BTreeMap<String, Vec<f32>>;

impl SparseConfig {
    /// A config training the fraction `density` of each target, chosen by `selection`
    /// (`select_top` as the method needs: PaFi keeps the smallest magnitudes).
    pub fn with_density(density: f64, selection: Selection, select_top: bool) -> Result<Self> {
        check_density(density)?;
        Ok(Self {
            sparsity: 1.0 - density,
            selection,
            select_top,
            ..Default::default()
        })
    }

    /// Parse an `adapter_config.json` value (`SUPERTUNING` or `SUPERTUNING_PACKED`); fields
    /// of other methods are an error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let ty = match value.get("peft_type").and_then(serde_json::Value::as_str) {
            Some(SUPERTUNING_PACKED) => SUPERTUNING_PACKED,
            _ => SUPERTUNING,
        };
        let c: Self = peft_core::adapter_io::method_config(value, ty, "a SUPERTUNING")?;
        c.validate()?;
        Ok(c)
    }

    /// The same config saving its positions packed (`SUPERTUNING_PACKED`), or in PEFT's
    /// layout (`SUPERTUNING`).
    pub fn packed(mut self, packed: bool) -> Self {
        self.peft_type = if packed {
            SUPERTUNING_PACKED
        } else {
            SUPERTUNING
        }
        .into();
        self
    }

    /// Whether the positions are saved packed.
    pub fn packs_indices(&self) -> bool {
        self.peft_type == SUPERTUNING_PACKED
    }

    /// Check the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(PeftError::Config(format!(
                "sparsity {}: must be in [0, 1) (density = 1 − sparsity in (0, 1])",
                self.sparsity
            )));
        }
        if self.r.is_some() {
            return Err(PeftError::Config(
                "SUPERTUNING: r (the \"Supra\" LoRA beside the sparse values) is not supported; \
                 train a LoRA adapter alongside instead"
                    .into(),
            ));
        }
        if self.packs_indices() && !self.save_precomputed_indices {
            return Err(PeftError::Config(
                "SUPERTUNING_PACKED saves the positions: save_precomputed_indices must be true"
                    .into(),
            ));
        }
        if self.fisher_samples == Some(0) {
            return Err(PeftError::Config(
                "fisher_samples 0: the Fisher estimate needs at least one example".into(),
            ));
        }
        Ok(())
    }

    /// Fill unset `target_modules` with PEFT's default for `model_type` (LoRA's mapping).
    pub fn with_defaults(&self, model_type: &str) -> Result<Self> {
        let mut c = self.clone();
        if c.target_modules.is_none() {
            c.target_modules = Some(peft_core::target::lora_default_targets(model_type).ok_or_else(|| {
                PeftError::Config(format!(
                    "SUPERTUNING has no default target_modules for model type `{model_type}`; give target_modules"
                ))
            })?);
        }
        Ok(c)
    }

    /// The `modules_to_save` names (none when unset).
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    /// The targeted linear paths of `model`.
    pub fn targets<M: SiteHost>(&self, model: &M) -> Result<Vec<String>> {
        let c = self.with_defaults(model.model_type())?;
        let spec = TargetSpec {
            target_modules: c.target_modules.clone(),
            modules_to_save: c.saved_modules(),
            ..Default::default()
        };
        let modules = model.module_paths();
        spec.select(modules.iter().map(|(p, k)| (p.as_str(), *k)))
    }

    /// Entries trained of a weight with `numel` entries, as PEFT counts them.
    pub fn entries(&self, numel: usize) -> usize {
        (numel as f64 * (1.0 - self.sparsity)) as usize
    }

    /// Attach sparse deltas chosen by `scores` (per target path, Hugging Face layout; a
    /// missing path is scored by magnitude).
    pub fn apply_scored<M: SiteHost>(
        &self,
        mut model: M,
        name: &str,
        scores: &Scores,
    ) -> Result<M> {
        self.validate()?;
        let config = self.with_defaults(model.model_type())?;
        for path in config.targets(&model)? {
            let site = model
                .linear_mut(&path)
                .expect("selected from the model's linears");
            let (d_out, d_in, device) = (
                site.base.d_output(),
                site.base.d_input(),
                site.base.device(),
            );
            let k = config.entries(d_out * d_in);
            if k == 0 {
                return Err(PeftError::Config(format!(
                    "sparsity {}: leaves no trainable entry of `{path}` ({d_out}×{d_in}); lower it",
                    config.sparsity
                )));
            }
            let mut flat = match scores.get(&path) {
                Some(s) => {
                    if s.len() != d_out * d_in {
                        return Err(PeftError::Config(format!(
                            "scores of `{path}` have {} entries, its weight {d_out}×{d_in}",
                            s.len()
                        )));
                    }
                    top_k(s, k, config.select_top)
                }
                None => {
                    let w = site.base.weight_hf().data;
                    let mag: Vec<f32> = w.iter().map(|v| v.abs()).collect();
                    top_k(&mag, k, config.select_top)
                }
            };
            if config.packs_indices() {
                // The order a packed file keeps: the values and their optimizer state stay in
                // place when a run resumes from its checkpoint.
                flat.sort_unstable();
            }
            let values = if config.init_weights {
                Tensor::zeros([k], &device)
            } else {
                Tensor::random([k], Distribution::Normal(0.0, 1.0), &device)
            };
            let support = Support::new(d_out, d_in, flat, &path)?;
            site.add_part(name, LinearPart::Sparse(SparseDelta::new(support, values)));
        }
        saved::train_whole(&mut model, &config.saved_modules())?;
        Ok(model)
    }
}

fn check_density(d: f64) -> Result<()> {
    if d > 0.0 && d <= 1.0 {
        Ok(())
    } else {
        Err(PeftError::Config(format!(
            "density {d}: the fraction of entries that train must be in (0, 1]"
        )))
    }
}

/// The positions of the `k` largest (`largest`) or smallest scores, ordered by score (ties by
/// position), as `torch.topk` orders them.
pub fn top_k(scores: &[f32], k: usize, largest: bool) -> Vec<u32> {
    let k = k.min(scores.len());
    let cmp = |a: &u32, b: &u32| {
        let (x, y) = (scores[*a as usize], scores[*b as usize]);
        let by_score = if largest {
            y.total_cmp(&x)
        } else {
            x.total_cmp(&y)
        };
        by_score.then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// The linear paths holding a sparse delta named `name`.
fn adapted<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|(_, s)| matches!(s.part(name), Some(LinearPart::Sparse(_))))
        .map(|(p, _)| p)
        .collect()
}

impl<M: SiteHost> Tuner<M> for SparseConfig {
    fn peft_type(&self) -> &'static str {
        if self.packs_indices() {
            SUPERTUNING_PACKED
        } else {
            SUPERTUNING
        }
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("SparseConfig serialises")
    }

    /// Magnitude masks (Fisher masks need data: [`SparseConfig::apply_scored`]).
    fn apply(&self, model: M, name: &str) -> Result<M> {
        self.apply_scored(model, name, &Scores::new())
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.linears() {
            if let Some(LinearPart::Sparse(s)) = site.part(name) {
                let values = HostTensor::from_tensor(s.values.val());
                if self.packs_indices() {
                    let (positions, order) = s.support.0.to_packed();
                    let sorted = order.iter().map(|&j| values.data[j]).collect();
                    out.insert(values_key(&path), HostTensor::new(values.shape, sorted));
                    out.insert(packed_indices_key(&path), positions);
                    continue;
                }
                out.insert(values_key(&path), values);
                if self.save_precomputed_indices {
                    out.insert(indices_key(&path), s.support.0.to_host());
                }
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
            let (d_out, d_in, device) = (
                site.base.d_output(),
                site.base.d_input(),
                site.base.device(),
            );
            let Some(LinearPart::Sparse(s)) = site.part_mut(name) else {
                unreachable!()
            };
            let support = if self.packs_indices() {
                let key = packed_indices_key(&path);
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| PeftError::MissingTensor {
                        path: file.to_path_buf(),
                        key: key.clone(),
                    })?;
                Support::from_packed(d_out, d_in, &t, &format!("{} `{key}`", file.display()))?
            } else {
                match tensors.remove(&indices_key(&path)) {
                    Some(t) => Support::from_host(
                        d_out,
                        d_in,
                        &t,
                        &format!("{} `{}`", file.display(), indices_key(&path)),
                    )?,
                    None if !self.save_precomputed_indices
                        && self.selection == Selection::Magnitude =>
                    {
                        // PEFT recomputes magnitude masks from the base; apply did the same.
                        Support::new(d_out, d_in, s.support.0.flat.clone(), &path)?
                    }
                    None => {
                        return Err(PeftError::MissingTensor {
                            path: file.to_path_buf(),
                            key: indices_key(&path),
                        });
                    }
                }
            };
            let v = tensors.take_shaped(file, &values_key(&path), &[support.len()])?;
            *s = SparseDelta::new(support, v.to_tensor(&device));
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// `w[o, i] += v` at the positions; every other entry keeps its bits.
    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let paths = adapted(&model, name);
        if paths.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        for path in paths {
            model.linear_mut(&path).expect("listed").merge(name)?;
        }
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_like_torch_topk() {
        let s = [0.5, -2.0, 3.0, 0.5, 1.0];
        assert_eq!(top_k(&s, 3, true), [2, 4, 0]);
        assert_eq!(top_k(&s, 2, false), [1, 0]);
        assert_eq!(top_k(&s, 9, true).len(), 5);
    }

    #[test]
    fn entry_counts_follow_peft() {
        let c = SparseConfig::with_density(0.01, Selection::Magnitude, true).unwrap();
        // int(331776 * (1 - 0.99)) in Python.
        assert_eq!(c.entries(576 * 576), 3317);
        assert!(SparseConfig::with_density(0.0, Selection::Magnitude, true).is_err());
        assert!(SparseConfig::with_density(1.5, Selection::Magnitude, true).is_err());
        assert_eq!(
            SparseConfig::with_density(1.0, Selection::Magnitude, true)
                .unwrap()
                .entries(10),
            10
        );
    }
}
