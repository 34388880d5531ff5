//! Modules trained and saved whole beside an adapter (Hugging Face `modules_to_save`, e.g. a
//! classifier), shared by every method: their linear sites become trainable in full precision
//! and save as `base_model.model.<path>.weight` / `.bias`.

use std::path::Path;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::params::trainable;
use peft_core::target::in_saved_module;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};

use crate::host::SiteHost;

/// The linear sites in or under a `modules_to_save` module (the rule that also keeps them out
/// of the targets, [`in_saved_module`]).
pub fn saved_linears<M: SiteHost>(model: &M, modules_to_save: &[String]) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| in_saved_module(p, modules_to_save))
        .collect()
}

/// Make the saved modules trainable: weight (dense, even over a 4-bit base) and bias.
pub fn train_whole<M: SiteHost>(model: &mut M, modules_to_save: &[String]) -> Result<()> {
    for path in saved_linears(model, modules_to_save) {
        let s = model.linear_mut(&path).expect("listed");
        let w = s.base.dense_weight(&s.base.device());
        s.base.set_weight(w, true)?;
        s.base.set_bias_trainable(true);
    }
    Ok(())
}

/// Put the saved modules' weights and biases into `out` under their adapter keys.
pub fn put_whole<M: SiteHost>(model: &M, modules_to_save: &[String], out: &mut TensorMap) {
    put_whole_under(model, modules_to_save, out, KEY_PREFIX)
}

/// [`put_whole`] with keys `<prefix><path>.weight`: prompt-learning methods save them under
/// `base_model.` (PEFT puts no tuner wrapper between the model and its saved modules there).
pub fn put_whole_under<M: SiteHost>(
    model: &M,
    modules_to_save: &[String],
    out: &mut TensorMap,
    prefix: &str,
) {
    for (path, s) in model.linears() {
        if !in_saved_module(&path, modules_to_save) {
            continue;
        }
        out.insert(format!("{prefix}{path}.weight"), s.base.weight_hf());
        if let Some(b) = s.base.bias() {
            out.insert(
                format!("{prefix}{path}.bias"),
                HostTensor::from_tensor(b.val()),
            );
        }
    }
}

/// Take the saved modules' weights and biases out of `tensors` (read from `file`) into the
/// model, trainable.
pub fn take_whole<M: SiteHost>(
    model: &mut M,
    modules_to_save: &[String],
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<()> {
    take_whole_under(model, modules_to_save, tensors, file, KEY_PREFIX)
}

/// [`take_whole`] from keys `<prefix><path>.weight` (see [`put_whole_under`]).
pub fn take_whole_under<M: SiteHost>(
    model: &mut M,
    modules_to_save: &[String],
    tensors: &mut TensorMap,
    file: &Path,
    prefix: &str,
) -> Result<()> {
    for path in saved_linears(model, modules_to_save) {
        let s = model.linear_mut(&path).expect("listed");
        let device = s.base.device();
        let (d_in, d_out) = (s.base.d_input(), s.base.d_output());
        let w = tensors.take_shaped(file, &format!("{prefix}{path}.weight"), &[d_out, d_in])?;
        s.base.set_weight(w.transposed().to_tensor(&device), true)?;
        if s.base.bias().is_some() {
            let b = tensors.take_shaped(file, &format!("{prefix}{path}.bias"), &[d_out])?;
            *s.base.bias_mut() = Some(trainable(b.to_tensor(&device)));
        }
    }
    Ok(())
}

/// Refuse tensors a load did not use: they belong to modules this model does not have.
pub fn ensure_used(tensors: &TensorMap, file: &Path) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let left: Vec<&String> = tensors.keys().take(5).collect();
    Err(PeftError::format(
        file,
        format!(
            "{} tensors do not belong to any adapted module of this model (first: {left:?}); \
             is the adapter for another base model?",
            tensors.len()
        ),
    ))
}
