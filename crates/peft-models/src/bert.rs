//! A BERT encoder (token, position and type embeddings; post-LN blocks; GELU) with a sequence
//! classification head, laid out as Hugging Face `BertForSequenceClassification`
//! (`bert.encoder.layer.0.attention.self.query`, `classifier`).
//!
//! The head is trained whole beside the adapter (PEFT `modules_to_save = ["classifier"]`).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use peft_core::params::frozen;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};
use peft_sites::{
    PromptPlace, PromptSite, Site, SiteHost, SiteMut, SubNorm, SublayerPlace, SublayerSite,
    TunedNorm, site_table,
};
use serde::{Deserialize, Serialize};

use peft_quant::checkpoint::weight_shape;

use crate::attention::encoder_attention;
use crate::gelu::gelu;
use crate::slot::{
    LinearSlot, placeholder_linear, placeholder_norm, put_sites, quantization_config, take_sites,
};

fn default_eps() -> f64 {
    1e-12
}
fn two() -> usize {
    2
}

/// The fields of a BERT `config.json` the model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Number of classes of the head (`num_labels`; `id2label` also gives it).
    #[serde(default)]
    pub num_labels: Option<usize>,
}

/// Whether `path` is a Hugging Face folder whose `config.json` says `model_type: bert`.
pub fn is_bert_folder(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["model_type"] == "bert")
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        Self::from_json_str(path, &text)
    }

    /// Parse the text of a `config.json`; `path` only names it in errors.
    pub fn from_json_str(path: &Path, text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PeftError::format(path, format!("invalid JSON: {e}")))?;
        if let Some(t) = value.get("model_type").and_then(|v| v.as_str())
            && t != "bert"
        {
            return Err(PeftError::format(
                path,
                format!("model_type `{t}` is not a BERT encoder"),
            ));
        }
        let mut config: Self = peft_core::error::from_json_value(value.clone())
            .map_err(|e| PeftError::format(path, e))?;
        if config.num_labels.is_none() {
            config.num_labels = value
                .get("id2label")
                .and_then(|v| v.as_object())
                .map(|m| m.len());
        }
        config
            .validate()
            .map_err(|e| PeftError::format(path, e.to_string()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        use crate::config::{MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, check_size};
        check_size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check_size("hidden_size", self.hidden_size, MAX_WIDTH)?;
        check_size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        check_size("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check_size("num_attention_heads", self.num_attention_heads, MAX_WIDTH)?;
        check_size(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_VOCAB,
        )?;
        check_size("type_vocab_size", self.type_vocab_size, MAX_VOCAB)?;
        if let Some(n) = self.num_labels {
            check_size("num_labels", n, MAX_VOCAB)?;
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(PeftError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(PeftError::Config(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

/// Layer norm with a frozen scale and shift (Hugging Face `LayerNorm.weight` / `.bias`): a
/// norm site.
pub type LayerNorm = TunedNorm;

/// The LayerNorm forward pass over a norm site.
trait LayerNormForward {
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl LayerNormForward for LayerNorm {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (weight, bias) = self.scale_shift();
        peft_sites::ops::layer_norm(x, weight, bias, self.eps)
    }
}

#[derive(Module, Debug)]
pub struct BertLayer {
    pub query: LinearSlot,
    pub key: LinearSlot,
    pub value: LinearSlot,
    /// `attention.output.dense`
    pub attention_output: LinearSlot,
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`
    pub intermediate: LinearSlot,
    /// `output.dense`
    pub output: LinearSlot,
    pub output_norm: LayerNorm,
    /// `attention.output`'s `LayerNorm(h + input)`, with room for bottleneck adapters
    /// (AdapterHub's `mh_adapter` location).
    pub attention_adapters: SublayerSite,
    /// `output`'s `LayerNorm(h + input)` after the feed-forward block (`output_adapter`).
    pub output_adapters: SublayerSite,
}

/// A BERT sub-layer's LayerNorm, as the sub-layer site calls it.
struct SubLayerNorm<'a>(&'a LayerNorm);

impl SubNorm for SubLayerNorm<'_> {
    fn norm(&self, x: Tensor<3>) -> Tensor<3> {
        self.0.forward(x)
    }
}

/// BERT with a classification head on the pooled `[CLS]` state.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    pub word_embeddings: Param<Tensor<2>>,
    pub position_embeddings: Param<Tensor<2>>,
    pub token_type_embeddings: Param<Tensor<2>>,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<BertLayer>,
    /// `bert.pooler.dense` (tanh of it on `[CLS]`).
    pub pooler: LinearSlot,
    pub classifier: LinearSlot,
    /// Soft prompts placed before the word embeddings (prompt tuning, P-tuning).
    pub prompt: PromptSite,
    /// Key/value prefixes of every attention layer (prefix tuning, P-tuning v2).
    pub prefix: PromptSite,
    pub n_heads: usize,
    #[module(skip)]
    pub config: BertConfig,
    /// Whether the classifier came from the checkpoint (false: newly initialised, as for a
    /// plain `BertModel` such as a sentence encoder).
    #[module(skip)]
    pub head_from_checkpoint: bool,
}

site_table!(BertLayer {
    "attention.self.query" => Linear(query),
    "attention.self.key" => Linear(key),
    "attention.self.value" => Linear(value),
    "attention.output.dense" => Linear(attention_output),
    "attention.output.LayerNorm" => Norm(attention_norm),
    "intermediate.dense" => Linear(intermediate),
    "output.dense" => Linear(output),
    "output.LayerNorm" => Norm(output_norm),
    "attention.output" => Sublayer(attention_adapters),
    "output" => Sublayer(output_adapters),
});

site_table!(BertForSequenceClassification {
    "bert.embeddings.word_embeddings" => Prompt(prompt),
    "bert.embeddings.LayerNorm" => Norm(embeddings_norm),
    "bert.encoder.layer" => Each(layers),
    "bert.encoder.layer" => Prompt(prefix),
    "bert.pooler.dense" => Linear(pooler),
    "classifier" => Head(classifier),
});

impl BertForSequenceClassification {
    /// Build from Hugging Face tensors (`BertModel` keys with or without the `bert.` prefix).
    /// Without `classifier.*` tensors, or with a head for another number of classes, the head
    /// is new (as transformers does with `ignore_mismatched_sizes`): weight ~ N(0, 0.02),
    /// bias 0.
    pub fn from_tensors(
        config: BertConfig,
        num_labels: usize,
        mut t: TensorMap,
        source: &Path,
        device: &Device,
    ) -> Result<Self> {
        // A `BertModel` checkpoint has the keys of `BertForSequenceClassification` less `bert.`.
        let bare: Vec<String> = t
            .keys()
            .filter(|k| {
                ["embeddings.", "encoder.", "pooler."]
                    .iter()
                    .any(|m| k.starts_with(m))
            })
            .cloned()
            .collect();
        for k in bare {
            let v = t.remove(&k).expect("present");
            t.insert(format!("bert.{k}"), v);
        }
        t.tensors.retain(|k, _| !k.ends_with("position_ids"));
        let h = config.hidden_size;
        let mut embeddings = Vec::new();
        for (name, rows) in [
            ("word_embeddings", config.vocab_size),
            ("position_embeddings", config.max_position_embeddings),
            ("token_type_embeddings", config.type_vocab_size),
        ] {
            let key = format!("bert.embeddings.{name}.weight");
            embeddings.push(frozen(
                t.take_shaped(source, &key, &[rows, h])?.to_tensor(device),
            ));
        }
        let [word_embeddings, position_embeddings, token_type_embeddings] =
            <[_; 3]>::try_from(embeddings).expect("three embeddings");

        let head_shape = weight_shape(&t, source, "classifier.weight")?;
        let head_from_checkpoint = head_shape.as_ref().is_some_and(|s| s[0] == num_labels);
        // A head for another number of classes is replaced by a new one.
        if head_shape.is_some() && !head_from_checkpoint {
            t.tensors.retain(|k, _| !k.starts_with("classifier."));
        }
        let eps = config.layer_norm_eps;
        let norm = || placeholder_norm(h, true, eps);
        let inter = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer {
                query: placeholder_linear(h, h, true),
                key: placeholder_linear(h, h, true),
                value: placeholder_linear(h, h, true),
                attention_output: placeholder_linear(h, h, true),
                attention_norm: norm(),
                intermediate: placeholder_linear(inter, h, true),
                output: placeholder_linear(h, inter, true),
                output_norm: norm(),
                attention_adapters: SublayerSite::new(SublayerPlace::Attention, i, h),
                output_adapters: SublayerSite::new(SublayerPlace::Output, i, h),
            })
            .collect();
        let mut config = config;
        config.num_labels = Some(num_labels);
        let mut model = Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm: norm(),
            layers,
            pooler: placeholder_linear(h, h, true),
            classifier: placeholder_linear(num_labels, h, true),
            prompt: PromptSite::new(
                PromptPlace::Input,
                config.hidden_size,
                config.num_attention_heads,
                config.num_hidden_layers,
            ),
            prefix: PromptSite::new(
                PromptPlace::Prefix,
                config.hidden_size,
                config.num_attention_heads,
                config.num_hidden_layers,
            ),
            n_heads: config.num_attention_heads,
            config,
            head_from_checkpoint,
        };
        let sites = model.sites_mut().into_iter();
        let sites = sites.filter(|(_, s)| head_from_checkpoint || !matches!(s, SiteMut::Head(_)));
        take_sites(&mut t, source, sites.collect(), device)?;
        if head_from_checkpoint {
            // The head is trained whole, so one stored 4-bit (transformers quantizes it too
            // unless told to skip it) is made dense.
            model.classifier.base.dequantize();
        } else {
            let w = Tensor::<2>::random([h, num_labels], Distribution::Normal(0.0, 0.02), device);
            model.classifier = LinearSlot::new(w, Some(Tensor::zeros([num_labels], device)));
        }
        if !t.is_empty() {
            let left: Vec<&String> = t.keys().take(5).collect();
            return Err(PeftError::format(
                source,
                format!(
                    "{} tensors are not part of a BERT model (first: {left:?})",
                    t.len()
                ),
            ));
        }
        Ok(model)
    }

    /// Class logits `[batch, num_labels]` for token ids and a 1/0 attention mask `[batch, seq]`.
    ///
    /// Active virtual tokens enter as Hugging Face PEFT puts them: a soft prompt before the
    /// word embeddings (positions from 0, token type 0; the pooled state is then the first
    /// virtual token's), a prefix as extra keys and values in every layer (the tokens'
    /// positions start at `n_virtual`). Both are always attended to.
    pub fn forward(&self, tokens: Tensor<2, Int>, attention_mask: Tensor<2>) -> Tensor<2> {
        let device = tokens.device();
        let [b, _] = tokens.dims();
        let h = self.config.hidden_size;
        let (nh, hd) = (self.n_heads, h / self.n_heads);
        let mut x = burn::tensor::module::embedding(self.word_embeddings.val(), tokens);
        let mut mask = attention_mask;
        if let Some(p) = self.prompt.input_prompt(b) {
            let n = p.dims()[1];
            x = Tensor::cat(vec![p, x], 1);
            mask = Tensor::cat(vec![Tensor::ones([b, n], &device), mask], 1);
        }
        let s = x.dims()[1];
        let prefix = self.prefix.prefix_kv(b);
        let start = prefix.as_ref().map_or(0, |kv| kv[0].0.dims()[2]);
        if start > 0 {
            mask = Tensor::cat(vec![Tensor::ones([b, start], &device), mask], 1);
        }
        let positions =
            Tensor::<1, Int>::arange(start as i64..(start + s) as i64, &device).reshape([1, s]);
        x = x
            + burn::tensor::module::embedding(self.position_embeddings.val(), positions)
            + self
                .token_type_embeddings
                .val()
                .narrow(0, 0, 1)
                .reshape([1, 1, h]);
        x = self.embeddings_norm.forward(x);
        // Padding keys get a large negative score, so softmax gives them zero weight.
        let bias = mask.neg().add_scalar(1.0).mul_scalar(-1e9);
        for (i, l) in self.layers.iter().enumerate() {
            let heads = |slot: &LinearSlot, x: Tensor<3>| {
                slot.forward(x).reshape([b, s, nh, hd]).swap_dims(1, 2)
            };
            let q = heads(&l.query, x.clone());
            let mut k = heads(&l.key, x.clone());
            let mut v = heads(&l.value, x.clone());
            if let Some(kv) = &prefix {
                k = Tensor::cat(vec![kv[i].0.clone(), k], 2);
                v = Tensor::cat(vec![kv[i].1.clone(), v], 2);
            }
            let ctx = encoder_attention(q, k, v, Some(bias.clone()), 1.0 / (hd as f64).sqrt())
                .swap_dims(1, 2)
                .reshape([b, s, h]);
            x = l.attention_adapters.forward(
                l.attention_output.forward(ctx),
                x,
                Some(&SubLayerNorm(&l.attention_norm)),
            );
            let ff = l.output.forward(gelu(l.intermediate.forward(x.clone())));
            x = l
                .output_adapters
                .forward(ff, x, Some(&SubLayerNorm(&l.output_norm)));
        }
        let cls = x.narrow(1, 0, 1).reshape([b, h]);
        let pooled = self.pooler.forward(cls).tanh();
        self.classifier.forward(pooled)
    }

    /// Mean cross-entropy of `labels` `[batch]`.
    pub fn loss(
        &self,
        tokens: Tensor<2, Int>,
        attention_mask: Tensor<2>,
        labels: Tensor<1, Int>,
    ) -> Tensor<1> {
        let logits = self.forward(tokens, attention_mask);
        crate::loss::cross_entropy_rows(logits, labels).mean()
    }

    /// Every weight under its Hugging Face `BertForSequenceClassification` key.
    pub fn to_tensors(&self) -> TensorMap {
        let mut t = TensorMap::new();
        put_sites(&mut t, self.sites());
        let embeddings = [
            ("word_embeddings", &self.word_embeddings),
            ("position_embeddings", &self.position_embeddings),
            ("token_type_embeddings", &self.token_type_embeddings),
        ];
        for (name, e) in embeddings {
            t.insert(
                format!("bert.embeddings.{name}.weight"),
                HostTensor::from_tensor(e.val()),
            );
        }
        t
    }

    pub fn device(&self) -> Device {
        self.word_embeddings.device()
    }

    /// The `quantization_config` entry of `config.json` when encoder weights are 4-bit; the
    /// classifier stays in full precision.
    pub fn quantization_config(&self) -> Option<serde_json::Value> {
        quantization_config(self.linears().into_iter().map(|(_, s)| s), &["classifier"])
    }
}

/// Accuracy and macro-averaged F1 of `model` on `data`.
pub fn accuracy_and_macro_f1(
    model: &BertForSequenceClassification,
    data: &[(Vec<u32>, i64)],
    n_classes: usize,
) -> (f64, f64) {
    let model = model.valid();
    let device = model.device();
    let mut confusion = vec![vec![0usize; n_classes]; n_classes];
    for chunk in data.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|e| e.0.clone()).collect();
        let (tokens, mask) = encode_batch(&ids, &device);
        let pred = model
            .forward(tokens, mask)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        for (p, e) in pred.iter().zip(chunk) {
            confusion[e.1 as usize][*p as usize] += 1;
        }
    }
    let total: usize = confusion.iter().flatten().sum();
    let correct: usize = (0..n_classes).map(|c| confusion[c][c]).sum();
    let f1: f64 = (0..n_classes)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: f64 = (0..n_classes).map(|r| confusion[r][c] as f64).sum();
            let actual: f64 = confusion[c].iter().sum::<usize>() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (predicted + actual)
            }
        })
        .sum::<f64>()
        / n_classes as f64;
    (correct as f64 / total.max(1) as f64, f1)
}

/// Token ids and attention mask of a padded batch.
pub fn encode_batch(ids: &[Vec<u32>], device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
    let s = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut tok = Vec::with_capacity(ids.len() * s);
    let mut mask = Vec::with_capacity(ids.len() * s);
    for row in ids {
        tok.extend(row.iter().map(|&t| t as i64));
        tok.extend(std::iter::repeat_n(0i64, s - row.len()));
        mask.extend(std::iter::repeat_n(1.0f32, row.len()));
        mask.extend(std::iter::repeat_n(0.0f32, s - row.len()));
    }
    let b = ids.len();
    (
        Tensor::from_data(TensorData::new(tok, [b, s]), device),
        Tensor::from_data(TensorData::new(mask, [b, s]), device),
    )
}

impl SiteHost for BertForSequenceClassification {
    fn model_type(&self) -> &'static str {
        "bert"
    }

    fn sites(&self) -> Vec<(String, Site<'_>)> {
        self.site_list()
    }

    fn sites_mut(&mut self) -> Vec<(String, SiteMut<'_>)> {
        self.site_list_mut()
    }

    fn input_embeddings(&self) -> Option<Tensor<2>> {
        Some(self.word_embeddings.val())
    }

    fn embeddings(&self) -> Vec<(String, &Param<Tensor<2>>)> {
        let e = self;
        vec![
            ("bert.embeddings.word_embeddings".into(), &e.word_embeddings),
            (
                "bert.embeddings.position_embeddings".into(),
                &e.position_embeddings,
            ),
            (
                "bert.embeddings.token_type_embeddings".into(),
                &e.token_type_embeddings,
            ),
        ]
    }

    fn embeddings_mut(&mut self) -> Vec<(String, &mut Param<Tensor<2>>)> {
        let e = self;
        vec![
            (
                "bert.embeddings.word_embeddings".into(),
                &mut e.word_embeddings,
            ),
            (
                "bert.embeddings.position_embeddings".into(),
                &mut e.position_embeddings,
            ),
            (
                "bert.embeddings.token_type_embeddings".into(),
                &mut e.token_type_embeddings,
            ),
        ]
    }
}
