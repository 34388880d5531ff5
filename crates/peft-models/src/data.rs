//! Instruction data: question/answer pairs from the chatterbot corpus (YAML conversations).

use std::path::Path;

use peft_core::{PeftError, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// A question and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct QaPair {
    pub question: String,
    pub answer: String,
}

/// Every consecutive (turn, reply) pair of every conversation in the `*.yml` files of `dir`,
/// in file-name order.
pub fn chatterbot_pairs(dir: &Path) -> Result<Vec<QaPair>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| PeftError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    let mut pairs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| PeftError::io(&file, e))?;
        let docs = YamlLoader::load_from_str(&text).map_err(|e| PeftError::format(&file, format!("YAML: {e}")))?;
        for doc in docs {
            let Some(conversations) = doc["conversations"].as_vec() else { continue };
            for conv in conversations {
                let turns: Vec<String> = conv
                    .as_vec()
                    .map(|v| v.iter().filter_map(yaml_text).collect())
                    .unwrap_or_default();
                for w in turns.windows(2) {
                    pairs.push(QaPair { question: w[0].clone(), answer: w[1].clone() });
                }
            }
        }
    }
    if pairs.is_empty() {
        return Err(PeftError::format(dir, "no conversations found in *.yml files"));
    }
    Ok(pairs)
}

fn yaml_text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) => Some(s.trim().to_string()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Deterministic split: every `k`-th pair is held out.
pub fn split_every(pairs: Vec<QaPair>, k: usize) -> (Vec<QaPair>, Vec<QaPair>) {
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if i % k == k - 1 { held.push(p) } else { train.push(p) }
    }
    (train, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_from_conversations() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yml"),
            "categories:\n- x\nconversations:\n- - Hi\n  - Hello\n  - How are you?\n- - What is 2?\n  - 2\n",
        )
        .unwrap();
        let p = chatterbot_pairs(dir.path()).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1], QaPair { question: "Hello".into(), answer: "How are you?".into() });
        assert_eq!(p[2].answer, "2");
        let (t, h) = split_every(p, 3);
        assert_eq!((t.len(), h.len()), (2, 1));
    }
}
