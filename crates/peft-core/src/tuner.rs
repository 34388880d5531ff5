//! The contract every PEFT method implements on a model.
//!
//! A method ([`Tuner`]) turns a config into adapted modules, hands out its tensors under
//! Hugging Face PEFT keys, loads them back, and merges where the method allows. Models expose
//! the places methods attach (linears, norms, ...) through `peft_sites::SiteHost`.

use std::path::Path;

use serde_json::Value;

use crate::adapter_io::{AdapterFiles, adapter_dir, load_adapter, save_adapter};
use crate::tensors::TensorMap;
use crate::{PeftError, Result};

/// A parameter-efficient fine-tuning method applied to models of type `M`.
/// The file of a checkpoint holding [`Tuner::training_extras`].
pub const TRAINING_EXTRAS_FILE: &str = "training_extras.safetensors";

pub trait Tuner<M> {
    /// Hugging Face `peft_type` (`LORA`, `IA3`, `PROMPT_TUNING`, ...).
    fn peft_type(&self) -> &'static str;

    /// The `adapter_config.json` content.
    fn config_json(&self) -> Value;

    /// Add adapter `name` to `model`; the base stays frozen, the adapter is trainable.
    fn apply(&self, model: M, name: &str) -> Result<M>;

    /// The tensors of adapter `name`, keyed as Hugging Face PEFT saves them.
    fn state(&self, model: &M, name: &str) -> Result<TensorMap>;

    /// Load tensors (saved by [`Tuner::state`] or by Python PEFT) into adapter `name`, which
    /// [`Tuner::apply`] has created. Every key must be used; `path` names the file in errors.
    fn load_state(&self, model: M, name: &str, tensors: TensorMap, path: &Path) -> Result<M>;

    /// Add adapter `name` and load the tensors of an adapter folder read with
    /// [`crate::adapter_io::load_adapter`].
    fn apply_and_load(&self, model: M, name: &str, files: AdapterFiles) -> Result<M> {
        let model = self.apply(model, name)?;
        self.load_state(model, name, files.tensors, &files.weights)
    }

    /// Tensors a resumed run needs beyond [`Tuner::state`], which the reference format does
    /// not keep (e.g. the network of a P-tuning encoder, of which PEFT saves only the output).
    /// Written into a run's checkpoint as [`TRAINING_EXTRAS_FILE`]; none by default.
    fn training_extras(&self, model: &M, name: &str) -> Result<TensorMap> {
        let _ = (model, name);
        Ok(TensorMap::new())
    }

    /// Put [`Tuner::training_extras`] back into adapter `name` after [`Tuner::load_state`];
    /// `path` names the file in errors.
    fn load_training_extras(
        &self,
        model: M,
        name: &str,
        tensors: TensorMap,
        path: &Path,
    ) -> Result<M> {
        let _ = (name, path);
        if !tensors.is_empty() {
            return Err(PeftError::format(
                path,
                format!(
                    "{} keeps no training extras, but the file holds {} tensors",
                    self.peft_type(),
                    tensors.len()
                ),
            ));
        }
        Ok(model)
    }

    /// Put a run's checkpoint folder `dir` (written as [`Tuner::save`] plus
    /// [`TRAINING_EXTRAS_FILE`] when [`Tuner::training_extras`] has any) back into adapter
    /// `name`, which [`Tuner::apply`] has created with the run's config.
    fn load_checkpoint(&self, model: M, name: &str, dir: &Path) -> Result<M> {
        let files = load_adapter(dir)?;
        let model = self.load_state(model, name, files.tensors, &files.weights)?;
        let extras = dir.join(TRAINING_EXTRAS_FILE);
        if !extras.exists() {
            return Ok(model);
        }
        let tensors = TensorMap::read_safetensors(&extras)?;
        self.load_training_extras(model, name, tensors, &extras)
    }

    /// A term the method adds to the training loss of adapter `name` (e.g. AdapterFusion's
    /// regularisation); none by default. Trainers add it through
    /// [`crate::train::TrainHook::extra_loss`].
    fn extra_loss(&self, model: &M, name: &str) -> Option<burn::tensor::Tensor<1>> {
        let _ = (model, name);
        None
    }

    /// Fold adapter `name` into the base weights; methods that cannot merge say so.
    fn merge(&self, model: M, name: &str) -> Result<M> {
        let _ = (model, name);
        Err(PeftError::Other(format!(
            "{} adapters cannot be merged into the base weights",
            self.peft_type()
        )))
    }

    /// Save adapter `name` under `root` in the Hugging Face layout.
    fn save(&self, model: &M, name: &str, root: &Path) -> Result<()> {
        save_adapter(
            &adapter_dir(root, name),
            &self.config_json(),
            &self.state(model, name)?,
        )
    }
}

/// Read an adapter folder and check it is of `peft_type`.
pub fn read_adapter(dir: &Path, peft_type: &str) -> Result<AdapterFiles> {
    let files = load_adapter(dir)?;
    files.expect_type(peft_type)?;
    Ok(files)
}
