//! Causal-LM fine-tuning: examples with a loss mask (answer tokens only), batching,
//! evaluation, and [`train`] over the generic [`Trainer`] (AdamW, warmup + cosine schedule,
//! gradient accumulation, global-norm clipping). Only parameters that require gradients are
//! updated; frozen ones get no gradient and no optimizer state.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::Result;
pub use peft_core::train::{StepReport, TrainConfig, Trainer};

use crate::llama::LlamaForCausalLM;
use crate::tokenizer::TextTokenizer;

/// One training sequence: token ids and, per token, whether it is predicted (1) or only
/// context (0).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<f32>,
}

/// A question/answer pair in the chat format, with the loss on the answer (and its closing
/// marker) only. Sequences are cut to `max_len` tokens.
pub fn chat_example(
    tok: &TextTokenizer,
    question: &str,
    answer: &str,
    max_len: usize,
) -> Result<Example> {
    let prompt = tok.encode(&tok.chat_prompt(question))?;
    let answer = tok.encode(&format!("{answer}{}", tok.answer_suffix()))?;
    let mut tokens = prompt.clone();
    tokens.extend(&answer);
    let mut loss_mask = vec![0.0; prompt.len()];
    loss_mask.extend(std::iter::repeat_n(1.0, answer.len()));
    tokens.truncate(max_len);
    loss_mask.truncate(max_len);
    Ok(Example { tokens, loss_mask })
}

/// Right-padded `[batch, seq]` token ids and loss mask (padding is never predicted).
pub fn batch(examples: &[Example], pad: u32, device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
    let seq = examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut ids = Vec::with_capacity(examples.len() * seq);
    let mut mask = Vec::with_capacity(examples.len() * seq);
    for e in examples {
        ids.extend(e.tokens.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad as i64, seq - e.tokens.len()));
        mask.extend(&e.loss_mask);
        mask.extend(std::iter::repeat_n(0.0f32, seq - e.tokens.len()));
    }
    let b = examples.len();
    (
        Tensor::from_data(TensorData::new(ids, [b, seq]), device),
        Tensor::from_data(TensorData::new(mask, [b, seq]), device),
    )
}

/// Mean loss per predicted token over `examples` (no gradients).
pub fn eval_loss(
    model: &LlamaForCausalLM,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> f64 {
    let model = model.valid();
    eval_loss_with(&model.device(), examples, batch_size, pad, |ids, mask| {
        model.causal_lm_loss(ids, mask)
    })
}

/// [`eval_loss`] with any batch loss (`loss` gets right-padded ids and the loss mask and
/// returns the mean loss per predicted token, as [`LlamaForCausalLM::causal_lm_loss`]).
pub fn eval_loss_with(
    device: &Device,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    loss: impl Fn(Tensor<2, Int>, Tensor<2>) -> Tensor<1>,
) -> f64 {
    let (mut total, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size.max(1)) {
        let (ids, mask) = batch(chunk, pad, device);
        let n: f64 = chunk
            .iter()
            .map(|e| e.loss_mask[1..].iter().sum::<f32>() as f64)
            .sum();
        let loss: f32 = loss(ids, mask).into_scalar();
        total += loss as f64 * n;
        count += n;
    }
    total / count.max(1.0)
}

/// Train the parameters of `model` that require gradients on `data` (the model must live on
/// an autodiff device); `on_step` sees every optimizer step.
pub fn train(
    model: LlamaForCausalLM,
    data: &[Example],
    config: &TrainConfig,
    pad: u32,
    mut on_step: impl FnMut(&StepReport),
) -> LlamaForCausalLM {
    let mut trainer = Trainer::new(model, config.clone());
    while !trainer.is_done() {
        let report = trainer.step(data, |m, batch| lm_batch_loss(m, batch, pad));
        on_step(&report);
    }
    trainer.into_model()
}

/// The loss of one batch and its token count, for [`Trainer::step`].
pub fn lm_batch_loss(model: &LlamaForCausalLM, batch: &[Example], pad: u32) -> (Tensor<1>, usize) {
    let (ids, mask) = self::batch(batch, pad, &model.device());
    let tokens = batch.iter().map(|e| e.tokens.len()).sum();
    (model.causal_lm_loss(ids, mask), tokens)
}
