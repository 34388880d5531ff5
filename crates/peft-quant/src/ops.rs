//! The 4-bit product as a burn backend operation with its own backward pass.
//!
//! Composing the product from burn ops (dequantize, then `matmul`) would make autodiff keep the
//! dequantized f32 weight of every layer alive until the backward pass, losing the memory that
//! 4 bits saves. This operation instead keeps only a handle to the packed weight and computes
//! the input gradient with the same tiled kernel (`g · W`); the weight gets no gradient.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Flex, backend_extension, tensor::FloatTensor,
};
use burn::tensor::{DType, TensorData};

use crate::blockwise::Quantized4bit;
use crate::kernel;

/// A shared handle to a packed 4-bit weight `[n, k]`, passed to the backend operation.
#[derive(Clone, Debug)]
pub struct PackedWeight(pub Arc<Quantized4bit>);

/// Products with a 4-bit weight `W [n, k]`, on the last dimension of `x`.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait Quant4Ops: Backend {
    /// `x [.., k] · Wᵀ -> [.., n]`, or with `transposed`, `x [.., n] · W -> [.., k]`.
    fn matmul_4bit(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        transposed: bool,
    ) -> FloatTensor<Self>;

    /// The weight `W [n, k]` dequantized, on the device and in the float dtype of `like` (whose
    /// values are not read). A constant: it carries no gradient.
    fn dequantize_4bit(like: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self>;
}

impl Quant4Ops for Flex {
    fn matmul_4bit(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let data = x.into_data();
        let dtype = data.dtype();
        let mut shape = data.shape().to_vec();
        let data = data.convert_dtype(DType::F32);
        let xs = data.as_slice::<f32>().expect("converted to f32");
        let (n, k) = (weight.0.shape[0], weight.0.shape[1]);
        let (d_in, d_out) = if transposed { (n, k) } else { (k, n) };
        let last = shape
            .last_mut()
            .expect("a 4-bit product needs at least one dimension");
        assert_eq!(
            *last, d_in,
            "input's last dimension is {}, the 4-bit weight expects {d_in}",
            *last
        );
        *last = d_out;
        let m = xs.len() / d_in;
        let y = if transposed {
            kernel::matmul_4bit_transposed(xs, m, &weight.0)
        } else {
            kernel::matmul_4bit(xs, m, &weight.0)
        };
        FlexTensor::from_data(TensorData::new(y, shape).convert_dtype(dtype))
    }

    fn dequantize_4bit(like: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        let w = &weight.0;
        FlexTensor::from_data(
            TensorData::new(w.dequantize(), w.shape.clone()).convert_dtype(like.dtype()),
        )
    }
}

/// The backward pass of `y = x · op(W)`: `dx = dy · op(W)ᵀ`, the same kernel transposed.
#[derive(Debug)]
struct Matmul4bitBackward;

impl<B: Backend + Quant4Ops> Backward<B, 1> for Matmul4bitBackward {
    type State = (PackedWeight, bool);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (weight, transposed) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::matmul_4bit(grad, weight, !transposed)
        });
    }
}

impl<B: Backend + Quant4Ops, C: CheckpointStrategy> Quant4Ops for Autodiff<B, C> {
    fn matmul_4bit(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let parent = x.node();
        let y = B::matmul_4bit(x.into_primitive(), weight.clone(), transposed);
        match Matmul4bitBackward
            .prepare::<C>([parent])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((weight, transposed), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn dequantize_4bit(like: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::dequantize_4bit(like.into_primitive(), weight))
    }
}
