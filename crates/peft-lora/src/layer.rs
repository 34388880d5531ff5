//! One linear layer with LoRA adapters on its side path.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::{PeftError, Result};
use peft_quant::BaseLinear;

/// How new adapter weights are drawn (Hugging Face `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform (a = sqrt(5)), B = 0, so the adapter starts as a no-op.
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// `false`: both A and B random (as `nn.Linear` initialises them); for tests.
    Random,
}

/// Adapter weights are f32 whatever the base's type: their updates are small against their
/// values, which f16/bf16 would round away (and AdamW's second moment would underflow).
pub const ADAPTER_DTYPE: DType = DType::F32;

/// One LoRA adapter: `delta(x) = scale · dropout(x) · A · B`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]` (Hugging Face `lora_A.weight` is its transpose `[r, in]`).
    pub a: Param<Tensor<2>>,
    /// `[r, out]` (Hugging Face `lora_B.weight` is its transpose `[out, r]`).
    pub b: Param<Tensor<2>>,
    pub dropout: Dropout,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<2>()[1]
    }

    /// The side path, computed as `(x·A)·B` so the dense `A·B` is never formed. A
    /// half-precision input (an f16/bf16 base) goes through the adapter in f32, the adapter's
    /// type, and comes back in its own type (Hugging Face PEFT does the same).
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = self.dropout.forward(x).cast(ADAPTER_DTYPE);
        burn::tensor::module::linear(
            burn::tensor::module::linear(x, self.a.val(), None),
            self.b.val(),
            None,
        )
        .mul_scalar(self.scale)
        .cast(dtype)
    }

    /// `scale · A·B`, the `[in, out]` update a merge adds to the base weight (f32).
    pub fn delta_weight(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// A frozen linear with named LoRA adapters. Several adapters can be active at once (their
/// deltas add up); merged adapters live in the base weight and are skipped on the side path.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen base: dense, or 4-bit (QLoRA).
    pub base: BaseLinear,
    pub adapters: Vec<LoraAdapter>,
    /// Name of each entry of `adapters`.
    #[module(skip)]
    pub names: Vec<String>,
    /// Names of the adapters used in the forward pass.
    #[module(skip)]
    pub active: Vec<String>,
    /// Names of the adapters folded into `base`.
    #[module(skip)]
    pub merged: Vec<String>,
    /// When set, the forward pass is the base alone (Hugging Face `disable_adapter()`).
    #[module(skip)]
    pub disabled: bool,
}

impl LoraLinear {
    /// Wrap a `[in, out]` weight (frozen) and optional bias.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::from_base(BaseLinear::dense(weight, bias))
    }

    pub fn from_base(base: impl Into<BaseLinear>) -> Self {
        Self {
            base: base.into(),
            adapters: Vec::new(),
            names: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.index(name).map(|i| &self.adapters[i])
    }

    /// Add (or replace) adapter `name` with rank `r`, and make it active.
    pub fn add_adapter(
        &mut self,
        name: &str,
        r: usize,
        alpha: f64,
        rslora: bool,
        dropout: f64,
        init: LoraInit,
    ) {
        assert!(r > 0, "LoRA rank must be positive");
        let device = self.base.device();
        let (d_in, d_out) = (self.base.d_input(), self.base.d_output());
        let a_bound = 1.0 / (d_in as f64).sqrt();
        let f32_on = (&device, ADAPTER_DTYPE);
        let a = match init {
            LoraInit::Gaussian => {
                Tensor::random([d_in, r], Distribution::Normal(0.0, 1.0 / r as f64), f32_on)
            }
            _ => Tensor::random([d_in, r], Distribution::Uniform(-a_bound, a_bound), f32_on),
        };
        let b = match init {
            LoraInit::Random => {
                let b_bound = 1.0 / (r as f64).sqrt();
                Tensor::random([r, d_out], Distribution::Uniform(-b_bound, b_bound), f32_on)
            }
            _ => Tensor::zeros([r, d_out], f32_on),
        };
        let scale = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let adapter = LoraAdapter {
            a: trainable(a),
            b: trainable(b),
            dropout: DropoutConfig::new(dropout).init(),
            scale,
        };
        self.delete_adapter(name).ok();
        self.names.push(name.to_string());
        self.adapters.push(adapter);
        self.active.push(name.to_string());
    }

    /// Replace the weights of adapter `name` with `[in, r]` A and `[r, out]` B.
    pub fn set_weights(&mut self, name: &str, a: Tensor<2>, b: Tensor<2>) -> Result<()> {
        let i = self
            .index(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))?;
        let adapter = &mut self.adapters[i];
        adapter.a = trainable(a.cast(ADAPTER_DTYPE));
        adapter.b = trainable(b.cast(ADAPTER_DTYPE));
        Ok(())
    }

    /// Remove adapter `name` (unmerging it first if it was merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.merged.iter().any(|m| m == name) {
            self.unmerge(name)?;
        }
        let i = self
            .index(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))?;
        self.adapters.remove(i);
        self.names.remove(i);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Use exactly `names` in the forward pass.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.index(n)
                .ok_or_else(|| PeftError::UnknownAdapter(n.to_string()))?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Fold adapter `name` into the base weight. A 4-bit base is dequantized, updated and
    /// quantized again, which rounds: outputs then differ slightly from the unmerged ones.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let i = self
            .index(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))?;
        if self.merged.iter().any(|m| m == name) {
            return Ok(());
        }
        let w = self.base.dense_weight(&self.base.device());
        let delta = self.adapters[i].delta_weight().cast(w.dtype());
        self.base.set_weight(w + delta, false)?;
        self.merged.push(name.to_string());
        Ok(())
    }

    /// Take adapter `name` back out of the base weight.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let i = self
            .index(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))?;
        if !self.merged.iter().any(|m| m == name) {
            return Ok(());
        }
        let w = self.base.dense_weight(&self.base.device());
        let delta = self.adapters[i].delta_weight().cast(w.dtype());
        self.base.set_weight(w - delta, false)?;
        self.merged.retain(|m| m != name);
        Ok(())
    }

    /// `base(x) + Σ_active delta(x)` (merged adapters are already in `base`).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut y = self.base.forward(x.clone());
        if self.disabled {
            // The merged adapters cannot be switched off without unmerging: refuse silently
            // wrong output.
            assert!(
                self.merged.is_empty(),
                "cannot disable adapters while some are merged; unmerge first"
            );
            return y;
        }
        for (name, adapter) in self.names.iter().zip(&self.adapters) {
            if self.active.contains(name) && !self.merged.contains(name) {
                y = y + adapter.delta(x.clone());
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tolerance};

    fn layer(device: &Device) -> LoraLinear {
        device.seed(7);
        let mut l = LoraLinear::new(
            Tensor::random([6, 5], Distribution::Default, device),
            Some(Tensor::random([5], Distribution::Default, device)),
        );
        l.add_adapter("a", 3, 6.0, false, 0.0, LoraInit::Random);
        l
    }

    #[test]
    fn zero_b_starts_as_the_base() {
        let device = Device::flex();
        let mut l = layer(&device);
        l.add_adapter("z", 2, 4.0, false, 0.0, LoraInit::Default);
        l.set_active(&["z"]).unwrap();
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        l.forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&l.base.forward(x).into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn merged_equals_unmerged_and_unmerge_restores_the_base() {
        let device = Device::flex();
        let mut l = layer(&device);
        let base_w = l.base.dense_weight(&l.base.device());
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Default, &device);
        let unmerged = l.forward(x.clone());
        l.merge("a").unwrap();
        let merged = l.forward(x.clone());
        merged
            .into_data()
            .assert_approx_eq::<f32>(&unmerged.into_data(), Tolerance::absolute(1e-5));
        l.unmerge("a").unwrap();
        l.base
            .dense_weight(&device)
            .into_data()
            .assert_approx_eq::<f32>(&base_w.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn adapters_add_up_and_can_be_disabled_or_deleted() {
        let device = Device::flex();
        let mut l = layer(&device);
        l.add_adapter("b", 2, 2.0, true, 0.0, LoraInit::Random);
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let expected = l.base.forward(x.clone())
            + l.adapter("a").unwrap().delta(x.clone())
            + l.adapter("b").unwrap().delta(x.clone());
        l.set_active(&["a", "b"]).unwrap();
        l.forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
        l.disabled = true;
        l.forward(x.clone()).into_data().assert_approx_eq::<f32>(
            &l.base.forward(x.clone()).into_data(),
            Tolerance::absolute(1e-6),
        );
        l.disabled = false;
        l.delete_adapter("a").unwrap();
        assert_eq!(l.names, vec!["b"]);
        assert!(l.set_active(&["a"]).is_err());
    }

    #[test]
    fn init_variants_follow_hugging_face() {
        let device = Device::flex();
        device.seed(3);
        let mut l = LoraLinear::new(Tensor::zeros([400, 300], &device), None);
        l.add_adapter("g", 4, 8.0, false, 0.0, LoraInit::Gaussian);
        l.add_adapter("k", 4, 8.0, false, 0.0, LoraInit::Default);
        let g = l.adapter("g").unwrap();
        let std: f32 = g.a.val().powi_scalar(2).mean().sqrt().into_scalar();
        assert!(
            (std - 0.25).abs() < 0.01,
            "gaussian A std {std}, expected 1/r"
        );
        let k = l.adapter("k").unwrap();
        let max: f32 = k.a.val().abs().max().into_scalar();
        assert!(
            max <= 1.0 / 20.0 && max > 0.045,
            "kaiming-uniform bound 1/sqrt(in): {max}"
        );
        for a in [g, k] {
            assert_eq!(
                a.b.val().abs().sum().into_scalar::<f32>(),
                0.0,
                "B starts at zero"
            );
        }
    }

    #[test]
    fn rslora_scale() {
        let device = Device::flex();
        let mut l = layer(&device);
        l.add_adapter("r", 4, 8.0, true, 0.0, LoraInit::Default);
        assert_eq!(l.adapter("r").unwrap().scale, 4.0);
        assert_eq!(l.adapter("a").unwrap().scale, 2.0);
    }

    #[test]
    fn only_the_adapter_gets_gradients() {
        let device = Device::flex().autodiff();
        let l = layer(&device);
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let grads = l.forward(x).sum().backward();
        let BaseLinear::Dense(base) = &l.base else {
            unreachable!()
        };
        assert!(base.weight.val().grad(&grads).is_none());
        let a = l.adapter("a").unwrap();
        assert!(a.a.val().grad(&grads).is_some() && a.b.val().grad(&grads).is_some());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use burn::tensor::{Device, TensorData};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// For any shape, rank, alpha and rsLoRA flag: merged output == side-path output, and
        /// unmerging gives the base weight back.
        #[test]
        fn merge_is_exact(d_in in 1usize..24, d_out in 1usize..24, r in 1usize..8, alpha in 0.5f64..64.0, rs in any::<bool>(), seed in any::<u64>()) {
            let device = Device::flex();
            device.seed(seed);
            let w = Tensor::<2>::random([d_in, d_out], Distribution::Default, &device);
            let mut l = LoraLinear::new(w.clone(), None);
            l.add_adapter("x", r, alpha, rs, 0.0, LoraInit::Random);
            let x = Tensor::<2>::random([3, d_in], Distribution::Default, &device);
            let side: TensorData = l.forward(x.clone()).into_data();
            l.merge("x").unwrap();
            let merged = l.forward(x).into_data();
            merged.assert_approx_eq::<f32>(&side, burn::tensor::Tolerance::absolute(1e-4));
            l.unmerge("x").unwrap();
            l.base.dense_weight(&l.base.device()).into_data().assert_approx_eq::<f32>(&w.into_data(), burn::tensor::Tolerance::absolute(1e-5));
        }
    }
}
