//! LoRA on one linear site: Hugging Face's initialisation of a new adapter.

use burn::nn::DropoutConfig;
use burn::tensor::{Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::{PeftError, Result};
use peft_sites::{ADAPTER_DTYPE, LinearPart, LoraAdapter, Magnitude, TunedLinear};

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

/// An initialisation of A and B from the base weight `W` that also leaves the residual in the
/// base, `W ← W − s·B·A`, so the model starts unchanged (PEFT's `pissa_init`, `olora_init`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseInit {
    /// PiSSA: the leading `r` singular triplets, `A = √(S/s)·Vᵀ`, `B = U·√(S/s)`; with `niter`,
    /// from a randomized SVD with that many power iterations (`pissa_niter_K`).
    Pissa { niter: Option<usize> },
    /// OLoRA: the thin QR `W = Q·R`, `A = R[:r]`, `B = Q[:, :r]`.
    Olora,
    /// LoftQ (Li et al., 2023), as PEFT's `loftq_init`: `iter` rounds of quantizing the
    /// residual to NF4 (blocks of 64, no double quantization, bitsandbytes' `Params4bit`
    /// defaults) and taking the rank-`r` SVD of what the quantization lost,
    /// `A = √S·Vᵀ`, `B = U·√S` (no division by the LoRA scale, as in PEFT); the base becomes
    /// the dequantized NF4 weight. `bits`: only 4 is supported.
    Loftq { bits: u32, iter: usize },
}

/// LoftQ's factors and base of a `[out, in]` weight (Hugging Face layout): A `[r, in]`,
/// B `[out, r]` and the dequantized NF4 base `[out, in]`.
fn loftq(
    w: &[f32],
    out: usize,
    d_in: usize,
    r: usize,
    iter: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    use peft_quant::{QuantType, dequantize_4bit, quantize_4bit};
    const BLOCK: usize = 64;
    let mut residual = w.to_vec();
    let mut result = None;
    for i in 0..iter {
        let (packed, absmax) = quantize_4bit(&residual, BLOCK, QuantType::Nf4)?;
        let deq = dequantize_4bit(&packed, &absmax, w.len(), BLOCK, QuantType::Nf4)?;
        let lost: Vec<f32> = w.iter().zip(&deq).map(|(x, q)| x - q).collect();
        let lr = crate::linalg::svd(&lost, out, d_in, r)?;
        let root: Vec<f64> = lr.s.iter().map(|s| s.sqrt()).collect();
        let a: Vec<f32> = (0..r * d_in)
            .map(|x| (root[x / d_in] * lr.vt[x]) as f32)
            .collect();
        let b: Vec<f32> = (0..out * r)
            .map(|x| (lr.u[x] * root[x % r]) as f32)
            .collect();
        if i + 1 < iter {
            // The next round quantizes what the low-rank part does not hold.
            let ba = crate::linalg::product(&b, &a, out, r, d_in);
            for ((x, w), ba) in residual.iter_mut().zip(w).zip(ba) {
                *x = w - ba as f32;
            }
        }
        result = Some((a, b, deq));
    }
    result.ok_or_else(|| PeftError::Config("loftq_iter must be at least 1".into()))
}

/// A linear site used for LoRA: the [`TunedLinear`] of `peft-sites` (a frozen base with named
/// parts), with the LoRA methods of [`LoraLayer`].
pub type LoraLinear = TunedLinear;

/// LoRA on a linear site: add an adapter with Hugging Face's initialisation, set its weights.
pub trait LoraLayer {
    /// Add (or replace) LoRA adapter `name` with rank `r`, and make it active.
    fn add_adapter(
        &mut self,
        name: &str,
        r: usize,
        alpha: f64,
        rslora: bool,
        dropout: f64,
        init: LoraInit,
    );

    /// Replace the weights of LoRA adapter `name` with `[in, r]` A and `[r, out]` B.
    fn set_weights(&mut self, name: &str, a: Tensor<2>, b: Tensor<2>) -> Result<()>;

    /// Make LoRA adapter `name` a DoRA one: its magnitude starts at `‖W + s·A·B‖` per output
    /// row, so the layer's output is unchanged (PEFT's `dora_init`).
    fn enable_dora(&mut self, name: &str) -> Result<()>;

    /// Replace DoRA adapter `name`'s magnitude (`[out]`).
    fn set_magnitude(&mut self, name: &str, m: Tensor<1>) -> Result<()>;

    /// Initialise LoRA adapter `name` from the base weight and leave the residual in the base
    /// (PiSSA, OLoRA). A 4-bit base is dequantized and the residual quantized again (OLoRA, as
    /// PEFT does); PiSSA needs a dense base, as in PEFT.
    fn init_from_base(&mut self, name: &str, init: BaseInit) -> Result<()>;
}

/// New `[in, r]` A and `[r, out]` B as Hugging Face draws them for `init` (f32).
pub fn new_factors(
    d_in: usize,
    d_out: usize,
    r: usize,
    init: LoraInit,
    device: &burn::tensor::Device,
) -> (Tensor<2>, Tensor<2>) {
    let a_bound = 1.0 / (d_in as f64).sqrt();
    let f32_on = (device, ADAPTER_DTYPE);
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
    (a, b)
}

/// The LoRA adapter `name` of `layer`, mutable, or an error naming what is there instead.
fn lora_mut<'a>(layer: &'a mut TunedLinear, name: &str) -> Result<&'a mut LoraAdapter> {
    match layer.part_mut(name) {
        Some(LinearPart::Lora(adapter)) => Ok(adapter),
        Some(other) => Err(PeftError::Other(format!(
            "adapter `{name}` is a {} part, not LoRA",
            other.kind()
        ))),
        None => Err(PeftError::UnknownAdapter(name.into())),
    }
}

/// Set adapter `name`'s A `[r, in]` and B `[out, r]` and the base weight `[out, in]` (all in
/// Hugging Face layout) after an initialisation from the base.
fn set_from_base(
    layer: &mut TunedLinear,
    name: &str,
    a: Vec<f32>,
    b: Vec<f32>,
    base: Vec<f32>,
    [out, d_in, r]: [usize; 3],
) -> Result<()> {
    let device = layer.base.device();
    let host =
        |v: Vec<f32>, shape: [usize; 2]| peft_core::tensors::HostTensor::new(shape.to_vec(), v);
    let a_t = host(a, [r, d_in]).transposed().to_tensor::<2>(&device);
    let b_t = host(b, [out, r]).transposed().to_tensor::<2>(&device);
    layer.set_weights(name, a_t, b_t)?;
    let dtype = layer.base.dense_weight(&device).dtype();
    let base = host(base, [out, d_in])
        .transposed()
        .to_tensor::<2>(&device)
        .cast(dtype);
    layer.base.set_weight(base, false)
}

impl LoraLayer for TunedLinear {
    fn add_adapter(
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
        let (a, b) = new_factors(d_in, d_out, r, init, &device);
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
            magnitude: None,
            singular: None,
        };
        self.add_part(name, LinearPart::Lora(adapter));
    }

    fn set_weights(&mut self, name: &str, a: Tensor<2>, b: Tensor<2>) -> Result<()> {
        let adapter = lora_mut(self, name)?;
        adapter.a = trainable(a.cast(ADAPTER_DTYPE));
        adapter.b = trainable(b.cast(ADAPTER_DTYPE));
        Ok(())
    }

    fn enable_dora(&mut self, name: &str) -> Result<()> {
        let norm = {
            let adapter = lora_mut(self, name)?;
            adapter.magnitude = None;
            peft_sites::dora::weight_norm(&self.base, self.lora(name).expect("LoRA"))
        };
        lora_mut(self, name)?.magnitude = Some(Magnitude::new(norm));
        Ok(())
    }

    fn init_from_base(&mut self, name: &str, init: BaseInit) -> Result<()> {
        let (r, scale) = {
            let a = lora_mut(self, name)?;
            (a.rank(), a.scale)
        };
        if matches!(init, BaseInit::Pissa { .. }) && self.base.is_quantized() {
            return Err(PeftError::Config(
                "PiSSA needs a float base: initialise it on the dense model, then quantize the residual (as PEFT requires)".into(),
            ));
        }
        if let BaseInit::Loftq { bits, iter } = init {
            if bits != 4 {
                return Err(PeftError::Config(format!(
                    "loftq_bits {bits}: only 4-bit (NF4) LoftQ is supported"
                )));
            }
            if iter == 0 {
                return Err(PeftError::Config(
                    "loftq_iter 0: LoftQ needs at least one round".into(),
                ));
            }
            if self.base.is_quantized() {
                return Err(PeftError::Config(
                    "LoftQ needs the full-precision weight: initialise it on the dense model (it then holds the NF4 values), then quantize".into(),
                ));
            }
        }
        let w = self.base.weight_hf();
        let (out, d_in) = (w.shape[0], w.shape[1]);
        if r > out.min(d_in) {
            return Err(PeftError::Config(format!(
                "rank {r} is above the rank a {out}x{d_in} weight can have"
            )));
        }
        // A `[r, in]` and B `[out, r]` in Hugging Face layout.
        if let BaseInit::Loftq { iter, .. } = init {
            let (a, b, base) = loftq(&w.data, out, d_in, r, iter)?;
            return set_from_base(self, name, a, b, base, [out, d_in, r]);
        }
        let (a, b): (Vec<f32>, Vec<f32>) = match init {
            BaseInit::Pissa { niter } => {
                let lr = match niter {
                    None => crate::linalg::svd(&w.data, out, d_in, r)?,
                    Some(n) => crate::linalg::randomized_svd(&w.data, out, d_in, r, n, 0)?,
                };
                let root: Vec<f64> = lr.s.iter().map(|s| (s / scale).sqrt()).collect();
                let a = (0..r * d_in)
                    .map(|x| (root[x / d_in] * lr.vt[x]) as f32)
                    .collect();
                let b = (0..out * r)
                    .map(|x| (lr.u[x] * root[x % r]) as f32)
                    .collect();
                (a, b)
            }
            BaseInit::Olora => {
                let (q, rr, k) = crate::linalg::qr(&w.data, out, d_in);
                let a = rr[..r * d_in].iter().map(|&x| x as f32).collect();
                let b = (0..out * r)
                    .map(|x| q[(x / r) * k + x % r] as f32)
                    .collect();
                (a, b)
            }
            BaseInit::Loftq { .. } => unreachable!("handled above"),
        };
        // The residual W − s·B·A (Hugging Face layout).
        let ba = crate::linalg::product(&b, &a, out, r, d_in);
        let residual: Vec<f32> = w
            .data
            .iter()
            .zip(ba)
            .map(|(w, ba)| (*w as f64 - scale * ba) as f32)
            .collect();
        set_from_base(self, name, a, b, residual, [out, d_in, r])
    }

    fn set_magnitude(&mut self, name: &str, m: Tensor<1>) -> Result<()> {
        let adapter = lora_mut(self, name)?;
        match &mut adapter.magnitude {
            Some(magnitude) => {
                *magnitude = Magnitude::new(m);
                Ok(())
            }
            None => Err(PeftError::Other(format!(
                "adapter `{name}` is a LoRA adapter without DoRA's magnitude"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tolerance};
    use peft_quant::BaseLinear;

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
            + l.lora("a").unwrap().delta(x.clone())
            + l.lora("b").unwrap().delta(x.clone());
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
        let g = l.lora("g").unwrap();
        let std: f32 = g.a.val().powi_scalar(2).mean().sqrt().into_scalar();
        // 1600 draws: the estimate's own spread is 0.25/√3200 ≈ 0.0044, and other tests draw
        // from the same generator at the same time, so allow 4.5 of it (0.02); kaiming's std
        // here would be 0.029 and N(0, 1)'s 1.
        assert!(
            (std - 0.25).abs() < 0.02,
            "gaussian A std {std}, expected 1/r"
        );
        let k = l.lora("k").unwrap();
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
    fn dora_starts_as_the_layer_and_several_adapters_follow_peft() {
        let device = Device::flex();
        let mut l = layer(&device);
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let before = l.forward(x.clone());
        l.enable_dora("a").unwrap();
        l.forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&before.into_data(), Tolerance::absolute(1e-5));
        // A second DoRA adapter rescales the running output minus the bias, the first
        // adapter's delta included (PEFT's `base_result` is the result so far).
        l.add_adapter("b", 2, 2.0, false, 0.0, LoraInit::Random);
        l.enable_dora("b").unwrap();
        let m = Tensor::<1>::random([5], Distribution::Uniform(0.5, 1.5), &device);
        l.set_magnitude("b", m.clone()).unwrap();
        l.set_active(&["a", "b"]).unwrap();
        let bias = l.base.bias().unwrap().val().unsqueeze::<2>();
        let after_a = l.base.forward(x.clone()) + l.lora("a").unwrap().delta(x.clone());
        let b = l.lora("b").unwrap();
        let f = (m / peft_sites::dora::weight_norm(&l.base, b)).unsqueeze::<2>();
        let expected =
            after_a.clone() + (f.clone() - 1.0) * (after_a - bias) + f * b.delta(x.clone());
        l.forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
        assert!(
            l.set_magnitude("nope", Tensor::zeros([5], &device))
                .is_err()
        );
    }

    #[test]
    fn rslora_scale() {
        let device = Device::flex();
        let mut l = layer(&device);
        l.add_adapter("r", 4, 8.0, true, 0.0, LoraInit::Default);
        assert_eq!(l.lora("r").unwrap().scale, 4.0);
        assert_eq!(l.lora("a").unwrap().scale, 2.0);
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
        let a = l.lora("a").unwrap();
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

        /// DoRA, for any shape, bias and magnitude: merged == side path
        /// (`(m/‖W'‖)·W'x + b`), and unmerging gives the base weight back.
        #[test]
        fn dora_merge_is_exact(d_in in 1usize..24, d_out in 1usize..24, r in 1usize..8, alpha in 0.5f64..16.0, seed in any::<u64>()) {
            let device = Device::flex();
            device.seed(seed);
            let w = Tensor::<2>::random([d_in, d_out], Distribution::Default, &device);
            let bias = Tensor::<1>::random([d_out], Distribution::Default, &device);
            let mut l = LoraLinear::new(w.clone(), Some(bias.clone()));
            l.add_adapter("x", r, alpha, false, 0.0, LoraInit::Random);
            l.enable_dora("x").unwrap();
            let m = Tensor::<1>::random([d_out], Distribution::Uniform(0.5, 2.0), &device);
            l.set_magnitude("x", m.clone()).unwrap();
            let x = Tensor::<2>::random([3, d_in], Distribution::Default, &device);
            let lora = l.lora("x").unwrap();
            let w2 = w.clone() + lora.delta_weight();
            let norm = w2.clone().powi_scalar(2).sum_dim(0).sqrt();
            let expected = x.clone().matmul(w2 * (m.unsqueeze::<2>() / norm)) + bias.unsqueeze::<2>();
            let side: TensorData = l.forward(x.clone()).into_data();
            side.assert_approx_eq::<f32>(&expected.into_data(), burn::tensor::Tolerance::absolute(1e-4));
            l.merge("x").unwrap();
            l.forward(x).into_data().assert_approx_eq::<f32>(&side, burn::tensor::Tolerance::absolute(1e-4));
            l.unmerge("x").unwrap();
            l.base.dense_weight(&l.base.device()).into_data().assert_approx_eq::<f32>(&w.into_data(), burn::tensor::Tolerance::absolute(1e-4));
        }
    }
}
