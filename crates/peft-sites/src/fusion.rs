//! AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of several bottleneck
//! adapters at one sub-layer site, computed as AdapterHub `adapters` 1.3.0's `BertFusion` does
//! (shared `formats.md` §B.3).

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_core::params::trainable;

use crate::bottleneck::{Bottleneck, SubNorm};
use crate::linear::ADAPTER_DTYPE;
use crate::ops::dropout_while_training;

/// A linear layer in burn's layout (`[in, out]`; AdapterHub's `.weight` is its transpose).
#[derive(Module, Debug)]
pub struct FusionDense {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl FusionDense {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        peft_core::matmul::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// The switches of AdapterHub's `AdapterFusionConfig` that shape the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusionWiring {
    pub query: bool,
    pub key: bool,
    pub value: bool,
    /// The query is the sub-layer output before the original norm.
    pub query_before_ln: bool,
    /// Add the residual to the adapters' outputs (keys and values) instead of the result.
    pub residual_before: bool,
    pub value_before_softmax: bool,
}

/// One fusion layer: query, key and value projections over the fused adapters' outputs.
#[derive(Module, Debug)]
pub struct FusionLayer {
    pub query: Option<FusionDense>,
    pub key: Option<FusionDense>,
    /// No bias.
    pub value: Option<FusionDense>,
    #[module(skip)]
    pub wiring: FusionWiring,
    /// The fused adapters, by the names they have at the site, in order.
    #[module(skip)]
    pub adapters: Vec<String>,
    /// Dropout on the attention scores while training.
    #[module(skip)]
    pub dropout: f64,
}

impl FusionLayer {
    /// A new layer as AdapterHub initialises it: query and key N(0, 0.02) with zero biases;
    /// value the identity with 1e-6 off the diagonal (`value_initialized`) or N(0, 0.02).
    pub fn new(
        hidden: usize,
        wiring: FusionWiring,
        value_initialized: bool,
        adapters: Vec<String>,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let normal = || {
            trainable(
                Tensor::<2>::random([hidden, hidden], Distribution::Normal(0.0, 0.02), device)
                    .cast(ADAPTER_DTYPE),
            )
        };
        let dense = || FusionDense {
            weight: normal(),
            bias: Some(trainable(
                Tensor::<1>::zeros([hidden], device).cast(ADAPTER_DTYPE),
            )),
        };
        let value = if value_initialized {
            let v: Vec<f32> = (0..hidden * hidden)
                .map(|i| if i / hidden == i % hidden { 1.0 } else { 1e-6 })
                .collect();
            trainable(Tensor::from_data(
                TensorData::new(v, [hidden, hidden]),
                device,
            ))
        } else {
            normal()
        };
        Self {
            query: wiring.query.then(dense),
            key: wiring.key.then(dense),
            value: wiring.value.then_some(FusionDense {
                weight: value,
                bias: None,
            }),
            wiring,
            adapters,
            dropout,
        }
    }

    /// The layer's output for sub-block output `h` and residual input `inp`, fusing
    /// `adapters` (in [`Self::adapters`]' order). The last adapter's wiring decides the
    /// adapters' input, the residual and the final norm, as in AdapterHub.
    pub fn forward(
        &self,
        adapters: &[&Bottleneck],
        h: Tensor<3>,
        inp: Tensor<3>,
        norm: Option<&dyn SubNorm>,
    ) -> Tensor<3> {
        let dtype = h.dtype();
        let (h, inp) = (h.cast(ADAPTER_DTYPE), inp.cast(ADAPTER_DTYPE));
        let last = adapters.last().expect("a fusion has adapters");
        let (x, residual) = last.pre_forward(h.clone(), inp.clone(), norm);
        let w = self.wiring;
        let query = if w.query_before_ln && !last.wiring.parallel {
            h.clone()
        } else {
            x.clone()
        };
        // [batch, seq, adapters, hidden]
        let mut ups = Tensor::stack::<4>(adapters.iter().map(|a| a.up(x.clone())).collect(), 2);
        if w.residual_before {
            // AdapterHub adds it in place to the one tensor that serves as keys and values.
            ups = ups + residual.clone().unsqueeze_dim::<4>(2);
        }
        let q = match &self.query {
            Some(l) => l.forward(query),
            None => query,
        };
        let k = match &self.key {
            Some(l) => l.forward(ups.clone()),
            None => ups.clone(),
        };
        let v = match &self.value {
            Some(l) if w.value_before_softmax => l.forward(ups),
            _ => ups,
        };
        // scores[b, s, n] = q[b, s] · k[b, s, n]
        let mut scores = (k * q.unsqueeze_dim::<4>(2)).sum_dim(3);
        let training = self
            .query
            .as_ref()
            .or(self.key.as_ref())
            .or(self.value.as_ref())
            .is_some_and(|l| l.weight.is_require_grad());
        scores = dropout_while_training(scores, self.dropout, training);
        let p = softmax(scores, 2);
        // p is [batch, seq, adapters, 1]: weight each adapter's value and sum them.
        let [b, s, _, hd] = v.dims();
        let mut ctx = (v * p).sum_dim(2).reshape([b, s, hd]);
        if let Some(l) = &self.value
            && !w.value_before_softmax
        {
            ctx = l.forward(ctx);
        }
        if !w.residual_before {
            ctx = ctx + residual;
        }
        last.post_forward(ctx, h, inp, norm).cast(dtype)
    }

    /// AdapterHub's fusion regularisation: `0.01 · ||I − V||²` (0 without a value matrix).
    pub fn regularization(&self) -> Option<Tensor<1>> {
        let v = self.value.as_ref()?.weight.val();
        let [n, _] = v.dims();
        let eye = Tensor::<2>::eye(n, &v.device()).cast(v.dtype());
        Some((eye - v).powi_scalar(2).sum().mul_scalar(0.01))
    }
}
