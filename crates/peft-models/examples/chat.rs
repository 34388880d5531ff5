//! `cargo run --example chat -- <model.gguf|hf-folder> "question"`: greedy answer.
use burn::tensor::Device;
use peft_models::{generate::greedy, load::load_causal_lm};

fn main() -> peft_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("model path");
    let question = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let t = std::time::Instant::now();
    let loaded = load_causal_lm(std::path::Path::new(&path), &Device::flex())?;
    eprintln!("loaded in {:?}", t.elapsed());
    let prompt = loaded
        .tokenizer
        .encode(&loaded.tokenizer.chat_prompt(&question))?;
    eprintln!("prompt tokens: {prompt:?}");
    let t = std::time::Instant::now();
    let out = greedy(&loaded.model, &prompt, 40, &loaded.tokenizer.eos_ids);
    eprintln!("{} tokens in {:?}", out.len(), t.elapsed());
    println!("{}", loaded.tokenizer.decode(&out)?);
    Ok(())
}
