//! LoRA on a whole model: the [`Tuner`] implementation over any [`SiteHost`].

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::{ParamReport, trainable};
use peft_core::target::ModuleKind;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};

use crate::config::LoraConfig;
use crate::layer::{LoraLayer, LoraLinear};
use peft_quant::{BaseLinear, QuantSpec};
use peft_sites::{SiteHost, saved};

fn slot<'a, M: SiteHost>(model: &'a mut M, path: &str) -> Result<&'a mut LoraLinear> {
    model
        .linear_mut(path)
        .ok_or_else(|| PeftError::Other(format!("model has no linear module `{path}`")))
}

/// DoRA's magnitude, saved without the `.weight` of PEFT's in-memory module.
const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// Key of a trained bias: Python PEFT wraps adapted layers, so theirs sit under `base_layer`.
fn bias_key(path: &str, adapted: bool) -> String {
    if adapted {
        format!("{KEY_PREFIX}{path}.base_layer.bias")
    } else {
        format!("{KEY_PREFIX}{path}.bias")
    }
}

/// Paths of the slots that hold adapter `name`.
fn adapted_paths<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|(_, s)| s.lora(name).is_some())
        .map(|(p, _)| p)
        .collect()
}

impl<M: SiteHost> Tuner<M> for LoraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("LoraConfig serialises")
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        self.validate()?;
        let init = self.init_lora_weights.to_init()?;
        let base_init = self.base_init()?;
        let modules = model.module_paths();
        let targets = self
            .target_spec()
            .select(modules.iter().map(|(p, k)| (p.as_str(), *k)))?;
        for path in &targets {
            let (r, alpha) = self.rank_alpha(path)?;
            let s = slot(&mut model, path)?;
            s.add_adapter(name, r, alpha, self.use_rslora, self.lora_dropout, init);
            if let Some(from_base) = base_init {
                s.init_from_base(name, from_base)
                    .map_err(|e| PeftError::Config(format!("`{path}`: {e}")))?;
            }
            if self.use_dora {
                s.enable_dora(name)?;
            }
        }
        saved::train_whole(&mut model, &self.saved_modules())?;
        // bias = "all" trains every bias, "lora_only" those of adapted layers.
        if self.bias != "none" {
            let paths: Vec<String> = if self.bias == "all" {
                model.linears().into_iter().map(|(p, _)| p).collect()
            } else {
                targets.clone()
            };
            let whole = saved::saved_linears(&model, &self.saved_modules());
            for path in paths.into_iter().filter(|p| !whole.contains(p)) {
                slot(&mut model, &path)?.claim_bias(&path, "LoRA bias")?;
            }
        }
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        let whole = saved::saved_linears(model, &self.saved_modules());
        saved::put_whole(model, &self.saved_modules(), &mut out);
        for (path, s) in model.linears() {
            if let Some(adapter) = s.lora(name) {
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_A.weight"),
                    HostTensor::from_tensor(adapter.a.val()).transposed(),
                );
                out.insert(
                    format!("{KEY_PREFIX}{path}.lora_B.weight"),
                    HostTensor::from_tensor(adapter.b.val()).transposed(),
                );
                if let Some(m) = &adapter.magnitude {
                    out.insert(
                        format!("{KEY_PREFIX}{path}.{MAGNITUDE_KEY}"),
                        HostTensor::from_tensor(m.value.val()),
                    );
                }
            }
            if whole.contains(&path) {
                continue;
            }
            let save_bias = match self.bias.as_str() {
                "all" => true,
                "lora_only" => s.lora(name).is_some(),
                _ => false,
            };
            if save_bias && let Some(b) = s.base.bias() {
                out.insert(
                    bias_key(&path, s.lora(name).is_some()),
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
            let adapter = s.lora(name).expect("adapted");
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
            let is_dora = adapter.magnitude.is_some();
            s.set_weights(
                name,
                a.transposed().to_tensor(&device),
                b.transposed().to_tensor(&device),
            )?;
            if is_dora {
                let key = format!("{KEY_PREFIX}{path}.{MAGNITUDE_KEY}");
                let m = tensors.take_shaped(file, &key, &[d_out])?;
                s.set_magnitude(name, m.to_tensor(&device))?;
            }
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        if self.bias != "none" {
            for (path, _) in model.module_paths() {
                let Some(s) = model.linear_mut(&path) else {
                    continue;
                };
                let key = bias_key(&path, s.lora(name).is_some());
                if tensors.get(&key).is_none() {
                    continue;
                }
                let Some(bias) = s.base.bias() else { continue };
                let device = bias.device();
                let b = tensors.take_shaped(file, &key, &[s.base.d_output()])?;
                *s.base.bias_mut() = Some(trainable(b.to_tensor(&device)));
            }
        }
        saved::ensure_used(&tensors, file)?;
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
/// norms and the output head keep full precision, as bitsandbytes leaves them, and so do linears
/// being trained whole.
pub fn quantize_base<M: SiteHost>(mut model: M, spec: QuantSpec) -> Result<M> {
    let paths: Vec<String> = model
        .module_paths()
        .into_iter()
        .filter(|(_, kind)| *kind == ModuleKind::Linear)
        .map(|(p, _)| p)
        .collect();
    for path in paths {
        let Some(s) = model.linear_mut(&path) else {
            continue;
        };
        // A module trained whole (`modules_to_save`) keeps its dense, trainable weight.
        if matches!(&s.base, BaseLinear::Dense(l) if l.weight.is_require_grad()) {
            continue;
        }
        s.base
            .quantize(spec)
            .map_err(|e| PeftError::Other(format!("quantizing `{path}`: {e}")))?;
    }
    Ok(model)
}

/// Make every 4-bit base dense again (dequantized, frozen).
pub fn dequantize_base<M: SiteHost>(mut model: M) -> Result<M> {
    let paths: Vec<String> = model.linears().into_iter().map(|(p, _)| p).collect();
    for path in paths {
        slot(&mut model, &path)?.base.dequantize();
    }
    Ok(model)
}

/// The parameter counts of `model`, 4-bit base weights included (they are frozen and are not
/// burn parameters, so [`ParamReport::of`] alone does not see them).
pub fn param_report<M: SiteHost + burn::module::Module>(model: &M) -> ParamReport {
    let mut report = ParamReport::of(model);
    report.all += quantized_footprint(model).0;
    report
}

/// How many weights of `model` are 4-bit, and the bytes their codes and scales take.
pub fn quantized_footprint<M: SiteHost>(model: &M) -> (usize, usize) {
    let (mut values, mut bytes) = (0, 0);
    for (_, s) in model.linears() {
        if let BaseLinear::Quant4(q) = &s.base {
            values += q.quantized().numel();
            bytes += q.quantized().storage_bytes();
        }
    }
    (values, bytes)
}
