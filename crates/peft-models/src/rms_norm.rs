//! Root-mean-square normalization with a learned scale, `x / sqrt(mean(x²) + eps) · weight`
//! over the last axis, as one operation.
//!
//! Composed from burn ops it is a square, a mean, an add, a square root, a division and a
//! product forward (each a pass and a new tensor), more backward, and autodiff keeps several of
//! the intermediates. On the CPU this operation reads each row once forward and once backward
//! (both gradients in the same pass) and keeps only its input. Other devices use the burn
//! composition.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor};
use peft_core::device::is_cpu;
use rayon::prelude::*;

use peft_core::cpu::{
    backward_pair, dot, f32_values, flex_tensor, par_fill, sum_partials, write_each, write_rows,
};
use peft_core::simd_dispatch;

/// `x / sqrt(mean(x²) + eps) · weight` over the last axis of `x`, normalized in f32 whatever
/// the type of `x` (as transformers does) and returned in that type. Differentiable in `x` and
/// `weight`.
///
/// # Panics
/// When `weight` does not have one value per element of the last axis.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let n = x.dims()[D - 1];
    assert_eq!(
        weight.dims(),
        [n],
        "rms_norm: {} weights for rows of {n}",
        weight.dims()[0]
    );
    if is_cpu(&x.device()) {
        Tensor::from_dispatch(<Dispatch as RmsNormOps>::rms_norm(
            x.into_dispatch(),
            weight.into_dispatch(),
            eps as f32,
        ))
    } else {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(D - 1)
            .add_scalar(eps)
            .sqrt();
        let mut dims = [1; D];
        dims[D - 1] = n;
        x.div(rms).cast(dtype).mul(weight.reshape(dims))
    }
}

/// The operation and its gradients as backend operations.
#[backend_extension(Flex, Autodiff)]
pub trait RmsNormOps: Backend {
    /// `x / sqrt(mean(x²) + eps) · weight` over the last axis.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;

    /// The gradients in `x` and `weight` of `Σ grad · rms_norm(x, weight)`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// `1 / sqrt(mean(row²) + eps)`.
#[inline(always)]
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt()
}

/// Rows of `x` normalized and scaled into `out`.
#[inline(always)]
fn forward_body<'o>(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    let n = weight.len();
    write_rows(
        out,
        n,
        #[inline(always)]
        |i, out| {
            let row = &x[i * n..][..out.len()];
            let r = inverse_rms(row, eps);
            write_each(out, row.iter().zip(weight).map(|(&x, &w)| x * r * w))
        },
    )
}

/// Per row, with `gw = g · w`: `dx = r · gw - x · r³ · Σ(gw · x) / n`; `d_weight += g · x · r`
/// summed over the rows.
#[inline(always)]
fn backward_body<'o>(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    eps: f32,
    dx: &'o mut [MaybeUninit<f32>],
    d_weight: &mut [f32],
) -> &'o mut [f32] {
    let n = weight.len();
    let mut gw = vec![0f32; n];
    write_rows(
        dx,
        n,
        #[inline(always)]
        |i, dx| {
            let (row, g) = (&x[i * n..][..dx.len()], &grad[i * n..][..dx.len()]);
            let r = inverse_rms(row, eps);
            for ((gw, &g), &w) in gw.iter_mut().zip(g).zip(weight) {
                *gw = g * w;
            }
            let k = r * r * r * dot(&gw, row) / n as f32;
            for ((dw, &x), &g) in d_weight.iter_mut().zip(row).zip(g) {
                *dw += g * x * r;
            }
            write_each(dx, row.iter().zip(&gw).map(|(&x, &gw)| r * gw - x * k))
        },
    )
}

simd_dispatch! {
    fn forward_rows<'o>(x: &[f32], weight: &[f32], eps: f32, out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => forward_body
}

simd_dispatch! {
    fn backward_rows<'o>(x: &[f32], weight: &[f32], grad: &[f32], eps: f32, dx: &'o mut [MaybeUninit<f32>], d_weight: &mut [f32]) -> &'o mut [f32] => backward_body
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

impl RmsNormOps for Flex {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let (xs, w) = (f32_values(&x), f32_values(&weight));
        let chunk = (w.len() * ROWS_PER_TASK).max(1);
        let out = par_fill(xs.len(), chunk, xs.par_chunks(chunk), |out, x| {
            forward_rows(x, &w, eps, out)
        });
        flex_tensor(out, shape, dtype)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let w_dtype = weight.dtype();
        let (xs, w, g) = (f32_values(&x), f32_values(&weight), f32_values(&grad));
        let n = w.len();
        let chunk = (n * ROWS_PER_TASK).max(1);
        // Each task sums its rows' weight gradient; the partial sums are added after.
        let mut partials = vec![vec![0f32; n]; xs.len().div_ceil(chunk)];
        let inputs = xs
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .zip(partials.par_iter_mut());
        let dx = par_fill(xs.len(), chunk, inputs, |dx, ((x, g), dw)| {
            backward_rows(x, &w, g, eps, dx, dw)
        });
        let dw = sum_partials(&partials, n);
        (flex_tensor(dx, shape, dtype), flex_tensor(dw, [n], w_dtype))
    }
}

/// The backward pass: the input and the weight (only) are kept from the forward pass.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend + RmsNormOps> Backward<B, 2> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        backward_pair::<B, _>(ops, grads, |(x, weight, eps), grad| {
            B::rms_norm_backward(x, weight, grad, eps)
        });
    }
}

impl<B: Backend + RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let parents = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        match RmsNormBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, weight, eps)),
        }
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::rms_norm_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
            eps,
        );
        (
            <Self as AutodiffBackend>::from_inner(dx),
            <Self as AutodiffBackend>::from_inner(dw),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// The burn composition the operation replaces.
    fn reference(x: Tensor<3>, weight: Tensor<1>, eps: f64) -> Tensor<3> {
        let rms = x.clone().powi_scalar(2).mean_dim(2).add_scalar(eps).sqrt();
        x.div(rms).mul(weight.unsqueeze::<3>())
    }

    /// Equal to the burn composition, value and both gradients, on the CPU autodiff device:
    /// rows shorter and longer than the vector width, several tasks with a partial last one.
    #[test]
    fn matches_the_burn_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(11);
        for shape in [[2, 3, 7], [3, 30, 100]] {
            let n = shape[2];
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.5, 2.0), &device);
            let w = Tensor::<1>::random([n], Distribution::Uniform(0.5, 1.5), &device);
            let weights = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);

            let (a, wa) = (
                x.clone().detach().require_grad(),
                w.clone().detach().require_grad(),
            );
            let y = rms_norm(a.clone(), wa.clone(), 1e-5);
            let g = (y.clone() * weights.clone()).sum().backward();
            let (ga, gwa) = (a.grad(&g).unwrap(), wa.grad(&g).unwrap());

            let (b, wb) = (x.detach().require_grad(), w.detach().require_grad());
            let q = reference(b.clone(), wb.clone(), 1e-5);
            let g = (q.clone() * weights).sum().backward();
            let (gb, gwb) = (b.grad(&g).unwrap(), wb.grad(&g).unwrap());

            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
            y.into_data().assert_approx_eq::<f32>(&q.into_data(), tol);
            ga.into_data().assert_approx_eq::<f32>(&gb.into_data(), tol);
            gwa.into_data()
                .assert_approx_eq::<f32>(&gwb.into_data(), Tolerance::<f32>::rel_abs(1e-4, 1e-4));
        }
    }

    /// A frozen weight (LoRA): only the input's gradient, and it still matches.
    #[test]
    fn frozen_weight_gets_no_gradient() {
        let device = Device::flex().autodiff();
        device.seed(12);
        let x =
            Tensor::<3>::random([1, 4, 20], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<1>::random([20], Distribution::Uniform(0.5, 1.5), &device);
        let g = rms_norm(x.clone(), w.clone(), 1e-6).sum().backward();
        assert!(w.grad(&g).is_none());
        let x2 = x.clone().detach().require_grad();
        let g2 = reference(x2.clone(), w, 1e-6).sum().backward();
        x.grad(&g).unwrap().into_data().assert_approx_eq::<f32>(
            &x2.grad(&g2).unwrap().into_data(),
            Tolerance::<f32>::rel_abs(1e-5, 1e-5),
        );
    }

    #[test]
    #[should_panic(expected = "rms_norm: 3 weights for rows of 4")]
    fn weight_must_fit_the_rows() {
        let device = Device::flex();
        let _ = rms_norm(
            Tensor::<3>::zeros([1, 2, 4], &device),
            Tensor::<1>::ones([3], &device),
            1e-5,
        );
    }
}
