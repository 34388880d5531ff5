//! Rotary position embedding (RoPE) of queries or keys, as one operation.
//!
//! Composed from burn ops, `x·cos + rotate_half(x)·sin` is a negation, a concatenation, two
//! products and a sum forward (each a pass and a new tensor) and about twice that backward
//! (the concatenation's gradient is two slices, each scattered back into zeros). On the CPU
//! this operation reads `x` once each way and keeps nothing but the tables: its gradient is
//! the inverse rotation of the output's gradient. Other devices use the burn composition.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use peft_core::cpu::{
    backward_single, f32_values, flex_tensor, par_fill, write_each, write_rows, write_split,
};
use peft_core::device::is_cpu;
use peft_core::simd_dispatch;
use rayon::prelude::*;

/// `x·cos + rotate_half(x)·sin` for `x` `[batch, seq, heads, head_dim]` (Hugging Face's
/// rotation: the first half of each head pairs with the second), with the tables `cos`, `sin`
/// `[rows, seq, head_dim]` where `rows` is 1 (every sequence at the same positions) or `batch`.
/// Differentiable in `x`; the tables are constants.
///
/// # Panics
/// When the tables do not fit `x` (an odd head size, other positions or head size, or rows
/// neither 1 nor the batch).
pub fn rope(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let [b, s, _, d] = x.dims();
    let [rows, ts, td] = cos.dims();
    assert!(
        d % 2 == 0 && ts == s && td == d && (rows == 1 || rows == b) && sin.dims() == cos.dims(),
        "rope: tables {:?} / {:?} for x {:?}",
        cos.dims(),
        sin.dims(),
        x.dims()
    );
    if is_cpu(&x.device()) {
        Tensor::from_dispatch(<Dispatch as RopeOps>::rope(
            x.into_dispatch(),
            cos.into_dispatch(),
            sin.into_dispatch(),
            false,
        ))
    } else {
        composed(x, cos, sin)
    }
}

/// The same from burn ops (other devices; the reference of the tests).
fn composed(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.unsqueeze_dim(2) + rotated * sin.unsqueeze_dim(2)
}

/// The operation as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait RopeOps: Backend {
    /// The rotation of [`rope`], or with `transpose` its transpose (the gradient's rotation).
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self>;
}

/// One head: `y₁ = x₁c₁ − x₂s₁`, `y₂ = x₂c₂ + x₁s₂`; transposed `y₁ = x₁c₁ + x₂s₂`,
/// `y₂ = x₂c₂ − x₁s₁` (halves of `d/2`).
#[inline(always)]
fn rotate_body<'y>(
    x: &[f32],
    c: &[f32],
    s: &[f32],
    y: &'y mut [MaybeUninit<f32>],
    transpose: bool,
) -> &'y mut [f32] {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (c1, c2) = c.split_at(half);
    let (s1, s2) = s.split_at(half);
    // The sign of the sine terms, so that one loop per half (no branch inside) vectorizes.
    let (sign1, sign2) = if transpose { (1.0, -1.0) } else { (-1.0, 1.0) };
    let (s_first, s_second) = if transpose { (s2, s1) } else { (s1, s2) };
    // Zips of slices (not index ranges), which the compiler turns into one vector loop each.
    let first = x1.iter().zip(c1).zip(x2.iter().zip(s_first));
    let second = x2.iter().zip(c2).zip(x1.iter().zip(s_second));
    write_split(
        y,
        half,
        #[inline(always)]
        |y1| write_each(y1, first.map(|((&a, &c), (&b, &s))| a * c + sign1 * b * s)),
        #[inline(always)]
        |y2| write_each(y2, second.map(|((&a, &c), (&b, &s))| a * c + sign2 * b * s)),
    )
}

simd_dispatch! {
    fn rotate<'y>(x: &[f32], c: &[f32], s: &[f32], y: &'y mut [MaybeUninit<f32>], transpose: bool) -> &'y mut [f32] => rotate_body
}

impl RopeOps for Flex {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let [_, s, h, d]: [usize; 4] = shape.dims();
        let rows = cos.layout().shape().dims::<3>()[0];
        let (xv, cv, sv) = (f32_values(&x), f32_values(&cos), f32_values(&sin));
        // One task per position of one sequence: its heads share the table row.
        let chunk = (h * d).max(1);
        let inputs = xv.par_chunks(chunk).enumerate();
        let out = par_fill(xv.len(), chunk, inputs, |y, (at, x)| {
            let (seq, pos) = (at / s, at % s);
            let t = (if rows == 1 { 0 } else { seq } * s + pos) * d;
            let (c, sn) = (&cv[t..t + d], &sv[t..t + d]);
            write_rows(y, d, |head, y| {
                rotate(&x[head * d..][..y.len()], c, sn, y, transpose)
            })
        });
        flex_tensor(out, shape, dtype)
    }
}

/// The backward pass: the transposed rotation of the output's gradient (only the tables
/// are kept).
#[derive(Debug)]
struct RopeBackward;

impl<B: Backend + RopeOps> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        backward_single::<B, _>(ops, grads, |(cos, sin, transpose), grad| {
            B::rope(grad, cos, sin, !transpose)
        });
    }
}

impl<B: Backend + RopeOps, C: CheckpointStrategy> RopeOps for Autodiff<B, C> {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let parents = [x.node()];
        let (x, cos, sin) = (
            x.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        );
        match RopeBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rope(x, cos.clone(), sin.clone(), transpose);
                prep.finish((cos, sin, transpose), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x, cos, sin, transpose)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// Value and gradient equal the composition's, with one table row for every sequence and
    /// one per sequence, tables whose halves differ (the transpose must not assume they match),
    /// and head sizes that leave vector tails.
    #[test]
    fn matches_the_burn_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(3);
        for (b, s, h, d, rows) in [(2, 5, 3, 8, 1), (3, 4, 2, 6, 3), (1, 7, 4, 34, 1)] {
            let x = Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device);
            let cos = Tensor::<3>::random([rows, s, d], Distribution::Normal(0.0, 1.0), &device);
            let sin = Tensor::<3>::random([rows, s, d], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device);

            let a = x.clone().detach().require_grad();
            let y = rope(a.clone(), cos.clone(), sin.clone());
            let ga = a.grad(&(y.clone() * w.clone()).sum().backward()).unwrap();

            let c = x.detach().require_grad();
            let reference = composed(c.clone(), cos, sin);
            let gc = c.grad(&(reference.clone() * w).sum().backward()).unwrap();

            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
            y.into_data()
                .assert_approx_eq::<f32>(&reference.into_data(), tol);
            ga.into_data().assert_approx_eq::<f32>(&gc.into_data(), tol);
        }
    }

    #[test]
    #[should_panic(expected = "rope: tables")]
    fn tables_must_fit() {
        let device = Device::flex();
        let _ = rope(
            Tensor::<4>::zeros([2, 3, 1, 4], &device),
            Tensor::<3>::zeros([2, 4, 4], &device),
            Tensor::<3>::zeros([2, 4, 4], &device),
        );
    }
}
