//! Project tasks.
//!
//! - `cargo xtask demo`: fetch SmolLM2 and the chatterbot corpus, LoRA-fine-tune on CPU with a
//!   progress bar, save a Hugging Face PEFT adapter, print answers before and after.
//! - `cargo xtask test`: fetch what the tests need, run the workspace tests, the wgpu test
//!   (through lavapipe when no GPU is present), the CUDA type-check and, where cargo-fuzz and a
//!   nightly toolchain are installed, every fuzz target for 3 seconds.
//! - `cargo xtask fuzz [--seconds N]`: every reader of outside files under cargo fuzz (nightly),
//!   or the stable mutation suite where there is no nightly.
//! - `cargo xtask sweep`: delete the build outputs in the target folder that the tests no
//!   longer use (old feature sets and flags pile up there and fill the disk).
//! - `cargo xtask fetch`: only fetch the model and data into `models/`.
//! - `cargo xtask compare [--quick]`: every method on real data with the same budget, side by
//!   side (trainable parameters, saved size, step time and memory, held-out metric); a report
//!   under `target/compare/`.
//! - `cargo xtask bench [--peer]`: criterion benchmarks, and with `--peer` the same work side
//!   by side with Hugging Face PEFT and bitsandbytes; a report under `target/bench-report/`.
//!   `--isa avx2` keeps both sides off AVX-512, so an AVX-512 machine imitates an AVX2 one.

mod bench;
mod compare;
mod fuzz;
mod sweep;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::params::ParamReport;
use peft_core::tuner::Tuner;
use peft_lora::LoraConfig;
use peft_models::assets::{CHATTERBOT_EN, SMOLLM2};
use peft_models::data::{chatterbot_pairs, split_every};
use peft_models::generate::greedy;
use peft_models::load::{LoadedModel, load_causal_lm};
use peft_models::train::{TrainConfig, chat_example, eval_loss, train};

/// Large buffers on transparent huge pages (see `peft_core::alloc`).
#[global_allocator]
static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;

/// The workspace this xtask runs for. `cargo run` sets CARGO_MANIFEST_DIR at run time too; it is
/// preferred over the compile-time path because a target folder shared between two checkouts
/// can hold a binary built in the other one (cargo keys path packages relative to the workspace).
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let manifest_dir = manifest_dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"))
}

fn fetch() -> Result<(PathBuf, PathBuf)> {
    let dir = models_dir();
    Ok((SMOLLM2.ensure(&dir)?, CHATTERBOT_EN.ensure(&dir)?))
}

pub(crate) fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// Passed and failed test counts over several `cargo test` runs.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    /// Run `cargo test ...`, echoing its output and adding up its `test result:` lines.
    fn cargo_test(&mut self, args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
        use std::io::{BufRead, BufReader};
        eprintln!("+ cargo {}", args.join(" "));
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(args)
            .current_dir(workspace_root())
            .stdout(std::process::Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("running cargo")?;
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> usize {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(word)
                                .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                        })
                        .unwrap_or(0)
                };
                self.passed += count(" passed");
                self.failed += count(" failed");
            }
        }
        if !child.wait()?.success() {
            bail!("`cargo {}` failed", args.join(" "));
        }
        Ok(())
    }
}

/// One cargo invocation of `cargo xtask test`.
pub(crate) struct Phase {
    pub(crate) args: Vec<&'static str>,
    pub(crate) envs: Vec<(&'static str, &'static str)>,
}

/// The cargo invocations of `cargo xtask test` (also what `cargo xtask sweep` keeps the outputs
/// of). The first, with `gpu_backends`, is a type-check; the others run tests.
pub(crate) fn test_phases(gpu_backends: bool) -> Vec<Phase> {
    let mut phases = Vec::new();
    if gpu_backends {
        // CUDA cannot be built offline (cubecl-cuda downloads LLVM); type-check it instead.
        phases.push(Phase {
            args: vec!["check", "-p", "peft-models", "--features", "cuda"],
            envs: vec![("DOCS_RS", "1")],
        });
        // The 4-bit kernels, the LoRA layer and QLoRA with an f16 compute type on wgpu (Vulkan;
        // lavapipe runs them on the CPU where no GPU is present). One cargo invocation, so burn
        // with wgpu is built once; each test file is still its own process (a device's float
        // type is set once per process).
        phases.push(Phase {
            args: vec![
                "test",
                "-p",
                "peft-quant",
                "-p",
                "peft-lora",
                "-p",
                "peft-models",
                "--features",
                "peft-quant/wgpu,peft-lora/wgpu,peft-models/wgpu",
                "--test",
                "wgpu",
                "--test",
                "wgpu_half",
            ],
            envs: vec![],
        });
    }
    phases.push(Phase {
        args: vec!["test", "--workspace", "--doc"],
        envs: vec![],
    });
    phases.push(Phase {
        args: vec!["test", "--workspace", "--all-targets"],
        envs: vec![],
    });
    phases
}

fn test(args: &[String]) -> Result<()> {
    fetch()?;
    let models = models_dir();
    let models = models.to_str().context("models path is not UTF-8")?;
    let mut tally = Tally::default();
    let gpu_backends = !args.iter().any(|a| a == "--no-gpu-backends");
    for phase in test_phases(gpu_backends) {
        let mut envs = phase.envs.clone();
        envs.push(("PEFT_MODELS_DIR", models));
        if phase.args[0] == "test" {
            tally.cargo_test(&phase.args, &envs)?;
        } else {
            cargo(&phase.args, &envs)?;
        }
    }
    println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
    // Coverage-guided fuzzing of every reader, a few seconds each (the stable mutation suite ran
    // above with the tests); `cargo xtask fuzz --seconds N` runs longer.
    if !args.iter().any(|a| a == "--no-fuzz") && fuzz::cargo_fuzz_available() {
        fuzz::fuzz(&["--seconds".into(), "3".into()])?;
    }
    Ok(())
}

const QUESTIONS: [&str; 3] = ["What is AI?", "Do you like sports?", "Tell me a joke."];

fn answers(m: &LoadedModel, label: &str) -> Result<()> {
    println!("\n{label}");
    for q in QUESTIONS {
        let prompt = m.tokenizer.encode(&m.tokenizer.chat_prompt(q))?;
        let out = greedy(&m.model, &prompt, 40, &m.tokenizer.eos_ids);
        println!("  Q: {q}\n  A: {}", m.tokenizer.decode(&out)?.trim());
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    let steps: usize = match args.iter().position(|a| a == "--steps") {
        Some(i) => args
            .get(i + 1)
            .context("--steps needs a number")?
            .parse()
            .context("--steps")?,
        None => 60,
    };
    let out = workspace_root().join("target/demo-adapter");
    let (gguf, corpus) = fetch()?;
    let device = Device::flex().autodiff();
    device.seed(0);
    let t = Instant::now();
    let loaded = load_causal_lm(&gguf, &device)?;
    println!("loaded {} in {:.1?}", gguf.display(), t.elapsed());
    answers(&loaded, "Before fine-tuning:")?;

    let LoadedModel { model, tokenizer } = loaded;
    let (train_pairs, held) = split_every(chatterbot_pairs(&corpus)?, 10);
    let examples = |pairs: &[peft_models::data::QaPair]| -> Result<Vec<_>> {
        Ok(pairs
            .iter()
            .map(|p| chat_example(&tokenizer, &p.question, &p.answer, 96))
            .collect::<Result<_, _>>()?)
    };
    let train_set = examples(&train_pairs)?;
    let held_set = examples(&held[..held.len().min(48)])?;
    let pad = tokenizer.eos_ids[0];

    let config = LoraConfig::new(8, 16.0, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let model = config.apply(model, "default")?;
    println!("\nLoRA r=8 on q,k,v,o: {}", ParamReport::of(&model));
    let before = eval_loss(&model, &held_set, 8, pad);
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        steps,
        batch_size: 8,
        warmup_steps: 5,
        ..Default::default()
    };
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    let started = Instant::now();
    let mut tokens = 0usize;
    let model = train(model, &train_set, &cfg, pad, |r| {
        tokens += r.tokens;
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.3} lr {:.1e} {:.0} tok/s",
            r.loss, r.learning_rate, tps
        ));
        bar.inc(1);
    });
    bar.finish();
    let after = eval_loss(&model, &held_set, 8, pad);
    println!(
        "held-out loss: {before:.3} -> {after:.3} ({} pairs)",
        held_set.len()
    );
    config.save(&model, "default", &out)?;
    println!(
        "adapter saved (Hugging Face PEFT format) to {}",
        out.display()
    );
    answers(&LoadedModel { model, tokenizer }, "After fine-tuning:")?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("compare") => compare::compare(&args[1..], &workspace_root(), &models_dir()),
        Some("sweep") => sweep::sweep(),
        Some("fetch") => fetch().map(|(m, d)| println!("{}\n{}", m.display(), d.display())),
        _ => bail!(
            "usage: cargo xtask <demo [--steps N] | test [--no-gpu-backends] [--no-fuzz] | sweep | fetch | \
             bench [--peer] [--rounds N] [--only PREFIX[,PREFIX]] [--no-criterion] [--isa avx2|native] | \
             fuzz [--seconds N] [--only NAME] [--sanitizer none|address] | \
             compare [--quick] [--peer] [--task sentiment|chat] [--only M1,M2] [--out DIR]>"
        ),
    }
}
