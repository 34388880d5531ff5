//! Mixed-batch inference: one forward pass where each row of the batch uses its own LoRA
//! adapter, or none (Hugging Face PEFT's `adapter_names=`). Each adapter's delta is computed
//! on its own rows only, so a batch of prompts over several adapters costs one base pass plus
//! each adapter's side path on its share of the rows.

use peft_core::{PeftError, Result};

use crate::host::{Site, SiteHost, SiteMut};
use crate::linear::LinearPart;

/// The row name that means "no adapter" (PEFT's `"__base__"`).
pub const BASE_ROW: &str = "__base__";

/// Give each row of the next forward passes its adapter (`rows[i]` for row `i`; [`BASE_ROW`]
/// for the base alone), or go back to the active adapters (`None`). Every name must be a LoRA
/// adapter of the model, not DoRA and not merged (as PEFT requires); other methods' adapters
/// (virtual tokens, norms, bottlenecks) cannot differ per row.
pub fn set_row_adapters<M: SiteHost>(model: &mut M, rows: Option<&[String]>) -> Result<()> {
    if let Some(rows) = rows {
        if rows.is_empty() {
            return Err(PeftError::Config(
                "a mixed batch needs at least one row".into(),
            ));
        }
        for name in rows.iter().filter(|n| *n != BASE_ROW) {
            check_row_adapter(model, name)?;
        }
    }
    for (_, site) in model.sites_mut() {
        if let SiteMut::Linear(l) | SiteMut::Head(l) = site {
            l.row_adapters = rows.map(<[String]>::to_vec);
        }
    }
    Ok(())
}

fn check_row_adapter<M: SiteHost>(model: &M, name: &str) -> Result<()> {
    let mut found = false;
    for (path, site) in model.sites() {
        let other = match site {
            Site::Linear(l) | Site::Head(l) => {
                if !l.merged.is_empty() {
                    return Err(PeftError::Config(format!(
                        "`{path}` has merged adapters ({}): unmerge them before a mixed batch",
                        l.merged.join(", ")
                    )));
                }
                match l.part(name) {
                    Some(LinearPart::Lora(a)) if a.singular.is_some() => {
                        return Err(PeftError::Config(format!(
                            "adapter `{name}` is an AdaLoRA adapter: mixed batches take LoRA adapters"
                        )));
                    }
                    Some(LinearPart::Lora(a)) if a.magnitude.is_some() => {
                        return Err(PeftError::Config(format!(
                            "adapter `{name}` is a DoRA adapter: mixed batches take LoRA adapters (PEFT refuses DoRA too)"
                        )));
                    }
                    Some(LinearPart::Lora(_)) => {
                        found = true;
                        false
                    }
                    Some(_) => true,
                    None => false,
                }
            }
            Site::Norm(n) => n.copy(name).is_some(),
            Site::Prompt(p) => p.encoder(name).is_some(),
            Site::Sublayer(b) => b.adapter(name).is_some(),
        };
        if other {
            return Err(PeftError::Config(format!(
                "adapter `{name}` is not a LoRA adapter (it has a part at `{path}`): mixed batches take LoRA adapters"
            )));
        }
    }
    if !found {
        return Err(PeftError::UnknownAdapter(name.into()));
    }
    Ok(())
}
