//! The sub-layer output sites: where bottleneck adapters sit, after a layer's attention block
//! and after its feed-forward block (AdapterHub's `mh_adapter` / `attention_adapters` and
//! `output_adapter` / `output_adapters` locations).
//!
//! A [`SublayerSite`] takes the sub-block's output `h` and its residual input `inp` and
//! returns what the layer goes on with: `norm(h + inp)` with nothing active (BERT's
//! `LayerNorm(h + input_tensor)`; Llama has no norm there, so `h + inp`), or the active
//! [`Bottleneck`]'s result, computed as AdapterHub `adapters` 1.3.0 does (shared
//! `formats.md` §B.2).

use burn::module::{Module, Param};
use burn::tensor::activation;
use burn::tensor::{Distribution, Tensor};
use peft_core::params::trainable;
use peft_core::{PeftError, Result};

use crate::fusion::FusionLayer;
use crate::linear::ADAPTER_DTYPE;
use crate::ops::{dropout_while_training, layer_norm};

/// The non-linearity between the down and up projections (transformers' `get_activation`
/// names, as AdapterHub's `non_linearity` takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnActivation {
    Relu,
    /// `swish` / `silu`
    Silu,
    /// `gelu`: the exact (erf) form.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Tanh,
    Sigmoid,
    /// `leakyrelu`, slope 0.01.
    LeakyRelu,
    /// `identity` / `linear`
    Identity,
}

impl BnActivation {
    /// The activation named `name` (case-insensitive), or an error listing the known ones.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "relu" => Self::Relu,
            "swish" | "silu" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            "leakyrelu" => Self::LeakyRelu,
            "identity" | "linear" => Self::Identity,
            other => {
                return Err(PeftError::Config(format!(
                    "non_linearity `{other}` is not supported (relu, swish, silu, gelu, \
                     gelu_new, tanh, sigmoid, leakyrelu, identity)"
                )));
            }
        })
    }

    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Relu => activation::relu(x),
            Self::Silu => activation::silu(x),
            Self::Gelu => activation::gelu(x),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => activation::sigmoid(x),
            Self::LeakyRelu => activation::leaky_relu(x, 0.01),
            Self::Identity => x,
        }
    }
}

/// AdapterHub's `residual_before_ln`: which state the adapter's own residual connection adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualFrom {
    /// `true`: the sub-block output `h`, before the original norm.
    Output,
    /// `"post_add"`: `h + inp`, before the original norm.
    PostAdd,
    /// `false`: the adapter's input (after the original norm when `original_ln_before`).
    AdapterInput,
}

/// How a bottleneck adapter is wired around the sub-layer (the placement fields of
/// AdapterHub's `BnConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnWiring {
    /// Parallel (`is_parallel`): the adapter reads the sub-block's input, its output is added
    /// to the sub-block's output.
    pub parallel: bool,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
    pub residual: ResidualFrom,
    /// Add the residual before the adapter's own `ln_after` norm.
    pub adapter_residual_before_ln: bool,
}

/// A LayerNorm owned by an adapter (`ln_before` / `ln_after`), torch's init and eps 1e-5.
#[derive(Module, Debug)]
pub struct AdapterNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
}

impl AdapterNorm {
    pub fn new(width: usize, device: &burn::tensor::Device) -> Self {
        Self {
            weight: trainable(Tensor::<1>::ones([width], device).cast(ADAPTER_DTYPE)),
            bias: trainable(Tensor::<1>::zeros([width], device).cast(ADAPTER_DTYPE)),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        layer_norm(x, self.weight.val(), Some(self.bias.val()), 1e-5)
    }
}

/// The adapter's scaling of its output: a number, or learned (`"learned"`: one value,
/// `"channel"`: one per feature, both starting at 1).
#[derive(Module, Debug)]
pub enum BnScaling {
    Fixed(f64),
    Learned(Param<Tensor<1>>),
}

/// A bottleneck adapter: `up(act(down(x)))·scaling`, with AdapterHub's wiring.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// `[hidden, down]` (AdapterHub's `adapter_down.<i>.weight` is its transpose).
    pub down_weight: Param<Tensor<2>>,
    pub down_bias: Param<Tensor<1>>,
    /// `[down, hidden]` (`adapter_up.weight` is its transpose).
    pub up_weight: Param<Tensor<2>>,
    pub up_bias: Param<Tensor<1>>,
    pub scaling: BnScaling,
    pub norm_before: Option<AdapterNorm>,
    pub norm_after: Option<AdapterNorm>,
    #[module(skip)]
    pub activation: BnActivation,
    #[module(skip)]
    pub wiring: BnWiring,
    /// Dropout on the scaled output while training.
    #[module(skip)]
    pub dropout: f64,
}

/// How [`Bottleneck::random`] initialises the projections (AdapterHub's `init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnInit {
    /// `"bert"`: weights N(0, 0.02), zero biases.
    Bert,
    /// `"mam_adapter"`: down kaiming-uniform (a = √5), up zero, zero biases.
    MamAdapter,
    /// `"houlsby"`: weights truncated N(0, 0.01) in ±0.02, zero biases.
    Houlsby,
}

impl BnInit {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "bert" => Self::Bert,
            "mam_adapter" => Self::MamAdapter,
            "houlsby" => Self::Houlsby,
            other => {
                return Err(PeftError::Config(format!(
                    "init_weights `{other}` is not supported (bert, mam_adapter, houlsby)"
                )));
            }
        })
    }
}

/// Everything that shapes one [`Bottleneck`].
#[derive(Debug, Clone, PartialEq)]
pub struct BnShape {
    pub hidden: usize,
    pub down: usize,
    pub activation: BnActivation,
    pub wiring: BnWiring,
    pub init: BnInit,
    /// `None`: a fixed number; `Some(1)`: `"learned"`; `Some(hidden)`: `"channel"`.
    pub learned_scaling: Option<usize>,
    pub fixed_scaling: f64,
    pub ln_before: bool,
    pub ln_after: bool,
    pub dropout: f64,
}

/// Truncated normal in `[-2σ, 2σ]` by redrawing (the bound AdapterHub's houlsby init uses).
fn truncated_normal(shape: [usize; 2], std: f64, device: &burn::tensor::Device) -> Tensor<2> {
    let n = shape[0] * shape[1];
    let draw = Tensor::<1>::random([n * 2 + 64], Distribution::Normal(0.0, std), device);
    let values = peft_core::tensors::HostTensor::from_tensor(draw).data;
    let mut kept: Vec<f32> = values
        .into_iter()
        .filter(|v| v.abs() <= 2.0 * std as f32)
        .take(n)
        .collect();
    while kept.len() < n {
        kept.push(0.0);
    }
    Tensor::from_data(burn::tensor::TensorData::new(kept, shape), device)
}

impl Bottleneck {
    /// A new adapter initialised as AdapterHub initialises it.
    pub fn random(shape: &BnShape, device: &burn::tensor::Device) -> Self {
        let (h, d) = (shape.hidden, shape.down);
        let normal = |dims: [usize; 2], std: f64| {
            Tensor::<2>::random(dims, Distribution::Normal(0.0, std), device)
        };
        let (down_weight, up_weight) = match shape.init {
            BnInit::Bert => (normal([h, d], 0.02), normal([d, h], 0.02)),
            BnInit::Houlsby => (
                truncated_normal([h, d], 0.01, device),
                truncated_normal([d, h], 0.01, device),
            ),
            BnInit::MamAdapter => {
                // kaiming_uniform(a=√5) on [down, hidden]: bound 1/sqrt(fan_in = hidden).
                let k = 1.0 / (h as f64).sqrt();
                (
                    Tensor::random([h, d], Distribution::Uniform(-k, k), device),
                    Tensor::zeros([d, h], device),
                )
            }
        };
        let zeros = |n: usize| trainable(Tensor::<1>::zeros([n], device).cast(ADAPTER_DTYPE));
        Self {
            down_weight: trainable(down_weight.cast(ADAPTER_DTYPE)),
            down_bias: zeros(d),
            up_weight: trainable(up_weight.cast(ADAPTER_DTYPE)),
            up_bias: zeros(h),
            scaling: match shape.learned_scaling {
                Some(n) => BnScaling::Learned(trainable(
                    Tensor::<1>::ones([n], device).cast(ADAPTER_DTYPE),
                )),
                None => BnScaling::Fixed(shape.fixed_scaling),
            },
            norm_before: shape.ln_before.then(|| AdapterNorm::new(h, device)),
            norm_after: shape.ln_after.then(|| AdapterNorm::new(h, device)),
            activation: shape.activation,
            wiring: shape.wiring,
            dropout: shape.dropout,
        }
    }

    /// `up(act(down(x)))·scaling` (dropout while training), without any residual: the
    /// part AdapterFusion combines.
    pub fn up(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.norm_before {
            Some(n) => n.forward(x),
            None => x,
        };
        let down = peft_core::matmul::linear(x, self.down_weight.val(), Some(self.down_bias.val()));
        let up = peft_core::matmul::linear(
            self.activation.apply(down),
            self.up_weight.val(),
            Some(self.up_bias.val()),
        );
        let up = match &self.scaling {
            BnScaling::Fixed(s) if *s == 1.0 => up,
            BnScaling::Fixed(s) => up.mul_scalar(*s),
            BnScaling::Learned(s) => up * s.val().unsqueeze::<3>(),
        };
        dropout_while_training(up, self.dropout, self.up_weight.is_require_grad())
    }

    /// The layer's output for sub-block output `h` and residual input `inp`, with the
    /// layer's own norm (`None` where the model has none at this place).
    pub fn forward(&self, h: Tensor<3>, inp: Tensor<3>, norm: Option<&dyn SubNorm>) -> Tensor<3> {
        let dtype = h.dtype();
        let (h, inp) = (h.cast(ADAPTER_DTYPE), inp.cast(ADAPTER_DTYPE));
        let (x, residual) = self.pre_forward(h.clone(), inp.clone(), norm);
        let mut out = self.up(x);
        if self.wiring.parallel {
            if let Some(n) = &self.norm_after {
                out = n.forward(out);
            }
        } else {
            if self.wiring.adapter_residual_before_ln {
                out = out + residual.clone();
            }
            if let Some(n) = &self.norm_after {
                out = n.forward(out);
            }
            if !self.wiring.adapter_residual_before_ln {
                out = out + residual;
            }
        }
        self.post_forward(out, h, inp, norm).cast(dtype)
    }

    /// What follows the adapter (AdapterHub's `post_forward`): a parallel adapter's output
    /// joins the sub-block's `h`; then `norm(out + inp)` (or `out + inp` without a norm) when
    /// `original_ln_after`.
    pub fn post_forward(
        &self,
        out: Tensor<3>,
        h: Tensor<3>,
        inp: Tensor<3>,
        norm: Option<&dyn SubNorm>,
    ) -> Tensor<3> {
        let out = if self.wiring.parallel { out + h } else { out };
        if !self.wiring.original_ln_after {
            return out;
        }
        match norm {
            Some(n) => n.norm(out + inp),
            None => out + inp,
        }
    }

    /// The adapter's input and its residual (AdapterHub's `pre_forward`).
    /// A parallel adapter reads the sub-block's input, which is also its residual.
    pub fn pre_forward(
        &self,
        h: Tensor<3>,
        inp: Tensor<3>,
        norm: Option<&dyn SubNorm>,
    ) -> (Tensor<3>, Tensor<3>) {
        let w = self.wiring;
        if w.parallel {
            return (inp.clone(), inp);
        }
        let mut residual = (w.residual == ResidualFrom::Output).then(|| h.clone());
        let mut x = h;
        if w.original_ln_before {
            x = x + inp;
            if w.residual == ResidualFrom::PostAdd {
                residual = Some(x.clone());
            }
            if let Some(n) = norm {
                x = n.norm(x);
            }
        }
        let residual = match residual {
            Some(r) => r,
            None => x.clone(),
        };
        (x, residual)
    }
}

/// The model's own norm at a sub-layer output (BERT's `LayerNorm`), as the site calls it.
pub trait SubNorm {
    fn norm(&self, x: Tensor<3>) -> Tensor<3>;
}

/// Which sub-layer output a [`SublayerSite`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SublayerPlace {
    /// After the attention block (AdapterHub `mh_adapter`).
    Attention,
    /// After the feed-forward block (AdapterHub `output_adapter`).
    Output,
}

/// A sub-layer output with named bottleneck adapters and named fusion layers over them; at
/// most one of them is active (an adapter alone, or a fusion of several).
#[derive(Module, Debug)]
pub struct SublayerSite {
    pub adapters: Vec<Bottleneck>,
    #[module(skip)]
    pub names: Vec<String>,
    #[module(skip)]
    pub active: Option<String>,
    pub fusions: Vec<FusionLayer>,
    #[module(skip)]
    pub fusion_names: Vec<String>,
    /// The fusion used in the forward pass (it takes precedence over `active`).
    #[module(skip)]
    pub active_fusion: Option<String>,
    #[module(skip)]
    pub place: SublayerPlace,
    /// The layer's index (AdapterHub's `leave_out` and per-layer `reduction_factor` use it).
    #[module(skip)]
    pub layer: usize,
    #[module(skip)]
    pub hidden: usize,
}

impl SublayerSite {
    pub fn new(place: SublayerPlace, layer: usize, hidden: usize) -> Self {
        Self {
            adapters: Vec::new(),
            names: Vec::new(),
            active: None,
            fusions: Vec::new(),
            fusion_names: Vec::new(),
            active_fusion: None,
            place,
            layer,
            hidden,
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Add adapter `name` and make it the active one.
    pub fn add(&mut self, name: &str, adapter: Bottleneck) -> Result<()> {
        if self.index(name).is_some() {
            return Err(PeftError::Other(format!(
                "adapter `{name}` already has a bottleneck here"
            )));
        }
        self.adapters.push(adapter);
        self.names.push(name.to_string());
        self.active = Some(name.to_string());
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Option<&Bottleneck> {
        self.index(name).map(|i| &self.adapters[i])
    }

    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut Bottleneck> {
        self.index(name).map(|i| &mut self.adapters[i])
    }

    /// Remove adapter `name` (and deactivate it).
    pub fn remove(&mut self, name: &str) -> Option<Bottleneck> {
        let i = self.index(name)?;
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        self.names.remove(i);
        // A fusion over it has nothing to fuse any more.
        while let Some(f) = self
            .fusions
            .iter()
            .position(|f| f.adapters.iter().any(|a| a == name))
        {
            self.fusions.remove(f);
            let gone = self.fusion_names.remove(f);
            if self.active_fusion.as_ref() == Some(&gone) {
                self.active_fusion = None;
            }
        }
        Some(self.adapters.remove(i))
    }

    /// Use adapter `name`, or none.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name
            && self.index(n).is_none()
        {
            return Err(PeftError::Other(format!(
                "no bottleneck adapter named `{n}`"
            )));
        }
        self.active = name.map(str::to_string);
        Ok(())
    }

    /// Add fusion layer `name` (over adapters this site holds) and make it the active one.
    pub fn add_fusion(&mut self, name: &str, fusion: FusionLayer) -> Result<()> {
        if self.fusion(name).is_some() {
            return Err(PeftError::Other(format!(
                "fusion `{name}` already exists here"
            )));
        }
        if let Some(missing) = fusion.adapters.iter().find(|a| self.adapter(a).is_none()) {
            return Err(PeftError::Other(format!(
                "fusion `{name}` needs adapter `{missing}`, which is not loaded"
            )));
        }
        self.fusions.push(fusion);
        self.fusion_names.push(name.to_string());
        self.active_fusion = Some(name.to_string());
        Ok(())
    }

    pub fn fusion(&self, name: &str) -> Option<&FusionLayer> {
        let i = self.fusion_names.iter().position(|n| n == name)?;
        Some(&self.fusions[i])
    }

    pub fn fusion_mut(&mut self, name: &str) -> Option<&mut FusionLayer> {
        let i = self.fusion_names.iter().position(|n| n == name)?;
        Some(&mut self.fusions[i])
    }

    /// Use fusion `name`, or none.
    pub fn set_active_fusion(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name
            && self.fusion(n).is_none()
        {
            return Err(PeftError::Other(format!("no fusion named `{n}`")));
        }
        self.active_fusion = name.map(str::to_string);
        Ok(())
    }

    /// The layer's output after this sub-layer: `norm(h + inp)` (or `h + inp` without a norm)
    /// with nothing active, else the active fusion's or adapter's.
    pub fn forward(&self, h: Tensor<3>, inp: Tensor<3>, norm: Option<&dyn SubNorm>) -> Tensor<3> {
        if let Some(f) = self.active_fusion.as_deref().and_then(|n| self.fusion(n)) {
            let adapters: Vec<&Bottleneck> = f
                .adapters
                .iter()
                .map(|a| self.adapter(a).expect("checked when the fusion was added"))
                .collect();
            return f.forward(&adapters, h, inp, norm);
        }
        match self.active.as_deref().and_then(|n| self.adapter(n)) {
            Some(adapter) => adapter.forward(h, inp, norm),
            None => match norm {
                Some(n) => n.norm(h + inp),
                None => h + inp,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    struct Double;
    impl SubNorm for Double {
        fn norm(&self, x: Tensor<3>) -> Tensor<3> {
            x.mul_scalar(2.0)
        }
    }

    fn shape(wiring: BnWiring) -> BnShape {
        BnShape {
            hidden: 4,
            down: 2,
            activation: BnActivation::Relu,
            wiring,
            init: BnInit::Bert,
            learned_scaling: None,
            fixed_scaling: 1.0,
            ln_before: false,
            ln_after: false,
            dropout: 0.0,
        }
    }

    fn close(a: Tensor<3>, b: Tensor<3>) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn the_presets_compute_adapterhubs_formulas() {
        let device = Device::flex();
        let data = |seed: f32| {
            let v: Vec<f32> = (0..8).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
            Tensor::<3>::from_data(TensorData::new(v, [1, 2, 4]), &device)
        };
        let (h, inp) = (data(0.0), data(5.0));
        let norm = Double;
        let seq = BnWiring {
            parallel: false,
            original_ln_before: true,
            original_ln_after: true,
            residual: ResidualFrom::Output,
            adapter_residual_before_ln: false,
        };
        // Pfeiffer: LN(h + inp + up(relu(down(LN(h + inp))))).
        let a = Bottleneck::random(&shape(seq), &device);
        let want = norm.norm(h.clone() + inp.clone() + a.up(norm.norm(h.clone() + inp.clone())));
        close(a.forward(h.clone(), inp.clone(), Some(&norm)), want);
        // Houlsby: LN(h + inp + up(act(down(h)))).
        let houlsby = BnWiring {
            original_ln_before: false,
            ..seq
        };
        let a = Bottleneck::random(&shape(houlsby), &device);
        let want = norm.norm(h.clone() + inp.clone() + a.up(h.clone()));
        close(a.forward(h.clone(), inp.clone(), Some(&norm)), want);
        // Parallel: LN(h + inp + up(act(down(inp)))).
        let par = BnWiring {
            parallel: true,
            ..houlsby
        };
        let a = Bottleneck::random(&shape(par), &device);
        let want = norm.norm(h.clone() + inp.clone() + a.up(inp.clone()));
        close(a.forward(h.clone(), inp.clone(), Some(&norm)), want);
        // Without a model norm (Llama), Pfeiffer is h + inp + up(act(down(h + inp))).
        let a = Bottleneck::random(&shape(seq), &device);
        let want = h.clone() + inp.clone() + a.up(h.clone() + inp.clone());
        close(a.forward(h.clone(), inp.clone(), None), want);
        // An empty site is the plain residual.
        let site = SublayerSite::new(SublayerPlace::Output, 0, 4);
        close(
            site.forward(h.clone(), inp.clone(), Some(&norm)),
            norm.norm(h.clone() + inp.clone()),
        );
    }
}
