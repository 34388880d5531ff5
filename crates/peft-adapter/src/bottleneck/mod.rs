//! Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022's parallel
//! form), interchangeable with AdapterHub `adapters` 1.3.0.

mod config;
mod fusion;
mod model;

pub use config::{ADAPTERHUB_VERSION, BnConfig, BottleneckConfig};
pub use fusion::{FusionConfig, FusionSettings};
