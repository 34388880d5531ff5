//! `peft train --task causal-lm`: a causal language model on question/answer or plain-text
//! data, through the loop every task shares (`train::train_loop`).

use anyhow::{Context, Result};
use peft_lora::param_report;
use peft_models::load::load_causal_lm;
use peft_models::train::{eval_loss, lm_batch_loss};

use crate::data::read_examples;
use crate::train::{Run, apply_method, hold_out, train_loop};

/// Train the causal LM of `run`; the held-out loss is measured at every checkpoint.
pub fn train(mut run: Run) -> Result<()> {
    let a = &run.args;
    let model_path = a.model.clone().expect("checked");
    eprintln!("loading {}", model_path.display());
    let loaded = load_causal_lm(&model_path, &run.device)?;
    let tok = loaded.tokenizer;
    let max_len = peft_cli::usage::max_len(
        a.max_len,
        256,
        loaded.model.config.max_position_embeddings,
        run.method.virtual_tokens(),
    )?;
    std::fs::create_dir_all(&run.out).with_context(|| format!("{}", run.out.display()))?;
    let train_set = read_examples(a.data.as_ref().expect("checked"), &tok, max_len)?;
    let eval = a
        .eval_data
        .as_ref()
        .map(|p| read_examples(p, &tok, max_len))
        .transpose()?;
    let (train_set, eval_set) = hold_out(train_set, eval);
    let pad = tok.eos_ids.first().copied().unwrap_or(0);
    let model = loaded.model;
    run.method = run.method.resolved_for(&model)?.with_text_ids(
        |text| Ok(tok.encode_with_special(text, usize::MAX)?),
        &model_path.display().to_string(),
    )?;
    let model = crate::train::load_fused(&run, model)?;
    let model = apply_method(&run, model, &train_set, |m, b| lm_batch_loss(m, b, pad))?;
    eprintln!(
        "{} examples for training, {} held out; {}",
        train_set.len(),
        eval_set.len(),
        param_report(&model)
    );
    let batch = run.config.batch_size;
    train_loop(
        &run,
        model,
        &train_set,
        |m, b| lm_batch_loss(m, b, pad),
        |m| {
            let mut metrics = serde_json::Map::new();
            if !eval_set.is_empty() {
                metrics.insert(
                    "eval_loss".into(),
                    eval_loss(m, &eval_set, batch, pad).into(),
                );
            }
            metrics
        },
    )
}
