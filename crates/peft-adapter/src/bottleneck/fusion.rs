//! AdapterFusion over loaded bottleneck adapters: AdapterHub's `AdapterFusionConfig`, its
//! `adapter_fusion_config.json` + `model_adapter_fusion.safetensors`, and the [`Tuner`] that
//! adds, saves and loads fusion layers (shared `formats.md` §B.3).

use std::path::Path;

use burn::tensor::Tensor;
use peft_core::adapter_io::{FUSION_TYPE, adapter_dir, save_adapterhub_fusion};
use peft_core::params::trainable;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{FusionDense, FusionLayer, FusionWiring, SiteHost, saved};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::ADAPTERHUB_VERSION;

/// AdapterHub's `AdapterFusionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionSettings {
    pub key: bool,
    pub query: bool,
    pub value: bool,
    pub query_before_ln: bool,
    /// Add `0.01·||I − V||²` to the loss.
    pub regularization: bool,
    pub residual_before: bool,
    /// Divide the scores by a temperature that falls from 50 to 1, 0.05 per forward pass
    /// (`peft_sites::FusionTemperature`).
    pub temperature: bool,
    pub value_before_softmax: bool,
    /// The value matrix starts as the identity.
    pub value_initialized: bool,
    /// Dropout on the scores; `None`: the model's attention dropout (BERT's 0.1, none for
    /// Llama), as AdapterHub takes it.
    pub dropout_prob: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl FusionSettings {
    /// AdapterHub's presets: `dynamic` (the default) and `static` (no value matrix, no
    /// regularisation).
    pub fn preset(name: &str) -> Result<Self> {
        let dynamic = Self {
            key: true,
            query: true,
            value: true,
            query_before_ln: false,
            regularization: true,
            residual_before: false,
            temperature: false,
            value_before_softmax: true,
            value_initialized: true,
            dropout_prob: None,
            extra: Map::new(),
        };
        match name {
            "dynamic" => Ok(dynamic),
            "static" => Ok(Self {
                value: false,
                regularization: false,
                value_initialized: false,
                ..dynamic
            }),
            other => Err(PeftError::Config(format!(
                "unknown fusion preset `{other}` (dynamic, static)"
            ))),
        }
    }

    fn wiring(&self) -> FusionWiring {
        FusionWiring {
            query: self.query,
            key: self.key,
            value: self.value,
            query_before_ln: self.query_before_ln,
            residual_before: self.residual_before,
            value_before_softmax: self.value_before_softmax,
            temperature: self.temperature,
        }
    }
}

/// An AdapterFusion's `adapter_fusion_config.json`. `adapter_names` are the fused adapters'
/// AdapterHub names (the `name` in their configs); the fusion's `name` is them joined by commas,
/// as AdapterHub names it and keys its tensors (`...adapter_fusion_layer.a,b.query.weight`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionConfig {
    pub adapter_names: Vec<String>,
    pub config: FusionSettings,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub model_class: Option<String>,
    #[serde(default)]
    pub model_name: String,
    #[serde(default)]
    pub model_type: Option<String>,
    pub name: String,
    #[serde(default = "version")]
    pub version: String,
    /// Modules trained whole beside the fusion and saved as AdapterHub's static head
    /// (`model_head.safetensors`), e.g. a new classifier. Not an AdapterHub field; AdapterHub
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// The names the fused adapters have in the model here, when not their AdapterHub names
    /// (e.g. loaded under their folder names).
    #[serde(skip)]
    pub loaded_as: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn version() -> String {
    ADAPTERHUB_VERSION.into()
}

impl FusionConfig {
    /// A fusion of `adapters` with AdapterHub's preset `preset` (`dynamic` or `static`).
    pub fn new(adapters: &[String], preset: &str) -> Result<Self> {
        if adapters.len() < 2 {
            return Err(PeftError::Config(format!(
                "a fusion needs at least two adapters, got {}",
                adapters.len()
            )));
        }
        Ok(Self {
            adapter_names: adapters.to_vec(),
            config: FusionSettings::preset(preset)?,
            hidden_size: None,
            model_class: None,
            model_name: String::new(),
            model_type: None,
            name: adapters.join(","),
            version: version(),
            modules_to_save: None,
            loaded_as: None,
            extra: Map::new(),
        })
    }

    /// Read an `adapter_fusion_config.json` value; the registry's common keys (`task_type`,
    /// `base_model_name_or_path`) are dropped or mapped.
    pub fn from_json(value: &Value) -> Result<Self> {
        let mut value = value.clone();
        if let Some(obj) = value.as_object_mut() {
            for k in ["task_type", "peft_type"] {
                obj.remove(k);
            }
            if let Some(Value::String(name)) = obj.remove("base_model_name_or_path") {
                obj.insert("model_name".into(), Value::String(name));
            }
        }
        let config: Self = peft_core::error::from_json_value(value)
            .map_err(|e| PeftError::Config(format!("adapter_fusion_config.json: {e}")))?;
        if !(config.config.query || config.config.key || config.config.value) {
            return Err(PeftError::Config(
                "a fusion with neither query, key nor value has nothing to learn".into(),
            ));
        }
        Ok(config)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("FusionConfig serialises")
    }

    /// The modules trained whole beside the fusion.
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    /// The fused adapters' names in the model.
    pub fn internal_names(&self) -> Vec<String> {
        self.loaded_as
            .clone()
            .unwrap_or_else(|| self.adapter_names.clone())
    }

    /// The config with the model facts AdapterHub records filled in.
    pub fn resolved_for<M: SiteHost>(&self, model: &M) -> Result<Self> {
        let (hidden, model_type, class) = super::model::model_facts(model)?;
        let mut c = self.clone();
        c.hidden_size = Some(hidden);
        c.model_type = Some(model_type);
        c.model_class = Some(class);
        Ok(c)
    }

    fn dropout<M: SiteHost>(&self, model: &M) -> f64 {
        self.config
            .dropout_prob
            .unwrap_or(if model.model_type() == "bert" {
                0.1
            } else {
                0.0
            })
    }

    /// The paths of the sites that hold every fused adapter.
    fn sites<M: SiteHost>(&self, model: &M) -> Vec<String> {
        let names = self.internal_names();
        model
            .sublayers()
            .into_iter()
            .filter(|(_, s)| names.iter().all(|n| s.adapter(n).is_some()))
            .map(|(p, _)| p)
            .collect()
    }

    fn prefix(&self, path: &str) -> String {
        format!("{path}.adapter_fusion_layer.{}.", self.name)
    }

    /// `0.01·||I − V||²` summed over the fusion layers of `name`, when the config asks for the
    /// regularisation (AdapterHub adds it after each step; here it joins the loss).
    pub fn regularization<M: SiteHost>(&self, model: &M, name: &str) -> Option<Tensor<1>> {
        if !self.config.regularization {
            return None;
        }
        model
            .sublayers()
            .into_iter()
            .filter_map(|(_, s)| s.fusion(name).and_then(FusionLayer::regularization))
            .reduce(|a, b| a + b)
    }
}

/// The training-extras key (after a layer's prefix) of its temperature's forward passes.
const TEMPERATURE_PASSES: &str = "temperature_passes";

fn dense_tensors(d: &FusionDense, prefix: &str, out: &mut TensorMap) {
    out.insert(
        format!("{prefix}weight"),
        HostTensor::from_tensor(d.weight.val().transpose()),
    );
    if let Some(b) = &d.bias {
        out.insert(format!("{prefix}bias"), HostTensor::from_tensor(b.val()));
    }
}

fn take_dense(
    d: &mut FusionDense,
    prefix: &str,
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<()> {
    let device = d.weight.device();
    let [n, _] = d.weight.shape().dims::<2>();
    let w = tensors.take_shaped(file, &format!("{prefix}weight"), &[n, n])?;
    d.weight = trainable(w.transposed().to_tensor(&device));
    if d.bias.is_some() {
        let b = tensors.take_shaped(file, &format!("{prefix}bias"), &[n])?;
        d.bias = Some(trainable(b.to_tensor(&device)));
    }
    Ok(())
}

impl<M: SiteHost> Tuner<M> for FusionConfig {
    fn peft_type(&self) -> &'static str {
        FUSION_TYPE
    }

    fn config_json(&self) -> Value {
        self.to_json()
    }

    /// Add fusion layer `name` at every site holding all the fused adapters, which are frozen
    /// (only the fusion trains, as AdapterHub's `train_adapter_fusion`).
    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        let names = self.internal_names();
        let paths = self.sites(&model);
        if paths.is_empty() {
            return Err(PeftError::Config(format!(
                "fusion `{}`: no site of the model holds all of the adapters {} (load them first)",
                self.name,
                names.join(", ")
            )));
        }
        let dropout = self.dropout(&model);
        for path in paths {
            let site = model.sublayer_mut(&path).expect("listed");
            for a in &names {
                let adapter = site.adapter_mut(a).expect("holds it");
                *adapter = peft_core::params::freeze_all(adapter.clone());
            }
            let device = site
                .adapter(&names[0])
                .expect("holds it")
                .down_weight
                .device();
            let layer = FusionLayer::new(
                site.hidden,
                self.config.wiring(),
                self.config.value_initialized,
                names.clone(),
                dropout,
                &device,
            );
            site.add_fusion(name, layer)?;
        }
        saved::train_whole(&mut model, &self.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.sublayers() {
            let Some(f) = site.fusion(name) else { continue };
            let prefix = self.prefix(&path);
            for (part, d) in [("query", &f.query), ("key", &f.key), ("value", &f.value)] {
                if let Some(d) = d {
                    dense_tensors(d, &format!("{prefix}{part}."), &mut out);
                }
            }
        }
        if out.is_empty() {
            return Err(PeftError::UnknownAdapter(name.into()));
        }
        saved::put_whole_under(model, &self.saved_modules(), &mut out, "");
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
            .sublayers()
            .into_iter()
            .filter(|(_, s)| s.fusion(name).is_some())
            .map(|(p, _)| p)
            .collect();
        for path in paths {
            let prefix = self.prefix(&path);
            let f = model
                .sublayer_mut(&path)
                .and_then(|s| s.fusion_mut(name))
                .expect("listed");
            for (part, d) in [
                ("query", &mut f.query),
                ("key", &mut f.key),
                ("value", &mut f.value),
            ] {
                if let Some(d) = d {
                    take_dense(d, &format!("{prefix}{part}."), &mut tensors, file)?;
                }
            }
        }
        // A static head saved beside the fusion: the classifier trained with it.
        super::model::take_static_head(&mut model, &mut tensors, file)?;
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    fn extra_loss(&self, model: &M, name: &str) -> Option<Tensor<1>> {
        self.regularization(model, name)
    }

    /// With `temperature`, each layer's count of forward passes (AdapterHub saves none), so
    /// that a resumed run divides by the temperature it had reached.
    fn training_extras(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.sublayers() {
            if let Some(passes) = site.fusion(name).and_then(|f| f.temperature.passes()) {
                out.insert(
                    format!("{}{TEMPERATURE_PASSES}", self.prefix(&path)),
                    HostTensor::new(vec![1], vec![passes as f32]),
                );
            }
        }
        Ok(out)
    }

    fn load_training_extras(
        &self,
        mut model: M,
        name: &str,
        mut tensors: TensorMap,
        path: &Path,
    ) -> Result<M> {
        let paths: Vec<String> = model.sublayers().into_iter().map(|(p, _)| p).collect();
        for site in paths {
            let key = format!("{}{TEMPERATURE_PASSES}", self.prefix(&site));
            let Some(f) = model.sublayer_mut(&site).and_then(|s| s.fusion_mut(name)) else {
                continue;
            };
            if f.temperature.passes().is_none() {
                continue;
            }
            let passes = tensors.take_shaped(path, &key, &[1])?.data[0];
            f.temperature.set_passes(passes as u64);
        }
        saved::ensure_used(&tensors, path)?;
        Ok(model)
    }

    fn save(&self, model: &M, name: &str, root: &Path) -> Result<()> {
        let mut tensors = self.state(model, name)?;
        let head = super::model::split_head(&mut tensors, |k| k.contains(".adapter_fusion_layer."));
        let head_config = super::model::head_config(
            model,
            &self.saved_modules(),
            self.hidden_size,
            [
                &self.model_class,
                &Some(self.model_name.clone()),
                &self.model_type,
            ],
        );
        save_adapterhub_fusion(
            &adapter_dir(root, name),
            &self.to_json(),
            &tensors,
            (!head.is_empty()).then_some((&head_config, &head)),
        )
    }
}
