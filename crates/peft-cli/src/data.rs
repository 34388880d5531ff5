//! Training data files: JSONL (one example per line) or a chatterbot YAML folder, turned into
//! token sequences with a loss mask. Every bad line is an error naming file and line number.

use std::path::Path;

use anyhow::{Context, Result, bail};
use peft_models::data::{chatterbot_pairs, jsonl_examples};
use peft_models::tokenizer::TextTokenizer;
use peft_models::train::{Example, chat_example};

/// Read `path` into examples of at most `max_len` tokens: a `.jsonl` file (see
/// [`jsonl_examples`]) or a folder of chatterbot YAML conversations.
pub fn read_examples(path: &Path, tok: &TextTokenizer, max_len: usize) -> Result<Vec<Example>> {
    if path.is_dir() {
        let pairs = chatterbot_pairs(path)?;
        return pairs
            .iter()
            .map(|p| Ok(chat_example(tok, &p.question, &p.answer, max_len)?))
            .collect();
    }
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if !is_jsonl {
        bail!(
            "{}: unsupported data file (expected .jsonl or a chatterbot YAML folder)",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(jsonl_examples(path, &bytes, tok, max_len)?)
}
