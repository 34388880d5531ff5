//! LoRA on a whole model: the [`Tuner`] implementation over any [`LoraHost`].

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::{ParamReport, frozen, trainable};
use peft_core::target::ModuleKind;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::{ModuleHost, Tuner};
use peft_core::{PeftError, Result};

use crate::config::LoraConfig;
use crate::layer::LoraLinear;
use peft_quant::{BaseLinear, QuantSpec};

/// A model whose linear layers are [`LoraLinear`] slots addressed by Hugging Face path.
pub trait LoraHost: ModuleHost {
    /// The linear slot at `path`.
    fn lora_slot_mut(&mut self, path: &str) -> Option<&mut LoraLinear>;
    /// Every linear slot with its path.
    fn lora_slots(&self) -> Vec<(String, &LoraLinear)>;
}

fn slot<'a, M: LoraHost>(model: &'a mut M, path: &str) -> Result<&'a mut LoraLinear> {
    model
        .lora_slot_mut(path)
        .ok_or_else(|| PeftError::Other(format!("model has no linear module `{path}`")))
}

/// Key of a trained bias: Python PEFT wraps adapted layers, so theirs sit under `base_layer`.
fn bias_key(path: &str, adapted: bool) -> String {
    if adapted {
        format!("{KEY_PREFIX}{path}.base_layer.bias")
    } else {
        format!("{KEY_PREFIX}{path}.bias")
    }
}

/// Slots trained and saved whole: those in or under a `modules_to_save` module (the rule that
/// also keeps them out of the targets, `peft_core::target::in_saved_module`).
fn saved_modules<M: LoraHost>(config: &LoraConfig, model: &M) -> Vec<String> {
    let names = config.modules_to_save.clone().unwrap_or_default();
    model
        .lora_slots()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| peft_core::target::in_saved_module(p, &names))
        .collect()
}

/// Paths of the slots that hold adapter `name`.
fn adapted_paths<M: LoraHost>(model: &M, name: &str) -> Vec<String> {
    model
        .lora_slots()
        .into_iter()
        .filter(|(_, s)| s.adapter(name).is_some())
        .map(|(p, _)| p)
        .collect()
}

impl<M: LoraHost> Tuner<M> for LoraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("LoraConfig serialises")
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        self.validate()?;
        let init = self.init_lora_weights.to_init()?;
        let modules = model.module_paths();
        let targets = self
            .target_spec()
            .select(modules.iter().map(|(p, k)| (p.as_str(), *k)))?;
        for path in &targets {
            let (r, alpha) = self.rank_alpha(path)?;
            slot(&mut model, path)?.add_adapter(
                name,
                r,
                alpha,
                self.use_rslora,
                self.lora_dropout,
                init,
            );
        }
        for path in saved_modules(self, &model) {
            let s = slot(&mut model, &path)?;
            // A module trained whole is trained in full precision, even over a 4-bit base.
            let w = s.base.dense_weight(&s.base.device());
            s.base.set_weight(w, true)?;
            s.base.set_bias_trainable(true);
        }
        // bias = "all" trains every bias, "lora_only" those of adapted layers.
        if self.bias != "none" {
            let paths: Vec<String> = if self.bias == "all" {
                model.lora_slots().into_iter().map(|(p, _)| p).collect()
            } else {
                targets.clone()
            };
            for path in paths {
                slot(&mut model, &path)?.base.set_bias_trainable(true);
            }
        }
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        let whole = saved_modules(self, model);
        for (path, s) in model.lora_slots() {
            if let Some(adapter) = s.adapter(name) {
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_A.weight"),
                    HostTensor::from_tensor(adapter.a.val()).transposed(),
                );
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_B.weight"),
                    HostTensor::from_tensor(adapter.b.val()).transposed(),
                );
            }
            if whole.contains(&path) {
                out.insert(format!("{KEY_PREFIX}{path}.weight"), s.base.weight_hf());
                if let Some(b) = s.base.bias() {
                    out.insert(
                        format!("{KEY_PREFIX}{path}.bias"),
                        HostTensor::from_tensor(b.val()),
                    );
                }
                continue;
            }
            let save_bias = match self.bias.as_str() {
                "all" => true,
                "lora_only" => s.adapter(name).is_some(),
                _ => false,
            };
            if save_bias && let Some(b) = s.base.bias() {
                out.insert(
                    bias_key(&path, s.adapter(name).is_some()),
                    HostTensor::from_tensor(b.val()),
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
        for path in adapted_paths(&model, name) {
            let s = slot(&mut model, &path)?;
            let adapter = s.adapter(name).expect("adapted");
            let (d_in, d_out, r) = (s.base.d_input(), s.base.d_output(), adapter.rank());
            let device = s.base.device();
            let a = tensors.take_shaped(
                file,
                &format!("{KEY_PREFIX}{path}.lora_A.weight"),
                &[r, d_in],
            )?;
            let b = tensors.take_shaped(
                file,
                &format!("{KEY_PREFIX}{path}.lora_B.weight"),
                &[d_out, r],
            )?;
            s.set_weights(
                name,
                a.transposed().to_tensor(&device),
                b.transposed().to_tensor(&device),
            )?;
        }
        for path in saved_modules(self, &model) {
            let s = slot(&mut model, &path)?;
            let device = s.base.device();
            let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
            let w =
                tensors.take_shaped(file, &format!("{KEY_PREFIX}{path}.weight"), &[d_out, d_in])?;
            s.base.set_weight(w.transposed().to_tensor(&device), true)?;
            if s.base.bias().is_some() {
                let b = tensors.take_shaped(file, &format!("{KEY_PREFIX}{path}.bias"), &[d_out])?;
                *s.base.bias_mut() = Some(trainable(b.to_tensor(&device)));
            }
        }
        if self.bias != "none" {
            for (path, _) in model.module_paths() {
                let Some(s) = model.lora_slot_mut(&path) else {
                    continue;
                };
                let key = bias_key(&path, s.adapter(name).is_some());
                if tensors.get(&key).is_none() {
                    continue;
                }
                let Some(bias) = s.base.bias() else { continue };
                let device = bias.device();
                let b = tensors.take_shaped(file, &key, &[s.base.d_output()])?;
                *s.base.bias_mut() = Some(trainable(b.to_tensor(&device)));
            }
        }
        if !tensors.is_empty() {
            let left: Vec<&String> = tensors.keys().take(5).collect();
            return Err(PeftError::format(
                file,
                format!(
                    "{} tensors do not belong to any adapted module of this model (first: {left:?}); \
                     is the adapter for another base model?",
                    tensors.len()
                ),
            ));
        }
        Ok(model)
    }

    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let paths = adapted_paths(&model, name);
        if paths.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        for path in paths {
            slot(&mut model, &path)?.merge(name)?;
        }
        Ok(model)
    }
}

/// Quantize the base weight of every linear slot to 4 bits (QLoRA's frozen base). Embeddings,
/// norms and the output head keep full precision, as bitsandbytes leaves them.
pub fn quantize_base<M: LoraHost>(mut model: M, spec: QuantSpec) -> Result<M> {
    let paths: Vec<String> = model
        .module_paths()
        .into_iter()
        .filter(|(_, kind)| *kind == ModuleKind::Linear)
        .map(|(p, _)| p)
        .collect();
    for path in paths {
        let Some(s) = model.lora_slot_mut(&path) else {
            continue;
        };
        s.base
            .quantize(spec)
            .map_err(|e| PeftError::Other(format!("quantizing `{path}`: {e}")))?;
    }
    Ok(model)
}

/// Make every 4-bit base dense again (dequantized, frozen).
pub fn dequantize_base<M: LoraHost>(mut model: M) -> Result<M> {
    let paths: Vec<String> = model.lora_slots().into_iter().map(|(p, _)| p).collect();
    for path in paths {
        slot(&mut model, &path)?.base.dequantize();
    }
    Ok(model)
}

/// The parameter counts of `model`, 4-bit base weights included (they are frozen and are not
/// burn parameters, so [`ParamReport::of`] alone does not see them).
pub fn param_report<M: LoraHost + burn::module::Module>(model: &M) -> ParamReport {
    let mut report = ParamReport::of(model);
    report.all += quantized_footprint(model).0;
    report
}

/// How many weights of `model` are 4-bit, and the bytes their codes and scales take.
pub fn quantized_footprint<M: LoraHost>(model: &M) -> (usize, usize) {
    let (mut values, mut bytes) = (0, 0);
    for (_, s) in model.lora_slots() {
        if let BaseLinear::Quant4(q) = &s.base {
            values += q.quantized().numel();
            bytes += q.quantized().storage_bytes();
        }
    }
    (values, bytes)
}

/// Unmerge every merged adapter of the model.
pub fn unmerge_all<M: LoraHost>(mut model: M) -> Result<M> {
    let paths: Vec<String> = model.lora_slots().into_iter().map(|(p, _)| p).collect();
    for path in paths {
        let s = slot(&mut model, &path)?;
        for name in s.merged.clone() {
            s.unmerge(&name)?;
        }
    }
    Ok(model)
}

/// Merge the active adapters and drop all adapters: the model becomes a plain one whose
/// linear weights include the updates.
pub fn merge_and_unload_state<M: LoraHost>(mut model: M) -> Result<M> {
    let paths: Vec<String> = model.lora_slots().into_iter().map(|(p, _)| p).collect();
    for path in paths {
        let s = slot(&mut model, &path)?;
        if !s.disabled {
            for name in s.active.clone() {
                s.merge(&name)?;
            }
        }
        s.adapters.clear();
        s.names.clear();
        s.active.clear();
        s.merged.clear();
        s.disabled = false;
        if let BaseLinear::Dense(l) = &mut s.base {
            l.weight = frozen(l.weight.val().detach());
        }
        s.base.set_bias_trainable(false);
    }
    Ok(model)
}
