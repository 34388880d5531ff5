//! Causal-LM fine-tuning: examples with a loss mask (answer tokens only), batching, evaluation
//! and the training loop (AdamW, warmup + cosine schedule, gradient accumulation, global-norm
//! clipping). Only parameters that require gradients are updated; frozen ones get no gradient
//! and no optimizer state.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::optim::{LrSchedule, clip_grad_norm};
use peft_core::Result;

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
pub fn chat_example(tok: &TextTokenizer, question: &str, answer: &str, max_len: usize) -> Result<Example> {
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
    let seq = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1).max(2);
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
pub fn eval_loss(model: &LlamaForCausalLM, examples: &[Example], batch_size: usize, pad: u32) -> f64 {
    let model = model.valid();
    let device = model.device();
    let (mut total, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size.max(1)) {
        let (ids, mask) = batch(chunk, pad, &device);
        let n: f64 = chunk.iter().map(|e| e.loss_mask[1..].iter().sum::<f32>() as f64).sum();
        let loss: f32 = model.causal_lm_loss(ids, mask).into_scalar();
        total += loss as f64 * n;
        count += n;
    }
    total / count.max(1.0)
}

/// Hyper-parameters of [`train`].
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Optimizer steps (each over `grad_accum` micro-batches).
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 5,
            steps: 50,
            batch_size: 8,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            seed: 42,
        }
    }
}

/// What one optimizer step did, for progress display and logs.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// Deterministic shuffle (splitmix64 keys), so runs with one seed see one data order.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut keyed: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            (z ^ (z >> 31), i)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Train the parameters of `model` that require gradients (the model must live on an
/// autodiff device). `on_step` sees every optimizer step.
pub fn train(
    mut model: LlamaForCausalLM,
    data: &[Example],
    config: &TrainConfig,
    pad: u32,
    mut on_step: impl FnMut(&StepReport),
) -> LlamaForCausalLM {
    assert!(!data.is_empty(), "no training examples");
    let device = model.device();
    let mut optim = AdamWConfig::new().with_weight_decay(config.weight_decay as f32).init();
    let schedule = LrSchedule {
        peak: config.learning_rate,
        warmup_steps: config.warmup_steps,
        total_steps: config.steps,
        final_fraction: 0.1,
        cosine: true,
    };
    let mut order = Vec::new();
    let mut epoch = 0u64;
    let mut cursor = 0;
    for step in 0..config.steps {
        let mut accumulator = GradientsAccumulator::<LlamaForCausalLM>::new();
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for _ in 0..config.grad_accum.max(1) {
            let mut idx = Vec::with_capacity(config.batch_size);
            while idx.len() < config.batch_size {
                if cursor >= order.len() {
                    order = shuffled(data.len(), config.seed.wrapping_add(epoch));
                    epoch += 1;
                    cursor = 0;
                }
                idx.push(order[cursor]);
                cursor += 1;
            }
            let examples: Vec<Example> = idx.iter().map(|&i| data[i].clone()).collect();
            tokens += examples.iter().map(|e| e.tokens.len()).sum::<usize>();
            let (ids, mask) = batch(&examples, pad, &device);
            let loss = model.causal_lm_loss(ids, mask).div_scalar(config.grad_accum.max(1) as f64);
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        let grad_norm = match config.max_grad_norm {
            Some(max) => clip_grad_norm(&model, &mut grads, max),
            None => f64::NAN,
        };
        let lr = schedule.at(step);
        model = optim.step(lr, model, grads);
        on_step(&StepReport { step, loss: loss_sum, learning_rate: lr, grad_norm, tokens });
    }
    model
}
