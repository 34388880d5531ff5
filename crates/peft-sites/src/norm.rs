//! The norm site: the frozen scale (and shift) of an RMSNorm or LayerNorm, with named
//! trainable copies that replace it (Hugging Face `LN_TUNING`).
//!
//! The site holds parameters only; the model computes the norm with them, so its fused
//! kernels stay where they are.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use peft_core::params::{frozen, trainable};
use peft_core::{PeftError, Result};

use crate::linear::ScaleShift;

/// A norm's scale and optional shift.
#[derive(Module, Debug)]
pub struct NormWeights {
    pub weight: Param<Tensor<1>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl NormWeights {
    /// A copy whose parameters train (or stay frozen), detached from the original.
    fn copy(&self, train: bool) -> Self {
        let wrap = |t: Tensor<1>| {
            if train {
                trainable(t.detach())
            } else {
                frozen(t.detach())
            }
        };
        Self {
            weight: wrap(self.weight.val()),
            bias: self.bias.as_ref().map(|b| wrap(b.val())),
        }
    }
}

/// A norm's frozen weights, with named trainable copies of which at most one is used.
#[derive(Module, Debug)]
pub struct TunedNorm {
    pub base: NormWeights,
    pub eps: f64,
    pub copies: Vec<NormWeights>,
    /// The adapter name of each entry of `copies`.
    #[module(skip)]
    pub names: Vec<String>,
    /// The copy used in the forward pass, if any.
    #[module(skip)]
    pub active: Option<String>,
    /// The copy swapped into `base` by a merge (the original then sits in its place).
    #[module(skip)]
    pub merged: Option<String>,
    /// SSF: named scales and shifts of the norm's output, `norm(x) ⊙ scale + shift`; at most
    /// one active. Merged, the shift becomes the norm's (an RMSNorm then has one, which the
    /// model moves into the linears reading it before saving a checkpoint).
    pub scale_shifts: Vec<ScaleShift>,
    #[module(skip)]
    pub scale_shift_names: Vec<String>,
    #[module(skip)]
    pub scale_shift_active: Option<String>,
    /// The scale and shift folded into `base` by a merge.
    #[module(skip)]
    pub scale_shift_merged: Option<String>,
}

impl TunedNorm {
    /// A frozen norm.
    pub fn new(weight: Tensor<1>, bias: Option<Tensor<1>>, eps: f64) -> Self {
        Self {
            base: NormWeights {
                weight: frozen(weight),
                bias: bias.map(frozen),
            },
            eps,
            copies: Vec::new(),
            names: Vec::new(),
            active: None,
            merged: None,
            scale_shifts: Vec::new(),
            scale_shift_names: Vec::new(),
            scale_shift_active: None,
            scale_shift_merged: None,
        }
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))
    }

    /// The weights the forward pass uses: the active copy, else the base.
    pub fn weights(&self) -> &NormWeights {
        match &self.active {
            Some(name) if self.merged.as_ref() != Some(name) => {
                let i = self
                    .names
                    .iter()
                    .position(|n| n == name)
                    .expect("active copy exists");
                &self.copies[i]
            }
            _ => &self.base,
        }
    }

    /// The scale and shift the forward pass uses (an active SSF folded in:
    /// `w ⊙ γ`, `b ⊙ γ + β`).
    pub fn scale_shift(&self) -> (Tensor<1>, Option<Tensor<1>>) {
        let w = self.weights();
        let (weight, bias) = (w.weight.val(), w.bias.as_ref().map(|b| b.val()));
        match self.live_scale_shift() {
            Some(ss) => {
                let dtype = weight.dtype();
                (
                    weight * ss.vectors(dtype).0,
                    Some(ss.fold_bias(bias, dtype, false)),
                )
            }
            None => (weight, bias),
        }
    }

    /// The active, unmerged SSF scale and shift.
    fn live_scale_shift(&self) -> Option<&ScaleShift> {
        let name = self.scale_shift_active.as_ref()?;
        if self.scale_shift_merged.as_ref() == Some(name) {
            return None;
        }
        self.scale_shift_of(name)
    }

    /// The SSF scale and shift of adapter `name`.
    pub fn scale_shift_of(&self, name: &str) -> Option<&ScaleShift> {
        let i = self.scale_shift_names.iter().position(|n| n == name)?;
        Some(&self.scale_shifts[i])
    }

    /// The SSF scale and shift of adapter `name`, mutable.
    pub fn scale_shift_of_mut(&mut self, name: &str) -> Option<&mut ScaleShift> {
        let i = self.scale_shift_names.iter().position(|n| n == name)?;
        Some(&mut self.scale_shifts[i])
    }

    /// Add (or replace) SSF's scale and shift called `name` and make it the active one.
    pub fn add_scale_shift(&mut self, name: &str, ss: ScaleShift) -> Result<()> {
        if let Some(i) = self.scale_shift_names.iter().position(|n| n == name) {
            self.scale_shifts.remove(i);
            self.scale_shift_names.remove(i);
        }
        self.scale_shifts.push(ss);
        self.scale_shift_names.push(name.into());
        self.scale_shift_active = Some(name.into());
        Ok(())
    }

    /// Use SSF scale and shift `name`, or none.
    pub fn set_scale_shift_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name
            && self.scale_shift_of(n).is_none()
        {
            return Err(PeftError::UnknownAdapter(n.into()));
        }
        self.scale_shift_active = name.map(String::from);
        Ok(())
    }

    /// Fold SSF scale and shift `name` into the base (`undo`: take it back out); exact where
    /// the scale has no zero entry.
    pub fn fold_scale_shift(&mut self, name: &str, undo: bool) -> Result<()> {
        let ss = self
            .scale_shift_of(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.into()))?;
        let w = self.base.weight.val();
        let dtype = w.dtype();
        let g = ss.vectors(dtype).0;
        let w = if undo { w / g } else { w * g };
        let bias = ss.fold_bias(self.base.bias.as_ref().map(|b| b.val()), dtype, undo);
        self.base.weight = frozen(w.detach());
        self.base.bias = Some(frozen(bias.detach()));
        self.scale_shift_merged = if undo { None } else { Some(name.into()) };
        Ok(())
    }

    /// The copy of adapter `name`.
    pub fn copy(&self, name: &str) -> Option<&NormWeights> {
        self.index(name).ok().map(|i| &self.copies[i])
    }

    /// The copy of adapter `name`, mutable.
    pub fn copy_mut(&mut self, name: &str) -> Option<&mut NormWeights> {
        self.index(name).ok().map(|i| &mut self.copies[i])
    }

    /// Add (or replace) a trainable copy of the base called `name`, and make it the one used.
    pub fn add_copy(&mut self, name: &str) {
        self.delete_copy(name).ok();
        self.copies.push(self.base.copy(true));
        self.names.push(name.into());
        self.active = Some(name.into());
    }

    /// Remove copy `name` (unmerging it first if merged).
    pub fn delete_copy(&mut self, name: &str) -> Result<()> {
        if self.merged.as_deref() == Some(name) {
            self.unmerge(name)?;
        }
        let i = self.index(name)?;
        self.copies.remove(i);
        self.names.remove(i);
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        Ok(())
    }

    /// Use copy `name` (or the base with `None`).
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            self.index(n)?;
        }
        self.active = name.map(String::from);
        Ok(())
    }

    /// Swap copy `name` into the base (frozen); the original base takes its place, so
    /// [`TunedNorm::unmerge`] swaps back. Only one copy can be merged.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        match self.merged.as_deref() {
            Some(m) if m == name => return Ok(()),
            Some(m) => {
                return Err(PeftError::Other(format!(
                    "norm copy `{m}` is already merged; unmerge it before merging `{name}`"
                )));
            }
            None => {}
        }
        self.swap(i);
        self.merged = Some(name.into());
        Ok(())
    }

    /// Swap the original weights back into the base.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if self.merged.as_deref() != Some(name) {
            return Ok(());
        }
        self.swap(i);
        self.merged = None;
        Ok(())
    }

    fn swap(&mut self, i: usize) {
        let base = self.base.copy(false);
        let copy = &self.copies[i];
        let train = copy.weight.is_require_grad();
        self.base = copy.copy(false);
        self.copies[i] = base.copy(train);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    #[test]
    fn a_copy_starts_equal_trains_alone_and_merges_by_swapping() {
        let device = Device::flex().autodiff();
        let w = Tensor::<1>::random([4], Distribution::Default, &device);
        let b = Tensor::<1>::random([4], Distribution::Default, &device);
        let mut n = TunedNorm::new(w.clone(), Some(b.clone()), 1e-5);
        n.add_copy("ln");
        let (cw, cb) = n.scale_shift();
        cw.clone()
            .into_data()
            .assert_approx_eq::<f32>(&w.clone().into_data(), Tolerance::absolute(0.0));
        let grads = (cw * 2.0 + cb.unwrap()).sum().backward();
        assert!(n.copy("ln").unwrap().weight.val().grad(&grads).is_some());
        assert!(n.base.weight.val().grad(&grads).is_none());

        let new = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0], &device);
        n.copy_mut("ln").unwrap().weight = trainable(new.clone());
        n.merge("ln").unwrap();
        let (mw, _) = n.scale_shift();
        mw.into_data()
            .assert_approx_eq::<f32>(&new.into_data(), Tolerance::absolute(0.0));
        assert!(!n.base.weight.is_require_grad(), "a merged norm is frozen");
        n.unmerge("ln").unwrap();
        n.base
            .weight
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&w.into_data(), Tolerance::absolute(0.0));
        n.set_active(None).unwrap();
        assert!(n.set_active(Some("other")).is_err());
    }
}
