//! # peft-adapter
//!
//! Methods that add small modules or vectors to a frozen model.
//!
//! - [`Ia3Config`]: (IA)^3 (Liu et al., 2022), Hugging Face `IA3`: learned vectors scaling
//!   the output of target linears (`base(x) ⊙ l`) and the input of feed-forward ones
//!   (`base(x ⊙ l)`), merged exactly into the weights. On your own burn model, put a
//!   [`peft_sites::LinearPart::OutputScale`] or `InputScale` on a [`peft_sites::TunedLinear`].

//! - [`BottleneckConfig`]: bottleneck adapters (Houlsby, Pfeiffer, parallel) after a layer's
//!   attention and feed-forward blocks, in AdapterHub `adapters`' layout and semantics. On your
//!   own burn model, put a [`peft_sites::Bottleneck`] in a [`peft_sites::SublayerSite`].
//! - [`FusionConfig`]: AdapterFusion over loaded bottleneck adapters, in AdapterHub's layout.
//! - [`SsfConfig`]: SSF, a learned scale and shift after linears and LayerNorms, merged
//!   exactly ([`peft_sites::LinearPart::ScaleShift`], `TunedNorm::add_scale_shift`).

pub mod bottleneck;
pub mod ia3;
pub mod ssf;

pub use bottleneck::{BnConfig, BottleneckConfig, FusionConfig, FusionSettings};
pub use ia3::Ia3Config;
pub use ssf::SsfConfig;
