//! Training helpers burn does not have in the form fine-tuning needs: clipping by the global
//! gradient norm (burn clips each parameter on its own) and a warmup + decay schedule.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// Scale all gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sq: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sq.push(g.powi_scalar(2).sum());
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let id: ParamId = param.id;
            if let Some(g) = self.grads.remove::<D>(id) {
                self.grads.register(id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut n = Norm { grads, sq: Vec::new() };
    module.visit(&mut n);
    if n.sq.is_empty() {
        return 0.0;
    }
    let total: f64 = Tensor::cat(n.sq, 0).sum().into_scalar::<f32>() as f64;
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        module.visit(&mut Scale { grads, factor: max_norm / (norm + 1e-6) });
    }
    norm
}

/// Linear warmup to `peak`, then cosine or linear decay to `peak * final_fraction`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub final_fraction: f64,
    pub cosine: bool,
}

impl LrSchedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let shape = if self.cosine {
            0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        } else {
            1.0 - progress
        };
        self.peak * (self.final_fraction + (1.0 - self.final_fraction) * shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule { peak: 1.0, warmup_steps: 4, total_steps: 14, final_fraction: 0.1, cosine: true };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!(s.at(9) < s.at(5));
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        #[derive(Module, Debug)]
        struct Two {
            a: Param<Tensor<1>>,
            b: Param<Tensor<2>>,
        }
        let device = Device::flex().autodiff();
        let m = Two {
            a: Param::from_tensor(Tensor::from_floats([3.0], &device)),
            b: Param::from_tensor(Tensor::from_floats([[4.0]], &device)),
        };
        // d/da (a^2/2) = a = 3, d/db = b = 4: global norm 5.
        let loss = m.a.val().powi_scalar(2).sum().div_scalar(2.0) + m.b.val().powi_scalar(2).sum().div_scalar(2.0);
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        let norm = clip_grad_norm(&m, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let ga: f32 = grads.get::<1>(m.a.id).unwrap().into_scalar();
        let gb: f32 = grads.get::<2>(m.b.id).unwrap().sum().into_scalar();
        assert!((ga - 0.6).abs() < 1e-4 && (gb - 0.8).abs() < 1e-4, "{ga} {gb}");
    }
}
