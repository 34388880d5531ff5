//! The frozen dense linear every tunable linear slot starts from.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use crate::params::frozen;
use crate::tensors::HostTensor;

/// `y = x W + b` with `W` stored `[in, out]` (burn's layout; Hugging Face stores `[out, in]`).
/// Created frozen: fine-tuning methods add trainable parts beside it.
#[derive(Module, Debug)]
pub struct FrozenLinear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl FrozenLinear {
    /// From a Hugging Face `[out, in]` weight and optional `[out]` bias.
    pub fn from_hf(weight: &HostTensor, bias: Option<&HostTensor>, device: &Device) -> Self {
        Self {
            weight: frozen(weight.transposed().to_tensor(device)),
            bias: bias.map(|b| frozen(b.to_tensor(device))),
        }
    }

    /// From a burn `[in, out]` tensor.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: frozen(weight),
            bias: bias.map(frozen),
        }
    }

    pub fn d_input(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    pub fn d_output(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::matmul::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }

    /// The weight in Hugging Face layout `[out, in]`.
    pub fn weight_hf(&self) -> HostTensor {
        HostTensor::from_tensor(self.weight.val()).transposed()
    }
}
