//! The virtual-token sites: soft prompts before the input embeddings and key/value prefixes in
//! every attention layer.
//!
//! Both hold named [`PromptEncoder`]s: a table of trainable virtual-token embeddings, optionally
//! passed through a small network (P-tuning's MLP or LSTM, prefix tuning's projection). The
//! encoder's output is what Hugging Face PEFT saves (`prompt_embeddings`); a loaded adapter is
//! that table alone. One encoder is active per site at a time (as in PEFT).

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::{PeftError, Result};

use crate::linear::ADAPTER_DTYPE;
use crate::ops::dropout_while_training;

/// `[out, in]` weight and `[out]` bias, as torch's `nn.Linear` stores them.
#[derive(Module, Debug)]
pub struct DenseLayer {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl DenseLayer {
    /// torch's default init: weight and bias uniform in `±1/sqrt(in)`.
    pub fn random(inputs: usize, outputs: usize, device: &Device) -> Self {
        let k = 1.0 / (inputs as f64).sqrt();
        Self {
            weight: trainable(uniform([outputs, inputs], k, device)),
            bias: trainable(uniform([outputs], k, device)),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.val().transpose()) + self.bias.val().unsqueeze()
    }
}

fn uniform<const D: usize>(shape: [usize; D], k: f64, device: &Device) -> Tensor<D> {
    Tensor::<D>::random(shape, Distribution::Uniform(-k, k), device).cast(ADAPTER_DTYPE)
}

/// The activation between the layers of an [`MlpHead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Tanh,
}

/// Dense layers with an activation between them (none after the last).
#[derive(Module, Debug)]
pub struct MlpHead {
    pub layers: Vec<DenseLayer>,
    #[module(skip)]
    pub activation: Activation,
}

impl MlpHead {
    /// Layers of the given widths (`[in, h1, ..., out]`), torch's default init.
    pub fn random(widths: &[usize], activation: Activation, device: &Device) -> Self {
        Self {
            layers: widths
                .windows(2)
                .map(|w| DenseLayer::random(w[0], w[1], device))
                .collect(),
            activation,
        }
    }

    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i + 1 < n {
                x = match self.activation {
                    Activation::Relu => burn::tensor::activation::relu(x),
                    Activation::Tanh => x.tanh(),
                };
            }
        }
        x
    }
}

/// One direction of one LSTM layer, in torch's layout: gates `i, f, g, o` stacked in rows.
#[derive(Module, Debug)]
pub struct LstmCell {
    /// `[4·hidden, in]`
    pub weight_ih: Param<Tensor<2>>,
    /// `[4·hidden, hidden]`
    pub weight_hh: Param<Tensor<2>>,
    pub bias_ih: Param<Tensor<1>>,
    pub bias_hh: Param<Tensor<1>>,
}

impl LstmCell {
    /// torch's default init: everything uniform in `±1/sqrt(hidden)`.
    pub fn random(inputs: usize, hidden: usize, device: &Device) -> Self {
        let k = 1.0 / (hidden as f64).sqrt();
        Self {
            weight_ih: trainable(uniform([4 * hidden, inputs], k, device)),
            weight_hh: trainable(uniform([4 * hidden, hidden], k, device)),
            bias_ih: trainable(uniform([4 * hidden], k, device)),
            bias_hh: trainable(uniform([4 * hidden], k, device)),
        }
    }

    fn hidden(&self) -> usize {
        self.weight_hh.shape().dims::<2>()[1]
    }

    /// The hidden states `[seq, hidden]` of a run over `x [seq, in]`, backwards if `reverse`
    /// (rows still in sequence order), from zero state.
    fn run(&self, x: Tensor<2>, reverse: bool) -> Tensor<2> {
        let [seq, _] = x.dims();
        let hs = self.hidden();
        let device = x.device();
        // The input part of every gate at once; the recurrent part step by step.
        let pre = x.matmul(self.weight_ih.val().transpose())
            + (self.bias_ih.val() + self.bias_hh.val()).unsqueeze();
        let w_hh = self.weight_hh.val().transpose();
        let mut h = Tensor::<2>::zeros([1, hs], &device).cast(ADAPTER_DTYPE);
        let mut c = h.clone();
        let mut out = vec![None; seq];
        let order: Vec<usize> = if reverse {
            (0..seq).rev().collect()
        } else {
            (0..seq).collect()
        };
        for t in order {
            let gates = pre.clone().narrow(0, t, 1) + h.matmul(w_hh.clone());
            let gate = |k: usize| gates.clone().narrow(1, k * hs, hs);
            let (i, f, g, o) = (
                burn::tensor::activation::sigmoid(gate(0)),
                burn::tensor::activation::sigmoid(gate(1)),
                gate(2).tanh(),
                burn::tensor::activation::sigmoid(gate(3)),
            );
            c = f * c + i * g;
            h = o * c.clone().tanh();
            out[t] = Some(h.clone());
        }
        Tensor::cat(out.into_iter().map(|h| h.expect("every step")).collect(), 0)
    }
}

/// A bidirectional multi-layer LSTM (torch `nn.LSTM(bidirectional=True, batch_first=True)`),
/// then an MLP: P-tuning's LSTM encoder.
#[derive(Module, Debug)]
pub struct LstmHead {
    /// Per layer: the forward and the reverse direction.
    pub forward: Vec<LstmCell>,
    pub reverse: Vec<LstmCell>,
    pub mlp: MlpHead,
    /// Dropout between LSTM layers while training (torch's `dropout`).
    #[module(skip)]
    pub dropout: f64,
}

impl LstmHead {
    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let training = self.mlp.layers[0].weight.is_require_grad();
        for (l, (fw, bw)) in self.forward.iter().zip(&self.reverse).enumerate() {
            if l > 0 {
                x = dropout_while_training(x, self.dropout, training);
            }
            x = Tensor::cat(vec![fw.run(x.clone(), false), bw.run(x, true)], 1);
        }
        self.mlp.forward(x)
    }
}

/// The network over the virtual-token embeddings.
#[derive(Module, Debug)]
pub enum EncoderHead {
    Mlp(MlpHead),
    Lstm(LstmHead),
}

impl EncoderHead {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Mlp(m) => m.forward(x),
            Self::Lstm(l) => l.forward(x),
        }
    }
}

/// Trainable virtual-token embeddings `[n_virtual, dim]` and, while training a reparameterised
/// method, the network over them.
#[derive(Module, Debug)]
pub struct PromptEncoder {
    pub embedding: Param<Tensor<2>>,
    pub head: Option<EncoderHead>,
}

impl PromptEncoder {
    /// A table alone (prompt tuning, prefix tuning without projection, or a loaded adapter).
    pub fn table(embedding: Tensor<2>) -> Self {
        Self {
            embedding: trainable(embedding.cast(ADAPTER_DTYPE)),
            head: None,
        }
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.shape().dims::<2>()[0]
    }

    /// The virtual tokens the model sees, `[n_virtual, out]` (f32): the head's output over the
    /// embeddings, or the embeddings. This is what PEFT saves as `prompt_embeddings`.
    pub fn output(&self) -> Tensor<2> {
        let e = self.embedding.val();
        match &self.head {
            Some(h) => h.forward(e),
            None => e,
        }
    }
}

/// Where a site's virtual tokens go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptPlace {
    /// Before the input embeddings: each virtual token is `[hidden]`.
    Input,
    /// Keys and values of every attention layer, entering the cache as if already computed
    /// (no RoPE): each virtual token is `[layers · 2 · kv_heads · head_dim]`.
    Prefix,
}

/// A virtual-token site with its model facts (what PEFT's `_prepare_prompt_learning_config`
/// fills in: `token_dim`, `num_attention_heads`, `num_layers`).
#[derive(Module, Debug)]
pub struct PromptSite {
    pub encoders: Vec<PromptEncoder>,
    #[module(skip)]
    pub names: Vec<String>,
    #[module(skip)]
    pub active: Option<String>,
    #[module(skip)]
    pub place: PromptPlace,
    /// Width of one virtual token per layer: hidden size (input) or `kv_heads · head_dim`
    /// (prefix, as PEFT sizes it under grouped-query attention).
    #[module(skip)]
    pub token_dim: usize,
    /// Attention heads (input) or key/value heads (prefix).
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub layers: usize,
}

impl PromptSite {
    pub fn new(place: PromptPlace, token_dim: usize, heads: usize, layers: usize) -> Self {
        Self {
            encoders: Vec::new(),
            names: Vec::new(),
            active: None,
            place,
            token_dim,
            heads,
            layers,
        }
    }

    /// The width one virtual token's row must have: `token_dim` for input prompts,
    /// `layers · 2 · token_dim` for prefixes.
    pub fn row_width(&self) -> usize {
        match self.place {
            PromptPlace::Input => self.token_dim,
            PromptPlace::Prefix => self.layers * 2 * self.token_dim,
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Add encoder `name` and make it the active one. Its output must have [`Self::row_width`]
    /// columns.
    pub fn add(&mut self, name: &str, encoder: PromptEncoder) -> Result<()> {
        if self.index(name).is_some() {
            return Err(PeftError::Other(format!(
                "adapter `{name}` already has virtual tokens here"
            )));
        }
        self.encoders.push(encoder);
        self.names.push(name.to_string());
        self.active = Some(name.to_string());
        Ok(())
    }

    pub fn encoder(&self, name: &str) -> Option<&PromptEncoder> {
        self.index(name).map(|i| &self.encoders[i])
    }

    pub fn encoder_mut(&mut self, name: &str) -> Option<&mut PromptEncoder> {
        self.index(name).map(|i| &mut self.encoders[i])
    }

    /// Remove encoder `name` (and deactivate it).
    pub fn remove(&mut self, name: &str) -> Option<PromptEncoder> {
        let i = self.index(name)?;
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        self.names.remove(i);
        Some(self.encoders.remove(i))
    }

    /// Use encoder `name`, or none.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name
            && self.index(n).is_none()
        {
            return Err(PeftError::Other(format!("no virtual tokens named `{n}`")));
        }
        self.active = name.map(str::to_string);
        Ok(())
    }

    /// The active encoder's output `[n_virtual, row_width]`, if one is active.
    pub fn output(&self) -> Option<Tensor<2>> {
        self.active
            .as_deref()
            .and_then(|n| self.encoder(n))
            .map(PromptEncoder::output)
    }

    /// The active prefix as per-layer `(key, value)`, each `[batch, heads, n_virtual,
    /// head_dim]`, in PEFT's layout of a row: index `((2·layer + kv)·heads + head)·head_dim + j`.
    pub fn prefix_kv(&self, batch: usize) -> Option<Vec<(Tensor<4>, Tensor<4>)>> {
        let rows = self.output()?;
        let n = rows.dims()[0];
        let (h, d) = (self.heads, self.token_dim / self.heads);
        let per = rows.reshape([n, self.layers, 2, h, d]);
        let part = |l: usize, kv: usize| {
            per.clone()
                .narrow(1, l, 1)
                .narrow(2, kv, 1)
                .reshape([n, h, d])
                .swap_dims(0, 1)
                .unsqueeze::<4>()
                .expand([batch, h, n, d])
        };
        Some((0..self.layers).map(|l| (part(l, 0), part(l, 1))).collect())
    }

    /// The active input prompt, `[batch, n_virtual, token_dim]`.
    pub fn input_prompt(&self, batch: usize) -> Option<Tensor<3>> {
        let rows = self.output()?;
        let [n, d] = rows.dims();
        Some(rows.unsqueeze::<3>().expand([batch, n, d]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn prefix_rows_split_into_layers_keys_values_and_heads_as_peft_lays_them_out() {
        let device = Device::flex();
        let (layers, heads, d, n) = (2, 2, 3, 4);
        let mut site = PromptSite::new(PromptPlace::Prefix, heads * d, heads, layers);
        let width = site.row_width();
        assert_eq!(width, 24);
        let values: Vec<f32> = (0..n * width).map(|i| i as f32).collect();
        let table = Tensor::<2>::from_data(TensorData::new(values, [n, width]), &device);
        site.add("p", PromptEncoder::table(table)).unwrap();
        let kv = site.prefix_kv(3).unwrap();
        assert_eq!(kv.len(), layers);
        for (l, (k, v)) in kv.iter().enumerate() {
            assert_eq!(k.dims(), [3, heads, n, d]);
            for (which, t) in [(0, k), (1, v)] {
                let got: Vec<f32> = t.to_data().try_to_vec::<f32>().unwrap();
                for b in 0..3 {
                    for hh in 0..heads {
                        for tok in 0..n {
                            for j in 0..d {
                                let want = tok * width + ((2 * l + which) * heads + hh) * d + j;
                                let at = ((b * heads + hh) * n + tok) * d + j;
                                assert_eq!(got[at], want as f32);
                            }
                        }
                    }
                }
            }
        }
        site.set_active(None).unwrap();
        assert!(site.prefix_kv(1).is_none());
        assert!(site.set_active(Some("q")).is_err());
    }
}
