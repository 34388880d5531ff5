//! (IA)^3: config (Hugging Face `IA3Config`) and the whole-model method.

mod config;
mod model;

pub use config::Ia3Config;
