//! The tunable linear slot every architecture is built from, and its Hugging Face checkpoint
//! form: a dense `<name>.weight` (`[out, in]`), or bitsandbytes' 4-bit keys (packed weight,
//! scales, quant state) that load as a 4-bit base and are written back the same way.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use peft_core::Result;
use peft_core::linear::FrozenLinear;
use peft_core::params::frozen;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_quant::checkpoint::{put_4bit, take_4bit};
use peft_quant::{BaseLinear, Linear4bit};

/// A tunable linear projection: a frozen base with the parts methods attach.
pub type LinearSlot = peft_sites::TunedLinear;

/// A linear of the model's structure before its weights are read: zeros on the host, from an
/// allocation the kernel maps lazily, so a model-sized skeleton costs no memory until
/// [`take_sites`] replaces every one of them.
pub fn placeholder_linear(out: usize, inp: usize, bias: bool) -> LinearSlot {
    let host = Device::flex();
    LinearSlot::new(
        Tensor::zeros([inp, out], &host),
        bias.then(|| Tensor::zeros([out], &host)),
    )
}

/// A norm of the model's structure before its weights are read (see [`placeholder_linear`]).
pub fn placeholder_norm(len: usize, bias: bool, eps: f64) -> peft_sites::TunedNorm {
    let host = Device::flex();
    peft_sites::TunedNorm::new(
        Tensor::zeros([len], &host),
        bias.then(|| Tensor::zeros([len], &host)),
        eps,
    )
}

/// Fill a model's linear and norm sites from Hugging Face-named tensors: each site at `path`
/// takes `<path>.weight` (and `<path>.bias` where the site has one) out of `t`, with the shape
/// the site was built with. The inverse of [`put_sites`], so a model's module names are the
/// ones of its site table and nowhere else.
pub fn take_sites(
    t: &mut TensorMap,
    source: &Path,
    sites: Vec<(String, peft_sites::SiteMut<'_>)>,
    device: &Device,
) -> Result<()> {
    for (path, site) in sites {
        match site {
            peft_sites::SiteMut::Linear(l) | peft_sites::SiteMut::Head(l) => {
                let (out, inp) = (l.base.d_output(), l.base.d_input());
                let bias = l.base.bias().is_some();
                *l = take_linear(t, source, &path, out, inp, bias, device)?;
            }
            peft_sites::SiteMut::Norm(n) => {
                let len = n.base.weight.val().dims()[0];
                let w = t.take_shaped(source, &format!("{path}.weight"), &[len])?;
                n.base.weight = frozen(w.to_tensor(device));
                if n.base.bias.is_some() {
                    let b = t.take_shaped(source, &format!("{path}.bias"), &[len])?;
                    n.base.bias = Some(frozen(b.to_tensor(device)));
                }
            }
            // Virtual tokens and sub-layer adapters are adapter state, never in a checkpoint.
            peft_sites::SiteMut::Prompt(_) | peft_sites::SiteMut::Sublayer(_) => {}
        }
    }
    Ok(())
}

/// Take `<name>.weight` (`[out, inp]`, dense or bitsandbytes 4-bit, which stays 4-bit) and,
/// with `bias`, `<name>.bias` out of `t`.
pub fn take_linear(
    t: &mut TensorMap,
    source: &Path,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    device: &Device,
) -> Result<LinearSlot> {
    let take_bias = |t: &mut TensorMap| {
        bias.then(|| t.take_shaped(source, &format!("{name}.bias"), &[out]))
            .transpose()
    };
    if let Some(q) = take_4bit(t, source, &format!("{name}.weight"), out, inp)? {
        let b = take_bias(t)?.map(|b| frozen(b.to_tensor(device)));
        return Ok(LinearSlot::from_base(BaseLinear::Quant4(Linear4bit::new(
            q,
            b,
            device.clone(),
        )?)));
    }
    let w = t.take_shaped(source, &format!("{name}.weight"), &[out, inp])?;
    Ok(LinearSlot::from_base(FrozenLinear::from_hf(
        &w,
        take_bias(t)?.as_ref(),
        device,
    )))
}

/// Put a slot's base under `name`: `<name>.weight` dense, or in bitsandbytes' 4-bit layout;
/// `<name>.bias` when it has one.
pub fn put_linear(t: &mut TensorMap, name: &str, slot: &LinearSlot) {
    match &slot.base {
        BaseLinear::Quant4(q) => put_4bit(t, &format!("{name}.weight"), q.quantized(), "float32"),
        BaseLinear::Dense(d) => t.insert(format!("{name}.weight"), d.weight_hf()),
    }
    if let Some(b) = slot.base.bias() {
        t.insert(format!("{name}.bias"), HostTensor::from_tensor(b.val()));
    }
}

/// The `quantization_config` entry of `config.json` when some slot's base is 4-bit (what
/// transformers needs to load the checkpoint pre-quantized), `None` when all are dense.
/// `skip_modules` are the modules kept in full precision (the output head).
pub fn quantization_config<'a>(
    slots: impl IntoIterator<Item = &'a LinearSlot>,
    skip_modules: &[&str],
) -> Option<serde_json::Value> {
    let spec = slots.into_iter().find_map(|s| match &s.base {
        BaseLinear::Quant4(q) => Some(q.spec()),
        BaseLinear::Dense(_) => None,
    })?;
    Some(serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": spec.qtype.name(),
        "bnb_4bit_use_double_quant": spec.double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
    }))
}

/// Put the base weights of `sites` under their paths: linears as [`put_linear`] does, norms as
/// `<path>.weight` (and `<path>.bias`).
pub fn put_sites(t: &mut TensorMap, sites: Vec<(String, peft_sites::Site<'_>)>) {
    for (path, site) in sites {
        match site {
            peft_sites::Site::Linear(l) | peft_sites::Site::Head(l) => put_linear(t, &path, l),
            peft_sites::Site::Norm(n) => {
                t.insert(
                    format!("{path}.weight"),
                    HostTensor::from_tensor(n.base.weight.val()),
                );
                if let Some(b) = &n.base.bias {
                    t.insert(format!("{path}.bias"), HostTensor::from_tensor(b.val()));
                }
            }
            // Virtual tokens are adapter state, never part of the base checkpoint.
            peft_sites::Site::Prompt(_) | peft_sites::Site::Sublayer(_) => {}
        }
    }
}
