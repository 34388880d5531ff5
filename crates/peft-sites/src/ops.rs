//! Small tensor operations the sites (and the models' forward passes over them) share.

use burn::tensor::{Distribution, Tensor};

/// LayerNorm over the last dimension: `(x − mean) / sqrt(var + eps) ⊙ weight (+ bias)`.
pub fn layer_norm(x: Tensor<3>, weight: Tensor<1>, bias: Option<Tensor<1>>, eps: f64) -> Tensor<3> {
    let mean = x.clone().mean_dim(2);
    let centered = x - mean;
    let var = centered.clone().powi_scalar(2).mean_dim(2);
    let y = centered
        .div(var.add_scalar(eps).sqrt())
        .mul(weight.unsqueeze::<3>());
    match bias {
        Some(b) => y + b.unsqueeze::<3>(),
        None => y,
    }
}

/// Inverted dropout with probability `p`, only while `training` (the caller's parameters
/// take gradients); the identity otherwise.
pub fn dropout_while_training<const D: usize>(x: Tensor<D>, p: f64, training: bool) -> Tensor<D> {
    if !training || p <= 0.0 {
        return x;
    }
    let keep = x.random_like(Distribution::Bernoulli(1.0 - p));
    x * keep / (1.0 - p)
}
