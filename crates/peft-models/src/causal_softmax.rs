//! The attention weights of a causal decoder, `softmax(scale · scores)` over the positions each
//! query may see, as one operation (the CPU's fused attention, [`crate::attention`], computes
//! them itself; this serves the burn composition that other tensor types take).
//!
//! Composed from burn ops it is a scaling, a mask fill and a softmax (max, subtract, `expf` per
//! value, sum, divide) forward, their backward passes after, and autodiff keeps several
//! `[batch, heads, queries, keys]` tensors. On the CPU this operation reads the scores once
//! forward (writing the weights with the vectorized exponential of [`peft_core::cpu`]) and the
//! weights and their gradient once backward, and keeps only the weights. Other devices use the
//! burn composition.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};
use peft_core::device::is_cpu;
use rayon::prelude::*;

use peft_core::cpu::{
    dot, f32_values, flex_tensor, par_fill, softmax_in_place, write_each, write_rows, write_split,
    zeroed,
};
use peft_core::simd_dispatch;

/// `softmax(scale · scores)` along the last axis of `scores [batch, heads, queries, keys]`,
/// where query `i` sees keys `0..=i + keys - queries` (the queries are the last ones of the
/// sequence, as with a KV cache); the weights of the keys it cannot see are 0.
/// Differentiable in `scores`.
pub fn causal_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let [_, _, s, t] = scores.dims();
    assert!(s <= t, "causal softmax: {s} queries but only {t} keys");
    if is_cpu(&scores.device()) {
        Tensor::from_dispatch(<Dispatch as CausalSoftmaxOps>::causal_softmax(
            scores.into_dispatch(),
            scale as f32,
        ))
    } else {
        let scores = scores.mul_scalar(scale);
        let scores = if s > 1 {
            let mask = Tensor::<2, Bool>::tril_mask([s, t], (t - s) as i64, &scores.device())
                .unsqueeze::<4>();
            scores.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            scores
        };
        softmax(scores, 3)
    }
}

/// The operation and its gradient as backend operations.
#[backend_extension(Flex, Autodiff)]
pub trait CausalSoftmaxOps: Backend {
    /// The weights `[batch, heads, queries, keys]` (see [`causal_softmax`]).
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;

    /// The gradient in the scores from the weights `p` and their
    /// gradient `grad`:
    /// `scale · p · (grad - Σ_keys grad · p)`.
    fn causal_softmax_backward(
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// `out[..n] = softmax(scale · row[..n])`, `out[n..] = 0` (`scale > 0`).
#[inline(always)]
fn forward_body<'o>(
    row: &[f32],
    n: usize,
    scale: f32,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    // The keys a query sees: the softmax; the later ones (masked): zeros.
    let seen = &row[..n];
    write_split(
        out,
        n,
        #[inline(always)]
        |out| {
            let out = write_each(out, seen.iter().map(|&x| scale * x));
            softmax_in_place(out);
            out
        },
        zeroed,
    )
}

/// `out = scale · p · (g - Σ g · p)` over one row.
#[inline(always)]
fn backward_body<'o>(
    p: &[f32],
    g: &[f32],
    scale: f32,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    let pg = dot(p, g);
    write_each(out, p.iter().zip(g).map(|(&p, &g)| scale * p * (g - pg)))
}

simd_dispatch! {
    fn forward_row<'o>(row: &[f32], n: usize, scale: f32, out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => forward_body
}

simd_dispatch! {
    fn backward_row<'o>(p: &[f32], g: &[f32], scale: f32, out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => backward_body
}

/// Rows per parallel task: a row of attention scores is short.
const ROWS_PER_TASK: usize = 64;

/// `row_op(r, row, out)` for every row `r` of the last axis of `scores`, in parallel tasks of
/// [`ROWS_PER_TASK`] rows; the outputs as a tensor of the scores' shape.
fn map_rows(
    scores: &FloatTensor<Flex>,
    row_op: impl for<'o> Fn(usize, &[f32], &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] + Sync,
) -> FloatTensor<Flex> {
    let (dtype, shape) = (scores.dtype(), scores.layout().shape().clone());
    let t = shape[shape.len() - 1];
    let x = f32_values(scores);
    let chunk = (t * ROWS_PER_TASK).max(1);
    let inputs = x.par_chunks(chunk).enumerate();
    let out = par_fill(x.len(), chunk, inputs, |out, (task, x)| {
        write_rows(out, t, |r, out| {
            row_op(task * ROWS_PER_TASK + r, &x[r * t..][..out.len()], out)
        })
    });
    flex_tensor(out, shape, dtype)
}

impl CausalSoftmaxOps for Flex {
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let shape = scores.layout().shape().clone();
        let (s, t) = (shape[2], shape[3]);
        map_rows(&scores, |r, row, out| {
            // Query i of its (batch, head) sees keys 0..=i + t - s.
            let i = r % s;
            forward_row(row, i + t - s + 1, scale, out)
        })
    }

    fn causal_softmax_backward(
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (dtype, shape) = (p.dtype(), p.layout().shape().clone());
        let t = shape[3];
        let (p, g) = (f32_values(&p), f32_values(&grad));
        let chunk = (t * ROWS_PER_TASK).max(1);
        let inputs = p.par_chunks(chunk).zip(g.par_chunks(chunk));
        let out = par_fill(p.len(), chunk, inputs, |out, (p, g)| {
            write_rows(out, t, |r, out| {
                let n = out.len();
                backward_row(&p[r * t..][..n], &g[r * t..][..n], scale, out)
            })
        });
        flex_tensor(out, shape, dtype)
    }
}

/// The backward pass: the weights (only) are kept from the forward pass.
#[derive(Debug)]
struct CausalSoftmaxBackward;

impl<B: Backend + CausalSoftmaxOps> Backward<B, 1> for CausalSoftmaxBackward {
    type State = (FloatTensor<B>, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (p, scale) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::causal_softmax_backward(p, grad, scale)
        });
    }
}

/// Attention weights `weights(scores)` on the autodiff backend, keeping only them (and `scale`)
/// for the backward pass.
fn tracked_weights<B: Backend + CausalSoftmaxOps, C: CheckpointStrategy>(
    scores: FloatTensor<Autodiff<B, C>>,
    scale: f32,
    weights: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let parent = scores.node();
    let scores = scores.into_primitive();
    match CausalSoftmaxBackward
        .prepare::<C>([parent])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let p = weights(scores);
            prep.finish((p.clone(), scale), p)
        }
        OpsKind::UnTracked(prep) => prep.finish(weights(scores)),
    }
}

impl<B: Backend + CausalSoftmaxOps, C: CheckpointStrategy> CausalSoftmaxOps for Autodiff<B, C> {
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        tracked_weights::<B, C>(scores, scale, |x| B::causal_softmax(x, scale))
    }

    fn causal_softmax_backward(
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::causal_softmax_backward(
            p.into_primitive(),
            grad.into_primitive(),
            scale,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// The burn composition the operation replaces.
    fn reference(scores: Tensor<4>, scale: f64) -> Tensor<4> {
        let [_, _, s, t] = scores.dims();
        let mask =
            Tensor::<2, Bool>::tril_mask([s, t], (t - s) as i64, &scores.device()).unsqueeze::<4>();
        softmax(
            scores.mul_scalar(scale).mask_fill(mask, f32::NEG_INFINITY),
            3,
        )
    }

    /// Equal to scale + causal mask + softmax from burn ops, value and gradient, on the CPU
    /// autodiff device: a square (training) case with rows longer than the vector width and a
    /// partial task, and a KV-cache case with fewer queries than keys.
    #[test]
    fn matches_the_burn_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(9);
        for (shape, scale) in [
            ([2, 3, 37, 37], 0.125),
            ([1, 2, 3, 20], 0.5),
            ([1, 1, 1, 5], 1.0),
        ] {
            let scores = Tensor::<4>::random(shape, Distribution::Normal(0.0, 3.0), &device);
            let weights = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);

            let a = scores.clone().detach().require_grad();
            let p = causal_softmax(a.clone(), scale);
            let ga = a
                .grad(&(p.clone() * weights.clone()).sum().backward())
                .unwrap();

            let b = scores.detach().require_grad();
            let q = reference(b.clone(), scale);
            let gb = b.grad(&(q.clone() * weights).sum().backward()).unwrap();

            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
            p.clone()
                .into_data()
                .assert_approx_eq::<f32>(&q.into_data(), tol);
            ga.into_data().assert_approx_eq::<f32>(&gb.into_data(), tol);
            // Hidden keys get exactly zero weight.
            let [_, _, s, t] = shape;
            let p = p.into_data().try_to_vec::<f32>().unwrap();
            for (r, row) in p.chunks(t).enumerate() {
                let seen = r % s + t - s + 1;
                assert!(row[seen..].iter().all(|&w| w == 0.0), "{shape:?} row {r}");
            }
        }
    }
}
