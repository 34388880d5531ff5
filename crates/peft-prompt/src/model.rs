//! The three methods on a whole model: attach an encoder to the model's virtual-token site,
//! save and load PEFT's `prompt_embeddings`, keep the encoder's network in checkpoints.

use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::{PromptEncoder, PromptPlace, PromptSite, SiteHost, saved};

use crate::config::{
    PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig,
};
use crate::encoder::{
    EncoderShape, embedding_rows, encoder_tensors, load_encoder_tensors, normal_table,
};

/// The one tensor PEFT saves for every prompt-learning method.
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// Where PEFT keys `modules_to_save` of prompt-learning models (`base_model.classifier.weight`).
pub const SAVED_PREFIX: &str = "base_model.";

/// The shared fields of a method's config and the site it attaches to.
trait PromptBase {
    fn base(&self) -> &PromptLearningConfig;
    fn base_mut(&mut self) -> &mut PromptLearningConfig;
    fn place(&self) -> PromptPlace;
}

/// What differs between the three methods.
trait PromptMethod: PromptBase {
    /// The encoder a training run builds (a loaded adapter is a table).
    fn training_shape(&self, token_dim: usize) -> EncoderShape;
    /// The embeddings a training run starts from, `[n, dim]`.
    fn init_table<M: SiteHost>(&self, model: &M, n: usize, dim: usize) -> Result<Tensor<2>>;
    /// Fill defaults that depend on the model (`encoder_hidden_size`).
    fn fill_more(&mut self, _token_dim: usize) {}
    /// Change a freshly built encoder (prefix tuning's zero init of its projection).
    fn finish(&self, _encoder: &mut PromptEncoder) {}
}

fn site<M: SiteHost>(model: &M, place: PromptPlace, what: &str) -> Result<PromptSite> {
    model
        .prompt_sites()
        .into_iter()
        .find(|(_, s)| s.place == place)
        .map(|(_, s)| PromptSite::new(s.place, s.token_dim, s.heads, s.layers))
        .ok_or_else(|| {
            PeftError::Config(format!(
                "{what}: this {} model has no {} site",
                model.model_type(),
                match place {
                    PromptPlace::Input => "input-prompt",
                    PromptPlace::Prefix => "attention key/value prefix",
                }
            ))
        })
}

fn device_of<M: SiteHost>(model: &M) -> Result<burn::tensor::Device> {
    model
        .input_embeddings()
        .map(|e| e.device())
        .ok_or_else(|| PeftError::Config("the model exposes no input embeddings".into()))
}

/// The config with the model facts filled in (what the saved `adapter_config.json` holds),
/// and those facts (the site's widths, heads and layers).
fn resolved<C: PromptMethod + Clone, M: SiteHost>(
    config: &C,
    model: &M,
) -> Result<(C, PromptSite)> {
    let facts = site(model, config.place(), &config.base().peft_type)?;
    let mut c = config.clone();
    c.base_mut().fill_from(&facts)?;
    c.fill_more(facts.token_dim);
    Ok((c, facts))
}

/// The encoder a training run of `c` builds at a site with these `facts`, over `table`
/// (`[n, embedding_dim]`); its head, if any, with torch's default init.
fn training_encoder<C: PromptMethod>(
    c: &C,
    facts: &PromptSite,
    table: impl FnOnce(usize) -> Result<Tensor<2>>,
    device: &burn::tensor::Device,
) -> Result<PromptEncoder> {
    let width = facts.row_width();
    let shape = c.training_shape(facts.token_dim);
    Ok(PromptEncoder {
        embedding: trainable(table(shape.embedding_dim(facts.token_dim, width))?),
        head: shape.head(facts.token_dim, width, device),
    })
}

fn apply<C: PromptMethod + Clone, M: SiteHost>(config: &C, mut model: M, name: &str) -> Result<M> {
    let (c, facts) = resolved(config, &model)?;
    let n = c.base().total_virtual_tokens()?;
    let device = device_of(&model)?;
    let encoder = if c.base().inference_mode {
        PromptEncoder::table(Tensor::zeros([n, facts.row_width()], &device))
    } else {
        let mut e = training_encoder(&c, &facts, |dim| c.init_table(&model, n, dim), &device)?;
        c.finish(&mut e);
        e
    };
    model
        .prompt_site_mut(c.place())
        .expect("checked above")
        .add(name, encoder)?;
    saved::train_whole(&mut model, &c.base().saved_modules())?;
    Ok(model)
}

fn encoder<'a, M: SiteHost>(
    model: &'a M,
    place: PromptPlace,
    name: &str,
) -> Result<&'a PromptEncoder> {
    model
        .prompt_sites()
        .into_iter()
        .find(|(_, s)| s.place == place)
        .and_then(|(_, s)| s.encoder(name))
        .ok_or_else(|| PeftError::Other(format!("no virtual tokens for adapter `{name}`")))
}

fn state<C: PromptMethod, M: SiteHost>(config: &C, model: &M, name: &str) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    let e = encoder(model, config.place(), name)?;
    out.insert(PROMPT_KEY, HostTensor::from_tensor(e.output().detach()));
    saved::put_whole_under(
        model,
        &config.base().saved_modules(),
        &mut out,
        SAVED_PREFIX,
    );
    Ok(out)
}

fn load_state<C: PromptMethod + Clone, M: SiteHost>(
    config: &C,
    mut model: M,
    name: &str,
    mut tensors: TensorMap,
    path: &Path,
) -> Result<M> {
    let (c, _) = resolved(config, &model)?;
    let n = c.base().total_virtual_tokens()?;
    let device = device_of(&model)?;
    let site = model
        .prompt_site_mut(c.place())
        .expect("resolved checks the site");
    let width = site.row_width();
    let table = tensors.take_shaped(path, PROMPT_KEY, &[n, width])?;
    let e = site
        .encoder_mut(name)
        .ok_or_else(|| PeftError::Other(format!("adapter `{name}` has not been applied")))?;
    // As PEFT loads it: the saved output becomes the table, the network is gone.
    *e = PromptEncoder::table(table.to_tensor(&device));
    saved::take_whole_under(
        &mut model,
        &c.base().saved_modules(),
        &mut tensors,
        path,
        SAVED_PREFIX,
    )?;
    saved::ensure_used(&tensors, path)?;
    Ok(model)
}

fn training_extras<C: PromptMethod, M: SiteHost>(
    config: &C,
    model: &M,
    name: &str,
) -> Result<TensorMap> {
    let e = encoder(model, config.place(), name)?;
    if e.head.is_none() {
        return Ok(TensorMap::new());
    }
    let facts = site(model, config.place(), &config.base().peft_type)?;
    Ok(encoder_tensors(
        e,
        &config.training_shape(facts.token_dim),
        name,
    ))
}

fn load_training_extras<C: PromptMethod + Clone, M: SiteHost>(
    config: &C,
    mut model: M,
    name: &str,
    mut tensors: TensorMap,
    path: &Path,
) -> Result<M> {
    if tensors.is_empty() {
        return Ok(model);
    }
    let (c, facts) = resolved(config, &model)?;
    let n = c.base().total_virtual_tokens()?;
    let device = device_of(&model)?;
    let shape = c.training_shape(facts.token_dim);
    let fresh = training_encoder(
        &c,
        &facts,
        |dim| Ok(Tensor::zeros([n, dim], &device)),
        &device,
    )?;
    let loaded = load_encoder_tensors(fresh, &shape, name, &mut tensors, path)?;
    saved::ensure_used(&tensors, path)?;
    let e = model
        .prompt_site_mut(c.place())
        .and_then(|s| s.encoder_mut(name))
        .ok_or_else(|| PeftError::Other(format!("adapter `{name}` has not been applied")))?;
    *e = loaded;
    Ok(model)
}

macro_rules! prompt_tuner {
    ($ty:ty, $peft_type:literal, $place:expr) => {
        impl PromptBase for $ty {
            fn base(&self) -> &PromptLearningConfig {
                &self.base
            }

            fn base_mut(&mut self) -> &mut PromptLearningConfig {
                &mut self.base
            }

            fn place(&self) -> PromptPlace {
                $place
            }
        }

        impl $ty {
            /// The config with the model facts (`token_dim`, `num_attention_heads`,
            /// `num_layers`, `encoder_hidden_size`) filled in, as PEFT saves it.
            pub fn resolved_for<M: SiteHost>(&self, model: &M) -> Result<Self> {
                resolved(self, model).map(|(c, _)| c)
            }
        }

        impl<M: SiteHost> Tuner<M> for $ty {
            fn peft_type(&self) -> &'static str {
                $peft_type
            }

            /// As PEFT writes it: `inference_mode` true (a loaded adapter is its table).
            fn config_json(&self) -> serde_json::Value {
                let mut v = serde_json::to_value(self).expect("prompt configs serialise");
                v["inference_mode"] = true.into();
                v
            }

            fn apply(&self, model: M, name: &str) -> Result<M> {
                apply(self, model, name)
            }

            fn state(&self, model: &M, name: &str) -> Result<TensorMap> {
                state(self, model, name)
            }

            fn load_state(
                &self,
                model: M,
                name: &str,
                tensors: TensorMap,
                path: &Path,
            ) -> Result<M> {
                load_state(self, model, name, tensors, path)
            }

            fn training_extras(&self, model: &M, name: &str) -> Result<TensorMap> {
                training_extras(self, model, name)
            }

            fn load_training_extras(
                &self,
                model: M,
                name: &str,
                tensors: TensorMap,
                path: &Path,
            ) -> Result<M> {
                load_training_extras(self, model, name, tensors, path)
            }
        }
    };
}

prompt_tuner!(PromptTuningConfig, "PROMPT_TUNING", PromptPlace::Input);
prompt_tuner!(PromptEncoderConfig, "P_TUNING", PromptPlace::Input);
prompt_tuner!(PrefixTuningConfig, "PREFIX_TUNING", PromptPlace::Prefix);

/// `ids` repeated and cut to `n`, as PEFT fits a `TEXT` init to the virtual tokens.
pub fn fit_ids(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

impl PromptMethod for PromptTuningConfig {
    fn training_shape(&self, _token_dim: usize) -> EncoderShape {
        EncoderShape::Table
    }

    fn init_table<M: SiteHost>(&self, model: &M, n: usize, dim: usize) -> Result<Tensor<2>> {
        let device = device_of(model)?;
        let words = || {
            model
                .input_embeddings()
                .ok_or_else(|| PeftError::Config("the model exposes no input embeddings".into()))
        };
        match self.prompt_tuning_init.as_str() {
            "TEXT" => {
                let ids = self.init_token_ids.as_deref().ok_or_else(|| {
                    PeftError::Config(
                        "prompt_tuning_init TEXT: the token ids of prompt_tuning_init_text are not set (tokenize it with the model's tokenizer into `init_token_ids`)".into(),
                    )
                })?;
                if ids.is_empty() {
                    return Err(PeftError::Config(
                        "prompt_tuning_init_text has no tokens".into(),
                    ));
                }
                embedding_rows(words()?, &fit_ids(ids, n))
            }
            "SAMPLE_VOCAB" => {
                let table = words()?;
                let vocab = table.dims()[0];
                let ids: Vec<u32> =
                    Tensor::<1>::random([n], Distribution::Uniform(0.0, vocab as f64), &device)
                        .floor()
                        .int()
                        .clamp(0, vocab as i64 - 1)
                        .into_data()
                        .iter::<i64>()
                        .map(|i| i as u32)
                        .collect();
                embedding_rows(table, &ids)
            }
            _ => Ok(normal_table(n, dim, &device)),
        }
    }
}

impl PromptMethod for PromptEncoderConfig {
    fn training_shape(&self, token_dim: usize) -> EncoderShape {
        let hidden = self.encoder_hidden_size.unwrap_or(token_dim);
        match self.encoder_reparameterization_type.as_str() {
            "LSTM" => EncoderShape::Lstm {
                hidden,
                layers: self.encoder_num_layers,
                dropout: self.encoder_dropout,
            },
            _ => EncoderShape::Mlp { hidden },
        }
    }

    fn init_table<M: SiteHost>(&self, model: &M, n: usize, dim: usize) -> Result<Tensor<2>> {
        Ok(normal_table(n, dim, &device_of(model)?))
    }

    fn fill_more(&mut self, token_dim: usize) {
        self.encoder_hidden_size.get_or_insert(token_dim);
    }
}

impl PromptMethod for PrefixTuningConfig {
    fn training_shape(&self, token_dim: usize) -> EncoderShape {
        if self.prefix_projection {
            EncoderShape::Projection {
                hidden: self.encoder_hidden_size.unwrap_or(token_dim),
            }
        } else {
            EncoderShape::Table
        }
    }

    fn init_table<M: SiteHost>(&self, model: &M, n: usize, dim: usize) -> Result<Tensor<2>> {
        let device = device_of(model)?;
        Ok(match self.init_weights.as_deref() {
            Some("zero") if !self.prefix_projection => Tensor::zeros([n, dim], &device),
            _ => normal_table(n, dim, &device),
        })
    }

    fn fill_more(&mut self, token_dim: usize) {
        self.encoder_hidden_size.get_or_insert(token_dim);
    }

    /// `init_weights = "zero"` with a projection zeroes its last layer (as PEFT does).
    fn finish(&self, encoder: &mut PromptEncoder) {
        if self.init_weights.as_deref() == Some("zero")
            && let Some(peft_sites::prompt::EncoderHead::Mlp(m)) = &mut encoder.head
            && let Some(last) = m.layers.last_mut()
        {
            last.weight = trainable(last.weight.val().zeros_like());
            last.bias = trainable(last.bias.val().zeros_like());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ids_repeat_or_cut_to_the_virtual_tokens() {
        assert_eq!(fit_ids(&[1, 2, 3], 7), vec![1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(fit_ids(&[1, 2, 3], 2), vec![1, 2]);
    }
}
