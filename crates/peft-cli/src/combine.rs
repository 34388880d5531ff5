//! `peft combine`: a weighted combination of LoRA adapters saved as a new adapter folder
//! (Hugging Face PEFT's `add_weighted_adapter`, see `peft_lora::combine`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use peft_cli::usage;
use peft_core::adapter_io::{load_adapter, save_adapter};
use peft_lora::combine::COMBINATIONS;
use peft_lora::{AdapterToCombine, Combination, CombineSpec, LoraConfig};

/// The options of `peft combine`.
#[derive(clap::Args)]
pub struct CombineArgs {
    /// LoRA adapter folders to combine (two or more; one gives its weighted copy).
    #[arg(long, required = true)]
    adapter: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (a negative weight subtracts).
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    weights: Vec<f64>,
    /// svd, linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune or magnitude_prune_svd (PEFT's `combination_type`).
    #[arg(long = "type", default_value = "svd")]
    kind: String,
    /// Fraction of entries kept by the pruning types (ties, dare_*, magnitude_prune*).
    #[arg(long)]
    density: Option<f64>,
    /// How TIES elects each entry's sign: total or frequency.
    #[arg(long, default_value = "total")]
    majority_sign_method: String,
    /// Rank of the *_svd types [default: the largest rank of the adapters].
    #[arg(long)]
    svd_rank: Option<usize>,
    /// Clamp the SVD factors to this quantile of their entries, in (0, 1].
    #[arg(long)]
    svd_clamp: Option<f64>,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    overwrite: bool,
}

/// A LoRA adapter read from its folder: the folder (for messages), config and tensors.
pub type LoadedLora = (String, LoraConfig, peft_core::tensors::TensorMap);

/// Read LoRA adapter folders; another `peft_type` is an error naming the folder and `command`.
pub fn load_lora_adapters(dirs: &[PathBuf], command: &str) -> Result<Vec<LoadedLora>> {
    let mut loaded = Vec::new();
    for dir in dirs {
        let files = load_adapter(dir)?;
        let peft_type = files.config["peft_type"].as_str().unwrap_or("?");
        if peft_type != "LORA" {
            anyhow::bail!(
                "{}: a {peft_type} adapter; {command} takes LoRA adapters",
                dir.display()
            );
        }
        let config = LoraConfig::from_json(&files.config)
            .with_context(|| format!("{}", files.dir.display()))?;
        loaded.push((dir.display().to_string(), config, files.tensors));
    }
    Ok(loaded)
}

/// The loaded adapters as the library's inputs.
pub fn to_combine(loaded: &[LoadedLora]) -> Vec<AdapterToCombine<'_>> {
    loaded
        .iter()
        .map(|(label, config, tensors)| AdapterToCombine {
            label,
            config,
            tensors,
        })
        .collect()
}

pub fn run(a: CombineArgs) -> Result<()> {
    let combination: Combination = a.kind.parse().map_err(|_| {
        let names: Vec<&str> = COMBINATIONS.iter().map(|(n, _)| *n).collect();
        usage!(
            "--type {}: unknown combination (one of: {})",
            a.kind,
            names.join(", ")
        )
    })?;
    if a.weights.len() != a.adapter.len() {
        return Err(usage!(
            "--weights gives {} weights for {} --adapter folders: one weight per adapter",
            a.weights.len(),
            a.adapter.len()
        ));
    }
    if let Some(d) = a.density
        && !(0.0..=1.0).contains(&d)
    {
        return Err(usage!("--density {d}: must be in [0, 1]"));
    }
    if a.svd_rank == Some(0) {
        return Err(usage!("--svd-rank 0: must be at least 1"));
    }
    let majority_sign = a
        .majority_sign_method
        .parse()
        .map_err(|e| usage!("--majority-sign-method: {e}"))?;
    if a.out.exists() && !a.overwrite {
        return Err(usage!(
            "output folder {} exists; pass --overwrite to replace it",
            a.out.display()
        ));
    }
    let loaded = load_lora_adapters(&a.adapter, "peft combine")?;
    let inputs = to_combine(&loaded);
    let spec = CombineSpec {
        density: a.density,
        majority_sign,
        svd_rank: a.svd_rank,
        svd_clamp: a.svd_clamp,
        seed: a.seed,
        ..CombineSpec::new(combination, a.weights.clone())
    };
    let (config, tensors) = peft_lora::combine(&inputs, &spec)?;
    let json = serde_json::to_value(&config)?;
    peft_core::folder::write_folder(&a.out, |tmp| -> Result<()> {
        save_adapter(tmp, &json, &tensors)?;
        Ok(())
    })?;
    eprintln!(
        "{} adapters combined ({}, rank {}) into {}",
        a.adapter.len(),
        combination.name(),
        config.r,
        a.out.display()
    );
    Ok(())
}
