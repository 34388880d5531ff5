//! Building the virtual-token encoders of each method as PEFT shapes and initialises them, and
//! their weights under PEFT's parameter names (`prompt_encoder.<adapter>.mlp_head.0.weight`),
//! which is how a checkpoint keeps them and how torch's weights are read.

use std::path::Path;

use burn::tensor::{Device, Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};
use peft_sites::prompt::{Activation, DenseLayer, EncoderHead, LstmCell, LstmHead, MlpHead};
use peft_sites::{ADAPTER_DTYPE, PromptEncoder};

/// The network over the virtual-token embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EncoderShape {
    /// No network: the embeddings are the virtual tokens.
    Table,
    /// P-tuning MLP: `Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d)`.
    Mlp { hidden: usize },
    /// P-tuning LSTM: bidirectional `LSTM(d → h, layers)`, then `Linear(2h, 2h), ReLU,
    /// Linear(2h, d)`.
    Lstm {
        hidden: usize,
        layers: usize,
        dropout: f64,
    },
    /// Prefix projection: `Linear(d, h), Tanh, Linear(h, width)`.
    Projection { hidden: usize },
}

impl EncoderShape {
    /// Width of the trainable embeddings when the virtual tokens are `width` wide and one
    /// layer's token is `token_dim` wide.
    pub fn embedding_dim(&self, token_dim: usize, width: usize) -> usize {
        match self {
            Self::Table => width,
            _ => token_dim,
        }
    }

    /// The head with torch's default init (none for a table).
    pub fn head(&self, token_dim: usize, width: usize, device: &Device) -> Option<EncoderHead> {
        let d = token_dim;
        match *self {
            Self::Table => None,
            Self::Mlp { hidden } => Some(EncoderHead::Mlp(MlpHead::random(
                &[d, hidden, hidden, d],
                Activation::Relu,
                device,
            ))),
            Self::Lstm {
                hidden,
                layers,
                dropout,
            } => {
                let cells = |_| {
                    (0..layers)
                        .map(|l| {
                            LstmCell::random(if l == 0 { d } else { 2 * hidden }, hidden, device)
                        })
                        .collect()
                };
                Some(EncoderHead::Lstm(LstmHead {
                    forward: cells(0),
                    reverse: cells(1),
                    mlp: MlpHead::random(&[2 * hidden, 2 * hidden, d], Activation::Relu, device),
                    dropout,
                }))
            }
            Self::Projection { hidden } => Some(EncoderHead::Mlp(MlpHead::random(
                &[d, hidden, width],
                Activation::Tanh,
                device,
            ))),
        }
    }

    /// PEFT's module name of the head's MLP part.
    fn mlp_name(&self) -> &'static str {
        match self {
            Self::Projection { .. } => "transform",
            _ => "mlp_head",
        }
    }
}

/// N(0, 1) embeddings, torch's `nn.Embedding` default.
pub fn normal_table(n: usize, dim: usize, device: &Device) -> Tensor<2> {
    Tensor::<2>::random([n, dim], Distribution::Normal(0.0, 1.0), device).cast(ADAPTER_DTYPE)
}

fn put_mlp(out: &mut TensorMap, prefix: &str, mlp: &MlpHead) {
    for (i, layer) in mlp.layers.iter().enumerate() {
        let at = format!("{prefix}.{}", 2 * i);
        out.insert(
            format!("{at}.weight"),
            HostTensor::from_tensor(layer.weight.val()),
        );
        out.insert(
            format!("{at}.bias"),
            HostTensor::from_tensor(layer.bias.val()),
        );
    }
}

/// The encoder's weights under PEFT's names (`prompt_encoder.<name>.embedding.weight`, ...).
pub fn encoder_tensors(encoder: &PromptEncoder, shape: &EncoderShape, name: &str) -> TensorMap {
    let p = format!("prompt_encoder.{name}");
    let mut out = TensorMap::new();
    out.insert(
        format!("{p}.embedding.weight"),
        HostTensor::from_tensor(encoder.embedding.val()),
    );
    match &encoder.head {
        None => {}
        Some(EncoderHead::Mlp(m)) => put_mlp(&mut out, &format!("{p}.{}", shape.mlp_name()), m),
        Some(EncoderHead::Lstm(l)) => {
            for (dir, cells) in [("", &l.forward), ("_reverse", &l.reverse)] {
                for (i, c) in cells.iter().enumerate() {
                    let at = |w: &str| format!("{p}.lstm_head.{w}_l{i}{dir}");
                    out.insert(at("weight_ih"), HostTensor::from_tensor(c.weight_ih.val()));
                    out.insert(at("weight_hh"), HostTensor::from_tensor(c.weight_hh.val()));
                    out.insert(at("bias_ih"), HostTensor::from_tensor(c.bias_ih.val()));
                    out.insert(at("bias_hh"), HostTensor::from_tensor(c.bias_hh.val()));
                }
            }
            put_mlp(&mut out, &format!("{p}.mlp_head"), &l.mlp);
        }
    }
    out
}

/// Replace every weight of `encoder` (built with `shape`) by the tensor of the same name in
/// `tensors` (read from `file`), checking shapes; the tensors are taken out of the map.
pub fn load_encoder_tensors(
    mut encoder: PromptEncoder,
    shape: &EncoderShape,
    name: &str,
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<PromptEncoder> {
    let device = encoder.embedding.device();
    let p = format!("prompt_encoder.{name}");
    let mut take2 = |key: String, like: &Tensor<2>| -> Result<burn::module::Param<Tensor<2>>> {
        let t = tensors.take_shaped(file, &key, &like.dims())?;
        Ok(trainable(t.to_tensor::<2>(&device)))
    };
    encoder.embedding = take2(format!("{p}.embedding.weight"), &encoder.embedding.val())?;
    let mlp_name = shape.mlp_name();
    let load_mlp = |mlp: &mut MlpHead, prefix: String, tensors: &mut TensorMap| -> Result<()> {
        for (i, layer) in mlp.layers.iter_mut().enumerate() {
            *layer = load_dense(layer, &format!("{prefix}.{}", 2 * i), tensors, file)?;
        }
        Ok(())
    };
    match &mut encoder.head {
        None => {}
        Some(EncoderHead::Mlp(m)) => load_mlp(m, format!("{p}.{mlp_name}"), tensors)?,
        Some(EncoderHead::Lstm(l)) => {
            for (dir, cells) in [("", &mut l.forward), ("_reverse", &mut l.reverse)] {
                for (i, c) in cells.iter_mut().enumerate() {
                    let at = |w: &str| format!("{p}.lstm_head.{w}_l{i}{dir}");
                    let dev = c.weight_ih.device();
                    let w = |key: String, dims: Vec<usize>, tensors: &mut TensorMap| {
                        tensors.take_shaped(file, &key, &dims)
                    };
                    let ih = w(at("weight_ih"), c.weight_ih.val().dims().to_vec(), tensors)?;
                    let hh = w(at("weight_hh"), c.weight_hh.val().dims().to_vec(), tensors)?;
                    let bih = w(at("bias_ih"), c.bias_ih.val().dims().to_vec(), tensors)?;
                    let bhh = w(at("bias_hh"), c.bias_hh.val().dims().to_vec(), tensors)?;
                    *c = LstmCell {
                        weight_ih: trainable(ih.to_tensor(&dev)),
                        weight_hh: trainable(hh.to_tensor(&dev)),
                        bias_ih: trainable(bih.to_tensor(&dev)),
                        bias_hh: trainable(bhh.to_tensor(&dev)),
                    };
                }
            }
            load_mlp(&mut l.mlp, format!("{p}.mlp_head"), tensors)?;
        }
    }
    Ok(encoder)
}

fn load_dense(
    layer: &DenseLayer,
    prefix: &str,
    tensors: &mut TensorMap,
    file: &Path,
) -> Result<DenseLayer> {
    let device = layer.weight.device();
    let [o, i] = layer.weight.shape().dims::<2>();
    let w = tensors.take_shaped(file, &format!("{prefix}.weight"), &[o, i])?;
    let b = tensors.take_shaped(file, &format!("{prefix}.bias"), &[o])?;
    Ok(DenseLayer {
        weight: trainable(w.to_tensor(&device)),
        bias: trainable(b.to_tensor(&device)),
    })
}

/// Rows `ids` of the embedding table (prompt tuning's `TEXT` and `SAMPLE_VOCAB` inits), f32.
pub fn embedding_rows(table: Tensor<2>, ids: &[u32]) -> Result<Tensor<2>> {
    let vocab = table.dims()[0];
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(PeftError::Config(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let device = table.device();
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len();
    let index =
        Tensor::<1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids, [n]), &device);
    Ok(table.select(0, index).cast(ADAPTER_DTYPE).detach())
}
