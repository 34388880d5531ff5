//! Greedy decoding with the KV cache.

use burn::tensor::{Int, Tensor, TensorData};

use crate::llama::{KvCache, LlamaForCausalLM};

/// Continue `prompt` greedily for at most `max_new` tokens, stopping at any of `eos`.
/// Returns the new tokens only.
pub fn greedy(model: &LlamaForCausalLM, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
    let mut cache = KvCache::new();
    greedy_with(&model.device(), prompt, max_new, eos, |tokens| {
        model.forward(tokens, Some(&mut cache))
    })
}

/// [`greedy`] over any next-token scorer: `step` gets the new tokens `[1, n]` (the whole
/// prompt first, then one token at a time, as a KV cache wants them) and returns their
/// logits `[1, n, vocab]`.
pub fn greedy_with(
    device: &burn::tensor::Device,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    mut step: impl FnMut(Tensor<2, Int>) -> Tensor<3>,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for _ in 0..max_new {
        let n = input.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(input.clone(), [1, n]), device);
        let logits = step(tokens);
        let vocab = logits.dims()[2];
        let last = logits.narrow(1, n - 1, 1).reshape([vocab]);
        let next = last.argmax(0).into_scalar::<i64>() as u32;
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next as i64];
    }
    out
}

/// Continue every prompt greedily at once, in one left-padded batch, for at most `max_new`
/// tokens each, a row stopping at any of `eos`. Returns the new tokens of each prompt: what
/// [`greedy`] returns for it alone (padding is masked and each row keeps its own positions).
pub fn greedy_batch(
    model: &LlamaForCausalLM,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
) -> Vec<Vec<u32>> {
    let device = model.device();
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || width == 0 {
        return vec![Vec::new(); b];
    }
    let pad = eos.first().copied().unwrap_or(0) as i64;
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b);
    for p in prompts {
        let n = width - p.len();
        ids.extend(std::iter::repeat_n(pad, n));
        ids.extend(p.iter().map(|&t| t as i64));
        mask.push([vec![0.0; n], vec![1.0; p.len()]].concat());
    }
    let mut cache = KvCache::new();
    let mut tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, width]), &device);
    let mut out = vec![Vec::new(); b];
    let mut done: Vec<bool> = prompts.iter().map(|p| p.is_empty()).collect();
    for _ in 0..max_new {
        let n = tokens.dims()[1];
        let logits = model.forward_padded(tokens, &mask, Some(&mut cache));
        let vocab = logits.dims()[2];
        let next: Vec<i64> = logits
            .narrow(1, n - 1, 1)
            .reshape([b, vocab])
            .argmax(1)
            .into_data()
            .iter::<i64>()
            .collect();
        for (r, &t) in next.iter().enumerate() {
            if done[r] {
                continue;
            }
            if eos.contains(&(t as u32)) {
                done[r] = true;
            } else {
                out[r].push(t as u32);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // A finished row is fed padding, masked, so the others go on unchanged.
        mask = done
            .iter()
            .map(|&d| vec![if d { 0.0 } else { 1.0 }])
            .collect();
        let feed: Vec<i64> = next
            .iter()
            .zip(&done)
            .map(|(&t, &d)| if d { pad } else { t })
            .collect();
        tokens = Tensor::from_data(TensorData::new(feed, [b, 1]), &device);
    }
    out
}
