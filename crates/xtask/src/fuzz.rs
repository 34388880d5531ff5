//! `cargo xtask fuzz [--seconds N] [--only NAME] [--sanitizer none|address]`: every reader of
//! outside files under coverage-guided fuzzing (cargo fuzz / libFuzzer, nightly toolchain), each
//! for N seconds (default 10), seeded with real files. Without a nightly toolchain or
//! cargo-fuzz it says so and runs the stable structure-aware mutation suite instead
//! (`crates/peft-models/tests/malformed.rs`, proptest).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

#[path = "../../../fuzz/readers.rs"]
mod readers;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Whether `cargo +nightly fuzz` runs here.
pub fn cargo_fuzz_available() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What one target did.
struct TargetRun {
    name: &'static str,
    execs: u64,
    corpus: usize,
}

pub fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = arg(args, "--seconds")
        .map(str::parse)
        .transpose()
        .context("--seconds")?
        .unwrap_or(10);
    let only = arg(args, "--only");
    let sanitizer = arg(args, "--sanitizer").unwrap_or("none");
    let root = crate::workspace_root();
    if !cargo_fuzz_available() {
        // Scale the stable suite with the time asked for (about 2,000 cases a second here).
        let cases = (seconds * 2000).max(256).to_string();
        eprintln!(
            "xtask fuzz: no nightly toolchain with cargo-fuzz here (`rustup toolchain install nightly`, \
             `cargo install cargo-fuzz`); running the stable structure-aware mutation suite instead ({cases} cases)"
        );
        return crate::cargo(
            &["test", "-p", "peft-models", "--test", "malformed"],
            &[("PROPTEST_CASES", &cases)],
        );
    }
    let fuzz_dir = root.join("fuzz");
    let target_dir = crate::bench::target_dir().join("fuzz");
    let target_dir = target_dir.to_str().context("target path is not UTF-8")?;
    let names: Vec<&'static str> = readers::READERS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| only.is_none_or(|o| n.starts_with(o)))
        .collect();
    if names.is_empty() {
        bail!(
            "--only {}: no such target (targets: {})",
            only.unwrap_or_default(),
            readers::READERS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "build",
            "-O",
            "--sanitizer",
            sanitizer,
            "--target-dir",
            target_dir,
        ])
        .current_dir(&root)
        .status()
        .context("cargo fuzz build")?;
    if !status.success() {
        bail!("`cargo fuzz build` failed");
    }
    let seeds = seed_files(&root)?;
    let mut runs = Vec::new();
    for name in names {
        let corpus = fuzz_dir.join("corpus").join(name);
        std::fs::create_dir_all(&corpus)?;
        for (i, bytes) in seeds
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, b)| b)
            .enumerate()
        {
            std::fs::write(corpus.join(format!("seed-{i}")), bytes)?;
        }
        eprintln!("+ fuzz {name} for {seconds} s");
        let out = Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                "-O",
                "--sanitizer",
                sanitizer,
                "--target-dir",
                target_dir,
                name,
            ])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=30",
                "-rss_limit_mb=4096",
                "-print_final_stats=1",
            ])
            .current_dir(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("cargo fuzz run")?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            bail!(
                "fuzz target `{name}` found a failure; its input is under fuzz/artifacts/{name}/. Fix it, then commit the \
                 input as fuzz/regressions/{name}/<name> so the test suite replays it"
            );
        }
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let corpus_size = std::fs::read_dir(&corpus)?.count();
        eprintln!("  {name}: {execs} executions, corpus {corpus_size} inputs, no failure");
        runs.push(TargetRun {
            name,
            execs,
            corpus: corpus_size,
        });
    }
    let total: u64 = runs.iter().map(|r| r.execs).sum();
    println!("| target | executions | corpus |\n|---|---|---|");
    for r in &runs {
        println!("| {} | {} | {} |", r.name, r.execs, r.corpus);
    }
    println!(
        "xtask fuzz: {} targets, {total} executions in {seconds} s each, sanitizer {sanitizer}, no failure",
        runs.len()
    );
    Ok(())
}

/// The seeds: the real files of `readers::seeds`, plus the header of the SmolLM2 GGUF when it
/// has been fetched (its metadata and tokenizer; the tensor data is left out).
fn seed_files(root: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut seeds = readers::seeds();
    let gguf: PathBuf = peft_models::assets::SMOLLM2.path_in(&crate::models_dir());
    if let Ok(file) = peft_models::gguf::GgufFile::open(&gguf) {
        let header = file.data_start();
        let bytes = std::fs::read(&gguf)?;
        seeds.push(("gguf", bytes[..header.min(bytes.len())].to_vec()));
    } else {
        eprintln!(
            "(SmolLM2 not fetched under {}; `cargo xtask fetch` adds its GGUF header as a seed)",
            root.display()
        );
    }
    Ok(seeds)
}
