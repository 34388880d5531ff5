//! Bottleneck adapters on a whole model: the [`Tuner`] over any [`SiteHost`] with sub-layer
//! output sites, saving and loading AdapterHub's layout.

use std::path::Path;

use burn::module::Param;
use burn::tensor::Tensor;
use peft_core::adapter_io::{adapter_dir, save_adapterhub};
use peft_core::params::trainable;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{
    AdapterNorm, BnScaling, Bottleneck, SiteHost, SiteKind, SublayerPlace, SublayerSite, saved,
};
use serde_json::{Value, json};

use super::config::{ADAPTERHUB_VERSION, BottleneckConfig};

/// The model facts AdapterHub records in its configs: `hidden_size`, `model_type` and
/// `model_class` (Hugging Face's class name).
pub(super) fn model_facts<M: SiteHost>(model: &M) -> Result<(usize, String, String)> {
    let model_type = model.model_type();
    let hidden = model
        .sublayers()
        .first()
        .map(|(_, s)| s.hidden)
        .ok_or_else(|| {
            PeftError::Config(format!(
                "this {model_type} model has no sub-layer output sites for adapters"
            ))
        })?;
    let class = match model_type {
        "bert" => "BertForSequenceClassification",
        _ => "LlamaForCausalLM",
    };
    Ok((hidden, model_type.into(), class.into()))
}

/// Whether the config puts an adapter at `site`.
fn wants(config: &BottleneckConfig, site: &SublayerSite) -> bool {
    let c = &config.config;
    let place = match site.place {
        SublayerPlace::Attention => c.mh_adapter,
        SublayerPlace::Output => c.output_adapter,
    };
    place && !c.leave_out.contains(&site.layer)
}

/// The tensors of one adapter, keyed as AdapterHub keys them under `prefix`
/// (`<site>.adapters.<name>.`), in torch's `[out, in]` layout.
fn adapter_tensors(a: &Bottleneck, prefix: &str, out: &mut TensorMap) {
    let host = |t: Tensor<2>| HostTensor::from_tensor(t.transpose());
    let vec = |t: &Param<Tensor<1>>| HostTensor::from_tensor(t.val());
    let linear = if let Some(n) = &a.norm_before {
        out.insert(format!("{prefix}adapter_down.0.weight"), vec(&n.weight));
        out.insert(format!("{prefix}adapter_down.0.bias"), vec(&n.bias));
        1
    } else {
        0
    };
    out.insert(
        format!("{prefix}adapter_down.{linear}.weight"),
        host(a.down_weight.val()),
    );
    out.insert(
        format!("{prefix}adapter_down.{linear}.bias"),
        vec(&a.down_bias),
    );
    out.insert(
        format!("{prefix}adapter_up.weight"),
        host(a.up_weight.val()),
    );
    out.insert(format!("{prefix}adapter_up.bias"), vec(&a.up_bias));
    if let BnScaling::Learned(s) = &a.scaling {
        out.insert(format!("{prefix}scaling"), vec(s));
    }
    if let Some(n) = &a.norm_after {
        out.insert(format!("{prefix}adapter_norm_after.weight"), vec(&n.weight));
        out.insert(format!("{prefix}adapter_norm_after.bias"), vec(&n.bias));
    }
}

/// Take one adapter's tensors (see [`adapter_tensors`]) into `a`, checking shapes.
fn take_adapter(
    a: &mut Bottleneck,
    prefix: &str,
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<()> {
    let device = a.down_weight.device();
    let [hidden, down] = a.down_weight.shape().dims::<2>();
    let mut take2 = |key: String, shape: [usize; 2]| -> Result<Param<Tensor<2>>> {
        let t = tensors.take_shaped(file, &key, &shape)?;
        Ok(trainable(t.transposed().to_tensor(&device)))
    };
    let linear = if a.norm_before.is_some() { 1 } else { 0 };
    a.down_weight = take2(
        format!("{prefix}adapter_down.{linear}.weight"),
        [down, hidden],
    )?;
    a.up_weight = take2(format!("{prefix}adapter_up.weight"), [hidden, down])?;
    let mut take1 = |key: String, n: usize| -> Result<Param<Tensor<1>>> {
        Ok(trainable(
            tensors.take_shaped(file, &key, &[n])?.to_tensor(&device),
        ))
    };
    a.down_bias = take1(format!("{prefix}adapter_down.{linear}.bias"), down)?;
    a.up_bias = take1(format!("{prefix}adapter_up.bias"), hidden)?;
    if let BnScaling::Learned(s) = &mut a.scaling {
        let n = s.shape().dims::<1>()[0];
        *s = take1(format!("{prefix}scaling"), n)?;
    }
    let mut take_norm = |n: &mut AdapterNorm, at: &str| -> Result<()> {
        n.weight = take1(format!("{prefix}{at}.weight"), hidden)?;
        n.bias = take1(format!("{prefix}{at}.bias"), hidden)?;
        Ok(())
    };
    if let Some(n) = &mut a.norm_before {
        take_norm(n, "adapter_down.0")?;
    }
    if let Some(n) = &mut a.norm_after {
        take_norm(n, "adapter_norm_after")?;
    }
    Ok(())
}

impl BottleneckConfig {
    /// The config with the model facts AdapterHub records filled in (`hidden_size`,
    /// `model_class`, `model_type`).
    pub fn resolved_for<M: SiteHost>(&self, model: &M) -> Result<Self> {
        let (hidden, model_type, class) = model_facts(model)?;
        let mut c = self.clone();
        c.hidden_size = Some(hidden);
        c.model_type = Some(model_type);
        c.model_class = Some(class);
        c.version = ADAPTERHUB_VERSION.into();
        Ok(c)
    }

    /// The paths of the sites holding adapter `name`.
    fn holding<M: SiteHost>(model: &M, name: &str) -> Vec<String> {
        model
            .sublayers()
            .into_iter()
            .filter(|(_, s)| s.adapter(name).is_some())
            .map(|(p, _)| p)
            .collect()
    }

    /// The key prefix of the adapter at site `path`.
    fn prefix(&self, path: &str) -> String {
        format!("{path}.adapters.{}.", self.name)
    }

    /// AdapterHub's `head_config.json` for the saved head modules.
    fn head_config<M: SiteHost>(&self, model: &M) -> Value {
        head_config(
            model,
            &self.saved_modules(),
            self.hidden_size,
            [
                &self.model_class,
                &Some(self.model_name.clone()),
                &self.model_type,
            ],
        )
    }
}

/// AdapterHub's `head_config.json` for the static head (`saved`: its modules) trained beside an
/// adapter or a fusion; `facts`: the model class, name and type of its config.
pub(crate) fn head_config<M: SiteHost>(
    model: &M,
    saved: &[String],
    hidden_size: Option<usize>,
    facts: [&Option<String>; 3],
) -> Value {
    let labels = model
        .linears()
        .into_iter()
        .find(|(p, _)| saved.contains(p))
        .map_or(0, |(_, l)| l.base.d_output());
    let label2id: serde_json::Map<String, Value> = (0..labels)
        .map(|i| (format!("LABEL_{i}"), json!(i)))
        .collect();
    let [model_class, model_name, model_type] = facts;
    json!({
        "config": null,
        "hidden_size": hidden_size,
        "label2id": label2id,
        "model_class": model_class,
        "model_name": model_name,
        "model_type": model_type,
        "name": null,
        "num_labels": labels,
        "version": ADAPTERHUB_VERSION,
    })
}

/// Take the static head saved beside an adapter or a fusion out of `tensors` (keys
/// `<path>.weight` of the model's head or linear sites: ours, or AdapterHub's
/// `model_head.safetensors`) into the model, where those modules train whole again.
pub(crate) fn take_static_head<M: SiteHost>(
    model: &mut M,
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<()> {
    let heads: Vec<String> = model
        .sites()
        .into_iter()
        .filter(|(p, s)| {
            matches!(s.kind(), SiteKind::Head | SiteKind::Linear)
                && tensors.get(&format!("{p}.weight")).is_some()
        })
        .map(|(p, _)| p)
        .collect();
    saved::train_whole(model, &heads)?;
    saved::take_whole_under(model, &heads, tensors, file, "")
}

/// Split the static head's tensors (keys `belongs` does not claim) off `tensors`.
pub(crate) fn split_head(tensors: &mut TensorMap, belongs: impl Fn(&str) -> bool) -> TensorMap {
    let mut head = TensorMap::new();
    let keys: Vec<String> = tensors.keys().filter(|k| !belongs(k)).cloned().collect();
    for k in keys {
        let t = tensors.remove(&k).expect("listed");
        head.insert(k, t);
    }
    head
}

impl<M: SiteHost> Tuner<M> for BottleneckConfig {
    fn peft_type(&self) -> &'static str {
        peft_core::adapter_io::BOTTLENECK_TYPE
    }

    fn config_json(&self) -> Value {
        self.to_json()
    }

    fn apply(&self, mut model: M, name: &str) -> Result<M> {
        self.config.validate()?;
        let paths: Vec<(String, usize, usize)> = model
            .sublayers()
            .into_iter()
            .filter(|(_, s)| wants(self, s))
            .map(|(p, s)| (p, s.layer, s.hidden))
            .collect();
        if paths.is_empty() {
            return Err(PeftError::Config(
                "the config puts no bottleneck adapter on this model (check mh_adapter, \
                 output_adapter and leave_out)"
                    .into(),
            ));
        }
        for (path, layer, hidden) in paths {
            let shape = self.config.shape_at(layer, hidden)?;
            let device = site_device(&model);
            let site = model.sublayer_mut(&path).expect("listed");
            site.add(name, Bottleneck::random(&shape, &device))?;
        }
        saved::train_whole(&mut model, &self.saved_modules())?;
        Ok(model)
    }

    fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (path, site) in model.sublayers() {
            if let Some(a) = site.adapter(name) {
                adapter_tensors(a, &self.prefix(&path), &mut out);
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
        for path in Self::holding(&model, name) {
            let prefix = self.prefix(&path);
            let site = model.sublayer_mut(&path).expect("listed");
            let a = site.adapter_mut(name).expect("holds it");
            take_adapter(a, &prefix, &mut tensors, file)?;
        }
        // A static head saved beside the adapter: the classifier trained with it.
        take_static_head(&mut model, &mut tensors, file)?;
        // AdapterHub also saves a causal LM's frozen output head; with tied embeddings the
        // model has no separate head to put it in, and it is the embedding table anyway.
        if model.site_paths(SiteKind::Head).is_empty() {
            tensors.remove("lm_head.weight");
        }
        saved::ensure_used(&tensors, file)?;
        Ok(model)
    }

    fn save(&self, model: &M, name: &str, root: &Path) -> Result<()> {
        let mut tensors = self.state(model, name)?;
        let head = split_head(&mut tensors, |k| k.contains(".adapters."));
        let head_config = self.head_config(model);
        save_adapterhub(
            &adapter_dir(root, name),
            &self.to_json(),
            &tensors,
            (!head.is_empty()).then_some((&head_config, &head)),
        )
    }
}

/// The device the model's sites live on.
fn site_device<M: SiteHost>(model: &M) -> burn::tensor::Device {
    model
        .linears()
        .first()
        .map(|(_, l)| l.base.device())
        .expect("a model with sub-layer sites has linears")
}
