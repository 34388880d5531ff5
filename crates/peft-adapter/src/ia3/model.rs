//! (IA)^3 on a whole model: the [`Tuner`] implementation over any [`SiteHost`].

use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use peft_core::adapter_io::KEY_PREFIX;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{FeatureVector, LinearPart, SiteHost, saved};

use super::config::Ia3Config;

/// The key of the vector of the module at `path`.
fn key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.ia3_l")
}

impl<M: SiteHost> Tuner<M> for Ia3Config {
    fn peft_type(&self) -> &'static str {
        "IA3"
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("Ia3Config serialises")
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        let config = self.with_defaults(model.model_type())?;
        config.validate()?;
        // IA3 scales linear layers; the head is a target only when named.
        let modules = model.module_paths();
        let targets = config
            .target_spec()
            .select(modules.iter().map(|(p, k)| (p.as_str(), *k)))?;
        for path in targets {
            let feedforward = config.is_feedforward(&path)?;
            let site = model
                .linear_mut(&path)
                .expect("selected from the model's linears");
            let (device, n) = if feedforward {
                (site.base.device(), site.base.d_input())
            } else {
                (site.base.device(), site.base.d_output())
            };
            let init = if config.init_ia3_weights {
                Tensor::ones([n], &device)
            } else {
                Tensor::random([n], Distribution::Normal(0.0, 1.0), &device)
            };
            let vector = FeatureVector::new(init);
            let part = if feedforward {
                LinearPart::InputScale(vector)
            } else {
                LinearPart::OutputScale(vector)
            };
            site.add_part(name, part);
        }
        saved::train_whole(&mut model, &config.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.linears() {
            let shaped = match site.part(name) {
                Some(LinearPart::InputScale(v)) => (v, vec![1, v.len()]),
                Some(LinearPart::OutputScale(v)) => (v, vec![v.len(), 1]),
                _ => continue,
            };
            let (v, shape) = shaped;
            out.insert(
                key(&path),
                HostTensor::new(shape, HostTensor::from_tensor(v.value.val()).data),
            );
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
        let paths: Vec<String> = model
            .linears()
            .into_iter()
            .filter(|(_, s)| s.part(name).is_some())
            .map(|(p, _)| p)
            .collect();
        for path in paths {
            let site = model.linear_mut(&path).expect("listed");
            let device = site.base.device();
            let (vector, shape) = match site.part_mut(name) {
                Some(LinearPart::InputScale(v)) => {
                    let n = v.len();
                    (v, [1, n])
                }
                Some(LinearPart::OutputScale(v)) => {
                    let n = v.len();
                    (v, [n, 1])
                }
                _ => continue,
            };
            let t = tensors.take_shaped(file, &key(&path), &shape)?;
            *vector =
                FeatureVector::new(HostTensor::new(vec![t.numel()], t.data).to_tensor(&device));
        }
        saved::take_whole(&mut model, &self.saved_modules(), &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    fn merge(&self, mut model: M, name: &str) -> Result<M> {
        let paths: Vec<String> = model
            .linears()
            .into_iter()
            .filter(|(_, s)| s.part(name).is_some())
            .map(|(p, _)| p)
            .collect();
        if paths.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        for path in paths {
            model.linear_mut(&path).expect("listed").merge(name)?;
        }
        Ok(model)
    }
}
