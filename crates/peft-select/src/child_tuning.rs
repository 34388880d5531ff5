//! Child-Tuning-F (Xu et al., 2021): at every step each gradient entry of the selected weights
//! is kept with probability `p` (a fresh Bernoulli mask) and scaled by `1/p`, so the expected
//! update is the full gradient's while each step moves a random child network only.
//!
//! The masks are drawn on the parameters' device from a seed made of the run's seed and the
//! step, so a resumed run draws the same masks as an uninterrupted one.

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use peft_core::train::TrainHook;
use peft_quant::BaseLinear;
use peft_sites::{Site, SiteHost};

/// The trainer hook of Child-Tuning-F over the parameters of the selected sites.
pub struct GradientMask {
    /// The probability of keeping a gradient entry.
    pub density: f64,
    seed: u64,
    /// The selected sites' paths; their trainable parameters are masked.
    paths: Vec<String>,
}

impl GradientMask {
    /// A mask of `density` over the trainable parameters of the sites at `paths`, drawn from
    /// `seed` and the step.
    pub fn new(density: f64, seed: u64, paths: Vec<String>) -> Self {
        Self {
            density,
            seed,
            paths,
        }
    }

    fn step_seed(&self, step: usize) -> u64 {
        // SplitMix64 of (seed, step): independent streams per step.
        let mut z = self
            .seed
            .wrapping_add((step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
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

fn mask<const D: usize>(grads: &mut GradientsParams, id: ParamId, density: f64) {
    if let Some(g) = grads.remove::<D>(id) {
        let keep = Tensor::<D>::random(g.shape(), Distribution::Bernoulli(density), &g.device())
            .cast(g.dtype())
            .div_scalar(density);
        grads.register(id, g * keep);
    }
}

impl<M: SiteHost + Module> TrainHook<M> for GradientMask {
    fn on_gradients(&mut self, model: &M, grads: &mut GradientsParams, step: usize) {
        if self.density >= 1.0 {
            return;
        }
        let mut seeded = false;
        for (path, site) in model.sites() {
            if !self.paths.contains(&path) {
                continue;
            }
            let (matrices, vectors) = site_params(&site);
            if !seeded {
                // Seeded once per step, before the first draw, on the parameters' device.
                // (A gradient is looked up with its own rank: another one does not downcast.)
                let device = matrices
                    .first()
                    .and_then(|id| grads.get::<2>(*id).map(|g| g.device()))
                    .or_else(|| {
                        vectors
                            .first()
                            .and_then(|id| grads.get::<1>(*id).map(|g| g.device()))
                    });
                if let Some(device) = device {
                    device.seed(self.step_seed(step));
                    seeded = true;
                }
            }
            for id in matrices {
                mask::<2>(grads, id, self.density);
            }
            for id in vectors {
                mask::<1>(grads, id, self.density);
            }
        }
    }
}
