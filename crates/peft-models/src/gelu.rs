//! GELU, `x · Φ(x)` with the exact normal CDF (BERT's `hidden_act = "gelu"`), as one operation.
//!
//! burn's `gelu` calls libm's scalar `erf` per value and, composed, autodiff keeps several
//! intermediates: on MiniLM's sentiment training step `erf` alone was 15% of the samples. On the
//! CPU this operation computes `Φ(x) = erfc(−x/√2)/2` with a vectorizable erfc (a rational in
//! `t = 1/(1 + z/2)` inside an exponential, Numerical Recipes' `erfcc`, fractional error below
//! 1.2e-7 everywhere) and the vectorized exponential of [`peft_core::cpu`], reads the input once
//! each way, and keeps only the input for the backward pass. Other devices use burn's `gelu`.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use peft_core::cpu::{backward_single, exp, f32_values, flex_tensor, par_fill, write_each};
use peft_core::device::is_cpu;
use peft_core::simd_dispatch;
use rayon::prelude::*;

/// `x · Φ(x)`, element by element, with the exact (erf) normal CDF. Differentiable.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if is_cpu(&x.device()) {
        Tensor::from_dispatch(<Dispatch as GeluOps>::fused_gelu(x.into_dispatch()))
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// The operation and its gradient as backend operations.
#[backend_extension(Flex, Autodiff)]
pub trait GeluOps: Backend {
    /// `x · Φ(x)`.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient in `x` of `Σ grad · gelu(x)`: `grad · (Φ(x) + x · φ(x))`.
    fn fused_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `Φ(x) = erfc(−x/√2)/2`, with `erfc(z) = t·e^(−z² + P(t))` for `z ≥ 0` and `2 − erfc(−z)`
/// below: one exponential.
#[inline(always)]
fn cdf(x: f32) -> f32 {
    let z = x * FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc_a = t * exp(p - a * a);
    // erfc(−z)/2: for z ≥ 0 that is 1 − erfc(z)/2.
    if z >= 0.0 {
        1.0 - 0.5 * erfc_a
    } else {
        0.5 * erfc_a
    }
}

#[inline(always)]
fn forward_body<'o>(x: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] {
    write_each(out, x.iter().map(|&v| v * cdf(v)))
}

/// `gelu'(x) = Φ(x) + x·φ(x)`, `φ(x) = e^(−x²/2)/√(2π)`.
#[inline(always)]
fn backward_body<'o>(x: &[f32], grad: &[f32], dx: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] {
    let values = x.iter().zip(grad);
    write_each(
        dx,
        values.map(|(&v, &g)| g * (cdf(v) + v * FRAC_1_SQRT_2PI * exp(-0.5 * v * v))),
    )
}

simd_dispatch! {
    fn forward_chunk<'o>(x: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => forward_body
}

simd_dispatch! {
    fn backward_chunk<'o>(x: &[f32], grad: &[f32], dx: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => backward_body
}

impl GeluOps for Flex {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let v = f32_values(&x);
        let out = par_fill(v.len(), CHUNK, v.par_chunks(CHUNK), |o, v| {
            forward_chunk(v, o)
        });
        flex_tensor(out, shape, dtype)
    }

    fn fused_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let (v, g) = (f32_values(&x), f32_values(&grad));
        let inputs = v.par_chunks(CHUNK).zip(g.par_chunks(CHUNK));
        let dx = par_fill(v.len(), CHUNK, inputs, |d, (v, g)| backward_chunk(v, g, d));
        flex_tensor(dx, shape, dtype)
    }
}

/// The backward pass: only the input is kept from the forward pass.
#[derive(Debug)]
struct GeluBackward;

impl<B: Backend + GeluOps> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        backward_single::<B, _>(ops, grads, |x, grad| B::fused_gelu_backward(x, grad));
    }
}

impl<B: Backend + GeluOps, C: CheckpointStrategy> GeluOps for Autodiff<B, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let parents = [x.node()];
        let x = x.into_primitive();
        match GeluBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::fused_gelu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_gelu(x)),
        }
    }

    fn fused_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::fused_gelu_backward(
            x.into_primitive(),
            grad.into_primitive(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData, Tolerance};

    /// Against `x·Φ(x)` and its derivative in f64 over [−12, 12]: within 2e-7 of the largest
    /// of 1 and the value (absolute near zero, relative beyond); below −5, where the values are
    /// under 1e-5, relatively within 2e-5 (`z²` rounded in f32 moves `e^(−z²)` by that much at
    /// z = 8.5, as in any f32 erfc), or 1e-36 absolutely (the exponential stops at e^-87).
    #[test]
    fn matches_the_exact_gelu_in_f64() {
        let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let mut x: Vec<f32> = (0..=48_000).map(|i| -12.0 + i as f32 / 2000.0).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0]);
        let uninit = || vec![MaybeUninit::uninit(); x.len()];
        let (mut y, mut d) = (uninit(), uninit());
        let y = forward_chunk(&x, &mut y);
        let d = backward_chunk(&x, &vec![1.0; x.len()], &mut d);
        for ((&v, &got), &dgot) in x.iter().zip(&*y).zip(&*d) {
            let v64 = v as f64;
            let want = v64 * phi(v64);
            let dwant =
                phi(v64) + v64 * (-v64 * v64 / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let tol = |w: f64| {
                if v64 < -5.0 {
                    2e-5 * w.abs() + 1e-36
                } else {
                    2e-7 * w.abs().max(1.0)
                }
            };
            assert!(
                (got as f64 - want).abs() <= tol(want),
                "gelu({v}) = {got}, want {want}"
            );
            assert!(
                (dgot as f64 - dwant).abs() <= tol(dwant),
                "gelu'({v}) = {dgot}, want {dwant}"
            );
        }
    }

    /// The fused operation equals burn's `gelu`, value and gradient, on the CPU autodiff
    /// device; sizes cover a partial chunk and the vector tails.
    #[test]
    fn matches_burn_gelu_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(3);
        for shape in [[3, 7], [5, CHUNK / 2 + 9]] {
            let x =
                Tensor::<2>::random(shape, Distribution::Normal(0.0, 3.0), &device).require_grad();
            let w = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let ours = gelu(x.clone());
            let theirs = burn::tensor::activation::gelu(x.clone());
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), Tolerance::absolute(1e-6));
            let g_ours = (ours * w.clone()).sum().backward();
            let g_theirs = (theirs * w).sum().backward();
            let (a, b): (TensorData, TensorData) = (
                x.grad(&g_ours).unwrap().into_data(),
                x.grad(&g_theirs).unwrap().into_data(),
            );
            a.assert_approx_eq::<f32>(&b, Tolerance::absolute(1e-5));
        }
    }
}
