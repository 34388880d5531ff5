//! The empirical Fisher information of linear weights: the sum over batches of the squared
//! gradient of each weight entry, the score FishMask and Child-Tuning-D select by.
//!
//! FishMask (Sung et al., 2021) sums over single examples (batches of one), Child-Tuning-D
//! (Xu et al., 2021, and its code) over the training batches. The loss is the one training
//! minimises (the mean token loss of the batch). While the scores are gathered the targeted
//! weights train in full, so this one pass holds their dense gradients; training afterwards
//! holds only the selected entries.

use burn::tensor::Tensor;
use peft_core::{PeftError, Result};
use peft_sites::SiteHost;

use crate::sparse::Scores;

/// Squared-gradient sums over `batches` of the weights of the linears at `paths`, in the
/// Hugging Face layout `[out·in]`; `loss_fn` gives a batch's loss on an autodiff device. The
/// model comes back with those weights frozen again. `progress` is called after each batch.
pub fn fisher_scores<M: SiteHost, E>(
    mut model: M,
    paths: &[String],
    batches: &[Vec<E>],
    loss_fn: impl Fn(&M, &[E]) -> Tensor<1>,
    mut progress: impl FnMut(usize),
) -> Result<(M, Scores)> {
    if batches.is_empty() {
        return Err(PeftError::Config(
            "fisher_samples: no examples to estimate the Fisher information from".into(),
        ));
    }
    for path in paths {
        let s = linear(&mut model, path)?;
        if s.base.is_quantized() {
            return Err(PeftError::Config(format!(
                "Fisher scores: `{path}` has a 4-bit base, whose gradient is not computed; \
                 load the model unquantized to choose the mask"
            )));
        }
        let w = s.base.dense_weight(&s.base.device());
        s.base.set_weight(w, true)?;
    }
    let mut scores = Scores::new();
    for (b, batch) in batches.iter().enumerate() {
        let grads = loss_fn(&model, batch).backward();
        for (path, site) in model.linears() {
            if !paths.contains(&path) {
                continue;
            }
            let peft_quant::BaseLinear::Dense(d) = &site.base else {
                unreachable!("made dense above")
            };
            let Some(g) = d.weight.val().grad(&grads) else {
                continue;
            };
            // burn's [in, out] -> Hugging Face [out, in].
            let g = peft_core::tensors::HostTensor::from_tensor(g.transpose()).data;
            let acc = scores.entry(path).or_insert_with(|| vec![0.0; g.len()]);
            for (a, v) in acc.iter_mut().zip(&g) {
                *a += v * v;
            }
        }
        progress(b + 1);
    }
    for path in paths {
        let s = linear(&mut model, path)?;
        let w = s.base.dense_weight(&s.base.device()).detach();
        s.base.set_weight(w, false)?;
    }
    Ok((model, scores))
}

fn linear<'a, M: SiteHost>(
    model: &'a mut M,
    path: &str,
) -> Result<&'a mut peft_sites::TunedLinear> {
    model
        .linear_mut(path)
        .ok_or_else(|| PeftError::Config(format!("Fisher scores: no linear `{path}` in the model")))
}
