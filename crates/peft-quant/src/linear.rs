//! Frozen linear layers with a 4-bit weight, and the base every tunable linear slot wraps:
//! dense or 4-bit.

use std::sync::Arc;

use burn::backend::{Dispatch, DispatchDevice};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use peft_core::linear::FrozenLinear;
use peft_core::params::{frozen, trainable};
use peft_core::tensors::HostTensor;
use peft_core::{PeftError, Result};

use crate::blockwise::Quantized4bit;
use crate::codebook::QuantType;
use crate::ops::{PackedWeight, Quant4Ops};

/// How to quantize a base weight (bitsandbytes' `BitsAndBytesConfig` 4-bit fields).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub qtype: QuantType,
    /// Values per absmax block (bitsandbytes default 64).
    pub blocksize: usize,
    /// Quantize the absmax values too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl QuantSpec {
    /// Quantize a weight with this setting.
    pub fn quantize(&self, w: &HostTensor) -> Result<Quantized4bit> {
        Quantized4bit::quantize(
            &w.data,
            &w.shape,
            self.qtype,
            self.blocksize,
            self.double_quant,
        )
    }
}

impl Default for QuantSpec {
    /// NF4, blocks of 64, double quantization: the QLoRA paper's setting.
    fn default() -> Self {
        Self {
            qtype: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// `y = x Wᵀ + b` with a frozen 4-bit `W [out, in]` (Hugging Face layout, as bitsandbytes
/// stores it). The gradient reaches the input, never the weight.
#[derive(Module, Debug)]
pub struct Linear4bit {
    #[module(skip)]
    pub weight: PackedWeight,
    pub bias: Option<Param<Tensor<1>>>,
    /// Where the layer computes (the packed weight itself stays in host memory for now).
    #[module(skip)]
    pub device: Device,
}

impl Linear4bit {
    /// A 4-bit weight `[out, in]` and an optional bias, computing on `device`.
    pub fn new(
        weight: Quantized4bit,
        bias: Option<Param<Tensor<1>>>,
        device: Device,
    ) -> Result<Self> {
        if weight.shape.len() != 2 {
            return Err(PeftError::Other(format!(
                "a 4-bit linear weight must be 2-D [out, in], got shape {:?}",
                weight.shape
            )));
        }
        Ok(Self {
            weight: PackedWeight(Arc::new(weight)),
            bias,
            device,
        })
    }

    /// Quantize a dense layer; its bias is kept as it is.
    pub fn quantize(dense: &FrozenLinear, spec: QuantSpec) -> Result<Self> {
        Self::new(
            spec.quantize(&dense.weight_hf())?,
            dense.bias.clone(),
            dense.weight.device(),
        )
    }

    pub fn quantized(&self) -> &Quantized4bit {
        &self.weight.0
    }

    pub fn d_input(&self) -> usize {
        self.weight.0.shape[1]
    }

    pub fn d_output(&self) -> usize {
        self.weight.0.shape[0]
    }

    pub fn spec(&self) -> QuantSpec {
        let q = self.quantized();
        QuantSpec {
            qtype: q.qtype,
            blocksize: q.blocksize,
            double_quant: matches!(q.absmax, crate::Absmax::Nested { .. }),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = if has_4bit_kernel(&x.device()) {
            let y =
                <Dispatch as Quant4Ops>::matmul_4bit(x.into_dispatch(), self.weight.clone(), false);
            Tensor::from_dispatch(y)
        } else {
            // Devices without a 4-bit kernel: the dequantized weight as a constant.
            let w = self.dense_weight(&x.device());
            burn::tensor::module::linear(x, w, None)
        };
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }

    /// The dequantized weight `[out, in]`.
    pub fn weight_hf(&self) -> HostTensor {
        HostTensor::new(self.weight.0.shape.clone(), self.weight.0.dequantize())
    }

    /// The dequantized weight `[out, in]` on `device`, in its default float dtype. Devices with a
    /// 4-bit kernel dequantize where they are (on a GPU: from the resident packed codes, with no
    /// host round trip); others get the host's dequantization uploaded. A constant (no gradient).
    pub fn dequantized(&self, device: &Device) -> Tensor<2> {
        if has_4bit_kernel(device) {
            let like = Tensor::<1>::zeros([1], device).into_dispatch();
            Tensor::from_dispatch(<Dispatch as Quant4Ops>::dequantize_4bit(
                like,
                self.weight.clone(),
            ))
        } else {
            self.weight_hf().to_tensor(device)
        }
    }

    /// The dequantized weight in burn layout `[in, out]` on `device`.
    pub fn dense_weight(&self, device: &Device) -> Tensor<2> {
        self.dequantized(device).transpose()
    }
}

/// Whether `device` (or the device an autodiff device wraps) has a 4-bit kernel behind
/// [`Quant4Ops`]: the CPU backend always, CubeCL devices (wgpu, cuda) with those features.
/// Elsewhere the layer multiplies by the dequantized weight as a constant.
pub fn has_4bit_kernel(device: &Device) -> bool {
    match device.as_dispatch().clone().inner() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The frozen base of a tunable linear slot: a dense weight, or a 4-bit one (QLoRA).
#[derive(Module, Debug)]
pub enum BaseLinear {
    Dense(FrozenLinear),
    Quant4(Linear4bit),
}

impl BaseLinear {
    /// A dense base from a burn `[in, out]` weight and optional bias, frozen.
    pub fn dense(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::Dense(FrozenLinear::new(weight, bias))
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Quant4(l) => l.forward(x),
        }
    }

    pub fn d_input(&self) -> usize {
        match self {
            Self::Dense(l) => l.d_input(),
            Self::Quant4(l) => l.d_input(),
        }
    }

    pub fn d_output(&self) -> usize {
        match self {
            Self::Dense(l) => l.d_output(),
            Self::Quant4(l) => l.d_output(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quant4(_))
    }

    pub fn bias(&self) -> Option<&Param<Tensor<1>>> {
        match self {
            Self::Dense(l) => l.bias.as_ref(),
            Self::Quant4(l) => l.bias.as_ref(),
        }
    }

    pub fn bias_mut(&mut self) -> &mut Option<Param<Tensor<1>>> {
        match self {
            Self::Dense(l) => &mut l.bias,
            Self::Quant4(l) => &mut l.bias,
        }
    }

    /// Make the bias trainable (or frozen), keeping its value.
    pub fn set_bias_trainable(&mut self, train: bool) {
        if let Some(b) = self.bias_mut().take() {
            let v = b.val().detach();
            *self.bias_mut() = Some(if train { trainable(v) } else { frozen(v) });
        }
    }

    /// The weight in Hugging Face layout `[out, in]` (dequantized for a 4-bit base).
    pub fn weight_hf(&self) -> HostTensor {
        match self {
            Self::Dense(l) => l.weight_hf(),
            Self::Quant4(l) => l.weight_hf(),
        }
    }

    /// The weight in burn layout `[in, out]` on `device` (dequantized for a 4-bit base).
    pub fn dense_weight(&self, device: &Device) -> Tensor<2> {
        match self {
            Self::Dense(l) => l.weight.val().to_device(device),
            Self::Quant4(l) => l.dense_weight(device),
        }
    }

    /// The device the layer computes on.
    pub fn device(&self) -> Device {
        match self {
            Self::Dense(l) => l.weight.device(),
            Self::Quant4(l) => l.device.clone(),
        }
    }

    /// Replace the weight by `[in, out]` `w`: a dense base takes it as it is (trainable or
    /// frozen); a 4-bit base re-quantizes it with its own settings, which rounds (the
    /// requested `train` then needs a dense base, so one is made).
    pub fn set_weight(&mut self, w: Tensor<2>, train: bool) -> Result<()> {
        let w = w.detach();
        match self {
            Self::Dense(l) => l.weight = if train { trainable(w) } else { frozen(w) },
            Self::Quant4(l) if !train => {
                let q = l
                    .spec()
                    .quantize(&HostTensor::from_tensor(w).transposed())?;
                l.weight = PackedWeight(Arc::new(q));
            }
            Self::Quant4(l) => {
                *self = Self::Dense(FrozenLinear {
                    weight: trainable(w),
                    bias: l.bias.take(),
                });
            }
        }
        Ok(())
    }

    /// Quantize a dense base to 4 bits (a 4-bit base stays as it is).
    pub fn quantize(&mut self, spec: QuantSpec) -> Result<()> {
        if let Self::Dense(l) = self {
            *self = Self::Quant4(Linear4bit::quantize(l, spec)?);
        }
        Ok(())
    }

    /// Make a 4-bit base dense, holding the dequantized weight (frozen).
    pub fn dequantize(&mut self) {
        if let Self::Quant4(l) = self {
            let w = l.dense_weight(&l.device);
            *self = Self::Dense(FrozenLinear {
                weight: frozen(w),
                bias: l.bias.take(),
            });
        }
    }
}

impl From<FrozenLinear> for BaseLinear {
    fn from(l: FrozenLinear) -> Self {
        Self::Dense(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    /// On the CPU kernel path the 4-bit layer computes exactly what a dense layer with the
    /// dequantized weight computes, forward and backward; only the input and the bias get
    /// gradients.
    #[test]
    fn matches_the_dequantized_dense_layer_forward_and_backward() {
        let device = Device::flex().autodiff();
        assert!(
            has_4bit_kernel(&device),
            "the test must exercise the 4-bit kernel and its backward"
        );
        device.seed(7);
        let (d_in, d_out) = (96, 40);
        let w = Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 0.2), &device);
        let b = Tensor::<1>::random([d_out], Distribution::Normal(0.0, 0.2), &device);
        let dense = FrozenLinear::new(w, Some(b));
        let mut q = BaseLinear::from(dense);
        q.quantize(QuantSpec::default()).unwrap();
        q.set_bias_trainable(true);
        let reference = FrozenLinear::new(q.dense_weight(&device), q.bias().map(|b| b.val()));

        let x = Tensor::<3>::random([2, 3, d_in], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let x_plain = x.clone().detach();
        let y = q.forward(x.clone());
        let grads = (y.clone() * y.clone()).sum().backward();
        let gx = x.grad(&grads).expect("input gradient");
        let gb = q.bias().unwrap().val().grad(&grads).expect("bias gradient");

        let x2 = x_plain.clone().require_grad();
        let y2 = reference.forward(x2.clone());
        let grads2 = (y2.clone() * y2.clone()).sum().backward();
        let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
        y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
        gx.into_data()
            .assert_approx_eq::<f32>(&x2.grad(&grads2).unwrap().into_data(), tol);
        let gb2 = (y2_sum_grad_bias(&reference, x_plain)).into_data();
        gb.into_data().assert_approx_eq::<f32>(&gb2, tol);
    }

    /// d/db sum(y²) = 2 Σ y over every row.
    fn y2_sum_grad_bias(l: &FrozenLinear, x: Tensor<3>) -> Tensor<1> {
        let y = l.forward(x.inner());
        y.mul_scalar(2.0)
            .sum_dim(0)
            .sum_dim(1)
            .reshape([l.d_output()])
    }

    #[test]
    fn set_weight_requantizes_a_4bit_base_and_densifies_for_training() {
        let device = Device::flex();
        let w = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.2), &device);
        let mut q = BaseLinear::dense(w.clone(), None);
        q.quantize(QuantSpec::default()).unwrap();
        q.set_weight(w.clone(), false).unwrap();
        assert!(q.is_quantized());
        let mut again = BaseLinear::dense(w.clone(), None);
        again.quantize(QuantSpec::default()).unwrap();
        assert_eq!(q.weight_hf().data, again.weight_hf().data);
        q.set_weight(w.clone(), true).unwrap();
        assert!(!q.is_quantized());
        q.dense_weight(&device)
            .into_data()
            .assert_eq(&w.into_data(), true);
    }
}
