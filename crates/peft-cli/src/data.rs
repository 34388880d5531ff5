//! Training data files: JSONL (one example per line) or a chatterbot YAML folder, turned into
//! token sequences with a loss mask. Every bad line is an error naming file and line number.

use std::path::Path;

use anyhow::{Context, Result, bail};
use peft_models::data::chatterbot_pairs;
use peft_models::tokenizer::TextTokenizer;
use peft_models::train::{Example, chat_example};
use serde_json::Value;

/// Read `path` into examples of at most `max_len` tokens.
///
/// JSONL lines may be `{"question", "answer"}`, `{"prompt", "completion"}`,
/// `{"instruction", "output"}` (chat format, loss on the answer) or `{"text"}` (plain text,
/// loss on every token). A folder is read as chatterbot YAML conversations.
pub fn read_examples(path: &Path, tok: &TextTokenizer, max_len: usize) -> Result<Vec<Example>> {
    if path.is_dir() {
        let pairs = chatterbot_pairs(path)?;
        return pairs
            .iter()
            .map(|p| Ok(chat_example(tok, &p.question, &p.answer, max_len)?))
            .collect();
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    if !is_jsonl {
        bail!("{}: unsupported data file (expected .jsonl or a chatterbot YAML folder)", path.display());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{line_no}", path.display());
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", where_()))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let example = if let (Some(q), Some(a)) = (field("question"), field("answer")) {
            chat_example(tok, q, a, max_len)?
        } else if let (Some(q), Some(a)) = (field("prompt"), field("completion")) {
            chat_example(tok, q, a, max_len)?
        } else if let (Some(q), Some(a)) = (field("instruction"), field("output")) {
            let q = match field("input") {
                Some(input) if !input.is_empty() => format!("{q}\n\n{input}"),
                _ => q.to_string(),
            };
            chat_example(tok, &q, a, max_len)?
        } else if let Some(t) = field("text") {
            let mut tokens = tok.encode(t)?;
            tokens.truncate(max_len);
            let loss_mask = vec![1.0; tokens.len()];
            Example { tokens, loss_mask }
        } else {
            bail!(
                "{}: expected an object with \"question\"/\"answer\", \"prompt\"/\"completion\", \
                 \"instruction\"/\"output\" or \"text\" string fields",
                where_()
            );
        };
        if example.tokens.len() < 2 {
            bail!("{}: the example has fewer than 2 tokens", where_());
        }
        out.push(example);
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}
