//! ReLoRA (Lialin et al., 2023): LoRA trained in cycles. Every `relora_steps` steps the
//! adapter's update `s·B·A` is merged into the base, A and B start again (A random, B zero, so
//! the model is unchanged), the optimizer state of A and B is pruned by magnitude
//! (`reset_prune`) and the learning rate warms up again over `relora_warmup` steps (a jagged
//! schedule). The sum of the cycles' updates can reach a rank far above `r`.
//!
//! Each finished cycle stays on its layer as a frozen LoRA part named `<adapter>.relora<k>`:
//! merged into a dense base (so a step costs what a LoRA step costs), on the side path over a
//! 4-bit base (merging would re-quantize the base and round the small updates away). The
//! saved adapter is a plain Hugging Face LoRA adapter holding every cycle side by side (rank
//! `r·(cycles + 1)`, `lora_alpha` scaled alike so each cycle keeps its scale): it loads in
//! PEFT and here on the original base, exactly, and a run resumes from it.

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::Tensor;
use peft_core::adapter_io::{KEY_PREFIX, adapter_dir, save_adapter};
use peft_core::optim::prune_state;
use peft_core::params::frozen;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::train::{ModuleOptimizer, TrainHook};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{LinearPart, LoraAdapter, SiteHost, SiteMut};
use serde::{Deserialize, Serialize};

use crate::config::LoraConfig;
use crate::layer::{LoraInit, LoraLayer, new_factors};

fn default_prune() -> f64 {
    0.99
}

fn default_warmup() -> usize {
    10
}

/// ReLoRA's settings over a LoRA config (the adapter each cycle trains).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloraConfig {
    /// The adapter of every cycle.
    #[serde(flatten)]
    pub lora: LoraConfig,
    /// Steps per cycle: after each `relora_steps` steps, merge and restart.
    pub relora_steps: usize,
    /// Fraction of the smallest optimizer-state entries of A and B zeroed at a restart.
    #[serde(default = "default_prune")]
    pub reset_prune: f64,
    /// Steps over which the learning rate warms up again after a restart.
    #[serde(default = "default_warmup")]
    pub relora_warmup: usize,
}

impl ReloraConfig {
    pub fn new(lora: LoraConfig, relora_steps: usize) -> Self {
        Self {
            lora,
            relora_steps,
            reset_prune: default_prune(),
            relora_warmup: default_warmup(),
        }
    }

    /// Check the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if self.relora_steps == 0 {
            return Err(PeftError::Config(
                "relora_steps must be at least 1 (the steps of each cycle)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.reset_prune) {
            return Err(PeftError::Config(format!(
                "reset_prune {} is not in [0, 1]",
                self.reset_prune
            )));
        }
        for (set, what) in [
            (self.lora.use_dora, "use_dora"),
            (
                self.lora.use_rslora,
                "use_rslora (the saved rank grows with the cycles, and rsLoRA's scale with it)",
            ),
            (
                self.lora.init_lora_weights.base_init()?.is_some(),
                "an init_lora_weights from the base (PiSSA/OLoRA)",
            ),
        ] {
            if set {
                return Err(PeftError::Config(format!("ReLoRA does not take {what}")));
            }
        }
        Ok(())
    }

    /// The training hook that restarts the cycles of adapter `name` in a run of `total_steps`.
    pub fn hook(&self, name: &str, total_steps: usize) -> ReloraHook {
        ReloraHook {
            name: name.into(),
            relora_steps: self.relora_steps,
            reset_prune: self.reset_prune,
            warmup: self.relora_warmup,
            total_steps,
        }
    }
}

/// The name of the frozen part of finished cycle `k` of adapter `name`.
pub fn cycle_name(name: &str, k: usize) -> String {
    format!("{name}.relora{k}")
}

/// How many cycles of adapter `name` have finished.
pub fn finished_cycles<M: SiteHost>(model: &M, name: &str) -> usize {
    model
        .linears()
        .into_iter()
        .find(|(_, s)| s.lora(name).is_some())
        .map(|(_, s)| {
            (0..)
                .take_while(|k| s.lora(&cycle_name(name, *k)).is_some())
                .count()
        })
        .unwrap_or(0)
}

/// A frozen copy of `a` (the cycle keeps its scale and values; no dropout).
fn frozen_copy(a: &LoraAdapter) -> LoraAdapter {
    LoraAdapter {
        a: frozen(a.a.val().detach()),
        b: frozen(a.b.val().detach()),
        dropout: burn::nn::DropoutConfig::new(0.0).init(),
        scale: a.scale,
        magnitude: None,
        singular: None,
    }
}

/// Keep `part` as finished cycle `k` of adapter `name` on `layer`: merged into a dense base,
/// on the side path over a 4-bit one.
fn keep_cycle(
    layer: &mut peft_sites::TunedLinear,
    name: &str,
    k: usize,
    part: LoraAdapter,
) -> Result<()> {
    let cycle = cycle_name(name, k);
    let active = layer.active.clone();
    layer.add_part(&cycle, LinearPart::Lora(part));
    if layer.base.is_quantized() {
        return Ok(());
    }
    layer.merge(&cycle)?;
    // A merged part is not in the forward pass either way; keep the active list as it was.
    layer.active = active;
    Ok(())
}

/// End the current cycle of adapter `name`: keep its update as a finished cycle and start A
/// (kaiming-uniform) and B (zero) again under the same parameter ids, so the optimizer keeps
/// their (pruned) state. Returns those ids.
pub fn restart<M: SiteHost>(model: &mut M, name: &str) -> Result<Vec<ParamId>> {
    let k = finished_cycles(model, name);
    let mut ids = Vec::new();
    for (_, site) in model.sites_mut() {
        let (SiteMut::Linear(layer) | SiteMut::Head(layer)) = site else {
            continue;
        };
        let Some(live) = layer.lora(name) else {
            continue;
        };
        let copy = frozen_copy(live);
        keep_cycle(layer, name, k, copy)?;
        // Fresh values drawn as a new adapter's, then put under the old ids.
        let (r, scale) = {
            let a = layer.lora(name).expect("live");
            (a.rank(), a.scale)
        };
        let (d_in, d_out) = (layer.base.d_input(), layer.base.d_output());
        let (a_new, b_new) = new_factors(d_in, d_out, r, LoraInit::Default, &layer.base.device());
        let Some(LinearPart::Lora(live)) = layer.part_mut(name) else {
            unreachable!("live")
        };
        let reset = |p: &mut Param<Tensor<2>>, v: Tensor<2>| {
            let id = p.id;
            *p = Param::initialized(id, v.require_grad());
            id
        };
        ids.push(reset(&mut live.a, a_new));
        ids.push(reset(&mut live.b, b_new));
        live.scale = scale;
    }
    if ids.is_empty() {
        return Err(PeftError::UnknownAdapter(name.into()));
    }
    Ok(ids)
}

/// The trainer side of ReLoRA: restarts after every `relora_steps` steps (not after the last
/// step), prunes the optimizer state of A and B, and warms the learning rate up again.
pub struct ReloraHook {
    name: String,
    relora_steps: usize,
    reset_prune: f64,
    warmup: usize,
    total_steps: usize,
}

impl<M: SiteHost + Module> TrainHook<M> for ReloraHook {
    fn lr_factor(&self, step: usize) -> f64 {
        if step < self.relora_steps || self.warmup == 0 {
            return 1.0;
        }
        let since = step % self.relora_steps;
        ((since + 1) as f64 / self.warmup as f64).min(1.0)
    }

    /// The cycle settings, so a resumed run with other ones is refused.
    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "relora_steps": self.relora_steps,
            "reset_prune": self.reset_prune,
            "relora_warmup": self.warmup,
        })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let now = <Self as TrainHook<M>>::state(self);
        let changed: Vec<String> = ["relora_steps", "reset_prune", "relora_warmup"]
            .iter()
            .filter(|k| state.get(**k).is_some_and(|v| *v != now[**k]))
            .map(|k| format!("--set {k}={} (the checkpoint has {})", now[*k], state[*k]))
            .collect();
        if changed.is_empty() {
            Ok(())
        } else {
            Err(PeftError::Config(format!(
                "--resume: {} differs from the run being resumed",
                changed.join(", ")
            )))
        }
    }

    fn after_step(&mut self, mut model: M, optim: &mut ModuleOptimizer, step: usize) -> M {
        let done = step + 1;
        if !done.is_multiple_of(self.relora_steps) || done >= self.total_steps {
            return model;
        }
        let ids = restart(&mut model, &self.name)
            .unwrap_or_else(|e| panic!("ReLoRA restart after step {done}: {e}"));
        let o = std::mem::replace(
            optim,
            ModuleOptimizer::from(peft_core::optim::AdamW::new(0.0)),
        );
        *optim = prune_state(o, &ids, self.reset_prune)
            .unwrap_or_else(|e| panic!("ReLoRA restart after step {done}: {e}"));
        model
    }
}

/// `[r, in]` A and `[out, r]` B of a LoRA part, Hugging Face layout.
fn factors_hf(a: &LoraAdapter) -> (HostTensor, HostTensor) {
    (
        HostTensor::from_tensor(a.a.val()).transposed(),
        HostTensor::from_tensor(a.b.val()).transposed(),
    )
}

/// Rows `[lo, hi)` of a row-major matrix.
fn rows(t: &HostTensor, lo: usize, hi: usize) -> HostTensor {
    let cols = t.shape[1];
    HostTensor::new(vec![hi - lo, cols], t.data[lo * cols..hi * cols].to_vec())
}

/// Columns `[lo, hi)` of a row-major matrix.
fn cols(t: &HostTensor, lo: usize, hi: usize) -> HostTensor {
    let (n, c) = (t.shape[0], t.shape[1]);
    let mut out = Vec::with_capacity(n * (hi - lo));
    for i in 0..n {
        out.extend_from_slice(&t.data[i * c + lo..i * c + hi]);
    }
    HostTensor::new(vec![n, hi - lo], out)
}

impl<M: SiteHost> Tuner<M> for ReloraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    /// The config of one cycle; [`Tuner::save`] writes the config of all of them.
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.lora).expect("LoraConfig serialises")
    }

    fn apply(&self, model: M, name: &str) -> Result<M> {
        self.validate()?;
        self.lora.apply(model, name)
    }

    /// Every cycle side by side, the live one last: `A` `[r·(k+1), in]`, `B` `[out, r·(k+1)]`.
    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let k = finished_cycles(model, name);
        let mut out = self.lora.state(model, name)?;
        for (path, s) in model.linears() {
            let Some(live) = s.lora(name) else { continue };
            let mut parts: Vec<(HostTensor, HostTensor)> = (0..k)
                .map(|c| factors_hf(s.lora(&cycle_name(name, c)).expect("every cycle")))
                .collect();
            parts.push(factors_hf(live));
            let (d_in, d_out) = (parts[0].0.shape[1], parts[0].1.shape[0]);
            let r_all: usize = parts.iter().map(|(a, _)| a.shape[0]).sum();
            let a: Vec<f32> = parts.iter().flat_map(|(a, _)| a.data.clone()).collect();
            let mut b = vec![0f32; d_out * r_all];
            let mut at = 0;
            for (_, pb) in &parts {
                let r = pb.shape[1];
                for o in 0..d_out {
                    b[o * r_all + at..o * r_all + at + r]
                        .copy_from_slice(&pb.data[o * r..(o + 1) * r]);
                }
                at += r;
            }
            out.insert(
                format!("{KEY_PREFIX}{path}.lora_A.weight"),
                HostTensor::new(vec![r_all, d_in], a),
            );
            out.insert(
                format!("{KEY_PREFIX}{path}.lora_B.weight"),
                HostTensor::new(vec![d_out, r_all], b),
            );
        }
        Ok(out)
    }

    /// Split a saved adapter back into its cycles: the first ones become finished cycles
    /// (merged into a dense base in their order, as the run merged them), the last the live
    /// adapter.
    fn load_state(
        &self,
        mut model: M,
        name: &str,
        mut tensors: TensorMap,
        file: &Path,
    ) -> Result<M> {
        let paths: Vec<String> = model
            .linears()
            .into_iter()
            .filter(|(_, s)| s.lora(name).is_some())
            .map(|(p, _)| p)
            .collect();
        for path in paths {
            let key_a = format!("{KEY_PREFIX}{path}.lora_A.weight");
            let key_b = format!("{KEY_PREFIX}{path}.lora_B.weight");
            let layer = model
                .linear_mut(&path)
                .ok_or_else(|| PeftError::Other(format!("model has no linear module `{path}`")))?;
            let live = layer.lora(name).expect("adapted");
            let (r, scale) = (live.rank(), live.scale);
            let (d_in, d_out) = (layer.base.d_input(), layer.base.d_output());
            let a = tensors
                .remove(&key_a)
                .ok_or_else(|| PeftError::format(file, format!("`{key_a}` is missing")))?;
            let b = tensors
                .remove(&key_b)
                .ok_or_else(|| PeftError::format(file, format!("`{key_b}` is missing")))?;
            let r_all = a.shape[0];
            if a.shape != [r_all, d_in] || b.shape != [d_out, r_all] || r_all % r != 0 {
                return Err(PeftError::format(
                    file,
                    format!(
                        "`{path}`: lora_A {:?} and lora_B {:?} are not ReLoRA cycles of rank {r} over a {d_out}x{d_in} layer",
                        a.shape, b.shape
                    ),
                ));
            }
            let cycles = r_all / r;
            let device = layer.base.device();
            for c in 0..cycles {
                let (ac, bc) = (rows(&a, c * r, (c + 1) * r), cols(&b, c * r, (c + 1) * r));
                let (at, bt) = (
                    ac.transposed().to_tensor::<2>(&device),
                    bc.transposed().to_tensor::<2>(&device),
                );
                if c + 1 == cycles {
                    layer.set_weights(name, at, bt)?;
                } else {
                    let part = LoraAdapter {
                        a: frozen(at),
                        b: frozen(bt),
                        dropout: burn::nn::DropoutConfig::new(0.0).init(),
                        scale,
                        magnitude: None,
                        singular: None,
                    };
                    keep_cycle(layer, name, c, part)?;
                }
            }
        }
        peft_sites::saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    /// Fold the live cycle (and the finished ones not yet merged, over a 4-bit base) into the
    /// base.
    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let k = finished_cycles(&model, name);
        for (_, site) in model.sites_mut() {
            if let SiteMut::Linear(layer) | SiteMut::Head(layer) = site
                && layer.lora(name).is_some()
            {
                for c in 0..k {
                    layer.merge(&cycle_name(name, c))?;
                }
                layer.merge(name)?;
            }
        }
        Ok(model)
    }

    /// A plain LoRA adapter of every cycle: rank and alpha times the number of cycles, so each
    /// keeps its scale.
    fn save(&self, model: &M, name: &str, root: &Path) -> Result<()> {
        let n = finished_cycles(model, name) + 1;
        let mut config = self.lora.clone();
        config.r *= n;
        config.lora_alpha *= n as f64;
        config.rank_pattern = config
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), v * n))
            .collect();
        config.alpha_pattern = config
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), v * n as f64))
            .collect();
        let json = serde_json::to_value(&config).expect("LoraConfig serialises");
        save_adapter(&adapter_dir(root, name), &json, &self.state(model, name)?)
    }
}
