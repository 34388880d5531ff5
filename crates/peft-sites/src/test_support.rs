//! Helpers the crate's unit tests share.

use burn::tensor::{Device, Distribution, Tensor};

/// A tensor of standard normal values.
pub fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}
