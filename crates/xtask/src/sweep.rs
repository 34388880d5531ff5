//! `cargo xtask sweep`: delete the build outputs that `cargo xtask test` no longer uses.
//!
//! Every change of features, flags or dependency versions leaves a new copy of each affected
//! crate in the target folder, and cargo never removes the old ones: a shared target folder
//! grew to 68 GB (63 copies of burn) and a CI run died in the linker with the disk full. The
//! sweep asks cargo which outputs the test phases use (`--message-format=json`, building what is
//! missing, running nothing) and deletes the rest of `deps/`, the incremental caches, and the
//! fuzz build when it has grown past a fresh one's size.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// A fuzz build of every target takes about 3 GB; past this it holds stale copies.
const FUZZ_KEEP_BYTES: u64 = 8 << 30;

/// The hash cargo appends to an output's file name (`libburn_core-0123456789abcdef.rlib`,
/// `peft-0123456789abcdef`), if the name has one.
fn output_hash(file_name: &str) -> Option<&str> {
    let stem = file_name.split('.').next()?;
    let (_, hash) = stem.rsplit_once('-')?;
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// Run one cargo command with JSON messages and add the hash of every output it reports (fresh
/// or built now) to `live`.
fn live_outputs(args: &[&str], envs: &[(&str, &str)], live: &mut HashSet<String>) -> Result<()> {
    eprintln!("+ cargo {} --message-format=json", args.join(" "));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .arg("--message-format=json")
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("running cargo")?;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line?) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let files = msg["filenames"].as_array().into_iter().flatten();
        for file in files.chain(msg.get("executable")) {
            let name = file
                .as_str()
                .and_then(|f| Path::new(f).file_name()?.to_str());
            if let Some(hash) = name.and_then(output_hash) {
                live.insert(hash.to_owned());
            }
        }
    }
    if !child.wait()?.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn remove_dir(dir: &Path) -> Result<u64> {
    let bytes = dir_bytes(dir);
    if bytes > 0 {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(bytes)
}

pub(crate) fn sweep() -> Result<()> {
    let target = crate::bench::target_dir();
    let debug = target.join("debug");
    let mut freed = remove_dir(&debug.join("incremental"))?;
    let fuzz = target.join("fuzz");
    if dir_bytes(&fuzz) > FUZZ_KEEP_BYTES {
        freed += remove_dir(&fuzz)?;
    }

    let mut live = HashSet::new();
    for phase in crate::test_phases(true) {
        let mut args = phase.args.clone();
        match args[0] {
            "test" if args.contains(&"--doc") => continue, // builds the libraries `--all-targets` builds
            "test" => args.push("--no-run"),
            _ => {}
        }
        live_outputs(&args, &phase.envs, &mut live)?;
    }
    // The xtask binary itself (built by the `cargo xtask` alias).
    live_outputs(&["build", "-p", "xtask"], &[], &mut live)?;
    if live.is_empty() {
        bail!("cargo reported no outputs; nothing deleted");
    }

    let deps = debug.join("deps");
    let (mut kept, mut deleted) = (0usize, 0usize);
    for entry in std::fs::read_dir(&deps).with_context(|| format!("reading {}", deps.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(hash) = name.to_str().and_then(output_hash) else {
            continue;
        };
        if live.contains(hash) {
            kept += 1;
            continue;
        }
        let path = entry.path();
        freed += if entry.file_type()?.is_dir() {
            remove_dir(&path)?
        } else {
            let bytes = entry.metadata()?.len();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            bytes
        };
        deleted += 1;
    }
    println!(
        "xtask sweep: kept {kept} outputs in {}, deleted {deleted}; freed {:.1} GB",
        deps.display(),
        freed as f64 / 1e9
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::output_hash;

    #[test]
    fn output_hash_reads_cargos_suffix_only() {
        assert_eq!(
            output_hash("libburn_core-0123456789abcdef.rlib"),
            Some("0123456789abcdef")
        );
        assert_eq!(
            output_hash("peft-0123456789abcdef"),
            Some("0123456789abcdef")
        );
        assert_eq!(
            output_hash("peft_lora-0123456789abcdef.d"),
            Some("0123456789abcdef")
        );
        assert_eq!(output_hash("libfoo-0123456789abcdeg.rlib"), None);
        assert_eq!(output_hash("libfoo-0123.rlib"), None);
        assert_eq!(output_hash("README"), None);
    }
}
