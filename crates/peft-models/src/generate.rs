//! Greedy decoding with the KV cache.

use burn::tensor::{Int, Tensor, TensorData};

use crate::llama::{KvCache, LlamaForCausalLM};

/// Continue `prompt` greedily for at most `max_new` tokens, stopping at any of `eos`.
/// Returns the new tokens only.
pub fn greedy(model: &LlamaForCausalLM, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
    let device = model.device();
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for _ in 0..max_new {
        let n = input.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(input.clone(), [1, n]), &device);
        let logits = model.forward(tokens, Some(&mut cache));
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
