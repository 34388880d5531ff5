//! A learned scale of every feature, `x ⊙ l` over the last axis ((IA)^3's vectors, SSF's
//! scale), as one operation.
//!
//! burn broadcasts the vector over the rows: forward that is one pass, but backward the
//! vector's gradient is a product over the whole broadcast shape and then a sum over the rows
//! (a reduction on one thread), and the input's gradient another broadcast product, both on
//! the calling thread alone while the other threads wait. In an (IA)^3 training step of the
//! benchmark Llama these took about 7% of the main thread (observed). On the CPU this
//! operation runs forward in one parallel pass, and backward computes what is needed of the
//! input's gradient `g ⊙ l` and the vector's `Σ_rows g ⊙ x` in one parallel pass. Other
//! devices and types use burn's broadcast product.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor};
use peft_core::cpu::{
    f32_values, flex_tensor, no_gradient, par_fill, sum_partials, write_each, write_rows,
};
use peft_core::device::is_cpu;
use peft_core::simd_dispatch;
use rayon::prelude::*;

/// `x ⊙ scale` with `scale` (`[n]`) broadcast over the last axis of `x` (`[..., n]`), in the
/// type of `x`. Differentiable in both.
///
/// # Panics
/// When `scale` does not have one value per element of the last axis.
pub fn scale_features<const D: usize>(x: Tensor<D>, scale: Tensor<1>) -> Tensor<D> {
    let n = x.dims()[D - 1];
    assert_eq!(
        scale.dims(),
        [n],
        "scale_features: {} scales for rows of {n}",
        scale.dims()[0]
    );
    let f32_on_cpu = is_cpu(&x.device()) && x.dtype() == DType::F32 && scale.dtype() == DType::F32;
    if !f32_on_cpu || n == 0 {
        let dtype = x.dtype();
        return x * scale.cast(dtype).unsqueeze::<D>();
    }
    Tensor::from_dispatch(<Dispatch as FeatureScaleOps>::scale_features(
        x.into_dispatch(),
        scale.into_dispatch(),
    ))
}

/// The operation and its gradients as backend operations (f32).
#[backend_extension(Flex, Autodiff)]
pub trait FeatureScaleOps: Backend {
    /// `x ⊙ scale` over the last axis.
    fn scale_features(x: FloatTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients in `x` and `scale` of `Σ grad ⊙ (x ⊙ scale)`, each only where `need`
    /// says so (an empty tensor otherwise).
    fn scale_features_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        need: [bool; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Rows of `x` times `scale` into `out`.
#[inline(always)]
fn forward_body<'o>(x: &[f32], scale: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] {
    let n = scale.len();
    write_rows(
        out,
        n,
        #[inline(always)]
        |i, out| {
            let row = &x[i * n..][..out.len()];
            write_each(out, row.iter().zip(scale).map(|(&x, &l)| x * l))
        },
    )
}

/// `d_scale += Σ_rows g ⊙ x`.
#[inline(always)]
fn scale_grad_body(x: &[f32], grad: &[f32], d_scale: &mut [f32]) {
    let n = d_scale.len();
    for (row, g) in x.chunks_exact(n).zip(grad.chunks_exact(n)) {
        for ((d, &x), &g) in d_scale.iter_mut().zip(row).zip(g) {
            *d += g * x;
        }
    }
}

simd_dispatch! {
    fn forward_rows<'o>(x: &[f32], scale: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => forward_body
}

simd_dispatch! {
    fn scale_grad_rows(x: &[f32], grad: &[f32], d_scale: &mut [f32]) => scale_grad_body
}

/// Values per parallel task (at least one row): 64 KiB of each operand.
const VALUES_PER_TASK: usize = 1 << 14;

fn task_values(n: usize) -> usize {
    VALUES_PER_TASK.next_multiple_of(n).max(n)
}

/// Rows of `xs` times `scale`, in parallel: the forward pass, and the input's gradient
/// (`g ⊙ scale`).
fn scaled_rows(xs: &[f32], scale: &[f32]) -> Vec<f32> {
    let chunk = task_values(scale.len());
    par_fill(xs.len(), chunk, xs.par_chunks(chunk), |out, x| {
        forward_rows(x, scale, out)
    })
}

impl FeatureScaleOps for Flex {
    fn scale_features(x: FlexTensor, scale: FlexTensor) -> FlexTensor {
        let shape = x.layout().shape().clone();
        let (xs, l) = (f32_values(&x), f32_values(&scale));
        flex_tensor(scaled_rows(&xs, &l), shape, DType::F32)
    }

    fn scale_features_backward(
        x: FlexTensor,
        scale: FlexTensor,
        grad: FlexTensor,
        [need_x, need_scale]: [bool; 2],
    ) -> (FlexTensor, FlexTensor) {
        // The shapes come from the gradient: an operand that is not needed may be a stand-in.
        let shape = grad.layout().shape().clone();
        let n = shape[shape.num_dims() - 1];
        let (l, g) = (f32_values(&scale), f32_values(&grad));
        let chunk = task_values(n);
        let dx = if need_x {
            flex_tensor(scaled_rows(&g, &l), shape, DType::F32)
        } else {
            no_gradient()
        };
        let d_scale = if need_scale {
            let xs = f32_values(&x);
            // Each task sums its rows; the partial sums are added after.
            let partials: Vec<Vec<f32>> = xs
                .par_chunks(chunk)
                .zip(g.par_chunks(chunk))
                .map(|(x, g)| {
                    let mut d = vec![0f32; n];
                    scale_grad_rows(x, g, &mut d);
                    d
                })
                .collect();
            flex_tensor(sum_partials(&partials, n), [n], DType::F32)
        } else {
            no_gradient()
        };
        (dx, d_scale)
    }
}

/// The backward pass: the input (only when the scale trains) and the scale (only when the
/// input needs a gradient) are kept.
#[derive(Debug)]
struct FeatureScaleBackward;

impl<B: Backend + FeatureScaleOps> Backward<B, 2> for FeatureScaleBackward {
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let [node_x, node_scale] = ops.parents;
        let (x, scale) = ops.state;
        let need = [node_x.is_some(), node_scale.is_some()];
        // Whatever is not kept is not needed: the kernel does not read it.
        let placeholder = || grad.clone();
        let (dx, d_scale) = B::scale_features_backward(
            x.unwrap_or_else(placeholder),
            scale.unwrap_or_else(placeholder),
            grad.clone(),
            need,
        );
        for (node, gradient) in [(node_x, dx), (node_scale, d_scale)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

impl<B: Backend + FeatureScaleOps, C: CheckpointStrategy> FeatureScaleOps for Autodiff<B, C> {
    fn scale_features(x: FloatTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x_tracked, scale_tracked) = (x.is_tracked(), scale.is_tracked());
        let parents = [x.node(), scale.node()];
        let (x, scale) = (x.into_primitive(), scale.into_primitive());
        let y = B::scale_features(x.clone(), scale.clone());
        match FeatureScaleBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((scale_tracked.then_some(x), x_tracked.then_some(scale)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn scale_features_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        need: [bool; 2],
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, d_scale) = B::scale_features_backward(
            x.into_primitive(),
            scale.into_primitive(),
            grad.into_primitive(),
            need,
        );
        (
            <Self as AutodiffBackend>::from_inner(dx),
            <Self as AutodiffBackend>::from_inner(d_scale),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random;
    use burn::tensor::{Device, Tolerance};

    /// Equal to burn's broadcast product, value and both gradients, on the CPU autodiff
    /// device: rows shorter and longer than a vector register, one task and several with a
    /// partial last one.
    #[test]
    fn matches_the_broadcast_product_forward_and_backward() {
        let device = Device::default().autodiff();
        for [b, s, n] in [
            [1, 1, 1],
            [2, 3, 5],
            [2, 7, 40],
            [3, 50, 512],
            [2, 33, 1376],
        ] {
            let x = random([b, s, n], &device).require_grad();
            let l = random([n], &device).require_grad();
            let w = random([b, s, n], &device);
            let ours = scale_features(x.clone(), l.clone());
            let want = x.clone() * l.clone().unsqueeze::<3>();
            ours.to_data()
                .assert_approx_eq::<f32>(&want.to_data(), Tolerance::default());
            let g_ours = (ours * w.clone()).sum().backward();
            let g_want = (want * w).sum().backward();
            x.grad(&g_ours)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(
                    &x.grad(&g_want).unwrap().into_data(),
                    Tolerance::default(),
                );
            l.grad(&g_ours)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(
                    &l.grad(&g_want).unwrap().into_data(),
                    Tolerance::rel_abs(1e-5, 1e-5),
                );
        }
    }

    /// Only the tracked operand gets a gradient, whichever it is.
    #[test]
    fn only_tracked_operands_get_gradients() {
        let device = Device::default().autodiff();
        let x = random([2, 4, 8], &device);
        let l = random([8], &device);
        let (xt, lt) = (x.clone().require_grad(), l.clone().require_grad());
        let g = scale_features(x.clone(), lt.clone()).sum().backward();
        let want = (x.clone().sum_dim(1).sum_dim(0)).reshape([8]);
        lt.grad(&g)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
        let g = scale_features(xt.clone(), l.clone()).sum().backward();
        let want = l.unsqueeze::<3>().repeat_dim(0, 2).repeat_dim(1, 4);
        xt.grad(&g)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
    }

    #[test]
    #[should_panic(expected = "scale_features: 3 scales for rows of 4")]
    fn a_scale_of_another_length_is_refused() {
        let device = Device::default();
        scale_features(random([2, 4], &device), random([3], &device));
    }
}
