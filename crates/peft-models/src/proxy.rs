//! Proxy-tuning (Liu et al., 2024): tune a model at decoding time without touching it. At each
//! position the next-token logits are `s_base + α·(s_expert − s_anti_expert)`, where the expert
//! is a small tuned model and the anti-expert the same small model untuned; the difference
//! carries what tuning taught the small model over to the large one.

use burn::tensor::{DType, Int, Tensor};
use peft_core::{PeftError, Result};

use crate::generate::greedy_with;
use crate::llama::{KvCache, LlamaForCausalLM, shifted_lm_loss};
use crate::train::{Example, eval_loss_with};

/// Three models that decode as one.
pub struct Proxy<'a> {
    pub base: &'a LlamaForCausalLM,
    pub expert: &'a LlamaForCausalLM,
    pub anti_expert: &'a LlamaForCausalLM,
    /// How far to move along the expert's difference (1: the paper's).
    pub alpha: f64,
}

impl<'a> Proxy<'a> {
    /// The three must share a vocabulary (token ids mean the same to all of them).
    pub fn new(
        base: &'a LlamaForCausalLM,
        expert: &'a LlamaForCausalLM,
        anti_expert: &'a LlamaForCausalLM,
        alpha: f64,
    ) -> Result<Self> {
        let vocab = |m: &LlamaForCausalLM| m.config.vocab_size;
        for (what, m) in [("expert", expert), ("anti-expert", anti_expert)] {
            if vocab(m) != vocab(base) {
                return Err(PeftError::Config(format!(
                    "proxy-tuning needs one vocabulary: the base model has {} tokens, the {what} {}",
                    vocab(base),
                    vocab(m)
                )));
            }
        }
        if !alpha.is_finite() {
            return Err(PeftError::Config(format!(
                "--proxy-alpha must be finite, got {alpha}"
            )));
        }
        Ok(Self {
            base,
            expert,
            anti_expert,
            alpha,
        })
    }

    /// `s_base + α·(s_expert − s_anti)` (f32) for `tokens`; with `caches` (one per model, in
    /// that order), each model continues its own KV cache.
    pub fn logits(&self, tokens: Tensor<2, Int>, caches: Option<&mut [KvCache; 3]>) -> Tensor<3> {
        let models = [self.base, self.expert, self.anti_expert];
        let [b, e, a] = match caches {
            Some([cb, ce, ca]) => [
                models[0].forward(tokens.clone(), Some(cb)),
                models[1].forward(tokens.clone(), Some(ce)),
                models[2].forward(tokens, Some(ca)),
            ],
            None => models.map(|m| m.forward(tokens.clone(), None)),
        }
        .map(|t| t.cast(DType::F32));
        b + (e - a).mul_scalar(self.alpha)
    }

    /// Greedy decoding of the combined distribution; every model keeps its KV cache.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
        let mut caches = [KvCache::new(), KvCache::new(), KvCache::new()];
        greedy_with(&self.base.device(), prompt, max_new, eos, |tokens| {
            self.logits(tokens, Some(&mut caches))
        })
    }

    /// The mean loss per predicted token of the combined distribution (as
    /// [`LlamaForCausalLM::causal_lm_loss`]).
    pub fn causal_lm_loss(&self, tokens: Tensor<2, Int>, loss_mask: Tensor<2>) -> Tensor<1> {
        let s = tokens.dims()[1];
        let logits = self.logits(tokens.clone().narrow(1, 0, s - 1), None);
        shifted_lm_loss(logits, tokens, loss_mask)
    }

    /// The held-out loss of the combined distribution on `examples`.
    pub fn eval_loss(&self, examples: &[Example], batch_size: usize, pad: u32) -> f64 {
        eval_loss_with(
            &self.base.device(),
            examples,
            batch_size,
            pad,
            |ids, mask| self.causal_lm_loss(ids, mask),
        )
    }
}
