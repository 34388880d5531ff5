//! # peft-models
//!
//! Reference architectures every PEFT method plugs into, built from tunable slots and
//! addressed by Hugging Face module paths:
//!
//! - [`bert`]: BERT encoder with a sequence-classification head.
//! - [`llama`]: Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU, tied/untied head, KV cache).
//! - [`slot`]: the tunable linear slot and its checkpoint form (dense or bitsandbytes 4-bit);
//!   every model declares its sites (linears, norms) once, with `peft_sites::site_table!`.
//! - [`reference`]: reference outputs (ids, logits, greedy tokens) that tests compare against.
//! - [`load`]: from a Hugging Face folder (config.json + safetensors, f32/f16/bf16) or a GGUF
//!   file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 dequantized at load).
//! - [`tokenizer`]: `tokenizers`-crate tokenizer from tokenizer.json or GGUF, chat template.
//! - [`generate`]: greedy generation with the KV cache.
//! - [`proxy`]: proxy-tuning, three models' logits combined at decoding time.
//! - [`assets`]: models and data fetched from the Python package registry.
//! - [`data`]: question/answer pairs (chatterbot corpus).
//! - [`train`]: the causal-LM training loop (AdamW, schedule, accumulation, clipping).
//! - [`loss`], [`swiglu`], [`causal_softmax`], [`rms_norm`], [`rope`]: the softmax
//!   cross-entropy, the SwiGLU activation, the causal attention weights, RMSNorm and the rotary
//!   position embedding as single operations with CPU kernels.

pub mod assets;
pub mod attention;
pub mod bert;
pub mod causal_softmax;
pub mod config;
pub mod data;
pub mod gelu;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod loss;
pub mod proxy;
pub mod reference;
pub mod rms_norm;
pub mod rope;
pub mod slot;
pub mod swiglu;
pub mod tokenizer;
pub mod train;
