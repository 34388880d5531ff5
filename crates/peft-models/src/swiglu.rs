//! SwiGLU, `silu(gate) · up` (the Llama MLP's activation), as one operation.
//!
//! Composed from burn ops it is a sigmoid (a libm `expf` per value) and two products forward,
//! about eight more passes backward, and autodiff keeps the sigmoid and SiLU outputs besides
//! `gate` and `up`. On the CPU this operation reads `gate` and `up` once forward and once
//! backward (both gradients in the same pass) with the vectorized exponential of
//! [`peft_core::cpu`], and keeps only `gate` and `up` for the backward pass. Other devices use the
//! burn composition.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use peft_core::device::is_cpu;
use rayon::prelude::*;

use peft_core::cpu::{
    backward_pair, exp, f32_values, flex_tensor, par_fill, par_fill_pair, write_each,
    write_each_pair,
};
use peft_core::simd_dispatch;

/// `silu(gate) · up = gate · sigmoid(gate) · up`, element by element. Differentiable in both.
///
/// # Panics
/// When `gate` and `up` differ in shape.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "swiglu: gate and up differ in shape"
    );
    if is_cpu(&gate.device()) {
        Tensor::from_dispatch(<Dispatch as SwigluOps>::swiglu(
            gate.into_dispatch(),
            up.into_dispatch(),
        ))
    } else {
        silu(gate) * up
    }
}

/// The operation and its gradients as backend operations.
#[backend_extension(Flex, Autodiff)]
pub trait SwigluOps: Backend {
    /// `gate · sigmoid(gate) · up` (same shapes).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients in `gate` and `up` of `Σ grad · swiglu(gate, up)`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Values per parallel task: large enough to amortize the task, small enough to share out.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn forward_body<'o>(gate: &[f32], up: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] {
    write_each(out, gate.iter().zip(up).map(|(&a, &u)| a * sigmoid(a) * u))
}

/// `d_up = g · silu(a)`, `d_gate = g · u · s · (1 + a · (1 - s))` with `s = sigmoid(a)`.
#[inline(always)]
fn backward_body<'g, 'u>(
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
    d_gate: &'g mut [MaybeUninit<f32>],
    d_up: &'u mut [MaybeUninit<f32>],
) -> (&'g mut [f32], &'u mut [f32]) {
    let values = gate.iter().zip(up).zip(grad).map(|((&a, &u), &g)| {
        let s = sigmoid(a);
        (g * u * s * (1.0 + a * (1.0 - s)), g * a * s)
    });
    write_each_pair(d_gate, d_up, values)
}

simd_dispatch! {
    fn forward_chunk<'o>(gate: &[f32], up: &[f32], out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => forward_body
}

simd_dispatch! {
    fn backward_chunk<'g, 'u>(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &'g mut [MaybeUninit<f32>], d_up: &'u mut [MaybeUninit<f32>]) -> (&'g mut [f32], &'u mut [f32]) => backward_body
}

impl SwigluOps for Flex {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dtype, shape) = (gate.dtype(), gate.layout().shape().clone());
        let (a, u) = (f32_values(&gate), f32_values(&up));
        let inputs = a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK));
        let out = par_fill(a.len(), CHUNK, inputs, |o, (a, u)| forward_chunk(a, u, o));
        flex_tensor(out, shape, dtype)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dtype, shape) = (gate.dtype(), gate.layout().shape().clone());
        let (a, u, g) = (f32_values(&gate), f32_values(&up), f32_values(&grad));
        let inputs = a
            .par_chunks(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .zip(g.par_chunks(CHUNK));
        let (d_gate, d_up) = par_fill_pair(a.len(), CHUNK, inputs, |dg, du, ((a, u), g)| {
            backward_chunk(a, u, g, dg, du)
        });
        (
            flex_tensor(d_gate, shape.clone(), dtype),
            flex_tensor(d_up, shape, dtype),
        )
    }
}

/// The backward pass: `gate` and `up` (only) are kept from the forward pass.
#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend + SwigluOps> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        backward_pair::<B, _>(ops, grads, |(gate, up), grad| {
            B::swiglu_backward(gate, up, grad)
        });
    }
}

impl<B: Backend + SwigluOps, C: CheckpointStrategy> SwigluOps for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let parents = [gate.node(), up.node()];
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        match SwigluBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate, up)),
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_gate, d_up) = B::swiglu_backward(
            gate.into_primitive(),
            up.into_primitive(),
            grad.into_primitive(),
        );
        (
            <Self as AutodiffBackend>::from_inner(d_gate),
            <Self as AutodiffBackend>::from_inner(d_up),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData, Tolerance};

    /// The fused operation equals `silu(gate) * up` composed from burn ops, value and both
    /// gradients, on the CPU autodiff device; sizes cover a partial chunk and the vector tails.
    #[test]
    fn matches_the_burn_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(5);
        for shape in [[3, 7], [5, CHUNK / 2 + 9]] {
            let gate = Tensor::<2>::random(shape, Distribution::Normal(0.0, 4.0), &device);
            let up = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let weights = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);

            let (a, u) = (
                gate.clone().detach().require_grad(),
                up.clone().detach().require_grad(),
            );
            let y = swiglu(a.clone(), u.clone());
            let g = (y.clone() * weights.clone()).sum().backward();
            let (ga, gu) = (a.grad(&g).unwrap(), u.grad(&g).unwrap());

            let (b, v) = (gate.detach().require_grad(), up.detach().require_grad());
            let reference = silu(b.clone()) * v.clone();
            let g = (reference.clone() * weights).sum().backward();
            let (gb, gv) = (b.grad(&g).unwrap(), v.grad(&g).unwrap());

            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
            y.into_data()
                .assert_approx_eq::<f32>(&reference.into_data(), tol);
            ga.into_data().assert_approx_eq::<f32>(&gb.into_data(), tol);
            gu.into_data().assert_approx_eq::<f32>(&gv.into_data(), tol);
        }
    }

    /// Only `up` tracked (a frozen gate): its gradient alone, and extreme gate values stay finite.
    #[test]
    fn one_tracked_input_and_extreme_values() {
        let device = Device::flex().autodiff();
        let gate = Tensor::<1>::from_data(
            TensorData::new(vec![-1000.0f32, -90.0, -1.0, 0.0, 1.0, 90.0, 1000.0], [7]),
            &device,
        );
        let up = Tensor::<1>::ones([7], &device).require_grad();
        let y = swiglu(gate.clone(), up.clone());
        let grad = up.grad(&y.clone().sum().backward()).unwrap();
        let want = [0.0f32, 0.0, -0.268_941_43, 0.0, 0.731_058_6, 90.0, 1000.0];
        let tol = Tolerance::<f32>::rel_abs(1e-6, 1e-6);
        y.into_data()
            .assert_approx_eq::<f32>(&TensorData::new(want.to_vec(), [7]), tol);
        grad.into_data()
            .assert_approx_eq::<f32>(&TensorData::new(want.to_vec(), [7]), tol);
    }

    #[test]
    #[should_panic(expected = "gate and up differ in shape")]
    fn shapes_must_agree() {
        let device = Device::flex();
        let _ = swiglu(
            Tensor::<2>::zeros([2, 3], &device),
            Tensor::<2>::zeros([3, 2], &device),
        );
    }
}
