//! Text <-> token ids with the `tokenizers` crate, from a `tokenizer.json` or from the
//! tokenizer stored in GGUF metadata, plus the ChatML chat template of instruct models.

use std::path::Path;

use peft_core::{PeftError, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::gguf::{GgufFile, Value};

/// A tokenizer with the special tokens generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Whether the vocabulary has ChatML markers (`<|im_start|>`).
    pub chatml: bool,
    /// System prompt used when a chat has none (from the model's template).
    pub default_system: Option<String>,
}

fn tk_err(path: &Path, e: impl std::fmt::Display) -> PeftError {
    PeftError::format(path, format!("tokenizer: {e}"))
}

/// Run a call into the `tokenizers` crate, turning a panic into an error: it panics on some
/// malformed `tokenizer.json` files (found by fuzzing: a bad `decoder` object) instead of
/// returning one.
fn guarded<T>(f: impl FnOnce() -> tokenizers::Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => Err(format!(
            "rejected by the tokenizers crate: {}",
            peft_core::error::panic_message(&*panic)
        )),
    }
}

impl TextTokenizer {
    /// From a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path, eos_ids: Vec<u32>) -> Result<Self> {
        if !path.exists() {
            return Err(PeftError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = guarded(|| Tokenizer::from_file(path)).map_err(|e| tk_err(path, e))?;
        Ok(Self::finish(inner, eos_ids, None))
    }

    /// From the bytes of a `tokenizer.json`; `path` only names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8], eos_ids: Vec<u32>) -> Result<Self> {
        let inner = guarded(|| Tokenizer::from_bytes(bytes)).map_err(|e| tk_err(path, e))?;
        Ok(Self::finish(inner, eos_ids, None))
    }

    /// From the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE, `gpt2` model).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path.as_path();
        let model = file
            .require("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(tk_err(
                path,
                format!("tokenizer model `{model}` is not supported (gpt2 byte-level BPE)"),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            Ok(file
                .require(key)?
                .as_array()
                .ok_or_else(|| tk_err(path, format!("`{key}` is not an array")))?
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect())
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<u64> = file
            .meta("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tk_err(path, e))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = file
            .meta("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        // llama.cpp's `smollm` pre-tokenizer splits digits one by one before the GPT-2 regex.
        let pre_tok: PreTokenizerWrapper = if pre == "smollm" {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are matched whole, never split by BPE.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == 3)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&special);
        let eos = file
            .meta("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        let template = file
            .meta("tokenizer.chat_template")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok(Self::finish(inner, eos, system_from_template(template)))
    }

    fn finish(mut inner: Tokenizer, mut eos_ids: Vec<u32>, default_system: Option<String>) -> Self {
        // Batches are padded by the caller to their own longest sequence.
        inner.with_padding(None);
        let chatml = inner.token_to_id("<|im_start|>").is_some();
        if let Some(id) = inner.token_to_id("<|im_end|>")
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Self {
            inner,
            eos_ids,
            chatml,
            default_system,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        guarded(|| self.inner.encode(text, false))
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Other(format!("tokenizer: {e}")))
    }

    /// Encode with the model's special tokens (e.g. BERT's `[CLS] ... [SEP]`), truncated to
    /// `max_len`.
    pub fn encode_with_special(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let mut ids = guarded(|| self.inner.encode(text, true))
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Other(format!("tokenizer: {e}")))?;
        if max_len == 0 {
            return Ok(Vec::new());
        }
        if ids.len() > max_len {
            // Keep the closing special token (e.g. [SEP]).
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_len);
            ids[max_len - 1] = last;
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded(|| self.inner.decode(ids, true))
            .map_err(|e| PeftError::Other(format!("tokenizer: {e}")))
    }

    /// The prompt for one user turn, ready for the assistant's answer (ChatML when the
    /// vocabulary has it, the plain text otherwise).
    pub fn chat_prompt(&self, user: &str) -> String {
        if !self.chatml {
            return user.to_string();
        }
        let mut s = String::new();
        if let Some(system) = &self.default_system {
            s.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        s
    }

    /// Text that closes an assistant answer in the chat format.
    pub fn answer_suffix(&self) -> &'static str {
        if self.chatml { "<|im_end|>" } else { "" }
    }
}

/// The default system message of a ChatML template (`...'<|im_start|>system\n' + TEXT + '<|im_end|>`).
fn system_from_template(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let rest = &template[start..];
    let end = rest.find("<|im_end|>")?;
    let text = &rest[..end];
    (!text.contains("{{")).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn system_prompt_from_chatml_template() {
        let t = "{% if x %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}";
        assert_eq!(
            super::system_from_template(t).as_deref(),
            Some("You are helpful")
        );
        assert_eq!(super::system_from_template("{{ messages }}"), None);
    }
}
