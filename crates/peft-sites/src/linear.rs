//! The linear site: a frozen base (dense or 4-bit) with named parts that methods attach.
//!
//! What can sit on a linear is one enum ([`LinearPart`]) because burn's derived modules have
//! no trait objects. Each part is owned by one adapter name; several can be active at once.
//! The forward pass of a site with nothing attached is the base alone.

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::{DType, Int, Tensor, TensorData};
use peft_core::params::{frozen, trainable};
use peft_core::{PeftError, Result};
use peft_quant::BaseLinear;

use crate::dora::{self, Magnitude};
use crate::sparse::SparseDelta;

/// Trainable parts are f32 whatever the base's type: their updates are small against their
/// values, which f16/bf16 would round away (and AdamW's second moment would underflow).
pub const ADAPTER_DTYPE: DType = DType::F32;

/// One LoRA adapter: `delta(x) = scale · dropout(x) · A · B`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]` (Hugging Face `lora_A.weight` is its transpose `[r, in]`).
    pub a: Param<Tensor<2>>,
    /// `[r, out]` (Hugging Face `lora_B.weight` is its transpose `[out, r]`).
    pub b: Param<Tensor<2>>,
    pub dropout: Dropout,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// DoRA's magnitude vector, when the adapter is a DoRA one (see [`crate::dora`]).
    pub magnitude: Option<Magnitude>,
    /// AdaLoRA's singular values `E` (`[r]`): the update is `A·diag(E)·B` (`P·Λ·Q`).
    pub singular: Option<Singular>,
}

/// AdaLoRA's singular values of a LoRA part: `x·A ⊙ E · B` instead of `x·A·B`.
#[derive(Module, Debug)]
pub struct Singular {
    /// `[r]` (PEFT's `lora_E` is `[r, 1]`).
    pub value: Param<Tensor<1>>,
    /// The ranks kept by the last budget allocation (PEFT's `rank_pattern` entry), when one
    /// has run: saving keeps only these.
    #[module(skip)]
    pub keep: Option<Vec<bool>>,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<2>()[1]
    }

    /// The side path, computed as `(x·A)·B` so the dense `A·B` is never formed. A
    /// half-precision input (an f16/bf16 base) goes through the adapter in f32, the adapter's
    /// type, and comes back in its own type (Hugging Face PEFT does the same).
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.side_path(self.dropout.forward(x))
    }

    /// `scale · x·A·B` without dropout (the caller applied it).
    pub fn side_path<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(ADAPTER_DTYPE);
        let mut xa = peft_core::matmul::linear(x, self.a.val(), None);
        if let Some(e) = &self.singular {
            xa = xa * e.value.val().unsqueeze::<D>();
        }
        // The scale goes on B (`r × out` values) rather than on the `tokens × out` product.
        let b = if self.scale == 1.0 {
            self.b.val()
        } else {
            self.b.val().mul_scalar(self.scale)
        };
        peft_core::matmul::linear(xa, b, None).cast(dtype)
    }

    /// `scale · A·B`, the `[in, out]` update a merge adds to the base weight (f32).
    pub fn delta_weight(&self) -> Tensor<2> {
        let a = match &self.singular {
            Some(e) => self.a.val() * e.value.val().unsqueeze::<2>(),
            None => self.a.val(),
        };
        a.matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// A learned vector, one entry per input or output feature.
#[derive(Module, Debug)]
pub struct FeatureVector {
    pub value: Param<Tensor<1>>,
}

impl FeatureVector {
    /// A trainable vector (f32).
    pub fn new(value: Tensor<1>) -> Self {
        Self {
            value: trainable(value.cast(ADAPTER_DTYPE)),
        }
    }

    pub fn len(&self) -> usize {
        self.value.shape().dims::<1>()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vector shaped to broadcast over the last dimension of a rank-`D` tensor of `dtype`.
    fn broadcast<const D: usize>(&self, dtype: DType) -> Tensor<D> {
        self.value.val().cast(dtype).unsqueeze::<D>()
    }

    /// `x ⊙ vector` over the last dimension of `x`, in the type of `x`.
    fn scale<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        crate::feature_scale::scale_features(x, self.value.val().cast(dtype))
    }
}

/// A learned scale and shift of every output feature (SSF): `y ⊙ scale + shift`.
#[derive(Module, Debug)]
pub struct ScaleShift {
    pub scale: FeatureVector,
    pub shift: FeatureVector,
}

impl ScaleShift {
    /// The scale `γ` and shift `β` as tensors of `dtype`.
    pub fn vectors(&self, dtype: DType) -> (Tensor<1>, Tensor<1>) {
        (
            self.scale.value.val().cast(dtype),
            self.shift.value.val().cast(dtype),
        )
    }

    /// A layer's bias (of `dtype`) with this scale and shift folded in, `b ⊙ γ + β` (a
    /// missing bias is zero), or taken back out, `(b − β) / γ`.
    pub fn fold_bias(&self, bias: Option<Tensor<1>>, dtype: DType, undo: bool) -> Tensor<1> {
        let (g, b) = self.vectors(dtype);
        let bias = bias.unwrap_or_else(|| b.zeros_like());
        if undo { (bias - b) / g } else { bias * g + b }
    }
}

/// What a method can attach to a linear site.
#[derive(Module, Debug)]
pub enum LinearPart {
    /// LoRA: `+ scale · x·A·B` on the side path.
    Lora(LoraAdapter),
    /// A vector scaling the base's input, `base(x ⊙ l)` ((IA)^3 on feed-forward layers).
    InputScale(FeatureVector),
    /// A vector scaling the base's output, bias included, `base(x) ⊙ l` ((IA)^3).
    OutputScale(FeatureVector),
    /// A vector added to the output, `base(x) + b` (an added bias: BitFit/BEFT).
    Bias(FeatureVector),
    /// `base(x) ⊙ scale + shift` (SSF).
    ScaleShift(ScaleShift),
    /// `+ x·Sᵀ`: trainable values at fixed positions of the weight (parameter selection).
    Sparse(SparseDelta),
}

impl LinearPart {
    /// The method family of the part, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LoRA",
            Self::InputScale(_) | Self::OutputScale(_) => "input/output scale",
            Self::Bias(_) => "bias",
            Self::ScaleShift(_) => "scale and shift",
            Self::Sparse(_) => "sparse delta",
        }
    }
}

/// A frozen linear with named parts. Several parts can be active at once: input scales act on
/// the base's input, output scales on its output, LoRA deltas and biases add to the result.
/// Merged parts live in the base weight and are skipped in the forward pass.
#[derive(Module, Debug)]
pub struct TunedLinear {
    /// The frozen base: dense, or 4-bit (QLoRA).
    pub base: BaseLinear,
    pub parts: Vec<LinearPart>,
    /// The adapter name of each entry of `parts`.
    #[module(skip)]
    pub names: Vec<String>,
    /// Names of the parts used in the forward pass.
    #[module(skip)]
    pub active: Vec<String>,
    /// Names of the parts folded into `base`.
    #[module(skip)]
    pub merged: Vec<String>,
    /// When set, the forward pass is the base alone (Hugging Face `disable_adapter()`).
    #[module(skip)]
    pub disabled: bool,
    /// A mixed batch: the LoRA adapter of each row (dim 0) of the input, `__base__` for none
    /// (Hugging Face's `adapter_names`); set through [`crate::mixed::set_row_adapters`].
    #[module(skip)]
    pub row_adapters: Option<Vec<String>>,
}

impl TunedLinear {
    /// Wrap a `[in, out]` weight (frozen) and optional bias.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::from_base(BaseLinear::dense(weight, bias))
    }

    pub fn from_base(base: impl Into<BaseLinear>) -> Self {
        Self {
            base: base.into(),
            parts: Vec::new(),
            names: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            row_adapters: None,
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn index_or_err(&self, name: &str) -> Result<usize> {
        self.index(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))
    }

    /// The part of adapter `name`.
    pub fn part(&self, name: &str) -> Option<&LinearPart> {
        self.index(name).map(|i| &self.parts[i])
    }

    /// The part of adapter `name`, mutable.
    pub fn part_mut(&mut self, name: &str) -> Option<&mut LinearPart> {
        self.index(name).map(|i| &mut self.parts[i])
    }

    /// The LoRA adapter called `name`.
    pub fn lora(&self, name: &str) -> Option<&LoraAdapter> {
        match self.part(name)? {
            LinearPart::Lora(a) => Some(a),
            _ => None,
        }
    }

    /// Add (or replace) the part of adapter `name`, and make it active. One adapter name
    /// holds one part per site: attaching a second method under the same name replaces the
    /// first.
    pub fn add_part(&mut self, name: &str, part: LinearPart) {
        self.delete_adapter(name).ok();
        self.names.push(name.to_string());
        self.parts.push(part);
        self.active.push(name.to_string());
    }

    /// Remove adapter `name` (unmerging it first if it was merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.merged.iter().any(|m| m == name) {
            self.unmerge(name)?;
        }
        let i = self.index_or_err(name)?;
        self.parts.remove(i);
        self.names.remove(i);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Use exactly `names` in the forward pass.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.index_or_err(n)?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Fold adapter `name` into the base weight (and bias). A 4-bit base is dequantized,
    /// updated and quantized again, which rounds: outputs then differ slightly from the
    /// unmerged ones. Merge in the order the forward pass applies parts (scales before LoRA
    /// and biases): merging a scale folds it over what is already merged.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let i = self.index_or_err(name)?;
        if self.merged.iter().any(|m| m == name) {
            return Ok(());
        }
        self.fold(i, false)?;
        self.merged.push(name.to_string());
        Ok(())
    }

    /// Take adapter `name` back out of the base weight (and bias).
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let i = self.index_or_err(name)?;
        if !self.merged.iter().any(|m| m == name) {
            return Ok(());
        }
        self.fold(i, true)?;
        self.merged.retain(|m| m != name);
        Ok(())
    }

    /// Apply part `i` to the base weight and bias (`undo`: take it back out). Scales are
    /// undone by dividing, exact where the scale has no zero entry.
    fn fold(&mut self, i: usize, undo: bool) -> Result<()> {
        let device = self.base.device();
        let w = self.base.dense_weight(&device);
        let dtype = w.dtype();
        let mut bias = self.base.bias().map(|b| b.val());
        let mut merged_norm = None;
        let w = match &self.parts[i] {
            LinearPart::Lora(a) => match (&a.magnitude, undo) {
                (Some(m), false) => {
                    let (w, norm) = dora::merged_weight(w, a, m);
                    merged_norm = Some(norm);
                    w
                }
                (Some(m), true) => {
                    let norm = m.merged_norm.as_deref().ok_or_else(|| {
                        PeftError::Other("DoRA adapter has no norm from its merge".into())
                    })?;
                    dora::unmerged_weight(w, a, m, norm)
                }
                (None, _) => {
                    let delta = a.delta_weight().cast(dtype);
                    if undo { w - delta } else { w + delta }
                }
            },
            LinearPart::InputScale(l) => {
                // burn's weight is [in, out]: an input scale multiplies its rows.
                let l = l.value.val().cast(dtype).unsqueeze_dim::<2>(1);
                if undo { w / l } else { w * l }
            }
            LinearPart::OutputScale(l) => {
                let v = l.value.val().cast(dtype);
                bias = bias.map(|b| if undo { b / v.clone() } else { b * v.clone() });
                let l = v.unsqueeze_dim::<2>(0);
                if undo { w / l } else { w * l }
            }
            LinearPart::Bias(b) => {
                let v = b.value.val().cast(dtype);
                let zero = || v.zeros_like();
                let base = bias.unwrap_or_else(zero);
                bias = Some(if undo { base - v } else { base + v });
                w
            }
            LinearPart::ScaleShift(ss) => {
                // y·γ + β: the columns and the bias scale, then the shift joins the bias.
                bias = Some(ss.fold_bias(bias, dtype, undo));
                let g = ss.vectors(dtype).0.unsqueeze_dim::<2>(0);
                if undo { w / g } else { w * g }
            }
            LinearPart::Sparse(s) => s.fold_into(w, undo),
        };
        self.base.set_weight(w, false)?;
        if let LinearPart::Lora(LoraAdapter {
            magnitude: Some(m), ..
        }) = &mut self.parts[i]
        {
            m.merged_norm = merged_norm;
        }
        let trainable_bias = self.base.bias().is_some_and(|b| b.is_require_grad());
        *self.base.bias_mut() = bias.map(|b| {
            let b = b.detach();
            if trainable_bias {
                trainable(b)
            } else {
                frozen(b)
            }
        });
        Ok(())
    }

    /// Make the base's bias trainable on behalf of `method` (LoRA's `bias`, BitFit). A bias
    /// that already trains belongs to another method: two methods updating one parameter is
    /// an error naming it. Returns whether the layer has a bias.
    pub fn claim_bias(&mut self, path: &str, method: &str) -> Result<bool> {
        match self.base.bias() {
            None => Ok(false),
            Some(b) if b.is_require_grad() => Err(PeftError::Config(format!(
                "{method}: the bias of `{path}` is already trained by another method on this model (e.g. LoRA's bias=\"all\" and BitFit); train it with one of them"
            ))),
            Some(_) => {
                self.base.set_bias_trainable(true);
                Ok(true)
            }
        }
    }

    fn live(&self, i: usize) -> bool {
        let name = &self.names[i];
        self.active.contains(name) && !self.merged.contains(name)
    }

    /// The base's output with the first live sparse delta folded into its product
    /// ([`SparseDelta::tuned_product`]) and that part's index, where it applies: a dense base,
    /// and no live part that works on the base's output (a scale, DoRA's magnitude) rather than
    /// adding to it.
    fn folded_sparse<const D: usize>(&self, x: &Tensor<D>) -> Option<(usize, Tensor<D>)> {
        let BaseLinear::Dense(base) = &self.base else {
            return None;
        };
        let on_base_output = self.parts.iter().enumerate().any(|(i, part)| {
            self.live(i)
                && match part {
                    LinearPart::InputScale(_)
                    | LinearPart::OutputScale(_)
                    | LinearPart::ScaleShift(_) => true,
                    LinearPart::Lora(a) => a.magnitude.is_some(),
                    _ => false,
                }
        });
        if on_base_output {
            return None;
        }
        let (i, y) = self
            .parts
            .iter()
            .enumerate()
            .find_map(|(i, part)| match part {
                LinearPart::Sparse(s) if self.live(i) => {
                    Some((i, s.tuned_product(x, &base.weight.val())?))
                }
                _ => None,
            })?;
        Some(match &base.bias {
            Some(b) => (i, y + b.val().unsqueeze()),
            None => (i, y),
        })
    }

    /// `base(x ⊙ Π in-scales) ⊙ Π out-scales + Σ LoRA deltas(x) + Σ biases`, over the active
    /// parts that are not merged.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.disabled {
            // Merged parts cannot be switched off without unmerging: refuse silently wrong
            // output.
            assert!(
                self.merged.is_empty(),
                "cannot disable adapters while some are merged; unmerge first"
            );
            return self.base.forward(x);
        }
        if self.parts.is_empty() {
            return self.base.forward(x);
        }
        if let Some(rows) = &self.row_adapters {
            return self.forward_mixed(x, rows);
        }
        let dtype = x.dtype();
        let mut input = x.clone();
        for (i, part) in self.parts.iter().enumerate() {
            if let LinearPart::InputScale(l) = part
                && self.live(i)
            {
                input = l.scale(input);
            }
        }
        let (folded, mut y) = match self.folded_sparse(&input) {
            Some((i, y)) => (Some(i), y),
            None => (None, self.base.forward(input)),
        };
        // Scales first, then what adds: the order of the parts does not change the result.
        for (i, part) in self.parts.iter().enumerate() {
            if !self.live(i) {
                continue;
            }
            match part {
                LinearPart::OutputScale(l) => y = l.scale(y),
                LinearPart::ScaleShift(ss) => y = ss.scale.scale(y),
                _ => {}
            }
        }
        for (i, part) in self.parts.iter().enumerate() {
            if !self.live(i) {
                continue;
            }
            match part {
                LinearPart::Lora(a) => {
                    y = match &a.magnitude {
                        None => y + a.delta(x.clone()),
                        Some(m) => dora::forward(a, m, &self.base, x.clone(), y),
                    }
                }
                LinearPart::Bias(b) => y = y + b.broadcast::<D>(dtype),
                LinearPart::ScaleShift(ss) => y = y + ss.shift.broadcast::<D>(dtype),
                LinearPart::Sparse(_) if folded == Some(i) => {}
                LinearPart::Sparse(s) => y = y + s.delta(x.clone()),
                LinearPart::InputScale(_) | LinearPart::OutputScale(_) => {}
            }
        }
        y
    }
}

impl TunedLinear {
    /// The base's output plus, for each row of the batch, the delta of that row's LoRA
    /// adapter (PEFT's `_mixed_batch_forward`: one sub-batch per adapter). Adapters this layer
    /// does not have leave their rows as the base's.
    fn forward_mixed<const D: usize>(&self, x: Tensor<D>, rows: &[String]) -> Tensor<D> {
        assert_eq!(
            x.dims()[0],
            rows.len(),
            "a mixed batch names one adapter per row"
        );
        let device = x.device();
        let mut y = self.base.forward(x.clone());
        let mut done: Vec<&str> = Vec::new();
        for name in rows {
            if name == crate::mixed::BASE_ROW || done.contains(&name.as_str()) {
                continue;
            }
            done.push(name);
            let Some(lora) = self.lora(name) else {
                continue;
            };
            let idx: Vec<i64> = rows
                .iter()
                .enumerate()
                .filter(|(_, n)| *n == name)
                .map(|(i, _)| i as i64)
                .collect();
            let n = idx.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
            let delta = lora.delta(x.clone().select(0, idx.clone()));
            y = y.select_assign(0, idx, delta, IndexingUpdateOp::Add);
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::DropoutConfig;
    use burn::tensor::{Device, Distribution, Tolerance};

    pub(super) fn layer(device: &Device) -> TunedLinear {
        device.seed(7);
        let mut l = TunedLinear::new(
            Tensor::random([6, 5], Distribution::Default, device),
            Some(Tensor::random([5], Distribution::Default, device)),
        );
        let random =
            |shape: [usize; 2]| trainable(Tensor::random(shape, Distribution::Default, device));
        let lora = LoraAdapter {
            a: random([6, 3]),
            b: random([3, 5]),
            dropout: DropoutConfig::new(0.0).init(),
            scale: 2.0,
            magnitude: None,
            singular: None,
        };
        l.add_part("lora", LinearPart::Lora(lora));
        let vector = |n: usize| {
            FeatureVector::new(Tensor::random([n], Distribution::Uniform(0.5, 1.5), device))
        };
        l.add_part("in", LinearPart::InputScale(vector(6)));
        l.add_part("out", LinearPart::OutputScale(vector(5)));
        l.add_part("bias", LinearPart::Bias(vector(5)));
        l.add_part(
            "ss",
            LinearPart::ScaleShift(ScaleShift {
                scale: vector(5),
                shift: vector(5),
            }),
        );
        let support = crate::sparse::Support::new(5, 6, vec![0, 7, 13, 29], "test").unwrap();
        l.add_part(
            "sparse",
            LinearPart::Sparse(SparseDelta::new(
                support,
                Tensor::random([4], Distribution::Default, device),
            )),
        );
        l
    }

    #[test]
    fn parts_compose_as_documented() {
        let device = Device::flex();
        let l = layer(&device);
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let vec = |name: &str| match l.part(name).unwrap() {
            LinearPart::InputScale(v) | LinearPart::OutputScale(v) | LinearPart::Bias(v) => {
                v.value.val().unsqueeze::<2>()
            }
            _ => unreachable!(),
        };
        let LinearPart::ScaleShift(ss) = l.part("ss").unwrap() else {
            unreachable!()
        };
        let (g, b) = (
            ss.scale.value.val().unsqueeze::<2>(),
            ss.shift.value.val().unsqueeze::<2>(),
        );
        let LinearPart::Sparse(sparse) = l.part("sparse").unwrap() else {
            unreachable!()
        };
        let expected = l.base.forward(x.clone() * vec("in")) * vec("out") * g
            + l.lora("lora").unwrap().delta(x.clone())
            + sparse.delta(x.clone())
            + vec("bias")
            + b;
        l.forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
    }

    /// With nothing working on the base's output, the sparse delta folds into the base's
    /// product: the same sum as the parts one by one.
    #[test]
    fn a_sparse_delta_folds_into_an_unscaled_base() {
        let device = Device::flex();
        let mut l = layer(&device);
        l.set_active(&["lora", "bias", "sparse"]).unwrap();
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let (LinearPart::Sparse(sparse), LinearPart::Bias(bias)) =
            (l.part("sparse").unwrap(), l.part("bias").unwrap())
        else {
            unreachable!()
        };
        let expected = l.base.forward(x.clone())
            + l.lora("lora").unwrap().delta(x.clone())
            + sparse.delta(x.clone())
            + bias.value.val().unsqueeze::<2>();
        l.forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn merging_every_kind_of_part_is_exact_and_undone() {
        let device = Device::flex();
        let mut l = layer(&device);
        let w0 = l.base.dense_weight(&device);
        let b0 = l.base.bias().unwrap().val();
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Default, &device);
        let side = l.forward(x.clone());
        // LoRA sees the unscaled input and adds after the output scale: merge it last. The
        // scale and shift scales what is merged before it, then adds: after the scales,
        // before the biases.
        for name in ["in", "out", "ss", "bias", "sparse"] {
            l.merge(name).unwrap();
            assert_eq!(l.merged.last().unwrap(), name);
        }
        l.set_active(&["lora", "in", "out", "ss", "bias", "sparse"])
            .unwrap();
        let partly = l.forward(x.clone());
        partly
            .into_data()
            .assert_approx_eq::<f32>(&side.into_data(), Tolerance::absolute(1e-5));
        for name in ["sparse", "bias", "ss", "out", "in"] {
            l.unmerge(name).unwrap();
        }
        l.base
            .dense_weight(&device)
            .into_data()
            .assert_approx_eq::<f32>(&w0.into_data(), Tolerance::absolute(1e-5));
        l.base
            .bias()
            .unwrap()
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&b0.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn an_added_bias_merges_into_a_layer_without_one() {
        let device = Device::flex();
        let mut l = TunedLinear::new(Tensor::random([3, 2], Distribution::Default, &device), None);
        l.add_part(
            "b",
            LinearPart::Bias(FeatureVector::new(Tensor::from_floats(
                [1.0, -2.0],
                &device,
            ))),
        );
        let x = Tensor::<2>::random([4, 3], Distribution::Default, &device);
        let side = l.forward(x.clone());
        l.merge("b").unwrap();
        assert!(l.base.bias().is_some());
        l.forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&side.into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn an_empty_site_is_the_base_and_only_parts_get_gradients() {
        let device = Device::flex().autodiff();
        let mut l = layer(&device);
        let x = Tensor::<2>::random([4, 6], Distribution::Default, &device);
        let grads = l.forward(x.clone()).sum().backward();
        let BaseLinear::Dense(base) = &l.base else {
            unreachable!()
        };
        assert!(base.weight.val().grad(&grads).is_none());
        for part in &l.parts {
            let has = match part {
                LinearPart::Lora(a) => {
                    a.a.val().grad(&grads).is_some() && a.b.val().grad(&grads).is_some()
                }
                LinearPart::InputScale(v) | LinearPart::OutputScale(v) | LinearPart::Bias(v) => {
                    v.value.val().grad(&grads).is_some()
                }
                LinearPart::ScaleShift(ss) => {
                    ss.scale.value.val().grad(&grads).is_some()
                        && ss.shift.value.val().grad(&grads).is_some()
                }
                LinearPart::Sparse(s) => s.values.val().grad(&grads).is_some(),
            };
            assert!(has, "{} part has no gradient", part.kind());
        }
        for name in l.names.clone() {
            l.delete_adapter(&name).unwrap();
        }
        l.forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&l.base.forward(x).into_data(), Tolerance::absolute(0.0));
    }
}
