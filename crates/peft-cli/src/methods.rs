//! The method registry: every method the CLI knows, by `--method` name and by Hugging Face
//! `peft_type`. Loading an adapter folder and `--method` both dispatch through it.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::Tensor;
use peft_adapter::{BottleneckConfig, FusionConfig, Ia3Config, SsfConfig};
use peft_core::adapter_io::{BOTTLENECK_TYPE, FUSION_TYPE, is_adapterhub_config};
use peft_core::train::{TrainHook, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::{AdaLoraConfig, LoraConfig, ReloraConfig};
use peft_prompt::{PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig};
use peft_select::{
    BeftConfig, BitFitConfig, LnTuningConfig, SelectConfig, Selection, SparseConfig,
};
use peft_sites::SiteHost;
use serde_json::{Map, Value};

use crate::usage;

/// One method: its `--method` name, the `peft_type` its folders carry, and what it does.
pub struct Method {
    pub name: &'static str,
    pub peft_type: &'static str,
    pub about: &'static str,
}

/// Every method, in the order `--help` and errors list them.
pub const METHODS: &[Method] = &[
    Method {
        name: "lora",
        peft_type: "LORA",
        about: "LoRA on the side path of target linears",
    },
    Method {
        name: "qlora",
        peft_type: "LORA",
        about: "LoRA over an NF4 base with double quantization",
    },
    Method {
        name: "dora",
        peft_type: "LORA",
        about: "DoRA: LoRA with a learned magnitude per output row (use_dora; QDoRA with --quantize nf4)",
    },
    Method {
        name: "pissa",
        peft_type: "LORA",
        about: "LoRA initialised from the base's principal singular vectors (init_lora_weights=pissa)",
    },
    Method {
        name: "olora",
        peft_type: "LORA",
        about: "LoRA initialised from the QR decomposition of the base (init_lora_weights=olora)",
    },
    Method {
        name: "relora",
        peft_type: "LORA",
        about: "ReLoRA: LoRA merged into the base and restarted every relora_steps steps (--set relora_steps=N; saved as one LoRA adapter)",
    },
    Method {
        name: "adalora",
        peft_type: "ADALORA",
        about: "AdaLoRA: LoRA in SVD form whose rank budget shrinks from init_r to target_r by importance",
    },
    Method {
        name: "ia3",
        peft_type: "IA3",
        about: "(IA)^3: learned vectors scaling target linears",
    },
    Method {
        name: "ln-tuning",
        peft_type: "LN_TUNING",
        about: "LayerNorm tuning: trainable copies of the norms",
    },
    Method {
        name: "bitfit",
        peft_type: "BITFIT",
        about: "BitFit: only the model's own biases train",
    },
    Method {
        name: "beft",
        peft_type: "BEFT",
        about: "new zero-initialised biases on target linears (for models without biases)",
    },
    Method {
        name: "select",
        peft_type: "SELECT",
        about: "layer and module selection: chosen existing weights train in full (--set module_groups=[\"attention\",\"mlp\",\"norms\",\"biases\",\"head\",\"embeddings\"] --set layers_to_transform=[...])",
    },
    Method {
        name: "child-tuning-f",
        peft_type: "SELECT",
        about: "Child-Tuning-F: the selected weights train in full through a fresh Bernoulli(density) gradient mask each step (--set density=0.3)",
    },
    Method {
        name: "pafi",
        peft_type: "SUPERTUNING",
        about: "PaFi: the smallest-magnitude fraction of each target weight trains, as a sparse adapter (--set density=0.01)",
    },
    Method {
        name: "fishmask",
        peft_type: "SUPERTUNING",
        about: "FishMask: the entries of largest Fisher information (squared gradients of fisher_samples single examples) train, as a sparse adapter (--set density=0.01 --set fisher_samples=64)",
    },
    Method {
        name: "child-tuning-d",
        peft_type: "SUPERTUNING",
        about: "Child-Tuning-D: the entries of largest Fisher information over the training batches train, as a sparse adapter (--set density=0.01)",
    },
    Method {
        name: "supertuning",
        peft_type: "SUPERTUNING",
        about: "Hugging Face PEFT's Super-Tuning: the largest-magnitude fraction of each target weight trains (--set density=0.01)",
    },
    Method {
        name: "prompt-tuning",
        peft_type: "PROMPT_TUNING",
        about: "trainable virtual tokens before the input (init RANDOM, TEXT or SAMPLE_VOCAB)",
    },
    Method {
        name: "p-tuning",
        peft_type: "P_TUNING",
        about: "virtual tokens from an MLP or LSTM prompt encoder",
    },
    Method {
        name: "prefix-tuning",
        peft_type: "PREFIX_TUNING",
        about: "trainable keys and values in every attention layer (P-tuning v2)",
    },
    Method {
        name: "ssf",
        peft_type: "SSF",
        about: "SSF: a learned scale and shift after target linears and LayerNorms",
    },
    Method {
        name: "pfeiffer",
        peft_type: BOTTLENECK_TYPE,
        about: "bottleneck adapter after the feed-forward block (AdapterHub seq_bn)",
    },
    Method {
        name: "houlsby",
        peft_type: BOTTLENECK_TYPE,
        about: "bottleneck adapters after attention and feed-forward (AdapterHub double_seq_bn)",
    },
    Method {
        name: "parallel-adapter",
        peft_type: BOTTLENECK_TYPE,
        about: "bottleneck adapter beside the feed-forward block (AdapterHub par_bn)",
    },
    Method {
        name: "fusion",
        peft_type: FUSION_TYPE,
        about: "AdapterFusion over bottleneck adapters given with --fuse A,B (AdapterHub dynamic)",
    },
];

/// AdaLoRA's `total_step` before a run sets it (the CLI sets it to `--steps`).
const DEFAULT_TOTAL_STEP: usize = 100;

/// The AdapterHub preset of a bottleneck `--method`.
fn bottleneck_preset(method: &str) -> Option<&'static str> {
    match method {
        "pfeiffer" => Some("seq_bn"),
        "houlsby" => Some("double_seq_bn"),
        "parallel-adapter" => Some("par_bn"),
        _ => None,
    }
}

fn names() -> String {
    METHODS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn peft_types() -> String {
    let mut t: Vec<&str> = METHODS.iter().map(|m| m.peft_type).collect();
    t.dedup();
    t.join(", ")
}

/// A method's config, of whichever method it is.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodConfig {
    Lora(LoraConfig),
    /// LoRA trained in ReLoRA's cycles (saved as a plain LoRA adapter).
    Relora(ReloraConfig),
    AdaLora(AdaLoraConfig),
    Ia3(Ia3Config),
    LnTuning(LnTuningConfig),
    BitFit(BitFitConfig),
    Select(SelectConfig),
    /// Fixed sparse masks (PaFi, FishMask, Child-Tuning-D, Super-Tuning).
    Sparse(SparseConfig),
    Beft(BeftConfig),
    PromptTuning(PromptTuningConfig),
    PTuning(PromptEncoderConfig),
    PrefixTuning(PrefixTuningConfig),
    Ssf(SsfConfig),
    /// Bottleneck adapters, in AdapterHub's layout.
    Bottleneck(BottleneckConfig),
    /// AdapterFusion over bottleneck adapters, in AdapterHub's layout.
    Fusion(FusionConfig),
}

impl MethodConfig {
    /// The config an `adapter_config.json` holds, as the method its `peft_type` names (an
    /// AdapterHub config: by its layout).
    pub fn from_json(config: &Value) -> Result<Self> {
        if is_adapterhub_config(config) {
            if config.get("adapter_names").is_some() {
                return Ok(Self::Fusion(FusionConfig::from_json(config)?));
            }
            let arch = config["config"].get("architecture").and_then(Value::as_str);
            if let Some(a) = arch.filter(|a| *a != "bottleneck") {
                bail!("AdapterHub `{a}` adapters are not supported (bottleneck adapters are)");
            }
            return Ok(Self::Bottleneck(BottleneckConfig::from_json(config)?));
        }
        let peft_type = config
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        Ok(match peft_type {
            "LORA" => Self::Lora(LoraConfig::from_json(config)?),
            "IA3" => Self::Ia3(Ia3Config::from_json(config)?),
            "LN_TUNING" => Self::LnTuning(LnTuningConfig::from_json(config)?),
            "BITFIT" => Self::BitFit(BitFitConfig::from_json(config)?),
            "SELECT" => Self::Select(SelectConfig::from_json(config)?),
            "SUPERTUNING" | "SUPERTUNING_PACKED" => Self::Sparse(SparseConfig::from_json(config)?),
            "BEFT" => Self::Beft(BeftConfig::from_json(config)?),
            "PROMPT_TUNING" => Self::PromptTuning(PromptTuningConfig::from_json(config)?),
            "P_TUNING" => Self::PTuning(PromptEncoderConfig::from_json(config)?),
            "PREFIX_TUNING" => Self::PrefixTuning(PrefixTuningConfig::from_json(config)?),
            "SSF" => Self::Ssf(SsfConfig::from_json(config)?),
            "ADALORA" => Self::AdaLora(AdaLoraConfig::from_json(config)?),
            "" => bail!(
                "the adapter config has no peft_type (supported: {})",
                peft_types()
            ),
            other => bail!(
                "peft_type `{other}` is not supported (supported: {})",
                peft_types()
            ),
        })
    }

    /// The default config of `--method name` (its reference config's defaults).
    pub fn default_for(name: &str) -> Result<Self> {
        Ok(match name {
            "lora" | "qlora" => Self::Lora(LoraConfig::default()),
            "dora" => Self::Lora(LoraConfig {
                use_dora: true,
                ..Default::default()
            }),
            // relora_steps has no default that suits every run: --set it.
            "relora" => Self::Relora(ReloraConfig::new(LoraConfig::default(), 0)),
            // total_step comes from --steps (see `train::method_config`).
            "adalora" => Self::AdaLora(AdaLoraConfig {
                total_step: Some(DEFAULT_TOTAL_STEP),
                ..Default::default()
            }),
            "pissa" | "olora" => Self::Lora(LoraConfig {
                init_lora_weights: peft_lora::InitLoraWeights::Method(name.into()),
                ..Default::default()
            }),
            "ia3" => Self::Ia3(Ia3Config::default()),
            "ln-tuning" => Self::LnTuning(LnTuningConfig::default()),
            "bitfit" => Self::BitFit(BitFitConfig::default()),
            "select" => Self::Select(SelectConfig::default()),
            // The paper's best reserve probability on GLUE is 0.2-0.3.
            "child-tuning-f" => Self::Select(SelectConfig {
                density: Some(0.3),
                ..Default::default()
            }),
            "beft" => Self::Beft(BeftConfig::default()),
            // PEFT's default sparsity (1% of each weight trains); the selection papers train
            // every linear of the blocks.
            "pafi" | "fishmask" | "child-tuning-d" | "supertuning" => {
                let (selection, top) = match name {
                    "pafi" => (Selection::Magnitude, false),
                    "fishmask" => (Selection::Fishmask, true),
                    "child-tuning-d" => (Selection::ChildTuningD, true),
                    _ => (Selection::Magnitude, true),
                };
                let mut c = SparseConfig::with_density(0.01, selection, top)?;
                if name != "supertuning" {
                    c.target_modules = Some(peft_core::target::ModuleSelector::Pattern(
                        "all-linear".into(),
                    ));
                }
                Self::Sparse(c)
            }
            "prompt-tuning" => Self::PromptTuning(PromptTuningConfig::default()),
            "p-tuning" => Self::PTuning(PromptEncoderConfig::default()),
            "prefix-tuning" => Self::PrefixTuning(PrefixTuningConfig::default()),
            "ssf" => Self::Ssf(SsfConfig::default()),
            // A template: the fused adapters come from `--fuse` ([`Self::fusing`]).
            "fusion" => Self::Fusion(FusionConfig::new(&["a".into(), "b".into()], "dynamic")?),
            other => match bottleneck_preset(other) {
                Some(preset) => Self::Bottleneck(BottleneckConfig::preset(preset)?),
                None => {
                    return Err(usage!(
                        "--method {other}: unknown method (supported: {})",
                        names()
                    ));
                }
            },
        })
    }

    /// The method as a [`Tuner`] of models `M`.
    pub fn tuner<M: SiteHost>(&self) -> &dyn Tuner<M> {
        match self {
            Self::Lora(c) => c,
            Self::Relora(c) => c,
            Self::AdaLora(c) => c,
            Self::Ia3(c) => c,
            Self::LnTuning(c) => c,
            Self::BitFit(c) => c,
            Self::Select(c) => c,
            Self::Sparse(c) => c,
            Self::Beft(c) => c,
            Self::PromptTuning(c) => c,
            Self::PTuning(c) => c,
            Self::PrefixTuning(c) => c,
            Self::Ssf(c) => c,
            Self::Bottleneck(c) => c,
            Self::Fusion(c) => c,
        }
    }

    /// The `adapter_config.json` content.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Lora(c) => serde_json::to_value(c),
            Self::Relora(c) => serde_json::to_value(c),
            Self::AdaLora(c) => serde_json::to_value(c),
            Self::Ia3(c) => serde_json::to_value(c),
            Self::LnTuning(c) => serde_json::to_value(c),
            Self::BitFit(c) => serde_json::to_value(c),
            Self::Select(c) => serde_json::to_value(c),
            Self::Sparse(c) => serde_json::to_value(c),
            Self::Beft(c) => serde_json::to_value(c),
            Self::PromptTuning(c) => serde_json::to_value(c),
            Self::PTuning(c) => serde_json::to_value(c),
            Self::PrefixTuning(c) => serde_json::to_value(c),
            Self::Ssf(c) => serde_json::to_value(c),
            Self::Bottleneck(c) => serde_json::to_value(c),
            Self::Fusion(c) => serde_json::to_value(c),
        }
        .expect("configs serialise")
    }

    /// Fill in what depends on the model, as Python PEFT does before saving, so the saved
    /// config says what was adapted: the model type's default targets (IA3, LN tuning, BEFT),
    /// the model facts of prompt methods (`token_dim`, `num_layers`, ...).
    pub fn resolved_for<M: SiteHost>(&self, model: &M) -> Result<Self> {
        let model_type = model.model_type();
        Ok(match self {
            Self::Ia3(c) => Self::Ia3(c.with_defaults(model_type)?),
            Self::LnTuning(c) => Self::LnTuning(c.with_defaults(model_type)?),
            Self::Beft(c) => Self::Beft(c.with_defaults(model_type)?),
            Self::Sparse(c) => Self::Sparse(c.with_defaults(model_type)?),
            Self::Ssf(c) => Self::Ssf(c.with_defaults(model_type)?),
            Self::PromptTuning(c) => Self::PromptTuning(c.resolved_for(model)?),
            Self::PTuning(c) => Self::PTuning(c.resolved_for(model)?),
            Self::PrefixTuning(c) => Self::PrefixTuning(c.resolved_for(model)?),
            Self::Bottleneck(c) => Self::Bottleneck(c.resolved_for(model)?),
            Self::Fusion(c) => Self::Fusion(c.resolved_for(model)?),
            Self::AdaLora(c) => Self::AdaLora(c.with_defaults(model_type)?),
            Self::Lora(_) | Self::Relora(_) | Self::BitFit(_) | Self::Select(_) => self.clone(),
        })
    }

    /// Whether the method initialises its weights from the base's and changes the base (PiSSA,
    /// OLoRA, LoftQ): it needs the full-precision weights, so a 4-bit base is quantized after it.
    pub fn initialises_from_base(&self) -> bool {
        matches!(self, Self::Lora(c) if matches!(c.base_init(), Ok(Some(_))))
    }

    /// Positions the method's virtual tokens take ahead of every sequence (0 for methods
    /// without them).
    pub fn virtual_tokens(&self) -> usize {
        let base = match self {
            Self::PromptTuning(c) => &c.base,
            Self::PTuning(c) => &c.base,
            Self::PrefixTuning(c) => &c.base,
            _ => return 0,
        };
        base.total_virtual_tokens().unwrap_or(0)
    }

    /// Prompt tuning's `TEXT` init: tokenize `prompt_tuning_init_text` with the model's
    /// tokenizer (`encode`, special tokens included as PEFT's tokenizer call adds them) and
    /// name the tokenizer as PEFT's config requires. Other methods are unchanged.
    pub fn with_text_ids(
        mut self,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
        tokenizer_path: &str,
    ) -> Result<Self> {
        if let Self::PromptTuning(c) = &mut self
            && c.prompt_tuning_init == "TEXT"
            && !c.base.inference_mode
        {
            let text = c.prompt_tuning_init_text.clone().unwrap_or_default();
            let ids = encode(&text)?;
            if ids.is_empty() {
                bail!("prompt_tuning_init_text `{text}` gives no tokens");
            }
            c.init_token_ids = Some(ids);
            c.tokenizer_name_or_path
                .get_or_insert_with(|| tokenizer_path.to_string());
        }
        Ok(self)
    }

    /// A fusion of the bottleneck adapters `configs` (read from the `--fuse` folders `dirs`),
    /// with this fusion's settings: their AdapterHub names must differ and their placement
    /// (`mh_adapter`, `output_adapter`) agree, as AdapterHub requires. Other methods are
    /// unchanged.
    pub fn fusing(self, dirs: &[std::path::PathBuf], configs: &[MethodConfig]) -> Result<Self> {
        let Self::Fusion(mut fusion) = self else {
            return Ok(self);
        };
        let mut names = Vec::new();
        let mut first: Option<(&std::path::PathBuf, &BottleneckConfig)> = None;
        for (dir, c) in dirs.iter().zip(configs) {
            let MethodConfig::Bottleneck(b) = c else {
                bail!(
                    "--fuse {}: a {} adapter; AdapterFusion fuses bottleneck adapters",
                    dir.display(),
                    c.to_json()["peft_type"].as_str().unwrap_or("?")
                );
            };
            if let Some(i) = names.iter().position(|n| *n == b.name) {
                bail!(
                    "--fuse {} and --fuse {} are both named `{}` (the `name` in their \
                     adapter_config.json); fused adapters need different names",
                    dirs[i].display(),
                    dir.display(),
                    b.name
                );
            }
            if let Some((fdir, f)) = first {
                for (field, x, y) in [
                    ("mh_adapter", f.config.mh_adapter, b.config.mh_adapter),
                    (
                        "output_adapter",
                        f.config.output_adapter,
                        b.config.output_adapter,
                    ),
                ] {
                    if x != y {
                        bail!(
                            "--fuse: {} and {} differ in {field} ({x} and {y}); AdapterFusion \
                             fuses adapters placed alike",
                            fdir.display(),
                            dir.display()
                        );
                    }
                }
            } else {
                first = Some((dir, b));
            }
            names.push(b.name.clone());
        }
        if names.len() < 2 {
            bail!(
                "--fuse needs at least two adapter folders, got {}",
                names.len()
            );
        }
        fusion.name = names.join(",");
        fusion.adapter_names = names;
        Ok(Self::Fusion(fusion))
    }

    /// Set fields of the config by their reference names (`--set key=value`, a `[method]`
    /// table): a value is read as JSON (`8`, `true`, `["q_proj"]`) and otherwise taken as a
    /// string. Unknown keys are an error that lists the valid ones.
    pub fn with_options(&self, options: &[(String, Value)]) -> Result<Self> {
        if options.is_empty() {
            return Ok(self.clone());
        }
        let mut json = self.to_json();
        let known = known_fields(self);
        let method = match self {
            Self::Bottleneck(_) => BOTTLENECK_TYPE.to_string(),
            Self::Fusion(_) => FUSION_TYPE.to_string(),
            _ => json["peft_type"].as_str().unwrap_or("?").to_string(),
        };
        // AdapterHub keeps the method's options in the `config` object.
        let obj = match self {
            Self::Bottleneck(_) | Self::Fusion(_) => json["config"].as_object_mut(),
            _ => json.as_object_mut(),
        }
        .expect("configs are objects");
        for (key, value) in options {
            if let (Self::Sparse(_), "density") = (self, key.as_str()) {
                // A density d is PEFT's sparsity 1 − d.
                let d = value
                    .as_f64()
                    .ok_or_else(|| usage!("--set density={value}: expected a number in (0, 1]"))?;
                let c = SparseConfig::with_density(d, Selection::Magnitude, true)
                    .map_err(|e| usage!("--set {e}"))?;
                obj.insert("sparsity".into(), c.sparsity.into());
                continue;
            }
            if let (Self::Sparse(_), "pack_indices") = (self, key.as_str()) {
                // Our packed layout is its own peft_type, so PEFT refuses it by name.
                let packed = value
                    .as_bool()
                    .ok_or_else(|| usage!("--set pack_indices={value}: expected true or false"))?;
                let c = SparseConfig::default().packed(packed);
                obj.insert("peft_type".into(), c.peft_type.into());
                continue;
            }
            if !known.contains(key) {
                return Err(usage!(
                    "--set {key}: {method} has no option `{key}` (valid: {})",
                    known.join(", ")
                ));
            }
            obj.insert(key.clone(), value.clone());
        }
        if let Self::Relora(_) = self {
            // A ReLoRA config is a LoRA config with the cycle settings beside it.
            let c: ReloraConfig = serde_json::from_value(json).map_err(|e| usage!("--set: {e}"))?;
            c.validate().map_err(|e| usage!("--set: {e}"))?;
            return Ok(Self::Relora(c));
        }
        Self::from_json(&json).map_err(|e| usage!("--set: {e:#}"))
    }
}

/// The fields of a method's reference config (those its defaults serialise, `peft_type` and
/// bookkeeping fields excluded).
fn known_fields(config: &MethodConfig) -> Vec<String> {
    let skip = ["peft_type", "base_model_name_or_path", "inference_mode"];
    let defaults = match config {
        MethodConfig::Lora(_) => MethodConfig::Lora(LoraConfig::default()),
        MethodConfig::Relora(_) => {
            MethodConfig::Relora(ReloraConfig::new(LoraConfig::default(), 0))
        }
        MethodConfig::AdaLora(_) => MethodConfig::AdaLora(AdaLoraConfig::default()),
        MethodConfig::Ia3(_) => MethodConfig::Ia3(Ia3Config::default()),
        MethodConfig::LnTuning(_) => MethodConfig::LnTuning(LnTuningConfig::default()),
        MethodConfig::BitFit(_) => MethodConfig::BitFit(BitFitConfig::default()),
        MethodConfig::Select(_) => MethodConfig::Select(SelectConfig::default()),
        MethodConfig::Sparse(_) => {
            let mut keys: Vec<String> = MethodConfig::Sparse(SparseConfig::default())
                .to_json()
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            keys.extend(["density", "fisher_samples", "pack_indices"].map(String::from));
            keys.retain(|k| !skip.contains(&k.as_str()));
            return keys;
        }
        MethodConfig::Beft(_) => MethodConfig::Beft(BeftConfig::default()),
        MethodConfig::PromptTuning(_) => MethodConfig::PromptTuning(Default::default()),
        MethodConfig::PTuning(_) => MethodConfig::PTuning(Default::default()),
        MethodConfig::PrefixTuning(_) => MethodConfig::PrefixTuning(Default::default()),
        MethodConfig::Ssf(_) => MethodConfig::Ssf(SsfConfig::default()),
        // AdapterHub's options are its `config` object's (the same fields for every preset).
        MethodConfig::Bottleneck(_) | MethodConfig::Fusion(_) => {
            let mut keys: Vec<String> = config.to_json()["config"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            return keys;
        }
    };
    let map: Map<String, Value> = defaults.to_json().as_object().cloned().unwrap_or_default();
    map.keys()
        .filter(|k| !skip.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// The method's own loss term ([`Tuner::extra_loss`] of adapter `default`, e.g.
/// AdapterFusion's regularisation) as a trainer hook.
pub struct MethodLoss(pub MethodConfig);

impl<M: SiteHost + Module> TrainHook<M> for MethodLoss {
    fn extra_loss(&self, model: &M) -> Option<Tensor<1>> {
        self.0.tuner::<M>().extra_loss(model, "default")
    }
}

/// `trainer` with what `method` changes in training: its loss term, when it has one on this
/// model (so checkpoints of methods without one keep no hook state), and ReLoRA's restarts.
pub fn with_method_hooks<M: SiteHost + Module + 'static>(
    trainer: Trainer<M>,
    method: &MethodConfig,
) -> Trainer<M> {
    let tuner = method.tuner::<M>();
    let trainer = if tuner.extra_loss(trainer.model(), "default").is_some() {
        trainer.with_hook(MethodLoss(method.clone()))
    } else {
        trainer
    };
    match method {
        MethodConfig::Relora(c) => {
            let steps = trainer.config.steps;
            trainer.with_hook(c.hook("default", steps))
        }
        MethodConfig::AdaLora(c) => trainer.with_hook(c.allocator("default")),
        MethodConfig::Select(c) => {
            let seed = trainer.config.seed;
            match c.gradient_mask(trainer.model(), seed) {
                Ok(Some(mask)) => trainer.with_hook(mask),
                // Nothing selected was refused when the method was applied.
                _ => trainer,
            }
        }
        _ => trainer,
    }
}

/// What choosing a Fisher-scored mask took.
#[derive(Debug, Clone, Copy)]
pub struct FisherRun {
    /// Linear weights scored.
    pub weights: usize,
    pub examples: usize,
    pub batches: usize,
    pub seconds: f64,
}

/// Attach `method` to `model` as [`Tuner::apply`] does, except that Fisher-scored masks
/// (FishMask, Child-Tuning-D) are first chosen from `train_set` with the training loss
/// `loss_fn`: FishMask over single examples (the first `fisher_samples`, default 64 or all of
/// a smaller set), Child-Tuning-D over batches of `batch_size` (the first `fisher_samples`,
/// default all). `progress(done, of)` follows the batches.
pub fn apply_with_data<M: SiteHost + Module + 'static, E: Clone>(
    method: &MethodConfig,
    model: M,
    train_set: &[E],
    batch_size: usize,
    loss_fn: impl Fn(&M, &[E]) -> Tensor<1>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(M, Option<FisherRun>)> {
    let MethodConfig::Sparse(c) = method else {
        return Ok((method.tuner().apply(model, "default")?, None));
    };
    if !c.selection.needs_fisher() {
        return Ok((method.tuner().apply(model, "default")?, None));
    }
    let single = c.selection == Selection::Fishmask;
    let n = match (c.fisher_samples, single) {
        (Some(n), _) => n,
        (None, true) => train_set.len().min(64),
        (None, false) => train_set.len(),
    };
    if n > train_set.len() {
        return Err(usage!(
            "--set fisher_samples={n}: the training data has {} examples",
            train_set.len()
        ));
    }
    let per = if single { 1 } else { batch_size.max(1) };
    let batches: Vec<Vec<E>> = train_set[..n].chunks(per).map(|b| b.to_vec()).collect();
    let paths = c.targets(&model)?;
    let started = std::time::Instant::now();
    let count = batches.len();
    let (model, scores) =
        peft_select::fisher::fisher_scores(model, &paths, &batches, loss_fn, |done| {
            progress(done, count)
        })?;
    let run = FisherRun {
        weights: paths.len(),
        examples: n,
        batches: count,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((c.apply_scored(model, "default", &scores)?, Some(run)))
}

/// Parse `key=value` (`--set`): the value as JSON when it is JSON, else as a string.
pub fn parse_option(text: &str) -> Result<(String, Value)> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        usage!("--set {text}: expected key=value (e.g. --set init_ia3_weights=false)")
    })?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_dispatch_by_peft_type_and_unknown_types_list_the_supported() {
        let ia3 = MethodConfig::from_json(&serde_json::json!({"peft_type": "IA3"})).unwrap();
        assert!(matches!(ia3, MethodConfig::Ia3(_)));
        let err = MethodConfig::from_json(&serde_json::json!({"peft_type": "VERA"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("VERA") && err.contains("LORA, IA3, LN_TUNING"),
            "{err}"
        );
        let err = MethodConfig::default_for("vera").unwrap_err().to_string();
        assert!(
            err.contains(
                "lora, qlora, dora, pissa, olora, relora, adalora, ia3, ln-tuning, bitfit, beft"
            ),
            "{err}"
        );
    }

    #[test]
    fn options_use_the_reference_names_and_unknown_ones_list_the_valid() {
        let c = MethodConfig::default_for("ia3").unwrap();
        let set = c
            .with_options(&[
                parse_option("init_ia3_weights=false").unwrap(),
                parse_option(r#"target_modules=["k_proj"]"#).unwrap(),
            ])
            .unwrap();
        let MethodConfig::Ia3(ia3) = &set else {
            unreachable!()
        };
        assert!(!ia3.init_ia3_weights);
        let err = c
            .with_options(&[parse_option("rank=4").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`rank`") && err.contains("feedforward_modules"),
            "{err}"
        );
        let err = c
            .with_options(&[parse_option("init_ia3_weights=maybe").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("init_ia3_weights"), "{err}");
        assert!(parse_option("no-equals").is_err());
    }
}
