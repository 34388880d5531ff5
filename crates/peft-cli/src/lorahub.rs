//! `peft lorahub`: LoRA adapters of other tasks composed for a new task from a few of its
//! examples (LoRAHub, see `peft_lora::lorahub`), saved as a plain LoRA adapter folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use peft_cli::usage;
use peft_core::adapter_io::save_adapter;
use peft_core::tuner::Tuner;
use peft_lora::lorahub::{Composer, Evaluation, LoraHubConfig, load_composition, lorahub};
use peft_models::load::load_causal_lm;
use peft_models::train::eval_loss;

use crate::combine::{load_lora_adapters, to_combine};
use crate::data::read_examples;

/// What `peft lorahub` writes beside the adapter: the weights it found and how.
pub const REPORT_FILE: &str = "lorahub.json";

/// The options of `peft lorahub`.
#[derive(clap::Args)]
pub struct LoraHubArgs {
    /// The base model the adapters were trained on (Hugging Face folder or GGUF file).
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter folders to compose (same target modules and ranks).
    #[arg(long, required = true)]
    adapter: Vec<PathBuf>,
    /// The few examples of the new task (.jsonl or a chatterbot YAML folder).
    #[arg(long)]
    data: PathBuf,
    /// Compose with these weights (one per adapter, comma-separated) instead of searching.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    weights: Option<Vec<f64>>,
    /// Loss evaluations of the search (the paper's 40).
    #[arg(long, default_value_t = 40)]
    max_evals: usize,
    /// Weight of the L1 penalty on the mean absolute weight (the paper's 0.05).
    #[arg(long, default_value_t = 0.05)]
    l1: f64,
    /// Each weight stays in [-bound, bound] (the paper's 1.5).
    #[arg(long, default_value_t = 1.5)]
    bound: f64,
    /// CMA-ES's initial step size around the start, all weights 0.
    #[arg(long, default_value_t = 0.5)]
    sigma: f64,
    /// Seed of the search.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Search as the paper does, from all weights 0 only, without first trying the uniform
    /// average (every weight 1/n).
    #[arg(long)]
    no_uniform_start: bool,
    /// Longest example in tokens [default: 256].
    #[arg(long)]
    max_len: Option<usize>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: LoraHubArgs, device: &burn::tensor::Device) -> Result<()> {
    let config = LoraHubConfig {
        max_evals: a.max_evals,
        l1: a.l1,
        bound: a.bound,
        sigma: a.sigma,
        seed: a.seed,
        try_uniform: !a.no_uniform_start,
    };
    config.validate().map_err(|e| usage!("{e}"))?;
    if let Some(w) = &a.weights
        && w.len() != a.adapter.len()
    {
        return Err(usage!(
            "--weights gives {} weights for {} --adapter folders: one weight per adapter",
            w.len(),
            a.adapter.len()
        ));
    }
    if a.out.exists() && !a.overwrite {
        return Err(usage!(
            "output folder {} exists; pass --overwrite to replace it",
            a.out.display()
        ));
    }
    let loaded = load_lora_adapters(&a.adapter, "peft lorahub")?;
    let composer = Composer::new(&to_combine(&loaded))?;

    eprintln!("loading {}", a.model.display());
    let base = load_causal_lm(&a.model, device)?;
    let max_len = usage::max_len(a.max_len, 256, base.model.config.max_position_embeddings, 0)?;
    let examples = read_examples(&a.data, &base.tokenizer, max_len)?;
    if examples.is_empty() {
        anyhow::bail!("{}: no examples", a.data.display());
    }
    let pad = base.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let batch = examples.len().min(8);
    let loss = |m: &peft_models::llama::LlamaForCausalLM| eval_loss(m, &examples, batch, pad);
    const NAME: &str = "lorahub";

    // The uniform average, the baseline the paper compares against.
    let uniform = vec![1.0 / composer.len() as f64; composer.len()];
    let uniform_loss_of = |model| -> Result<_> {
        let model = load_composition(model, &composer, NAME, &uniform)?;
        Ok((loss(&model), model))
    };
    let (model, weights, found, uniform_loss) = match &a.weights {
        Some(w) => {
            let model = composer.config().apply(base.model, NAME)?;
            let (uniform_loss, model) = uniform_loss_of(model)?;
            let model = load_composition(model, &composer, NAME, w)?;
            let l = loss(&model);
            let found = Evaluation {
                weights: w.clone(),
                loss: l,
                objective: config.objective(l, w),
            };
            (model, w.clone(), found, uniform_loss)
        }
        None => {
            eprintln!(
                "searching the weights of {} adapters on {} examples ({} evaluations)",
                composer.len(),
                examples.len(),
                config.max_evals
            );
            let bar = ProgressBar::new(config.max_evals as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
                    .expect("template"),
            );
            let (model, result) =
                lorahub(base.model, &composer, NAME, &config, loss, |_, best| {
                    bar.inc(1);
                    bar.set_message(format!(
                        "best loss {:.4} (objective {:.4})",
                        best.loss, best.objective
                    ));
                })?;
            bar.finish();
            // The search's first evaluation is the uniform average, unless told otherwise.
            let (uniform_loss, model) = match result.history.first() {
                Some(e) if config.try_uniform => (e.loss, model),
                _ => {
                    let (l, model) = uniform_loss_of(model)?;
                    (
                        l,
                        load_composition(model, &composer, NAME, &result.best.weights)?,
                    )
                }
            };
            (
                model,
                result.best.weights.clone(),
                result.best,
                uniform_loss,
            )
        }
    };

    let tensors = composer.config().state(&model, NAME)?;
    let json = serde_json::to_value(composer.config())?;
    let report = serde_json::json!({
        "adapters": composer.labels(),
        "weights": weights,
        "loss": found.loss,
        "objective": found.objective,
        "uniform_loss": uniform_loss,
        "examples": examples.len(),
        "searched": a.weights.is_none(),
        "max_evals": config.max_evals,
        "l1": config.l1,
        "bound": config.bound,
        "sigma": config.sigma,
        "seed": config.seed,
        "uniform_start": config.try_uniform,
    });
    peft_core::folder::write_folder(&a.out, |tmp| -> Result<()> {
        save_adapter(tmp, &json, &tensors)?;
        let path = tmp.join(REPORT_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("{}", path.display()))?;
        Ok(())
    })?;
    let listed: Vec<String> = composer
        .labels()
        .iter()
        .zip(&weights)
        .map(|(l, w)| format!("{l}: {w:.4}"))
        .collect();
    eprintln!("weights: {}", listed.join(", "));
    eprintln!(
        "loss on the {} examples: {:.4} (uniform average {:.4}); saved {}",
        examples.len(),
        found.loss,
        uniform_loss,
        a.out.display()
    );
    println!("{report}");
    Ok(())
}
