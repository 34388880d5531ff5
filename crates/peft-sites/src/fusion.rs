//! AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of several bottleneck
//! adapters at one sub-layer site, computed as AdapterHub `adapters` 1.3.0's `BertFusion` does
//! (shared `formats.md` §B.3).

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_core::params::trainable;

use crate::bottleneck::{Bottleneck, SubNorm};
use crate::fusion_attention::fusion_attention;
use crate::linear::ADAPTER_DTYPE;

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
    /// AdapterHub applies the value matrix to each adapter's output before the mix; being
    /// linear, it gives the same after it, where [`FusionLayer::forward`] applies it always
    /// (kept for the config file).
    pub value_before_softmax: bool,
    /// Scores divided by a temperature that falls from 50 to 1 ([`FusionTemperature`]).
    pub temperature: bool,
}

/// AdapterHub's fusion temperature: 50 at first, then after every forward pass 0.05 lower,
/// down to 1 (it keeps no count of training steps: evaluation and generation passes lower
/// it too). AdapterHub does not save it, so a loaded fusion starts again at 50; a run's
/// checkpoint here keeps the number of passes ([`Self::passes`]), so a resumed run goes on
/// where it stopped. Clones of a layer share one temperature, as AdapterHub's one module
/// does in training and evaluation.
#[derive(Debug, Clone, Default)]
pub struct FusionTemperature(Option<Arc<Mutex<Falling>>>);

#[derive(Debug, Clone, Copy)]
struct Falling {
    t: f64,
    passes: u64,
}

impl FusionTemperature {
    /// AdapterHub's `T` at the start.
    pub const START: f64 = 50.0;
    /// The fall per forward pass (AdapterHub's `T / 1000`).
    pub const STEP: f64 = Self::START / 1000.0;
    /// Passes after which the temperature has reached 1 for good.
    pub const FLOOR_PASSES: u64 = 1000;

    /// A falling temperature when `on`, else none (AdapterHub's constant `T = 1`).
    pub fn new(on: bool) -> Self {
        Self(on.then(|| {
            Arc::new(Mutex::new(Falling {
                t: Self::START,
                passes: 0,
            }))
        }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Falling) -> R) -> Option<R> {
        let mut state = self.0.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut state))
    }

    /// The temperature of this forward pass, lowering it for the next; `None` when off.
    pub fn take(&self) -> Option<f64> {
        self.with(|s| {
            let now = s.t;
            // AdapterHub's `T = max(T - T0/1000, 1)`, in f64 as Python computes it.
            s.t = (now - Self::STEP).max(1.0);
            s.passes += 1;
            now
        })
    }

    /// The temperature the next forward pass will use; `None` when off.
    pub fn current(&self) -> Option<f64> {
        self.with(|s| s.t)
    }

    /// Forward passes taken so far (at most [`Self::FLOOR_PASSES`] are counted; `None` when
    /// off).
    pub fn passes(&self) -> Option<u64> {
        self.with(|s| s.passes.min(Self::FLOOR_PASSES))
    }

    /// Restart from 50 and take `passes` passes (a resumed run).
    pub fn set_passes(&self, passes: u64) {
        self.with(|s| {
            *s = Falling {
                t: Self::START,
                passes: 0,
            }
        });
        for _ in 0..passes.min(Self::FLOOR_PASSES) {
            self.take();
        }
    }
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
    #[module(skip)]
    pub temperature: FusionTemperature,
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
            temperature: FusionTemperature::new(wiring.temperature),
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
        let mut ctx = self.attend(query, ups);
        if !w.residual_before {
            ctx = ctx + residual;
        }
        last.post_forward(ctx, h, inp, norm).cast(dtype)
    }

    /// The fused context from the query's input `query` `[batch, seq, hidden]` and the
    /// adapters' outputs `ups` `[batch, seq, adapters, hidden]`: AdapterHub's `BertFusion`
    /// between its projections' inputs and the residual.
    fn attend(&self, query: Tensor<3>, ups: Tensor<4>) -> Tensor<3> {
        let q = match &self.query {
            Some(l) => l.forward(query),
            None => query,
        };
        let training = self
            .query
            .as_ref()
            .or(self.key.as_ref())
            .or(self.value.as_ref())
            .is_some_and(|l| l.weight.is_require_grad());
        let drops = training && self.dropout > 0.0;
        // The key and value projections are linear, so they need not run on every adapter's
        // output. A score is q·(u·W_k + b_k) = (q·W_kᵀ)·u + q·b_k, and the last term is the
        // same for every adapter, which the softmax over the adapters does not see: one product
        // over the tokens instead of one over tokens × adapters (not with dropout on the scores,
        // which scales that term with the rest). The values' Σ p·(u·W_v) is (Σ p·u)·W_v: mix,
        // then one product, wherever AdapterHub applies W_v (`value_before_softmax`). The
        // outputs are AdapterHub's up to rounding; the key's bias gets no gradient (its true
        // one is zero) where the scores skip it.
        let (q, k) = match &self.key {
            Some(l) if drops => (q, l.forward(ups.clone())),
            Some(l) => (
                peft_core::matmul::linear(q, l.weight.val().transpose(), None),
                ups.clone(),
            ),
            None => (q, ups.clone()),
        };
        let temperature = self.temperature.take();
        let ctx = fusion_attention(q, k, ups, temperature, self.dropout, training);
        match &self.value {
            Some(l) => l.forward(ctx),
            None => ctx,
        }
    }

    /// AdapterHub's fusion regularisation: `0.01 · ||I − V||²` (0 without a value matrix).
    pub fn regularization(&self) -> Option<Tensor<1>> {
        let v = self.value.as_ref()?.weight.val();
        let [n, _] = v.dims();
        let eye = Tensor::<2>::eye(n, &v.device()).cast(v.dtype());
        Some((eye - v).powi_scalar(2).sum().mul_scalar(0.01))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random;
    use burn::tensor::Tolerance;

    /// The layer's context and every gradient equal AdapterHub's order (the key and value
    /// projections on each adapter's output, then the attention), with a key bias that is not
    /// zero, with and without the falling temperature; the key bias's true gradient is zero,
    /// which is why the layer may leave it out.
    #[test]
    fn projecting_once_equals_adapterhubs_order() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let (b, s, n, h) = (2, 5, 3, 24);
        for temperature in [false, true] {
            let wiring = FusionWiring {
                query: true,
                key: true,
                value: true,
                query_before_ln: false,
                residual_before: false,
                value_before_softmax: true,
                temperature,
            };
            let names = vec!["a".into(), "b".into(), "c".into()];
            let mut layer = FusionLayer::new(h, wiring, false, names, 0.0, &device);
            for d in [layer.query.as_mut().unwrap(), layer.key.as_mut().unwrap()] {
                d.bias = Some(trainable(random([h], &device)));
            }
            let (query, ups) = (random([b, s, h], &device), random([b, s, n, h], &device));
            let weights = random([b, s, h], &device);
            let (wq, bq) = {
                let d = layer.query.as_ref().unwrap();
                (d.weight.val(), d.bias.as_ref().unwrap().val())
            };
            let (wk, bk) = {
                let d = layer.key.as_ref().unwrap();
                (d.weight.val(), d.bias.as_ref().unwrap().val())
            };
            let wv = layer.value.as_ref().unwrap().weight.val();
            let run = |f: &dyn Fn(Tensor<3>, Tensor<4>) -> Tensor<3>| {
                let (x, u) = (query.clone().require_grad(), ups.clone().require_grad());
                let ctx = f(x.clone(), u.clone());
                let g = (ctx.clone() * weights.clone()).sum().backward();
                let grads: Vec<_> = [
                    x.grad(&g).unwrap().into_data(),
                    u.grad(&g).unwrap().into_data(),
                ]
                .into_iter()
                .chain([&wq, &wk, &wv].map(|p| p.grad(&g).unwrap().into_data()))
                .chain([bq.grad(&g).unwrap().into_data()])
                .collect();
                (ctx.into_data(), grads, bk.grad(&g))
            };
            // AdapterHub's order, at the temperature the layer's next pass will use.
            let t = layer.temperature.current();
            let reference = run(&|x, u| {
                let q = layer.query.as_ref().unwrap().forward(x);
                let k = layer.key.as_ref().unwrap().forward(u.clone());
                let v = layer.value.as_ref().unwrap().forward(u);
                fusion_attention(q, k, v, t, 0.0, true)
            });
            let ours = run(&|x, u| layer.attend(x, u));
            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
            ours.0.assert_approx_eq::<f32>(&reference.0, tol);
            for (a, b) in ours.1.iter().zip(&reference.1) {
                a.assert_approx_eq::<f32>(b, tol);
            }
            assert!(ours.2.is_none(), "the scores skip the key's bias");
            let bias_grad = reference.2.expect("AdapterHub's order uses the key's bias");
            assert!(bias_grad.abs().max().into_scalar::<f32>() < 1e-5);
        }
    }
}
