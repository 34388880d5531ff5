//! Child-Tuning-F (Xu et al., 2021): at every step each gradient entry of the selected weights
//! is kept with probability `p` (a fresh Bernoulli mask) and scaled by `1/p`, so the expected
//! update is the full gradient's while each step moves a random child network only.
//!
//! The masks come from a seed made of the run's seed, the step and the parameter, so a resumed
//! run draws the same masks as an uninterrupted one. On the CPU backend one parallel host loop
//! draws and applies each mask (a fast generator, one stream per block of entries, so the
//! result does not depend on the thread count); elsewhere burn draws it on the device.

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use peft_core::device::is_cpu;
use peft_core::train::TrainHook;
use peft_quant::BaseLinear;
use peft_sites::{Site, SiteHost};
use rayon::prelude::*;

/// Entries per generator stream of the host path.
const BLOCK: usize = 1 << 14;

/// The trainer hook of Child-Tuning-F over the parameters of the selected sites.
pub struct GradientMask {
    /// The probability of keeping a gradient entry.
    pub density: f64,
    seed: u64,
    /// The selected sites' and embedding tables' paths; their trainable parameters are masked.
    paths: Vec<String>,
    /// Draw with burn's device generator even on the CPU backend (the path other devices take).
    device_rng: bool,
}

/// SplitMix64: a well-mixed 64-bit value of `z`.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Keep each of `values` with probability `density` (scaled by `1/density`), zero it otherwise;
/// the draws of block `b` come from the stream `mix(seed ^ b)` (wyrand).
fn mask_host(values: &mut [f32], density: f64, seed: u64) {
    // An entry is kept when the high 32 bits of its draw fall below this.
    let threshold = (density * 4_294_967_296.0) as u64;
    let scale = (1.0 / density) as f32;
    values
        .par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, block)| {
            let mut state = mix(seed ^ b as u64);
            for v in block {
                state = state.wrapping_add(0xA076_1D64_78BD_642F);
                let t = u128::from(state) * u128::from(state ^ 0xE703_7ED1_A0B4_28DB);
                let r = ((t >> 64) as u64) ^ (t as u64);
                *v = if (r >> 32) < threshold {
                    *v * scale
                } else {
                    0.0
                };
            }
        });
}

impl GradientMask {
    /// A mask of `density` over the trainable parameters of the sites at `paths`, drawn from
    /// `seed` and the step.
    pub fn new(density: f64, seed: u64, paths: Vec<String>) -> Self {
        Self {
            density,
            seed,
            paths,
            device_rng: false,
        }
    }

    /// Draw the masks with burn's generator on the parameters' device also on the CPU backend.
    pub fn with_device_rng(mut self) -> Self {
        self.device_rng = true;
        self
    }

    fn step_seed(&self, step: usize) -> u64 {
        mix(self.seed ^ mix(step as u64 + 1))
    }

    /// Mask the gradient of parameter `id` (rank `D`); `seed` is this parameter's at this step.
    fn mask<const D: usize>(&self, grads: &mut GradientsParams, id: ParamId, seed: u64) {
        let Some(g) = grads.remove::<D>(id) else {
            return;
        };
        let device = g.device();
        let masked = if !self.device_rng && is_cpu(&device) && g.dtype() == DType::F32 {
            let shape = g.shape();
            let mut values = g
                .into_data()
                .try_into_vec::<f32>()
                .expect("an f32 gradient");
            mask_host(&mut values, self.density, seed);
            Tensor::from_data(TensorData::new(values, shape), &device)
        } else {
            let keep =
                Tensor::<D>::random(g.shape(), Distribution::Bernoulli(self.density), &device)
                    .cast(g.dtype())
                    .div_scalar(self.density);
            g * keep
        };
        grads.register(id, masked);
    }
}

/// The ids of a site's parameters by rank: 2-D weights and 1-D weights and biases.
fn site_params(site: &Site<'_>) -> (Vec<ParamId>, Vec<ParamId>) {
    match site {
        Site::Linear(l) | Site::Head(l) => {
            let weights = match &l.base {
                BaseLinear::Dense(d) => vec![d.weight.id],
                BaseLinear::Quant4(_) => vec![],
            };
            (weights, l.base.bias().map(|b| b.id).into_iter().collect())
        }
        Site::Norm(n) => {
            let mut v = vec![n.base.weight.id];
            v.extend(n.base.bias.as_ref().map(|b| b.id));
            (vec![], v)
        }
        Site::Prompt(_) | Site::Sublayer(_) => (vec![], vec![]),
    }
}

impl<M: SiteHost + Module> TrainHook<M> for GradientMask {
    fn on_gradients(&mut self, model: &M, grads: &mut GradientsParams, step: usize) {
        if self.density >= 1.0 {
            return;
        }
        let step_seed = self.step_seed(step);
        let mut seeded = false;
        let mut index = 0u64;
        for (path, site) in model.sites() {
            if !self.paths.contains(&path) {
                continue;
            }
            let (matrices, vectors) = site_params(&site);
            if !seeded {
                // The device path draws from the device's generator: seeded once per step,
                // before the first draw. (A gradient is looked up with its own rank: another
                // one does not downcast.)
                let device = matrices
                    .first()
                    .and_then(|id| grads.get::<2>(*id).map(|g| g.device()))
                    .or_else(|| {
                        vectors
                            .first()
                            .and_then(|id| grads.get::<1>(*id).map(|g| g.device()))
                    });
                if let Some(device) = device {
                    if self.device_rng || !is_cpu(&device) {
                        device.seed(step_seed);
                    }
                    seeded = true;
                }
            }
            for id in matrices {
                index += 1;
                self.mask::<2>(grads, id, mix(step_seed ^ mix(index)));
            }
            for id in vectors {
                index += 1;
                self.mask::<1>(grads, id, mix(step_seed ^ mix(index)));
            }
        }
        // Selected embedding tables, after the sites (so site masks do not depend on them).
        for (path, table) in model.embeddings() {
            if !self.paths.contains(&path) {
                continue;
            }
            if !seeded {
                if let Some(g) = grads.get::<2>(table.id) {
                    if self.device_rng || !is_cpu(&g.device()) {
                        g.device().seed(step_seed);
                    }
                    seeded = true;
                }
            }
            index += 1;
            self.mask::<2>(grads, table.id, mix(step_seed ^ mix(index)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mask_host;

    #[test]
    fn the_host_mask_keeps_its_share_scaled_and_is_the_same_for_the_same_seed() {
        let n = 200_000;
        let mut a = vec![1.0f32; n];
        mask_host(&mut a, 0.3, 11);
        let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-6));
        let mut b = vec![1.0f32; n];
        mask_host(&mut b, 0.3, 11);
        assert_eq!(a, b);
        let mut c = vec![1.0f32; n];
        mask_host(&mut c, 0.3, 12);
        assert_ne!(a, c);
        let mut all = vec![2.0f32; 1000];
        mask_host(&mut all, 1.0, 3);
        assert!(all.iter().all(|v| *v == 2.0));
    }
}
