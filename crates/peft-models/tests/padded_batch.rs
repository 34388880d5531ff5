//! A left-padded batch computes, row by row, what each sequence computes alone: the logits of
//! the last positions and greedy generation with the KV cache (rows of different lengths,
//! rows that stop early).

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_models::config::LlamaConfig;
use peft_models::generate::{greedy, greedy_batch};
use peft_models::llama::{KvCache, LlamaForCausalLM};
use peft_models::reference::max_abs_diff;

fn model() -> LlamaForCausalLM {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": false
    }))
    .unwrap();
    Device::flex().seed(3);
    LlamaForCausalLM::random(config, &Device::flex()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 9, 2, 33, 7], vec![12], vec![40, 41, 3]]
}

#[test]
fn padded_rows_give_the_logits_and_tokens_of_each_row_alone() {
    let m = model();
    let device = Device::flex();
    let ps = prompts();
    let width = 5;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for p in &ps {
        ids.extend(std::iter::repeat_n(0i64, width - p.len()));
        ids.extend(p.iter().map(|&t| i64::from(t)));
        mask.push([vec![0.0; width - p.len()], vec![1.0; p.len()]].concat());
    }
    let batch = Tensor::<2, Int>::from_data(TensorData::new(ids, [3, width]), &device);
    let mut cache = KvCache::new();
    let logits = m.forward_padded(batch, &mask, Some(&mut cache));
    // And one more token per row through the cache.
    let next = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [3, 1]), &device);
    let ones = vec![vec![1.0]; 3];
    let after = m.forward_padded(next, &ones, Some(&mut cache));
    for (r, p) in ps.iter().enumerate() {
        let n = p.len();
        let alone_ids: Vec<i64> = p.iter().map(|&t| i64::from(t)).collect();
        let alone = Tensor::<2, Int>::from_data(TensorData::new(alone_ids, [1, n]), &device);
        let mut c = KvCache::new();
        let want = m.forward(alone, Some(&mut c)).narrow(1, n - 1, 1);
        let got = logits.clone().narrow(0, r, 1).narrow(1, width - 1, 1);
        assert!(max_abs_diff(got, want) < 1e-5, "row {r}");
        let tok = Tensor::<2, Int>::from_data(TensorData::new(vec![r as i64 + 1], [1, 1]), &device);
        let want = m.forward(tok, Some(&mut c));
        assert!(
            max_abs_diff(after.clone().narrow(0, r, 1), want) < 1e-5,
            "row {r} after the cache"
        );
    }
}

#[test]
fn batched_greedy_equals_greedy_alone_even_when_rows_stop_early() {
    let m = model();
    let ps = prompts();
    let alone: Vec<Vec<u32>> = ps.iter().map(|p| greedy(&m, p, 6, &[])).collect();
    assert_eq!(greedy_batch(&m, &ps, 6, &[]), alone);
    // Stop each row at a token one of them produces: rows finish at different steps.
    let eos = [alone[1][2]];
    let alone: Vec<Vec<u32>> = ps.iter().map(|p| greedy(&m, p, 6, &eos)).collect();
    assert_eq!(greedy_batch(&m, &ps, 6, &eos), alone);
}
