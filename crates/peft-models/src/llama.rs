//! A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied
//! head, KV cache) whose fields carry the Hugging Face module names, so a module's burn path
//! is the path users know (`model.layers.3.self_attn.q_proj`).
//!
//! Every linear projection is a [`LinearSlot`] and every norm a [`TunedNorm`]: frozen weights
//! with room for what methods attach. The sites are declared once, in the `site_table!`s
//! below.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use peft_core::params::frozen;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};
use peft_sites::{
    PromptPlace, PromptSite, Site, SiteHost, SiteMut, SublayerPlace, SublayerSite, TunedNorm,
    site_table,
};

use crate::attention::causal_attention;
use crate::config::LlamaConfig;
use crate::loss::cross_entropy_rows;
use crate::rms_norm::rms_norm;
use crate::slot::{
    placeholder_linear, placeholder_norm, put_sites, quantization_config, take_sites,
};
use crate::swiglu::swiglu;

pub use crate::slot::LinearSlot;

/// The input embeddings' key: the one base tensor that is not a site's.
const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// Root-mean-square layer norm with a learned scale (a norm site: no shift).
pub type RmsNorm = TunedNorm;

/// The RMSNorm forward pass over a norm site.
trait RmsForward {
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl RmsForward for RmsNorm {
    /// Normalised in f32 whatever the input's type (as transformers does), then scaled in it;
    /// shifted where SSF gives the norm a shift.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (weight, shift) = self.scale_shift();
        let y = rms_norm(x, weight, self.eps);
        match shift {
            Some(b) => {
                let n = b.dims()[0];
                y + b.reshape([1, 1, n])
            }
            None => y,
        }
    }
}

/// Add `W·shift` to the bias of each linear (making one where there is none): the same output
/// as the linear of an input shifted by `shift`.
fn add_input_shift(linears: &mut [&mut LinearSlot], shift: Tensor<1>) {
    for l in linears {
        let device = l.base.device();
        let n = shift.dims()[0];
        let w = l.base.dense_weight(&device); // [in, out]
        let moved = shift
            .clone()
            .to_device(&device)
            .cast(w.dtype())
            .reshape([1, n])
            .matmul(w)
            .reshape([l.base.d_output()]);
        let bias = match l.base.bias() {
            Some(b) => b.val() + moved.cast(b.val().dtype()),
            None => moved,
        };
        *l.base.bias_mut() = Some(peft_core::params::frozen(bias.detach()));
    }
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: LinearSlot,
    pub k_proj: LinearSlot,
    pub v_proj: LinearSlot,
    pub o_proj: LinearSlot,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: LinearSlot,
    pub up_proj: LinearSlot,
    pub down_proj: LinearSlot,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(swiglu(
            self.gate_proj.forward(x.clone()),
            self.up_proj.forward(x),
        ))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// After the attention block: `o_proj`'s output plus the residual (AdapterHub's
    /// `attention_adapters`).
    pub attention_adapters: SublayerSite,
    /// After the MLP: its output plus the residual (AdapterHub's `output_adapters`).
    pub output_adapters: SublayerSite,
}

/// The embeddings, decoder stack and final norm (Hugging Face `LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// `[vocab, hidden]`, frozen.
    pub embed_tokens: Param<Tensor<2>>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Soft prompts placed before the input embeddings (prompt tuning, P-tuning).
    pub prompt: PromptSite,
    /// Key/value prefixes of every attention layer (prefix tuning), one encoder for all.
    pub prefix: PromptSite,
}

/// A causal language model (Hugging Face `LlamaForCausalLM`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    /// `None` when the head is tied to the input embeddings.
    pub lm_head: Option<LinearSlot>,
    #[module(skip)]
    pub config: LlamaConfig,
}

/// Keys and values of the positions seen so far, one entry per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// For a padded batch ([`LlamaForCausalLM::forward_padded`]): per row, 1 on the real
    /// cached positions and 0 on padding, and the position id each row's next token takes.
    padding: Option<(Vec<Vec<f32>>, Vec<usize>)>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start every layer's cache with these keys and values (`[batch, kv_heads, n, head_dim]`
    /// each, one pair per layer): a prefix that every later position attends to.
    pub fn prefill(&mut self, layers: Vec<(Tensor<4>, Tensor<4>)>) {
        self.layers = layers.into_iter().map(Some).collect();
    }
}

/// RoPE tables `[1, seq, head_dim]` for positions `start..start+seq` (Hugging Face layout:
/// the two halves of a head rotate together).
fn rope_tables(
    start: usize,
    seq: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let positions: Vec<usize> = (start..start + seq).collect();
    rope_rows(&[positions], head_dim, theta, device)
}

/// RoPE tables `[rows, seq, head_dim]`, row `r` at the position ids `positions[r]`.
fn rope_rows(
    positions: &[Vec<usize>],
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let half = head_dim / 2;
    let (rows, seq) = (positions.len(), positions[0].len());
    let mut cos = Vec::with_capacity(rows * seq * head_dim);
    let mut sin = Vec::with_capacity(rows * seq * head_dim);
    for &p in positions.iter().flatten() {
        for i in 0..head_dim {
            let inv = 1.0 / (theta as f32).powf((2 * (i % half)) as f32 / head_dim as f32);
            let angle = p as f32 * inv;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = [rows, seq, head_dim];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Position ids and key mask of a padded block: each row continues at `next[r]` and counts
/// its real tokens only (Hugging Face's `cumsum(mask) - 1`; padding repeats the row's next
/// position), so a row computes what it computes alone. Updates `cached` and `next`.
fn padded_positions(
    block: &[Vec<f32>],
    cached: &mut [Vec<f32>],
    next: &mut [usize],
) -> Vec<Vec<usize>> {
    block
        .iter()
        .zip(cached.iter_mut())
        .zip(next.iter_mut())
        .map(|((row, keys), n)| {
            let ids = row
                .iter()
                .map(|&m| {
                    let id = *n;
                    if m > 0.5 {
                        *n += 1;
                    }
                    id
                })
                .collect();
            keys.extend_from_slice(row);
            ids
        })
        .collect()
}

impl Attention {
    /// `key_bias` `[batch, keys]`: added to the scores (large negative on padding).
    fn forward(
        &self,
        x: Tensor<3>,
        rope: (Tensor<3>, Tensor<3>),
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        key_bias: Option<Tensor<2>>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // RoPE on the projections' own layout `[b, s, heads, d]`, then heads first.
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        let q = crate::rope::rope(q, rope.0.clone(), rope.1.clone()).swap_dims(1, 2);
        let k = self.k_proj.forward(x.clone()).reshape([b, s, kvh, d]);
        let mut k = crate::rope::rope(k, rope.0, rope.1).swap_dims(1, 2);
        let mut v = self
            .v_proj
            .forward(x)
            .reshape([b, s, kvh, d])
            .swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Query i (absolute position t - s + i) sees keys 0..=t - s + i.
        let out = causal_attention(q, k, v, key_bias, 1.0 / (d as f64).sqrt());
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

impl LlamaForCausalLM {
    /// The model's structure with placeholder weights ([`placeholder_linear`]), which
    /// [`take_sites`] fills by the paths of the site tables.
    fn skeleton(config: LlamaConfig) -> Self {
        let (hd, kvh, h) = (
            config.head_dim(),
            config.kv_heads(),
            config.num_attention_heads,
        );
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        let norm = || placeholder_norm(hidden, false, config.rms_norm_eps);
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer {
                self_attn: Attention {
                    q_proj: placeholder_linear(h * hd, hidden, ab),
                    k_proj: placeholder_linear(kvh * hd, hidden, ab),
                    v_proj: placeholder_linear(kvh * hd, hidden, ab),
                    o_proj: placeholder_linear(hidden, h * hd, ab),
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate_proj: placeholder_linear(inter, hidden, mb),
                    up_proj: placeholder_linear(inter, hidden, mb),
                    down_proj: placeholder_linear(hidden, inter, mb),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
                attention_adapters: SublayerSite::new(SublayerPlace::Attention, i, hidden),
                output_adapters: SublayerSite::new(SublayerPlace::Output, i, hidden),
            })
            .collect();
        Self {
            model: LlamaModel {
                embed_tokens: frozen(Tensor::zeros([config.vocab_size, hidden], &Device::flex())),
                layers,
                norm: norm(),
                prompt: PromptSite::new(PromptPlace::Input, hidden, h, config.num_hidden_layers),
                // As PEFT sizes it under grouped-query attention: key/value heads only.
                prefix: PromptSite::new(
                    PromptPlace::Prefix,
                    kvh * hd,
                    kvh,
                    config.num_hidden_layers,
                ),
            },
            lm_head: (!config.tie_word_embeddings)
                .then(|| placeholder_linear(config.vocab_size, hidden, false)),
            config,
        }
    }

    /// Build from Hugging Face-named tensors; every tensor must be used and have its shape.
    pub fn from_tensors(
        config: LlamaConfig,
        mut t: TensorMap,
        source: &Path,
        device: &Device,
    ) -> Result<Self> {
        let embed = t.take_shaped(
            source,
            EMBED_TOKENS,
            &[config.vocab_size, config.hidden_size],
        )?;
        // Checkpoints of tied models sometimes still carry a copy of the head.
        if config.tie_word_embeddings {
            t.remove("lm_head.weight");
        }
        let mut model = Self::skeleton(config);
        model.model.embed_tokens = frozen(embed.to_tensor(device));
        take_sites(&mut t, source, model.sites_mut(), device)?;
        t.tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if !t.is_empty() {
            let left: Vec<&String> = t.keys().take(5).collect();
            return Err(PeftError::format(
                source,
                format!(
                    "{} tensors are not part of a Llama model (first: {left:?})",
                    t.len()
                ),
            ));
        }
        Ok(model)
    }

    /// A model with random weights, for benchmarks and tests that need no checkpoint: every
    /// matrix drawn from N(0, 0.02²) (transformers' `initializer_range` default), norms at 1.
    /// Seed the host CPU device (`Device::flex().seed(..)`) for a reproducible model.
    pub fn random(config: LlamaConfig, device: &Device) -> Result<Self> {
        use burn::tensor::Distribution;
        let host = Device::flex();
        let normal = |shape: [usize; 2]| {
            HostTensor::from_tensor(Tensor::<2>::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                &host,
            ))
        };
        let ones = |n: usize| HostTensor::new(vec![n], vec![1.0; n]);
        let zeros = |n: usize| HostTensor::new(vec![n], vec![0.0; n]);
        let mut t = TensorMap::new();
        t.insert(
            EMBED_TOKENS,
            normal([config.vocab_size, config.hidden_size]),
        );
        // The keys and shapes are the skeleton's sites.
        let skeleton = Self::skeleton(config.clone());
        for (path, site) in skeleton.sites() {
            match site {
                Site::Linear(l) | Site::Head(l) => {
                    let out = l.base.d_output();
                    t.insert(format!("{path}.weight"), normal([out, l.base.d_input()]));
                    if l.base.bias().is_some() {
                        t.insert(format!("{path}.bias"), zeros(out));
                    }
                }
                Site::Norm(n) => t.insert(
                    format!("{path}.weight"),
                    ones(n.base.weight.val().dims()[0]),
                ),
                Site::Prompt(_) | Site::Sublayer(_) => {}
            }
        }
        Self::from_tensors(config, t, Path::new("<random weights>"), device)
    }

    /// Every weight under its Hugging Face key (what `save_pretrained` writes); 4-bit linear
    /// weights in bitsandbytes' layout.
    pub fn to_tensors(&self) -> TensorMap {
        let mut t = TensorMap::new();
        t.insert(
            EMBED_TOKENS,
            HostTensor::from_tensor(self.model.embed_tokens.val()),
        );
        put_sites(&mut t, self.sites());
        t
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.device()
    }

    /// Make the biases expressible in a Hugging Face checkpoint after a merge that gave some
    /// linears one (SSF's shift, an added bias): `attention_bias` (q, k, v, o) and `mlp_bias`
    /// (gate, up, down) switch on for the whole model, with zero biases where a layer had none.
    /// A bias on the output head has no place in a Llama checkpoint: an error.
    pub fn complete_biases(mut self) -> Result<Self> {
        self.fold_norm_shifts()?;
        // `attention_bias` covers the linears of `self_attn`, `mlp_bias` those of `mlp`.
        let in_group = |path: &str, group: &str| path.contains(&format!(".{group}."));
        let has = |group: &str, m: &Self| {
            m.linears()
                .iter()
                .any(|(p, l)| in_group(p, group) && l.base.bias().is_some())
        };
        if self
            .lm_head
            .as_ref()
            .is_some_and(|h| h.base.bias().is_some())
        {
            return Err(PeftError::Other(
                "the merged lm_head has a bias, which a Llama checkpoint cannot hold; \
                 leave the head out of the adapter's targets"
                    .into(),
            ));
        }
        let attention = has("self_attn", &self);
        let mlp = has("mlp", &self);
        self.config.attention_bias |= attention;
        self.config.mlp_bias |= mlp;
        for (path, site) in self.sites_mut() {
            let SiteMut::Linear(l) = site else { continue };
            let wanted =
                (attention && in_group(&path, "self_attn")) || (mlp && in_group(&path, "mlp"));
            if wanted && l.base.bias().is_none() {
                let zeros = Tensor::<1>::zeros([l.base.d_output()], &l.base.device());
                *l.base.bias_mut() = Some(peft_core::params::frozen(zeros));
            }
        }
        Ok(self)
    }

    /// A Llama checkpoint's RMSNorms have no shift: one a merge gave them (SSF's) moves into
    /// the biases of the linears that read the norm, `W·(n + β) = W·n + W·β` (q, k, v after
    /// `input_layernorm`, gate and up after `post_attention_layernorm`). The final norm feeds
    /// the output head, which cannot hold a bias: an error.
    fn fold_norm_shifts(&mut self) -> Result<()> {
        if self.model.norm.base.bias.is_some() {
            return Err(PeftError::Other(
                "a shift merged into model.norm would need a bias on the output head, which a \
                 Llama checkpoint cannot hold; leave `model.norm` out of SSF's targets"
                    .into(),
            ));
        }
        for layer in &mut self.model.layers {
            if let Some(shift) = layer.input_layernorm.base.bias.take() {
                let a = &mut layer.self_attn;
                add_input_shift(
                    &mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj],
                    shift.val(),
                );
            }
            if let Some(shift) = layer.post_attention_layernorm.base.bias.take() {
                let m = &mut layer.mlp;
                add_input_shift(&mut [&mut m.gate_proj, &mut m.up_proj], shift.val());
            }
        }
        Ok(())
    }

    /// The `quantization_config` entry of `config.json` when linear weights are 4-bit (what
    /// transformers needs to load the checkpoint pre-quantized), `None` for a dense model.
    pub fn quantization_config(&self) -> Option<serde_json::Value> {
        quantization_config(self.linears().into_iter().map(|(_, s)| s), &["lm_head"])
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`. With a cache, the tokens
    /// continue the cached positions and the cache is extended.
    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let h = self.hidden_states(tokens, cache);
        self.head(h)
    }

    /// Logits of a left-padded batch: `mask[r]` is 1 on the real tokens of row `r` and 0 on
    /// its padding. Every row gets what it gets alone: padding is never attended to and a
    /// row's position ids count its real tokens only. With a cache, later calls continue each
    /// row where it stopped (their tokens all real, or padding for a finished row).
    pub fn forward_padded(
        &self,
        tokens: Tensor<2, Int>,
        mask: &[Vec<f32>],
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let h = self.hidden_states_with(tokens, Some(mask), cache);
        self.head(h)
    }

    fn head(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => peft_core::matmul::linear(h, self.model.embed_tokens.val().transpose(), None),
        }
    }

    /// Final hidden states `[batch, seq, hidden]`.
    ///
    /// At the first call of a sequence (no cache, or an empty one) the active virtual tokens
    /// enter as Hugging Face PEFT puts them: a soft prompt before the token embeddings (its
    /// positions take the first position ids; their hidden states are not returned), a prefix
    /// as the cached keys and values of every layer (the tokens start at position
    /// `n_virtual`). With a cache, both stay in it for the later calls.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.hidden_states_with(tokens, None, cache)
    }

    /// [`Self::hidden_states`], of a padded batch when `padding` is given (see
    /// [`Self::forward_padded`]).
    fn hidden_states_with(
        &self,
        tokens: Tensor<2, Int>,
        padding: Option<&[Vec<f32>]>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let device = tokens.device();
        let [b, s] = tokens.dims();
        let n_layers = self.model.layers.len();
        let fresh = cache.as_ref().is_none_or(|c| c.is_empty());
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.val(), tokens);
        let mut n_prompt = 0;
        if fresh && let Some(p) = self.model.prompt.input_prompt(b) {
            n_prompt = p.dims()[1];
            x = Tensor::cat(vec![p.cast(x.dtype()), x], 1);
        }
        // A prefix without a caller's cache lives in one for this call only.
        let mut local = None;
        if fresh && let Some(kv) = self.model.prefix.prefix_kv(b) {
            let dtype = x.dtype();
            let kv = kv
                .into_iter()
                .map(|(k, v)| (k.cast(dtype), v.cast(dtype)))
                .collect();
            match cache.as_mut() {
                Some(c) => c.prefill(kv),
                None => {
                    let mut c = KvCache::new();
                    c.prefill(kv);
                    local = Some(c);
                }
            }
        }
        let mut cache = cache.or(local.as_mut());
        let start = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if let Some(c) = cache.as_mut()
            && c.layers.len() != n_layers
        {
            c.layers = vec![None; n_layers];
        }
        let cfg = &self.config;
        // A padded batch (now, or earlier in the cache): positions and key mask per row.
        let earlier = cache.as_ref().and_then(|c| c.padding.clone());
        let (rope, key_bias) = if padding.is_some() || earlier.is_some() {
            let (mut keys, mut next) =
                earlier.unwrap_or_else(|| (vec![vec![1.0; start]; b], vec![start; b]));
            // Virtual tokens are real positions of every row.
            let block: Vec<Vec<f32>> = (0..b)
                .map(|r| {
                    let mut row = vec![1.0; n_prompt];
                    match padding {
                        Some(m) => row.extend_from_slice(&m[r]),
                        None => row.extend(std::iter::repeat_n(1.0, s)),
                    }
                    row
                })
                .collect();
            let positions = padded_positions(&block, &mut keys, &mut next);
            let t = keys[0].len();
            let bias: Vec<f32> = keys
                .iter()
                .flatten()
                .map(|&m| if m > 0.5 { 0.0 } else { -1e9 })
                .collect();
            let bias = Tensor::<2>::from_data(TensorData::new(bias, [b, t]), &device);
            if let Some(c) = cache.as_mut() {
                c.padding = Some((keys, next));
            }
            (
                rope_rows(&positions, cfg.head_dim(), cfg.rope_theta, &device),
                Some(bias),
            )
        } else {
            (
                rope_tables(start, n_prompt + s, cfg.head_dim(), cfg.rope_theta, &device),
                None,
            )
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let a = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                rope.clone(),
                slot,
                key_bias.clone(),
            );
            x = layer.attention_adapters.forward(a, x, None);
            let m = layer
                .mlp
                .forward(layer.post_attention_layernorm.forward(x.clone()));
            x = layer.output_adapters.forward(m, x, None);
        }
        if n_prompt > 0 {
            x = x.narrow(1, n_prompt, s);
        }
        self.model.norm.forward(x)
    }

    /// Mean cross-entropy of predicting `tokens[:, t+1]` from `tokens[:, ..=t]`, counting only
    /// positions where `loss_mask[:, t+1]` is 1 (e.g. answer tokens, not padding).
    ///
    /// Logits are computed only at the positions whose loss counts: the LM head is the largest
    /// product of a small model's step, and a chat batch's prompts and padding are often half
    /// of its positions. The loss and every gradient are those of all positions' logits (a
    /// position outside the mask contributes exactly zero either way).
    pub fn causal_lm_loss(&self, tokens: Tensor<2, Int>, loss_mask: Tensor<2>) -> Tensor<1> {
        let [b, s] = tokens.dims();
        let h = self.hidden_states(tokens.clone().narrow(1, 0, s - 1), None);
        let weights = loss_mask.narrow(1, 1, s - 1).cast(DType::F32);
        let kept = counted_rows(weights.clone());
        if kept.len() == b * (s - 1) || kept.is_empty() {
            return masked_mean_nll(self.head(h), tokens.narrow(1, 1, s - 1), weights);
        }
        let hidden = h.dims()[2];
        let n = kept.len();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(kept, [n]), &tokens.device());
        let all = b * (s - 1);
        let h = h.reshape([all, hidden]).select(0, rows.clone());
        let targets = tokens
            .narrow(1, 1, s - 1)
            .reshape([all])
            .select(0, rows.clone());
        let weights = weights.reshape([all]).select(0, rows);
        masked_mean_nll(
            self.head(h.reshape([1, n, hidden])),
            targets.reshape([1, n]),
            weights.reshape([1, n]),
        )
    }
}

/// Flat indices of the rows of `weights [b, s]` that are not zero.
fn counted_rows(weights: Tensor<2>) -> Vec<i64> {
    let w = weights
        .into_data()
        .try_to_vec::<f32>()
        .expect("an f32 loss mask");
    (0..w.len() as i64)
        .filter(|&i| w[i as usize] != 0.0)
        .collect()
}

/// The loss of [`LlamaForCausalLM::causal_lm_loss`] from the logits of `tokens[:, ..s-1]`
/// (whatever computed them, e.g. several models' combined).
pub fn shifted_lm_loss(
    logits: Tensor<3>,
    tokens: Tensor<2, Int>,
    loss_mask: Tensor<2>,
) -> Tensor<1> {
    let s = tokens.dims()[1];
    masked_mean_nll(
        logits,
        tokens.narrow(1, 1, s - 1),
        loss_mask.narrow(1, 1, s - 1).cast(DType::F32),
    )
}

/// The mean of the cross-entropies of `logits [b, s, v]` at `targets [b, s]`, weighted by
/// `weights [b, s]` and divided by the weights' sum (at least 1).
fn masked_mean_nll(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    // The loss in f32 whatever the compute type (as transformers does).
    let nll = cross_entropy_rows(
        logits.cast(DType::F32).reshape([b * s, v]),
        targets.reshape([b * s]),
    );
    let count = weights.clone().sum().clamp_min(1.0);
    nll.reshape([b, s]).mul(weights).sum().div(count)
}

site_table!(DecoderLayer {
    "self_attn.q_proj" => Linear(self_attn.q_proj),
    "self_attn.k_proj" => Linear(self_attn.k_proj),
    "self_attn.v_proj" => Linear(self_attn.v_proj),
    "self_attn.o_proj" => Linear(self_attn.o_proj),
    "mlp.gate_proj" => Linear(mlp.gate_proj),
    "mlp.up_proj" => Linear(mlp.up_proj),
    "mlp.down_proj" => Linear(mlp.down_proj),
    "input_layernorm" => Norm(input_layernorm),
    "post_attention_layernorm" => Norm(post_attention_layernorm),
    "attention_adapters" => Sublayer(attention_adapters),
    "output_adapters" => Sublayer(output_adapters),
});

site_table!(LlamaForCausalLM {
    "model.embed_tokens" => Prompt(model.prompt),
    "model.layers" => Each(model.layers),
    "model.layers" => Prompt(model.prefix),
    "model.norm" => Norm(model.norm),
    "lm_head" => Head(lm_head),
});

impl SiteHost for LlamaForCausalLM {
    fn model_type(&self) -> &'static str {
        "llama"
    }

    fn sites(&self) -> Vec<(String, Site<'_>)> {
        self.site_list()
    }

    fn sites_mut(&mut self) -> Vec<(String, SiteMut<'_>)> {
        self.site_list_mut()
    }

    fn input_embeddings(&self) -> Option<Tensor<2>> {
        Some(self.model.embed_tokens.val())
    }

    /// With tied embeddings the output head is this table too.
    fn embeddings(&self) -> Vec<(String, &Param<Tensor<2>>)> {
        vec![("model.embed_tokens".into(), &self.model.embed_tokens)]
    }

    fn embeddings_mut(&mut self) -> Vec<(String, &mut Param<Tensor<2>>)> {
        vec![("model.embed_tokens".into(), &mut self.model.embed_tokens)]
    }
}
