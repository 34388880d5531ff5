//! `peft train`: LoRA fine-tuning from the command line or a TOML run file, with a progress
//! bar, a metrics log, a loss curve, atomic checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::adapter_io::{adapter_dir, load_adapter, save_adapter};
use peft_core::target::ModuleSelector;
use peft_core::train::{Schedule, StepReport, TrainConfig, Trainer};
use peft_core::tuner::TRAINING_EXTRAS_FILE;
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, SiteHost, quantize_base};

use peft_cli::methods::{self, MethodConfig};
use peft_quant::QuantSpec;
use serde::Deserialize;

use crate::plot::plot_loss;
use peft_cli::usage;

/// Options of `peft train`; every one can also come from `--config run.toml` (flags win).
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options (same names, `_` for `-`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face model folder or .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Fine-tuning method: lora, qlora (LoRA over an NF4 base with double quantization), ia3,
    /// ln-tuning, bitfit or beft (`peft methods` lists them) [default: lora].
    #[arg(long)]
    #[serde(skip)]
    pub method: Option<String>,
    /// A method option under its reference config's name, e.g. `--set init_ia3_weights=false`
    /// or `--set 'target_modules=["k_proj","v_proj"]'` (repeatable; the value is JSON, or a
    /// string). In the --config file: a `[method]` table with `name` and the options.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub set: Vec<String>,
    /// `method = "ia3"`, or a `[method]` table (`name = "ia3"` and options), in the --config
    /// file.
    #[arg(skip)]
    #[serde(rename = "method", default)]
    pub method_file: Option<MethodSpec>,
    /// Quantize the base's linear weights to 4 bits at load: nf4 or fp4 [default: none; nf4
    /// with --method qlora].
    #[arg(long)]
    pub quantize: Option<String>,
    /// With --quantize: quantize the 4-bit scales too (~4.13 bits per weight instead of 4.5)
    /// [default: on with --method qlora].
    #[arg(long, default_value_t = false)]
    #[serde(default)]
    pub double_quant: bool,
    /// With --quantize: weights per 4-bit scale, 32..4096 [default: 64].
    #[arg(long)]
    pub quant_blocksize: Option<usize>,
    /// Compute type of the base model: f32, f16 or bf16 (bitsandbytes' `bnb_4bit_compute_dtype`).
    /// With f16/bf16 the norms, softmax and loss still run in f32 and the LoRA weights and
    /// their optimizer state stay f32. Meant for GPUs; causal-lm only [default: f32].
    #[arg(long)]
    pub compute_dtype: Option<String>,
    /// Training data: .jsonl file or chatterbot YAML folder.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Task: causal-lm (chat pairs or plain text) or classification (CSV, BERT models)
    /// [default: causal-lm].
    #[arg(long)]
    pub task: Option<String>,
    /// CSV column holding the text (classification) [default: text].
    #[arg(long)]
    pub text_column: Option<String>,
    /// CSV column holding the label (classification) [default: label].
    #[arg(long)]
    pub label_column: Option<String>,
    /// Held-out data (default: every 10th example of --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output folder (adapter, checkpoint, metrics.jsonl, loss.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA alpha [default: 32].
    #[arg(long, allow_hyphen_values = true)]
    pub alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub dropout: Option<f64>,
    /// Target modules: names (suffix match), one regex, or all-linear [default: q_proj,v_proj].
    #[arg(long, value_delimiter = ',')]
    pub target: Option<Vec<String>>,
    /// Use rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub rslora: Option<bool>,
    /// Optimizer steps [default: 100].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// Examples per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Warmup steps [default: 10].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Learning-rate schedule: cosine-floor (warmup, cosine to 10% of the peak), or as
    /// transformers defines them (from 0, decaying to 0): linear, cosine, constant,
    /// cosine-restarts[:CYCLES] [default: cosine-floor].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Clip the global gradient norm to this [default: 1.0].
    #[arg(long, allow_hyphen_values = true)]
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f64>,
    /// Longest sequence in tokens [default: 256].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Seed of initialisation and data order [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N steps [default: 25].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Replace an existing output folder.
    #[arg(long, default_value_t = false)]
    #[serde(default)]
    pub overwrite: bool,
    /// Continue from the output folder's checkpoint (with the same settings).
    #[arg(long, default_value_t = false)]
    #[serde(default)]
    pub resume: bool,
    /// Skip a batch whose loss or gradient is NaN or infinite (counted in metrics.jsonl) instead
    /// of stopping the run.
    #[arg(long, default_value_t = false)]
    #[serde(default)]
    pub skip_nonfinite: bool,
    /// PiSSA / OLoRA: save the trained adapter as a plain LoRA of rank 2r that applies to the
    /// original base (PEFT's `path_initial_model_for_weight_conversion`); the checkpoint keeps the
    /// PiSSA / OLoRA form.
    #[arg(long, default_value_t = false)]
    #[serde(default)]
    pub convert_to_lora: bool,
    /// With --method fusion: the bottleneck adapter folders to fuse (two or more,
    /// comma-separated); they stay frozen, only the fusion trains.
    #[arg(long, value_delimiter = ',')]
    pub fuse: Option<Vec<PathBuf>>,
    /// Stop after this many steps, as an interruption would (for testing resume).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

/// The `method` entry of a --config file: a name, or a table with `name` and method options.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MethodSpec {
    Name(String),
    Table(toml::Table),
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

impl TrainArgs {
    /// Fill options not given on the command line from `--config`.
    fn with_config_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let mut file: TrainArgs = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        merge!(
            self,
            file,
            model,
            quantize,
            quant_blocksize,
            compute_dtype,
            task,
            text_column,
            label_column,
            data,
            eval_data,
            out,
            r,
            alpha,
            dropout,
            target,
            rslora,
            steps,
            lr,
            batch_size,
            grad_accum,
            warmup,
            schedule,
            max_grad_norm,
            weight_decay,
            max_len,
            seed,
            save_every,
            fuse
        );
        match file.method_file.take() {
            Some(MethodSpec::Name(name)) => self.method = self.method.take().or(Some(name)),
            Some(MethodSpec::Table(mut table)) => {
                if let Some(name) = table.remove("name") {
                    let name = name.as_str().map(String::from).ok_or_else(|| {
                        usage!("{}: [method] name must be a string", path.display())
                    })?;
                    self.method = self.method.take().or(Some(name));
                }
                // The file's options first: --set on the command line wins.
                let mut from_file: Vec<String> = table
                    .into_iter()
                    .map(|(k, v)| Ok(format!("{k}={}", serde_json::to_string(&v)?)))
                    .collect::<Result<_>>()?;
                from_file.append(&mut self.set);
                self.set = from_file;
            }
            None => {}
        }
        self.overwrite |= file.overwrite;
        self.double_quant |= file.double_quant;
        self.resume |= file.resume;
        self.skip_nonfinite |= file.skip_nonfinite;
        self.convert_to_lora |= file.convert_to_lora;
        Ok(self)
    }

    /// Refuse values outside each option's range, naming the option (exit code 2). `--max-len`'s
    /// upper bound (the model's positions) is checked once the model is loaded.
    fn check_ranges(&self) -> Result<()> {
        use peft_cli::usage::{at_least, fraction, non_negative, positive};
        at_least("--r", self.r, 1)?;
        positive("--alpha", self.alpha)?;
        fraction("--dropout", self.dropout)?;
        at_least("--steps", self.steps, 1)?;
        positive("--lr", self.lr)?;
        at_least("--batch-size", self.batch_size, 1)?;
        at_least("--grad-accum", self.grad_accum, 1)?;
        positive("--max-grad-norm", self.max_grad_norm)?;
        non_negative("--weight-decay", self.weight_decay)?;
        at_least("--max-len", self.max_len, 2)?;
        at_least("--save-every", self.save_every, 1)?;
        Ok(())
    }
}

fn lora_config(a: &TrainArgs, classification: bool) -> Result<LoraConfig> {
    let default_targets: &[&str] = if classification {
        &["query", "value"]
    } else {
        &["q_proj", "v_proj"]
    };
    let targets = a
        .target
        .clone()
        .unwrap_or_else(|| default_targets.iter().map(|s| s.to_string()).collect());
    let selector = if targets.len() == 1
        && (targets[0] == "all-linear" || targets[0].contains(['*', '(', '|', '\\']))
    {
        ModuleSelector::Pattern(targets[0].clone())
    } else {
        ModuleSelector::List(targets)
    };
    let config = LoraConfig {
        r: a.r.unwrap_or(16),
        lora_alpha: a.alpha.unwrap_or(32.0),
        lora_dropout: a.dropout.unwrap_or(0.0),
        use_rslora: a.rslora.unwrap_or(false),
        target_modules: Some(selector),
        task_type: Some(
            if classification {
                "SEQ_CLS"
            } else {
                "CAUSAL_LM"
            }
            .into(),
        ),
        // The classification head is new: train it whole and save it with the adapter.
        modules_to_save: classification.then(|| vec!["classifier".into()]),
        base_model_name_or_path: a.model.as_ref().map(|p| p.display().to_string()),
        ..Default::default()
    };
    config.validate()?;
    Ok(config)
}

/// Training steps without `--steps`.
const DEFAULT_STEPS: usize = 100;

/// The config of `--method`: LoRA from its flags, the others from their reference defaults;
/// then `--target` and the `--set` options. The task sets `task_type` (and, for
/// classification, trains and saves the new head whole).
fn method_config(a: &TrainArgs, method: &str, classification: bool) -> Result<MethodConfig> {
    let lora = matches!(
        method,
        "lora" | "qlora" | "dora" | "pissa" | "olora" | "relora"
    );
    let config = if lora {
        let mut c = lora_config(a, classification).map_err(|e| usage!("{e}"))?;
        c.use_dora = method == "dora";
        if matches!(method, "pissa" | "olora") {
            c.init_lora_weights = peft_lora::InitLoraWeights::Method(method.into());
        }
        if method == "relora" {
            MethodConfig::Relora(peft_lora::ReloraConfig::new(c, 0))
        } else {
            MethodConfig::Lora(c)
        }
    } else {
        for (flag, given) in [
            ("--r", a.r.is_some()),
            ("--alpha", a.alpha.is_some()),
            ("--dropout", a.dropout.is_some()),
            ("--rslora", a.rslora.is_some()),
        ] {
            if given {
                return Err(usage!(
                    "{flag} is a LoRA option; --method {method} takes its options with --set"
                ));
            }
        }
        let mut json = MethodConfig::default_for(method)?.to_json();
        json["task_type"] = if classification {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        }
        .into();
        if classification {
            json["modules_to_save"] = serde_json::json!(["classifier"]);
        }
        if let Some(t) = &a.target {
            if json.get("target_modules").is_none() {
                return Err(usage!(
                    "--target: --method {method} attaches no modules (its options: --set key=value)"
                ));
            }
            json["target_modules"] = serde_json::json!(t);
        }
        json["base_model_name_or_path"] =
            serde_json::json!(a.model.as_ref().map(|p| p.display().to_string()));
        if method == "adalora" {
            // The budget schedule spans the run.
            json["total_step"] = a.steps.unwrap_or(DEFAULT_STEPS).into();
        }
        if peft_core::adapter_io::is_adapterhub_config(&json) && json.get("adapter_names").is_none()
        {
            // AdapterHub names an adapter inside its keys; name it after the output folder, so
            // adapters trained here can be fused (their names must differ).
            json["name"] = adapterhub_name(a.out.as_deref()).into();
        }
        MethodConfig::from_json(&json).map_err(|e| usage!("{e:#}"))?
    };
    let options = a
        .set
        .iter()
        .map(|o| methods::parse_option(o))
        .collect::<Result<Vec<_>>>()?;
    let config = config.with_options(&options)?;
    if let MethodConfig::Relora(c) = &config {
        c.validate()
            .map_err(|e| usage!("--method relora: {e} (--set relora_steps=N)"))?;
    }
    Ok(config)
}

/// An AdapterHub adapter name from the output folder's name: letters, digits, `_` and `-`
/// kept, anything else (`.` and `,` split AdapterHub's keys and fusion names) becomes `_`.
fn adapterhub_name(out: Option<&Path>) -> String {
    let name: String = out
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("default")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "default".into()
    } else {
        name
    }
}

/// The `--fuse` folders read as the registry reads them (config only), for
/// [`MethodConfig::fusing`]; `--fuse` with another method than fusion is refused.
fn fused_configs(a: &TrainArgs, method: &str) -> Result<Vec<MethodConfig>> {
    match (&a.fuse, method) {
        (None, "fusion") => Err(usage!(
            "--method fusion needs --fuse A,B (the bottleneck adapter folders to fuse)"
        )),
        (Some(_), m) if m != "fusion" => Err(usage!("--fuse is for --method fusion")),
        (None, _) => Ok(Vec::new()),
        (Some(dirs), _) => dirs
            .iter()
            .map(|d| {
                let files = load_adapter(d)?;
                MethodConfig::from_json(&files.config)
                    .with_context(|| format!("--fuse {}", d.display()))
            })
            .collect(),
    }
}

/// Load the `--fuse` adapters, frozen by the fusion later, under their AdapterHub names.
pub(crate) fn load_fused<M: SiteHost>(run: &Run, mut model: M) -> Result<M> {
    for dir in run.args.fuse.iter().flatten() {
        model = load_bottleneck_without_head(model, dir, None)
            .with_context(|| format!("--fuse {}", dir.display()))?
            .0;
    }
    Ok(model)
}

/// Load the bottleneck adapter folder `dir` as adapter `name` (`None`: its AdapterHub name),
/// leaving out the head saved with it: a fusion over it has its own (a classifier for other
/// labels, or the model's own LM head).
pub(crate) fn load_bottleneck_without_head<M: SiteHost>(
    model: M,
    dir: &Path,
    name: Option<&str>,
) -> Result<(M, MethodConfig)> {
    let mut files = load_adapter(dir)?;
    let config =
        MethodConfig::from_json(&files.config).with_context(|| format!("{}", dir.display()))?;
    let MethodConfig::Bottleneck(c) = &config else {
        return Err(usage!(
            "{}: a {} adapter; AdapterFusion fuses bottleneck adapters",
            dir.display(),
            config.to_json()["peft_type"].as_str().unwrap_or("?")
        ));
    };
    files
        .tensors
        .tensors
        .retain(|k, _| k.contains(".adapters."));
    let mut c = c.clone();
    c.modules_to_save = None;
    let name = name.unwrap_or(&c.name).to_string();
    let model = c.apply_and_load(model, &name, files)?;
    Ok((model, config))
}

const CHECKPOINT: &str = "checkpoint";

/// Replace `out/checkpoint` atomically: build it beside, then swap names.
fn save_checkpoint<M: SiteHost + Module>(
    out: &Path,
    trainer: &Trainer<M>,
    config: &MethodConfig,
) -> Result<()> {
    let tmp = out.join(".checkpoint.tmp");
    let old = out.join(".checkpoint.old");
    let dest = out.join(CHECKPOINT);
    let _ = std::fs::remove_dir_all(&tmp);
    let tuner = config.tuner::<M>();
    let written = tuner
        .save(trainer.model(), "default", &tmp)
        .and_then(|()| trainer.save_state(&tmp))
        .and_then(|()| {
            // What the reference format does not keep (a prompt encoder's network).
            let extras = tuner.training_extras(trainer.model(), "default")?;
            if extras.is_empty() {
                return Ok(());
            }
            extras.write_safetensors(&tmp.join(TRAINING_EXTRAS_FILE))
        });
    if let Err(e) = written {
        // The previous checkpoint is untouched; drop the partial one.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(
            anyhow::Error::new(e).context("cannot write the checkpoint (the previous one is kept)")
        );
    }
    if dest.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dest, &old).with_context(|| format!("{}", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("{}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The checkpoint to resume from (a crash between the two renames leaves `.checkpoint.old`).
fn find_checkpoint(out: &Path) -> Option<PathBuf> {
    [CHECKPOINT, ".checkpoint.old"]
        .iter()
        .map(|n| out.join(n))
        .find(|p| p.join("trainer_state.json").exists())
}

/// Keep the metrics lines of steps before `step` (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| (s as usize) < step)
        })
        .collect();
    // Atomically: a run killed while rewriting the file must not lose the kept lines.
    let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
    Ok(peft_core::tensors::write_atomic(path, text.as_bytes())?)
}

/// What both tasks share once the options are resolved.
pub(crate) struct Run {
    pub(crate) args: TrainArgs,
    /// The method's config (model-type defaults filled in once the model is loaded).
    pub(crate) method: MethodConfig,
    pub(crate) out: PathBuf,
    pub(crate) resume_from: Option<PathBuf>,
    pub(crate) config: TrainConfig,
    pub(crate) device: Device,
    /// 4-bit quantization of the base's linear weights (QLoRA), if asked for.
    pub(crate) quant: Option<QuantSpec>,
}

/// The 4-bit quantization `--method`/`--quantize`/`--double-quant`/`--quant-blocksize` ask for.
fn quant_spec(a: &TrainArgs, method: &str) -> Result<Option<QuantSpec>> {
    let qlora = method == "qlora";
    let Some(kind) = a.quantize.clone().or_else(|| qlora.then(|| "nf4".into())) else {
        if a.double_quant || a.quant_blocksize.is_some() {
            return Err(usage!(
                "--double-quant and --quant-blocksize need --quantize nf4|fp4 (or --method qlora)"
            ));
        }
        return Ok(None);
    };
    let spec = crate::quant::spec(
        "--quantize",
        &kind,
        a.quant_blocksize.unwrap_or(64),
        a.double_quant || qlora,
    )?;
    Ok(Some(spec))
}

/// Quantize the base when asked, saying what it saved.
pub(crate) fn maybe_quantize<M: SiteHost>(model: M, quant: Option<QuantSpec>) -> Result<M> {
    let Some(spec) = quant else { return Ok(model) };
    let model = quantize_base(model, spec)?;
    let (values, bytes) = peft_lora::quantized_footprint(&model);
    eprintln!(
        "base linear weights quantized to {}{}: {values} weights in {:.1} MB ({:.2} bits each, f32 {:.1} MB)",
        spec.qtype.name(),
        if spec.double_quant {
            " with double quantization"
        } else {
            ""
        },
        bytes as f64 / 1e6,
        bytes as f64 * 8.0 / values.max(1) as f64,
        values as f64 * 4.0 / 1e6
    );
    Ok(model)
}

/// `peft train`: resolve and check the options, prepare the output folder, then hand the run to
/// `train_task` (with whether the task is classification), the task's own training.
pub fn run(
    args: TrainArgs,
    device_name: &str,
    train_task: impl FnOnce(Run, bool) -> Result<()>,
) -> Result<()> {
    let a = args.with_config_file()?;
    a.check_ranges()?;
    let method = a.method.clone().unwrap_or_else(|| "lora".into());
    MethodConfig::default_for(&method)?;
    let quant = quant_spec(&a, &method)?;
    let task = a.task.clone().unwrap_or_else(|| "causal-lm".into());
    let classification = match task.as_str() {
        "causal-lm" => false,
        "classification" => true,
        other => {
            return Err(usage!(
                "--task {other}: unknown task (supported: causal-lm, classification)"
            ));
        }
    };
    if a.model.is_none() {
        return Err(usage!(
            "--model is required (a Hugging Face folder or a .gguf file)"
        ));
    }
    if a.data.is_none() {
        return Err(usage!(
            "--data is required (a .jsonl file, a .csv for classification, or a chatterbot YAML folder)"
        ));
    }
    let out = a.out.clone().ok_or_else(|| usage!("--out is required"))?;
    let fused = fused_configs(&a, &method)?;
    let method_config = method_config(&a, &method, classification)?
        .fusing(a.fuse.as_deref().unwrap_or_default(), &fused)
        .map_err(|e| usage!("{e:#}"))?;
    if a.convert_to_lora {
        let MethodConfig::Lora(c) = &method_config else {
            return Err(usage!(
                "--convert-to-lora: only PiSSA and OLoRA adapters (--method pissa|olora) convert to plain LoRA, not --method {method}"
            ));
        };
        peft_lora::convert::check_convertible(c).map_err(|e| usage!("--convert-to-lora: {e}"))?;
        if quant.is_some() {
            eprintln!(
                "note: --convert-to-lora with a 4-bit base: the converted adapter on the original weights differs from the trained model by the quantization error of the residual (PEFT warns the same)"
            );
        }
    }
    let config = TrainConfig {
        learning_rate: a.lr.unwrap_or(2e-4),
        weight_decay: a.weight_decay.unwrap_or(0.0),
        warmup_steps: a.warmup.unwrap_or(10),
        steps: a.steps.unwrap_or(DEFAULT_STEPS),
        batch_size: a.batch_size.unwrap_or(8),
        grad_accum: a.grad_accum.unwrap_or(1),
        max_grad_norm: Some(a.max_grad_norm.unwrap_or(1.0)),
        seed: a.seed.unwrap_or(42),
        schedule: match &a.schedule {
            None => Schedule::default(),
            Some(name) => Schedule::parse(name).ok_or_else(|| {
                usage!("--schedule {name}: expected cosine-floor, linear, cosine, constant or cosine-restarts[:CYCLES]")
            })?,
        },
        param_groups: Vec::new(),
    };
    let has_contents = out.exists()
        && out
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    let mut displaced = None;
    let resume_from = if a.resume {
        match find_checkpoint(&out) {
            Some(ckpt) => {
                check_resume_settings(&ckpt, &config, &method_config)?;
                Some(ckpt)
            }
            // Killed before its first checkpoint: nothing to continue, start again.
            None if out.is_dir() => {
                eprintln!(
                    "--resume: no checkpoint in {} yet; starting from step 0",
                    out.display()
                );
                None
            }
            None => {
                return Err(usage!(
                    "--resume: no checkpoint in {} (the folder does not exist)",
                    out.display()
                ));
            }
        }
    } else {
        if has_contents {
            if !a.overwrite {
                return Err(usage!(
                    "output folder {} exists; pass --overwrite to replace it or --resume to continue",
                    out.display()
                ));
            }
            // Kept aside until the new run has finished (see `finish_overwrite`).
            displaced = Some(peft_core::folder::move_aside(&out)?);
        }
        None
    };
    let compute_dtype = a.compute_dtype.clone().unwrap_or_else(|| "f32".into());
    if classification && compute_dtype != "f32" {
        return Err(usage!(
            "--compute-dtype {compute_dtype}: classification (BERT) trains in f32 only"
        ));
    }
    let result = (|| {
        let device = peft_core::device::device_by_name(device_name)?;
        let device = peft_core::device::with_compute_dtype(device, &compute_dtype)
            .with_context(|| format!("--compute-dtype {compute_dtype}"))?
            .autodiff();
        device.seed(config.seed);
        let run = Run {
            args: a,
            method: method_config,
            out: out.clone(),
            resume_from,
            config,
            device,
            quant,
        };
        train_task(run, classification)
    })();
    finish_overwrite(&out, displaced, result)
}

/// After a run that replaced an existing output folder: delete the old contents once the run has
/// succeeded; on failure put them back if the new run left no checkpoint, otherwise say where
/// they are.
fn finish_overwrite(out: &Path, displaced: Option<PathBuf>, result: Result<()>) -> Result<()> {
    let Some(old) = displaced else { return result };
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        }
        Err(e) if find_checkpoint(out).is_none() => {
            let _ = std::fs::remove_dir_all(out);
            match std::fs::rename(&old, out) {
                Ok(()) => Err(e.context(format!(
                    "the previous contents of {} were put back",
                    out.display()
                ))),
                Err(_) => Err(e.context(format!(
                    "the previous contents of {} are kept in {}",
                    out.display(),
                    old.display()
                ))),
            }
        }
        Err(e) => Err(e.context(format!(
            "the previous contents of {} are kept in {}",
            out.display(),
            old.display()
        ))),
    }
}

/// Refuse to resume with settings other than the checkpoint's: the learning-rate schedule, the
/// data order or the adapter's shape would change without a word.
fn check_resume_settings(ckpt: &Path, config: &TrainConfig, method: &MethodConfig) -> Result<()> {
    let option = |field: &str| match field {
        "learning_rate" => "--lr",
        "weight_decay" => "--weight-decay",
        "warmup_steps" => "--warmup",
        "steps" => "--steps",
        "batch_size" => "--batch-size",
        "grad_accum" => "--grad-accum",
        "max_grad_norm" => "--max-grad-norm",
        "seed" => "--seed",
        "schedule" => "--schedule",
        "r" => "--r",
        "lora_alpha" => "--alpha",
        "lora_dropout" => "--dropout",
        "target_modules" => "--target",
        "use_rslora" => "--rslora",
        _ => "",
    };
    let mut changed = Vec::new();
    if let Some(saved) = Trainer::<peft_models::llama::LlamaForCausalLM>::saved_config(ckpt)? {
        let (was, now) = (serde_json::to_value(&saved)?, serde_json::to_value(config)?);
        for (k, v) in was.as_object().expect("object") {
            if now[k] != *v {
                changed.push(format!("{} {} (the checkpoint has {v})", option(k), now[k]));
            }
        }
    }
    // The method's settings: every field but bookkeeping (defaults filled in at apply time
    // are compared only where this run sets them).
    let saved_method = load_adapter(ckpt)?.config;
    let now_method = match method {
        // Saved as one LoRA adapter of all finished cycles: rank and alpha times their number
        // (the cycle settings are checked by the trainer hook's state).
        MethodConfig::Relora(c) => {
            let cycles = saved_method["r"].as_u64().unwrap_or(0) as usize / c.lora.r.max(1);
            let mut lora = c.lora.clone();
            lora.r *= cycles.max(1);
            lora.lora_alpha *= cycles.max(1) as f64;
            serde_json::to_value(&lora)?
        }
        _ => method.to_json(),
    };
    for (k, now) in now_method.as_object().expect("object") {
        if ["base_model_name_or_path", "inference_mode", "peft_version"].contains(&k.as_str())
            || now.is_null()
        {
            continue;
        }
        if saved_method.get(k).is_some_and(|v| v != now) {
            let flag = match option(k) {
                "" => format!("--set {k}="),
                f => format!("{f} "),
            };
            changed.push(format!(
                "{flag}{now} (the checkpoint has {})",
                saved_method[k]
            ));
        }
    }
    if !changed.is_empty() {
        return Err(usage!(
            "--resume: {} differs from the run being resumed; resume with the same settings, or start anew with --overwrite",
            changed.join(", ")
        ));
    }
    Ok(())
}

/// Every 10th example held out when no --eval-data is given (and there are enough).
pub(crate) fn hold_out<E: Clone>(train: Vec<E>, eval: Option<Vec<E>>) -> (Vec<E>, Vec<E>) {
    match eval {
        Some(e) => (train, e),
        None if train.len() >= 10 => {
            let held = train.iter().skip(9).step_by(10).cloned().collect();
            let rest = train
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 10 != 9)
                .map(|(_, e)| e)
                .collect();
            (rest, held)
        }
        None => (train, Vec::new()),
    }
}

/// Attach the method to `model` and quantize the base when asked (`--quantize`): first for
/// most methods, last for those that initialise from the full-precision base (PiSSA, OLoRA,
/// LoftQ: the residual, or LoftQ's values, is what gets quantized, as in PEFT's recipes).
/// Fisher-scored masks (FishMask, Child-Tuning-D) are chosen from `train_set` with the training
/// loss first, with progress. A resumed run takes its mask from the checkpoint instead.
pub(crate) fn apply_method<M: SiteHost + Module + 'static, E: Clone>(
    run: &Run,
    model: M,
    train_set: &[E],
    loss_fn: impl Fn(&M, &[E]) -> (burn::tensor::Tensor<1>, usize),
) -> Result<M> {
    if run.method.initialises_from_base() {
        let model = run.method.tuner().apply(model, "default")?;
        return maybe_quantize(model, run.quant);
    }
    let model = maybe_quantize(model, run.quant)?;
    if run.resume_from.is_some() {
        return Ok(run.method.tuner().apply(model, "default")?);
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("Fisher information {bar:30} {pos}/{len} [{elapsed_precise}]")
            .expect("template"),
    );
    let (model, fisher) = methods::apply_with_data(
        &run.method,
        model,
        train_set,
        run.config.batch_size,
        |m, b| loss_fn(m, b).0,
        |done, of| {
            bar.set_length(of as u64);
            bar.set_position(done as u64)
        },
    )?;
    bar.finish_and_clear();
    if let Some(f) = fisher {
        eprintln!(
            "Fisher information of {} weights over {} examples in {} batches: {:.1} s",
            f.weights, f.examples, f.batches, f.seconds
        );
    }
    Ok(model)
}

/// The loop both tasks share: resume, steps with progress, metrics, checkpoints, final
/// adapter and loss curve. `evaluate` adds held-out metrics at each checkpoint.
pub(crate) fn train_loop<M: SiteHost + Module + 'static, E: Clone>(
    run: &Run,
    mut model: M,
    train_set: &[E],
    loss_fn: impl Fn(&M, &[E]) -> (burn::tensor::Tensor<1>, usize),
    evaluate: impl Fn(&M) -> serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let (method, out, config) = (&run.method, &run.out, &run.config);
    let tuner = method.tuner::<M>();
    // The factors right after initialisation (a resumed run initialises again, identically).
    let initial = if run.args.convert_to_lora {
        Some(tuner.state(&model, "default")?)
    } else {
        None
    };
    if let Some(ckpt) = &run.resume_from {
        model = tuner.load_checkpoint(model, "default", ckpt)?;
    }
    let mut trainer = methods::with_method_hooks(Trainer::new(model, config.clone()), method);
    if let Some(ckpt) = &run.resume_from {
        trainer = trainer.load_state(ckpt)?;
        eprintln!("resuming at step {}", trainer.state().step);
    }
    let metrics_path = out.join("metrics.jsonl");
    truncate_metrics(&metrics_path, trainer.state().step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}", metrics_path.display()))?;

    let save_every = run.args.save_every.unwrap_or(25);
    let bar = ProgressBar::new(config.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    bar.set_position(trainer.state().step as u64);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut skipped = 0usize;
    while !trainer.is_done() {
        if run
            .args
            .stop_after
            .is_some_and(|n| trainer.state().step >= n)
        {
            bar.abandon_with_message("stopped (--stop-after)");
            return Ok(());
        }
        let report: StepReport = trainer.step(train_set, &loss_fn);
        if report.skipped {
            if !run.args.skip_nonfinite {
                bar.abandon();
                let kept = find_checkpoint(out)
                    .map(|c| {
                        format!(
                            "the last good checkpoint ({}) is kept; resume from it with --resume",
                            c.display()
                        )
                    })
                    .unwrap_or_else(|| "no checkpoint had been written yet".into());
                anyhow::bail!(
                    "step {}: the loss is {} and the gradient norm {}; stopped before the update ({kept}); \
                     try a lower --lr, or pass --skip-nonfinite to skip such batches",
                    report.step,
                    report.loss,
                    report.grad_norm
                );
            }
            skipped += 1;
        }
        tokens += report.tokens;
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.3} lr {:.1e} {:.0} tok/s",
            report.loss, report.learning_rate, tps
        ));
        bar.inc(1);
        let mut line = serde_json::to_value(report)?;
        line["tokens_per_s"] = tps.into();
        if run.args.skip_nonfinite {
            line["skipped_total"] = skipped.into();
        }
        let checkpoint = trainer.state().step % save_every == 0 || trainer.is_done();
        if checkpoint {
            for (k, v) in evaluate(trainer.model()) {
                line[k] = v;
            }
        }
        writeln!(metrics, "{line}").with_context(|| format!("{}", metrics_path.display()))?;
        if checkpoint {
            save_checkpoint(out, &trainer, method)?;
        }
    }
    bar.finish();
    let model = trainer.into_model();
    match (&initial, method) {
        (Some(initial), MethodConfig::Lora(c)) => {
            let trained = tuner.state(&model, "default")?;
            let (plain, tensors) = peft_lora::convert::to_plain_lora(c, &trained, initial)?;
            save_adapter(
                &adapter_dir(out, "default"),
                &Tuner::<M>::config_json(&plain),
                &tensors,
            )?;
            eprintln!(
                "saved as a plain LoRA adapter of rank {} on the original base (the adapter as trained, init_lora_weights {}, stays in {})",
                plain.r,
                serde_json::to_string(&c.init_lora_weights)?,
                out.join(CHECKPOINT).display()
            );
        }
        _ => tuner.save(&model, "default", out)?,
    }
    plot_loss(&metrics_path, &out.join("loss.svg"))?;
    eprintln!(
        "adapter, metrics.jsonl and loss.svg written to {}",
        out.display()
    );
    Ok(())
}
