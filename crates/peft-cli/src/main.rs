//! `peft`: parameter-efficient fine-tuning from the command line.

mod causal;
mod classify;
mod combine;
mod data;
mod lorahub;
mod plot;
mod quant;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peft_cli::methods::MethodConfig;
use peft_cli::{methods, usage};
use peft_core::adapter_io::load_adapter;
use peft_core::tuner::Tuner;
use peft_lora::{dequantize_base, merge_and_unload_state, quantize_base, quantized_footprint};
use peft_models::generate::{greedy, greedy_batch};
use peft_models::load::{LoadedModel, load_causal_lm};
use peft_models::proxy::Proxy;
use peft_sites::{SiteHost, SiteMut};

/// Large buffers on transparent huge pages (see `peft_core::alloc`).
#[global_allocator]
static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning of transformer models"
)]
struct Cli {
    /// Compute device: cpu, wgpu or cuda (wgpu/cuda need the matching cargo feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

/// Proxy-tuning (Liu et al., 2024): `--model`'s logits steered by a small tuned model
/// (expert) against the same small model untuned (anti-expert), `s + α·(s_expert − s_anti)`.
#[derive(clap::Args, Debug, Default)]
struct ProxyArgs {
    /// The small model whose tuned copy steers --model (the anti-expert); with
    /// --proxy-adapter, which makes the expert.
    #[arg(long)]
    proxy_base: Option<PathBuf>,
    /// The adapter (any method) that tunes --proxy-base into the expert.
    #[arg(long)]
    proxy_adapter: Option<PathBuf>,
    /// Instead of --proxy-base/--proxy-adapter: the tuned small model, a full model folder.
    #[arg(long)]
    proxy_expert: Option<PathBuf>,
    /// With --proxy-expert: the untuned small model.
    #[arg(long)]
    proxy_anti_expert: Option<PathBuf>,
    /// α, how far to follow the expert [default: 1].
    #[arg(long, allow_hyphen_values = true)]
    proxy_alpha: Option<f64>,
}

impl ProxyArgs {
    /// Whether any proxy-tuning option is given.
    fn any(&self) -> bool {
        self.proxy_base.is_some()
            || self.proxy_adapter.is_some()
            || self.proxy_expert.is_some()
            || self.proxy_anti_expert.is_some()
            || self.proxy_alpha.is_some()
    }
}

/// The small models of proxy-tuning, loaded.
struct ProxyModels {
    expert: peft_models::llama::LlamaForCausalLM,
    anti_expert: peft_models::llama::LlamaForCausalLM,
    alpha: f64,
}

impl ProxyModels {
    /// The proxy that steers `base` with them.
    fn over<'a>(&'a self, base: &'a peft_models::llama::LlamaForCausalLM) -> Result<Proxy<'a>> {
        Ok(Proxy::new(
            base,
            &self.expert,
            &self.anti_expert,
            self.alpha,
        )?)
    }
}

/// The expert and anti-expert `proxy` asks for, if any; a half-given pair is a usage error.
fn load_proxy(proxy: &ProxyArgs, dev: &burn::tensor::Device) -> Result<Option<ProxyModels>> {
    let p = proxy;
    let pairs = (
        &p.proxy_base,
        &p.proxy_adapter,
        &p.proxy_expert,
        &p.proxy_anti_expert,
    );
    let (expert, anti_expert) = match pairs {
        (None, None, None, None) => {
            if p.proxy_alpha.is_some() {
                return Err(usage!(
                    "--proxy-alpha needs --proxy-base and --proxy-adapter (or --proxy-expert and --proxy-anti-expert)"
                ));
            }
            return Ok(None);
        }
        (Some(small), Some(adapter), None, None) => {
            let (expert, _, _) = load_with_adapters(small, std::slice::from_ref(adapter), dev)?;
            (expert.model, load_causal_lm(small, dev)?.model)
        }
        (None, None, Some(expert), Some(anti)) => (
            load_causal_lm(expert, dev)?.model,
            load_causal_lm(anti, dev)?.model,
        ),
        _ => {
            return Err(usage!(
                "proxy-tuning takes --proxy-base with --proxy-adapter, or --proxy-expert with --proxy-anti-expert"
            ));
        }
    };
    Ok(Some(ProxyModels {
        expert,
        anti_expert,
        alpha: p.proxy_alpha.unwrap_or(1.0),
    }))
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with an adapter.
    Train(train::TrainArgs),
    /// Loss and perplexity of a model (with optional adapter) on a data file.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Adapter folder; several with --fusion.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// An AdapterFusion folder over the --adapter folders (AdapterHub's layout).
        #[arg(long)]
        fusion: Option<PathBuf>,
        #[command(flatten)]
        proxy: ProxyArgs,
        #[arg(long)]
        data: PathBuf,
        /// Longest sequence in tokens [default: 256 for causal-lm, 128 for classification].
        #[arg(long)]
        max_len: Option<usize>,
        /// causal-lm (loss, perplexity) or classification (accuracy, macro-F1).
        #[arg(long, default_value = "causal-lm")]
        task: String,
        #[arg(long, default_value = "text")]
        text_column: String,
        #[arg(long, default_value = "label")]
        label_column: String,
    },
    /// Answer a prompt greedily, with or without adapters.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Adapter folder(s); with several, --use picks the active one.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// Name of the adapter to use (the folder name) when several are loaded.
        #[arg(long = "use")]
        use_adapter: Option<String>,
        /// An AdapterFusion folder over the --adapter folders (AdapterHub's layout): the fused
        /// adapters answer together.
        #[arg(long)]
        fusion: Option<PathBuf>,
        #[command(flatten)]
        proxy: ProxyArgs,
        /// The prompt; several `--prompt`s are answered together in one padded batch, one
        /// answer per line.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        /// The adapter of each --prompt, comma-separated (folder names, `__base__` for none):
        /// one batched pass where each prompt uses its own LoRA adapter.
        #[arg(long, value_delimiter = ',')]
        per_prompt: Vec<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Send the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
    },
    /// Merge an adapter into the base and write a Hugging Face model folder (full precision,
    /// or 4-bit with --quantize).
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Write a bitsandbytes 4-bit checkpoint (nf4 or fp4): the merged weights are
        /// re-quantized, which rounds them.
        #[arg(long)]
        quantize: Option<String>,
        #[command(flatten)]
        quant: quant::WriteOptions,
        #[arg(long)]
        overwrite: bool,
    },
    /// Combine LoRA adapters with weights into a new LoRA adapter (Hugging Face PEFT's
    /// add_weighted_adapter: svd, linear, cat, ties, dare_*, magnitude_prune*).
    Combine(combine::CombineArgs),
    /// Compose LoRA adapters of other tasks for a new task from a few of its examples
    /// (LoRAHub: weights searched without gradients, CMA-ES), saved as a LoRA adapter.
    Lorahub(lorahub::LoraHubArgs),
    /// Quantize a model's linear weights to 4 bits and write a bitsandbytes-compatible
    /// Hugging Face folder (loads in transformers with bitsandbytes installed).
    Quantize {
        /// Hugging Face model folder (Llama family or BERT) or .gguf file.
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// nf4 or fp4.
        #[arg(long, default_value = "nf4")]
        quant_type: String,
        #[command(flatten)]
        quant: quant::WriteOptions,
        #[arg(long)]
        overwrite: bool,
    },
    /// List the fine-tuning methods (`--method` names and the `peft_type` of their folders).
    Methods,
    /// Describe an adapter or model folder (or a .gguf file).
    Inspect { path: PathBuf },
    /// Convert a GGUF model to a Hugging Face safetensors folder.
    Convert {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
    },
}

fn device(name: &str) -> Result<burn::tensor::Device> {
    Ok(peft_core::device::device_by_name(name)?)
}

/// The name an adapter folder is loaded under: its folder name. Two folders with the same name
/// would replace each other, so that is refused.
fn adapter_names(adapters: &[PathBuf]) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for dir in adapters {
        let full = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into());
        if let Some(i) = names.iter().position(|n| *n == name) {
            return Err(usage!(
                "--adapter {} and --adapter {} are both named `{name}` (adapters are named after their folder); rename one folder",
                adapters[i].display(),
                dir.display()
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// Load `model` and the adapters in `adapters` (each under its folder name, of whichever
/// method its `peft_type` names).
fn load_with_adapters(
    model: &Path,
    adapters: &[PathBuf],
    dev: &burn::tensor::Device,
) -> Result<(LoadedModel, Vec<String>, Vec<MethodConfig>)> {
    let names = adapter_names(adapters)?;
    let mut configs = Vec::new();
    let mut loaded = load_causal_lm(model, dev)?;
    for (dir, name) in adapters.iter().zip(&names) {
        let files = load_adapter(dir)?;
        let config =
            MethodConfig::from_json(&files.config).with_context(|| format!("{}", dir.display()))?;
        loaded.model = config.tuner().apply_and_load(loaded.model, name, files)?;
        configs.push(config);
    }
    Ok((loaded, names, configs))
}

/// `--per-prompt`: one name per prompt, each a loaded adapter (by folder name) or `__base__`,
/// and only LoRA adapters loaded.
fn check_per_prompt(
    per_prompt: &[String],
    prompts: &[String],
    names: &[String],
    configs: &[MethodConfig],
) -> Result<()> {
    if per_prompt.len() != prompts.len() {
        return Err(usage!(
            "--per-prompt names {} adapters for {} --prompt: one per prompt",
            per_prompt.len(),
            prompts.len()
        ));
    }
    for n in per_prompt {
        if n != peft_sites::BASE_ROW && !names.contains(n) {
            return Err(usage!(
                "--per-prompt {n}: no such adapter (loaded: {}; `{}` for none)",
                names.join(", "),
                peft_sites::BASE_ROW
            ));
        }
    }
    for (name, c) in names.iter().zip(configs) {
        if !matches!(c, MethodConfig::Lora(_)) {
            return Err(usage!(
                "--per-prompt: adapter `{name}` is {}; mixed batches take LoRA adapters",
                c.to_json()["peft_type"].as_str().unwrap_or("not LoRA")
            ));
        }
    }
    Ok(())
}

/// Load the AdapterFusion folder `fusion` over the loaded bottleneck adapters (`names` and
/// `configs` as [`load_with_adapters`] gives them) and make it the active composition. Each
/// fused adapter is found by its AdapterHub name (the `name` in its config).
fn load_fusion(
    mut loaded: LoadedModel,
    fusion: &Path,
    names: &[String],
    configs: &[MethodConfig],
) -> Result<LoadedModel> {
    loaded.model = fuse(loaded.model, fusion, names, configs)?;
    Ok(loaded)
}

/// Load the AdapterFusion folder `fusion` into `model`, over its loaded bottleneck adapters
/// (`names` as loaded, `configs` their configs), as the active composition `fusion`.
pub(crate) fn fuse<M: peft_sites::SiteHost>(
    model: M,
    fusion: &Path,
    names: &[String],
    configs: &[MethodConfig],
) -> Result<M> {
    let files = load_adapter(fusion)?;
    let MethodConfig::Fusion(mut config) =
        MethodConfig::from_json(&files.config).with_context(|| format!("{}", fusion.display()))?
    else {
        return Err(usage!(
            "--fusion {}: not an AdapterFusion folder (adapter_fusion_config.json)",
            fusion.display()
        ));
    };
    let hub_names: Vec<&str> = configs
        .iter()
        .map(|c| match c {
            MethodConfig::Bottleneck(b) => b.name.as_str(),
            _ => "",
        })
        .collect();
    let mut internal = Vec::new();
    for wanted in &config.adapter_names {
        let i = hub_names.iter().position(|n| n == wanted).ok_or_else(|| {
            usage!(
                "--fusion {}: it fuses adapter `{wanted}`, which no --adapter folder holds \
                 (loaded: {})",
                fusion.display(),
                hub_names
                    .iter()
                    .filter(|n| !n.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        internal.push(names[i].clone());
    }
    config.loaded_as = Some(internal);
    Ok(config.apply_and_load(model, "fusion", files)?)
}

/// Use adapter `name` alone: at every site that holds part of it, that part; elsewhere none.
fn activate(model: &mut peft_models::llama::LlamaForCausalLM, name: &str) -> Result<()> {
    for (_, site) in model.sites_mut() {
        match site {
            SiteMut::Linear(l) | SiteMut::Head(l) => {
                let active: &[&str] = if l.part(name).is_some() { &[name] } else { &[] };
                l.set_active(active)?;
            }
            SiteMut::Norm(n) => n.set_active(n.copy(name).is_some().then_some(name))?,
            SiteMut::Prompt(p) => p.set_active(p.encoder(name).is_some().then_some(name))?,
            SiteMut::Sublayer(b) => b.set_active(b.adapter(name).is_some().then_some(name))?,
        }
    }
    Ok(())
}

/// Refuse an existing `out` unless `--overwrite` was given. Nothing is deleted here: the old
/// folder is replaced only once the new one is complete (`peft_core::folder::write_folder`).
fn refuse_existing(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(usage!(
            "output folder {} exists; pass --overwrite to replace it",
            out.display()
        ));
    }
    Ok(())
}

/// Write a Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
fn write_hf_folder(loaded: &LoadedModel, out: &Path) -> Result<()> {
    peft_core::folder::write_folder(out, |tmp| write_hf_files(loaded, tmp))
}

fn write_hf_files(loaded: &LoadedModel, tmp: &Path) -> Result<()> {
    let mut config = serde_json::to_value(&loaded.model.config)?;
    config["model_type"] = "llama".into();
    config["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    if let Some(q) = loaded.model.quantization_config() {
        config["quantization_config"] = q;
    }
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    loaded
        .model
        .to_tensors()
        .write_safetensors(&tmp.join("model.safetensors"))?;
    loaded
        .tokenizer
        .inner
        .save(tmp.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    Ok(())
}

fn inspect(path: &Path) -> Result<()> {
    if path.join(peft_core::adapter_io::CONFIG_FILE).exists()
        || path
            .join(peft_core::adapter_io::ADAPTERHUB_FUSION_CONFIG)
            .exists()
    {
        let files = load_adapter(path)?;
        let c = &files.config;
        println!("adapter: {}", path.display());
        let adapterhub = peft_core::adapter_io::is_adapterhub_config(c);
        println!(
            "method: {}{}",
            files.peft_type()?,
            if adapterhub {
                " (AdapterHub layout)"
            } else {
                ""
            }
        );
        let base = if adapterhub {
            &c["model_name"]
        } else {
            &c["base_model_name_or_path"]
        };
        println!(
            "base model: {}",
            base.as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("(not recorded)")
        );
        // The method's own settings, as its reference config names them.
        let skip = [
            "peft_type",
            "base_model_name_or_path",
            "inference_mode",
            "peft_version",
            "auto_mapping",
            "revision",
        ];
        // AdapterHub keeps the method's settings in its `config` object.
        let settings_of = if adapterhub { &c["config"] } else { c };
        let mut settings: Vec<String> = settings_of
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| !skip.contains(&k.as_str()) && !v.is_null())
            .map(|(k, v)| format!("  {k}: {v}"))
            .collect();
        settings.sort();
        println!("settings:\n{}", settings.join("\n"));
        MethodConfig::from_json(c).with_context(|| format!("{}", path.display()))?;
        let params: usize = files.tensors.tensors.values().map(|t| t.numel()).sum();
        println!("tensors: {}", files.tensors.len());
        println!("parameters: {params}");
        let size = std::fs::metadata(&files.weights)
            .map(|m| m.len())
            .unwrap_or(0);
        println!("size: {:.2} MB", size as f64 / 1e6);
        return Ok(());
    }
    let loaded = load_causal_lm(path, &burn::tensor::Device::flex())?;
    let c = &loaded.model.config;
    let params: usize = loaded
        .model
        .to_tensors()
        .tensors
        .values()
        .map(|t| t.numel())
        .sum();
    println!("model: {}", path.display());
    println!(
        "architecture: Llama ({} layers, hidden {}, FFN {}, {} heads / {} KV heads, vocab {}, tied head: {})",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.vocab_size,
        c.tie_word_embeddings
    );
    println!("parameters: {params}");
    println!("linear modules: {}", loaded.model.linears().len());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::run(args, &cli.device, |run, classification| {
            if classification {
                classify::train(run)
            } else {
                causal::train(run)
            }
        }),
        Command::Eval {
            model,
            adapter,
            fusion,
            proxy,
            data,
            max_len,
            task,
            text_column,
            label_column,
        } => {
            let dev = device(&cli.device)?;
            if task == "classification" {
                if fusion.is_none() && adapter.len() != 1 {
                    return Err(usage!(
                        "classification takes one --adapter (the head is trained with it), or several with --fusion"
                    ));
                }
                if proxy.proxy_base.is_some() || proxy.proxy_expert.is_some() {
                    return Err(usage!("proxy-tuning: causal-lm only"));
                }
                println!(
                    "{}",
                    classify::eval(
                        &model,
                        &adapter,
                        fusion.as_deref(),
                        &data,
                        &text_column,
                        &label_column,
                        max_len,
                        &dev
                    )?
                );
                return Ok(());
            } else if task != "causal-lm" {
                return Err(usage!(
                    "--task {task}: unknown task (supported: causal-lm, classification)"
                ));
            }
            let (mut loaded, names, configs) = load_with_adapters(&model, &adapter, &dev)?;
            match &fusion {
                Some(f) => loaded = load_fusion(loaded, f, &names, &configs)?,
                None if names.len() > 1 => {
                    return Err(usage!(
                        "several adapters loaded ({}); eval takes one, or several with --fusion",
                        names.join(", ")
                    ));
                }
                None => {}
            }
            let virtual_tokens = configs.iter().map(|c| c.virtual_tokens()).max();
            let max_len = usage::max_len(
                max_len,
                256,
                loaded.model.config.max_position_embeddings,
                virtual_tokens.unwrap_or(0),
            )?;
            let examples = data::read_examples(&data, &loaded.tokenizer, max_len)?;
            let pad = loaded.tokenizer.eos_ids.first().copied().unwrap_or(0);
            let loss = match load_proxy(&proxy, &dev)? {
                Some(p) => p.over(&loaded.model)?.eval_loss(&examples, 8, pad),
                None => peft_models::train::eval_loss(&loaded.model, &examples, 8, pad),
            };
            println!(
                "{}",
                serde_json::json!({"loss": loss, "perplexity": loss.exp(), "examples": examples.len()})
            );
            Ok(())
        }
        Command::Generate {
            model,
            adapter,
            use_adapter,
            fusion,
            proxy,
            prompt,
            per_prompt,
            max_new_tokens,
            raw,
        } => {
            let dev = device(&cli.device)?;
            let (mut loaded, names, configs) = load_with_adapters(&model, &adapter, &dev)?;
            let mixed = !per_prompt.is_empty();
            if mixed {
                check_per_prompt(&per_prompt, &prompt, &names, &configs)?;
                if use_adapter.is_some() || fusion.is_some() || proxy.any() {
                    return Err(usage!(
                        "--per-prompt picks each prompt's adapter: leave out --use, --fusion and the --proxy options"
                    ));
                }
                peft_sites::set_row_adapters(&mut loaded.model, Some(&per_prompt))?;
            } else if let Some(f) = &fusion {
                if use_adapter.is_some() {
                    return Err(usage!("--use and --fusion: pick one"));
                }
                loaded = load_fusion(loaded, f, &names, &configs)?;
            } else if let Some(name) = &use_adapter {
                if !names.contains(name) {
                    return Err(usage!(
                        "--use {name}: no such adapter (loaded: {})",
                        names.join(", ")
                    ));
                }
                activate(&mut loaded.model, name)?;
            } else if names.len() > 1 {
                return Err(usage!(
                    "several adapters loaded ({}); pick one with --use",
                    names.join(", ")
                ));
            }
            let mut ids = Vec::with_capacity(prompt.len());
            for p in &prompt {
                let text = if raw {
                    p.clone()
                } else {
                    loaded.tokenizer.chat_prompt(p)
                };
                ids.push(loaded.tokenizer.encode(&text)?);
            }
            let eos = &loaded.tokenizer.eos_ids;
            let proxy_models = load_proxy(&proxy, &dev)?;
            let outs = if let Some(models) = &proxy_models {
                let p = models.over(&loaded.model)?;
                ids.iter()
                    .map(|i| p.greedy(i, max_new_tokens, eos))
                    .collect()
            } else if ids.len() == 1 && !mixed {
                vec![greedy(&loaded.model, &ids[0], max_new_tokens, eos)]
            } else {
                greedy_batch(&loaded.model, &ids, max_new_tokens, eos)
            };
            for out in outs {
                // One answer per line, whatever newlines the answers hold.
                let text = loaded.tokenizer.decode(&out)?;
                println!(
                    "{}",
                    if ids.len() == 1 {
                        text
                    } else {
                        text.replace('\n', " ")
                    }
                );
            }
            Ok(())
        }
        Command::Merge {
            model,
            adapter,
            out,
            quantize,
            quant,
            overwrite,
        } => {
            let spec = quantize.map(|k| quant.spec("--quantize", &k)).transpose()?;
            refuse_existing(&out, overwrite)?;
            if peft_models::bert::is_bert_folder(&model) {
                classify::merge_folder(&model, &adapter, &out, spec)?;
                eprintln!("merged model written to {}", out.display());
                return Ok(());
            }
            let dev = device(&cli.device)?;
            let (mut loaded, names, configs) =
                load_with_adapters(&model, std::slice::from_ref(&adapter), &dev)?;
            // Merge exactly in full precision: a 4-bit base is dequantized first.
            if quantized_footprint(&loaded.model).0 > 0 && spec.is_none() {
                eprintln!(
                    "the base is 4-bit: writing a full-precision merged model (pass --quantize nf4 to keep it 4-bit)"
                );
            }
            // The method merges (and may refuse, e.g. BEFT without a bias to fold into);
            // then every adapter is dropped.
            let dense = dequantize_base(loaded.model)?;
            let merged = configs[0].tuner().merge(dense, &names[0])?;
            // A merge that added biases (SSF's shift) switches them on model-wide.
            loaded.model = merge_and_unload_state(merged)?.complete_biases()?;
            if let Some(spec) = spec {
                eprintln!(
                    "warning: re-quantizing the merged weights to {} rounds them; outputs will differ slightly from base + adapter",
                    spec.qtype.name()
                );
                loaded.model = quantize_base(loaded.model, spec)?;
            }
            write_hf_folder(&loaded, &out)?;
            eprintln!("merged model written to {}", out.display());
            Ok(())
        }
        Command::Quantize {
            model,
            out,
            quant_type,
            quant,
            overwrite,
        } => {
            let spec = quant.spec("--quant-type", &quant_type)?;
            refuse_existing(&out, overwrite)?;
            let (values, bytes) = if peft_models::bert::is_bert_folder(&model) {
                classify::quantize_folder(&model, &out, spec)?
            } else {
                let mut loaded = load_causal_lm(&model, &burn::tensor::Device::flex())?;
                loaded.model = quantize_base(loaded.model, spec)?;
                write_hf_folder(&loaded, &out)?;
                quantized_footprint(&loaded.model)
            };
            eprintln!(
                "{values} linear weights quantized to {} ({:.2} bits each, {:.1} MB); written to {}",
                spec.qtype.name(),
                bytes as f64 * 8.0 / values.max(1) as f64,
                bytes as f64 / 1e6,
                out.display()
            );
            Ok(())
        }
        Command::Combine(args) => combine::run(args),
        Command::Lorahub(args) => lorahub::run(args, &device(&cli.device)?),
        Command::Inspect { path } => inspect(&path),
        Command::Methods => {
            for m in methods::METHODS {
                println!("{:<10} {:<10} {}", m.name, m.peft_type, m.about);
            }
            Ok(())
        }
        Command::Convert {
            input,
            out,
            overwrite,
        } => {
            if input.extension().is_none_or(|e| e != "gguf") {
                return Err(usage!("{}: expected a .gguf file", input.display()));
            }
            refuse_existing(&out, overwrite)?;
            let loaded = load_causal_lm(&input, &burn::tensor::Device::flex())?;
            write_hf_folder(&loaded, &out)?;
            eprintln!("Hugging Face folder written to {}", out.display());
            Ok(())
        }
    }
}

fn main() {
    // Before anything runs in parallel, so the pool does not exist yet.
    if let Err(e) = peft_core::cpu::join_thread_pool() {
        eprintln!("warning: the main thread works outside the thread pool: {e}");
    }
    // A panic is a bug, but the user still gets one line, not a backtrace: the hook is silent
    // (a library may catch a panic of its own dependency and turn it into an error) and `main`
    // reports one that reaches it.
    std::panic::set_hook(Box::new(|_| {}));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                print!("{e}");
                std::process::exit(0);
            }
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            eprintln!("{first}");
            std::process::exit(2);
        }
    };
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(if usage::is_usage(&e) { 2 } else { 1 });
        }
        Err(panic) => {
            eprintln!(
                "error: internal error: {}",
                peft_core::error::panic_message(&*panic)
            );
            std::process::exit(101);
        }
    }
}
