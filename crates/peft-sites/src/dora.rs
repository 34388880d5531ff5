//! DoRA (Liu et al., 2024): a LoRA adapter whose output rows are rescaled to a learned
//! magnitude, `y = (m / ‖W + s·A·B‖) ⊙ ((W + s·A·B)·x) + bias`, as Hugging Face PEFT's
//! `use_dora` computes it.
//!
//! The norm is detached (the paper's §4.3, and PEFT), so it is computed outside the autodiff
//! graph: nothing dense is kept for the backward pass. The forward pass reuses the base's own
//! output `W·x`, so a DoRA step costs a LoRA step plus the norm (one `[in, out]` pass over a
//! weight that is read anyway) and a few element-wise products on the output.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};
use peft_core::params::trainable;
use peft_quant::BaseLinear;

use crate::linear::{ADAPTER_DTYPE, LoraAdapter};

/// DoRA's learned magnitude of each output row (PEFT's `lora_magnitude_vector`, `[out]`).
#[derive(Module, Debug)]
pub struct Magnitude {
    pub value: Param<Tensor<1>>,
    /// The norm `‖W + s·A·B‖` at the time of a merge: the merged weight keeps only its
    /// direction times `m`, so unmerging needs it (PEFT caches it the same way).
    #[module(skip)]
    pub merged_norm: Option<Vec<f32>>,
}

impl Magnitude {
    /// A trainable magnitude (f32).
    pub fn new(value: Tensor<1>) -> Self {
        Self {
            value: trainable(value.cast(ADAPTER_DTYPE)),
            merged_norm: None,
        }
    }
}

/// `‖W + s·A·B‖` of every output row of `base` (over its inputs), in f32 and detached: the
/// norm PEFT divides the magnitude by. A 4-bit base is dequantized for it, as PEFT does.
pub fn weight_norm(base: &BaseLinear, lora: &LoraAdapter) -> Tensor<1> {
    let device = base.device();
    let w = base.dense_weight(&device).cast(ADAPTER_DTYPE).detach();
    output_norms(w + lora.delta_weight().detach())
}

/// The norm of every output column of a burn `[in, out]` weight.
fn output_norms(w: Tensor<2>) -> Tensor<1> {
    let [_, d_out] = w.dims();
    w.powi_scalar(2).sum_dim(0).sqrt().reshape([d_out])
}

/// The DoRA forward on top of the running output `y` (the base's output plus what the parts
/// before this one added), as PEFT's `DoraLinearVariant.forward`:
/// `y + (f − 1)·W·x + f·s·B(A(x))` with `f = m / ‖W + s·A·B‖`. Without active dropout `W·x`
/// is `y − bias` (PEFT's reuse of the base result, which includes earlier adapters); with
/// dropout it is recomputed on the dropped-out input, which the LoRA path shares.
pub fn forward<const D: usize>(
    lora: &LoraAdapter,
    magnitude: &Magnitude,
    base: &BaseLinear,
    x: Tensor<D>,
    y: Tensor<D>,
) -> Tensor<D> {
    let dtype = y.dtype();
    let f = (magnitude.value.val() / weight_norm(base, lora))
        .cast(dtype)
        .unsqueeze::<D>();
    let bias = || base.bias().map(|b| b.val().cast(dtype).unsqueeze::<D>());
    let dropout_active =
        lora.dropout.prob > 0.0 && lora.dropout.training.is_enabled() && x.device().is_autodiff();
    let (wx, lora_out) = if dropout_active {
        let x = lora.dropout.forward(x);
        let wx = match bias() {
            Some(b) => base.forward(x.clone()) - b,
            None => base.forward(x.clone()),
        };
        (wx, lora.side_path(x))
    } else {
        let wx = match bias() {
            Some(b) => y.clone() - b,
            None => y.clone(),
        };
        (wx, lora.side_path(x))
    };
    y + f.clone().sub_scalar(1.0) * wx + f * lora_out
}

/// The merged weight `(m / ‖W + ΔW‖) ⊙ (W + ΔW)` (columns of burn's `[in, out]` layout), and
/// the norm used, for unmerging.
pub fn merged_weight(
    w: Tensor<2>,
    lora: &LoraAdapter,
    magnitude: &Magnitude,
) -> (Tensor<2>, Vec<f32>) {
    let dtype = w.dtype();
    let w = w.cast(ADAPTER_DTYPE) + lora.delta_weight().detach();
    let norm = output_norms(w.clone());
    let f = magnitude.value.val().detach() / norm.clone();
    let merged = (w * f.unsqueeze_dim::<2>(0)).cast(dtype);
    let norm = norm
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 norm");
    (merged, norm)
}

/// The base weight back from a merged one: `W = merged / f − ΔW`, with `f` from the norm saved
/// at merge time.
pub fn unmerged_weight(
    merged: Tensor<2>,
    lora: &LoraAdapter,
    magnitude: &Magnitude,
    norm: &[f32],
) -> Tensor<2> {
    let dtype = merged.dtype();
    let device = merged.device();
    let norm = Tensor::<1>::from_data(TensorData::new(norm.to_vec(), [norm.len()]), &device)
        .cast(ADAPTER_DTYPE);
    let f = magnitude.value.val().detach() / norm;
    (merged.cast(ADAPTER_DTYPE) / f.unsqueeze_dim::<2>(0) - lora.delta_weight().detach())
        .cast(dtype)
}
