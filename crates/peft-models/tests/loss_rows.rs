//! `causal_lm_loss` computes logits only where the loss mask counts; its loss and gradients
//! are those of the logits of every position.

use burn::tensor::{Device, Int, Tensor, TensorData, Tolerance};
use peft_core::params::unfreeze_all;
use peft_models::config::LlamaConfig;
use peft_models::llama::{LlamaForCausalLM, shifted_lm_loss};

fn model(tied: bool, device: &Device) -> LlamaForCausalLM {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": tied
    }))
    .unwrap();
    device.seed(5);
    unfreeze_all(LlamaForCausalLM::random(config, device).unwrap())
}

/// The loss and the embedding gradient (which every layer's backward reaches; with a tied
/// head it holds the head's weight gradient too), through `causal_lm_loss` and through the
/// logits of every position.
fn loss_and_grad(m: &LlamaForCausalLM, mask: &[f32], all_rows: bool) -> (Tensor<1>, Tensor<2>) {
    let device = m.device();
    let (b, s) = (3, 7);
    let ids: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 13 + 5) % 64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask.to_vec(), [b, s]), &device);
    let loss = if all_rows {
        shifted_lm_loss(
            m.forward(tokens.clone().narrow(1, 0, s - 1), None),
            tokens,
            mask,
        )
    } else {
        m.causal_lm_loss(tokens, mask)
    };
    let grads = loss.backward();
    let g = m.model.embed_tokens.val().grad(&grads).unwrap();
    (loss.inner(), g.inner())
}

#[test]
fn loss_over_counted_rows_equals_loss_over_all_logits() {
    let device = Device::flex().autodiff();
    // A prompt (0) before an answer (1), right padding (0), and a weight other than 1.
    #[rustfmt::skip]
    let masks: [&[f32]; 3] = [
        &[0., 0., 1., 1., 1., 0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 0., 1., 1., 0., 0., 0.],
        &[1.; 21],
        &[0., 0., 0., 0., 0., 0., 0., 0., 0.5, 1., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.],
    ];
    let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
    for tied in [false, true] {
        let m = model(tied, &device);
        for mask in masks {
            let (loss, grad) = loss_and_grad(&m, mask, false);
            let (want_loss, want_grad) = loss_and_grad(&m, mask, true);
            loss.into_data()
                .assert_approx_eq::<f32>(&want_loss.into_data(), tol);
            grad.into_data()
                .assert_approx_eq::<f32>(&want_grad.into_data(), tol);
        }
        // No counted position: a zero loss, as before.
        let (loss, _) = loss_and_grad(&m, &[0.; 21], false);
        assert_eq!(loss.into_scalar::<f32>(), 0.0);
    }
}
