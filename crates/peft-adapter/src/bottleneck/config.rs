//! AdapterHub's bottleneck config (`BnConfig`, `adapters` 1.3.0) and the `adapter_config.json`
//! around it, with AdapterHub's field names, presets and defaults (shared `formats.md` §B.2).

use peft_core::{PeftError, Result};
use peft_sites::{BnActivation, BnInit, BnShape, BnWiring, ResidualFrom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The `version` AdapterHub writes (and these files follow).
pub const ADAPTERHUB_VERSION: &str = "adapters.1.3.0";

/// AdapterHub's `BnConfig`: where the adapters go, their size and wiring. Fields this crate
/// does not act on (the PHM options, ...) are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnConfig {
    /// An adapter after the attention block.
    pub mh_adapter: bool,
    /// An adapter after the feed-forward block.
    pub output_adapter: bool,
    /// `hidden / reduction_factor` is the bottleneck width: a number, or a mapping from layer
    /// index (as a string) to a number with a `"default"`.
    pub reduction_factor: Value,
    pub non_linearity: String,
    #[serde(default)]
    pub original_ln_before: bool,
    #[serde(default = "yes")]
    pub original_ln_after: bool,
    /// `true`, `false` or `"post_add"`.
    #[serde(default = "json_true")]
    pub residual_before_ln: Value,
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    #[serde(default)]
    pub ln_before: bool,
    #[serde(default)]
    pub ln_after: bool,
    /// `"bert"`, `"mam_adapter"` or `"houlsby"`.
    #[serde(default = "bert")]
    pub init_weights: String,
    #[serde(default)]
    pub init_weights_seed: Option<u64>,
    #[serde(default)]
    pub is_parallel: bool,
    /// A number, `"learned"` or `"channel"`.
    #[serde(default = "one")]
    pub scaling: Value,
    #[serde(default)]
    pub use_gating: bool,
    /// Layers (by index) that get no adapter.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub phm_layer: bool,
    #[serde(default)]
    pub inv_adapter: Option<String>,
    #[serde(default)]
    pub cross_adapter: bool,
    #[serde(default)]
    pub stochastic_depth: f64,
    /// Fields kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}
fn json_true() -> Value {
    Value::Bool(true)
}
fn bert() -> String {
    "bert".into()
}
fn one() -> Value {
    json!(1.0)
}

/// The fields AdapterHub writes for every `BnConfig` that this crate does not act on, with
/// their defaults (so a saved config has every field AdapterHub's has).
fn passive_defaults() -> Map<String, Value> {
    let v = json!({
        "factorized_phm_W": true,
        "factorized_phm_rule": false,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "inv_adapter_reduction_factor": null,
        "learn_phm": true,
        "phm_bias": true,
        "phm_c_init": "normal",
        "phm_dim": 4,
        "phm_init_range": 0.0001,
        "phm_rank": 1,
        "shared_W_phm": false,
        "shared_phm_rule": true,
    });
    v.as_object().cloned().expect("object")
}

impl BnConfig {
    /// An AdapterHub preset by name: `seq_bn` (legacy `pfeiffer`), `double_seq_bn`
    /// (`houlsby`), `par_bn`, `scaled_par_bn`.
    pub fn preset(name: &str) -> Result<Self> {
        let base = |mh: bool, act: &str, rf: f64| Self {
            mh_adapter: mh,
            output_adapter: true,
            reduction_factor: json!(rf as i64),
            non_linearity: act.into(),
            original_ln_before: false,
            original_ln_after: true,
            residual_before_ln: json!(true),
            adapter_residual_before_ln: false,
            ln_before: false,
            ln_after: false,
            init_weights: "bert".into(),
            init_weights_seed: None,
            is_parallel: false,
            scaling: json!(1.0),
            use_gating: false,
            leave_out: Vec::new(),
            dropout: 0.0,
            phm_layer: false,
            inv_adapter: None,
            cross_adapter: false,
            stochastic_depth: 0.0,
            extra: passive_defaults(),
        };
        Ok(match name {
            "seq_bn" | "pfeiffer" => Self {
                original_ln_before: true,
                ..base(false, "relu", 16.0)
            },
            "double_seq_bn" | "houlsby" => base(true, "swish", 16.0),
            "par_bn" | "scaled_par_bn" => Self {
                init_weights: "mam_adapter".into(),
                is_parallel: true,
                scaling: if name == "par_bn" {
                    json!(4.0)
                } else {
                    json!("learned")
                },
                ..base(false, "relu", 2.0)
            },
            other => {
                return Err(PeftError::Config(format!(
                    "unknown bottleneck preset `{other}` (seq_bn, double_seq_bn, par_bn, \
                     scaled_par_bn)"
                )));
            }
        })
    }

    /// The reduction factor of layer `layer`.
    pub fn reduction_factor_at(&self, layer: usize) -> Result<f64> {
        let rf = match &self.reduction_factor {
            Value::Object(map) => map
                .get(&layer.to_string())
                .or_else(|| map.get("default"))
                .ok_or_else(|| {
                    PeftError::Config(format!(
                        "reduction_factor gives no value for layer {layer} and no \"default\""
                    ))
                })?,
            v => v,
        };
        rf.as_f64().filter(|r| *r > 0.0).ok_or_else(|| {
            PeftError::Config(format!(
                "reduction_factor must be a positive number, got {rf}"
            ))
        })
    }

    /// The wiring of the adapters (`residual_before_ln` and friends).
    pub fn wiring(&self) -> Result<BnWiring> {
        let residual = match &self.residual_before_ln {
            Value::Bool(true) => ResidualFrom::Output,
            Value::Bool(false) => ResidualFrom::AdapterInput,
            Value::String(s) if s == "post_add" => ResidualFrom::PostAdd,
            other => {
                return Err(PeftError::Config(format!(
                    "residual_before_ln must be true, false or \"post_add\", got {other}"
                )));
            }
        };
        Ok(BnWiring {
            parallel: self.is_parallel,
            original_ln_before: self.original_ln_before,
            original_ln_after: self.original_ln_after,
            residual,
            adapter_residual_before_ln: self.adapter_residual_before_ln,
        })
    }

    /// Refuse the options this crate does not implement, naming each.
    pub fn validate(&self) -> Result<()> {
        let unsupported = [
            ("use_gating", self.use_gating),
            ("phm_layer (Compacter)", self.phm_layer),
            ("inv_adapter", self.inv_adapter.is_some()),
            ("cross_adapter", self.cross_adapter),
            ("stochastic_depth", self.stochastic_depth > 0.0),
        ];
        for (name, on) in unsupported {
            if on {
                return Err(PeftError::Config(format!(
                    "bottleneck option {name} is not supported yet"
                )));
            }
        }
        if !self.mh_adapter && !self.output_adapter {
            return Err(PeftError::Config(
                "neither mh_adapter nor output_adapter is set: the adapter would go nowhere".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(PeftError::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        BnActivation::from_name(&self.non_linearity)?;
        BnInit::from_name(&self.init_weights)?;
        self.wiring()?;
        self.scaling_kind(1)?;
        Ok(())
    }

    /// `(learned size, fixed value)` of the scaling for a hidden size.
    fn scaling_kind(&self, hidden: usize) -> Result<(Option<usize>, f64)> {
        match &self.scaling {
            Value::Number(n) => Ok((None, n.as_f64().unwrap_or(1.0))),
            Value::String(s) if s == "learned" => Ok((Some(1), 1.0)),
            Value::String(s) if s == "channel" => Ok((Some(hidden), 1.0)),
            other => Err(PeftError::Config(format!(
                "scaling must be a number, \"learned\" or \"channel\", got {other}"
            ))),
        }
    }

    /// The shape of the adapter of layer `layer` for a model of width `hidden`: a reduction
    /// factor above the width is an error (AdapterHub would silently use width 1).
    pub fn shape_at(&self, layer: usize, hidden: usize) -> Result<BnShape> {
        let rf = self.reduction_factor_at(layer)?;
        if rf > hidden as f64 {
            return Err(PeftError::Config(format!(
                "reduction_factor {rf} is larger than the hidden size {hidden}"
            )));
        }
        let (learned_scaling, fixed_scaling) = self.scaling_kind(hidden)?;
        Ok(BnShape {
            hidden,
            down: ((hidden as f64 / rf).floor() as usize).max(1),
            activation: BnActivation::from_name(&self.non_linearity)?,
            wiring: self.wiring()?,
            init: BnInit::from_name(&self.init_weights)?,
            learned_scaling,
            fixed_scaling,
            ln_before: self.ln_before,
            ln_after: self.ln_after,
            dropout: self.dropout,
        })
    }
}

/// A bottleneck adapter's `adapter_config.json`, as AdapterHub's `save_adapter` writes it: the
/// `config` object and the model facts around it. The `name` is the adapter's name inside its
/// tensor keys (`...adapters.<name>.adapter_down.0.weight`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    pub config: BnConfig,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub model_class: Option<String>,
    #[serde(default)]
    pub model_name: String,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "version")]
    pub version: String,
    /// Modules trained whole and saved as AdapterHub's static head (`model_head.safetensors`),
    /// e.g. a new classifier. Not an AdapterHub field; AdapterHub ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_name() -> String {
    "default".into()
}
fn version() -> String {
    ADAPTERHUB_VERSION.into()
}

impl BottleneckConfig {
    /// The preset `preset` (see [`BnConfig::preset`]), adapter name `default`.
    pub fn preset(preset: &str) -> Result<Self> {
        Ok(Self {
            config: BnConfig::preset(preset)?,
            hidden_size: None,
            model_class: None,
            model_name: String::new(),
            model_type: None,
            name: default_name(),
            version: version(),
            modules_to_save: None,
            extra: Map::new(),
        })
    }

    /// Read an `adapter_config.json` value. The registry's common keys are mapped:
    /// `base_model_name_or_path` becomes `model_name`; `task_type` is dropped (the model class
    /// says it).
    pub fn from_json(value: &Value) -> Result<Self> {
        let mut value = value.clone();
        if let Some(obj) = value.as_object_mut() {
            obj.remove("task_type");
            obj.remove("peft_type");
            if let Some(Value::String(name)) = obj.remove("base_model_name_or_path") {
                obj.insert("model_name".into(), Value::String(name));
            } else {
                obj.remove("base_model_name_or_path");
            }
        }
        let config: Self = peft_core::error::from_json_value(value)
            .map_err(|e| PeftError::Config(format!("adapter_config.json: {e}")))?;
        config.config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("BottleneckConfig serialises")
    }

    /// The modules trained and saved whole.
    pub fn saved_modules(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
}
