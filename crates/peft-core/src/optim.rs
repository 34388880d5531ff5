//! Training helpers burn does not have in the form fine-tuning needs: AdamW as PyTorch
//! configures it, fused into one pass on the CPU; clipping by the global gradient norm (burn
//! clips each parameter on its own); a warmup + decay schedule.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer,
    Optimizer,
};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu::{dot, f32_values, flex_tensor, par_fill, write_each};
use crate::device::is_cpu;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};

/// AdamW with PyTorch's defaults (betas 0.9 and 0.999, epsilon 1e-8; burn's default epsilon is
/// 1e-5) and a decoupled weight decay.
///
/// burn's AdamW walks each parameter about fifteen times per step (a new tensor per
/// operation): 48 ms of a 320 ms full fine-tuning step of the benchmark Llama. On the CPU this
/// one reads the parameter, gradient and both moments once and writes them back in place.
/// Elsewhere (and for other dtypes) it is burn's AdamW. The state is burn's [`AdamWState`], so
/// saved optimizer states load in either.
#[derive(Clone)]
pub struct AdamW {
    /// Multiplies the learning rate (a parameter group's own rate relative to the schedule).
    lr_scale: f64,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// burn's AdamW with the same settings, for devices without the fused pass.
    composed: burn::optim::AdamW,
}

impl AdamW {
    pub fn new(weight_decay: f32) -> Self {
        let (beta_1, beta_2, epsilon) = (0.9, 0.999, 1e-8);
        let config = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay);
        Self {
            lr_scale: 1.0,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            composed: config.build(),
        }
    }

    /// The same optimizer with its learning rate scaled by `scale`.
    pub fn with_lr_scale(mut self, scale: f64) -> Self {
        self.lr_scale = scale;
        self
    }

    /// The fused step on host data: `p`, `m`, `v` updated in place from `g` at step `time`.
    fn update(&self, lr: f32, time: i32, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, b2, eps) = (self.beta_1, self.beta_2, self.epsilon);
        let (c1, c2) = (1.0 - b1.powi(time), 1.0 - b2.powi(time));
        let keep = 1.0 - lr * self.weight_decay;
        // Chunks of 16 Ki values: big enough to share across threads, small enough to stay in L2.
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * (g * g);
                    let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
                    *p = *p * keep - lr * delta;
                }
            });
    }
}

/// The values of an f32 tensor, taken without a copy when it holds its buffer alone.
fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("an f32 tensor")
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let lr = lr * self.lr_scale;
        let device = tensor.device();
        // AMSGrad state or moments in another dtype (a state saved elsewhere): burn's step.
        let other_state = state.as_ref().is_some_and(|s| {
            let m = &s.momentum;
            m.max_moment_2.is_some()
                || m.moment_1.dtype() != DType::F32
                || m.moment_2.dtype() != DType::F32
        });
        if !is_cpu(&device)
            || tensor.dtype() != DType::F32
            || grad.dtype() != DType::F32
            || other_state
        {
            return self.composed.step(lr, tensor, grad, state);
        }
        let shape = tensor.shape();
        let n = shape.num_elements();
        let (time, mut m, mut v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                host_values(s.momentum.moment_1),
                host_values(s.momentum.moment_2),
            ),
            None => (1, vec![0f32; n], vec![0f32; n]),
        };
        let mut p = host_values(tensor);
        let g = host_values(grad);
        self.update(lr as f32, time as i32, &mut p, &mut m, &mut v, &g);
        // f32 explicitly: a device computing in f16 would otherwise convert to its default type.
        let back = |values: Vec<f32>| {
            Tensor::<D>::from_data(
                TensorData::new(values, shape.clone()),
                (&device, DType::F32),
            )
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: back(m),
            moment_2: back(v),
            max_moment_2: None,
        };
        (back(p), Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <burn::optim::AdamW as Optimizer>::to_device(state, device)
    }
}

/// Zero the `fraction` of smallest-magnitude entries of every state tensor (AdamW's two
/// moments) of the parameters `params`, keeping the others and the step counts: ReLoRA's
/// partial reset at each restart (Lialin et al., 2023, §3), each moment pruned by its own
/// magnitudes as the paper's code does. Then the first moment is also zeroed wherever the
/// second one was: an entry left with a first moment and no second one would move by
/// `lr·m̂/ε` at the next step (ε = 1e-8), which wrecked the model at the first step after a
/// restart on SmolLM2 (loss 1.4 to 7.1). The state goes through the optimizer's own record,
/// so what it holds for other parameters is untouched.
pub fn prune_state(
    optim: ModuleOptimizer,
    params: &[ParamId],
    fraction: f64,
) -> crate::Result<ModuleOptimizer> {
    use std::collections::{HashMap, HashSet};
    let err = |e: &dyn std::fmt::Display| crate::PeftError::Other(format!("optimizer state: {e}"));
    let ids: HashSet<u64> = params.iter().map(|p| p.val()).collect();
    let bytes = optim.to_record().into_bytes().map_err(|e| err(&e))?;
    let reader = burn_pack::Reader::from_bytes(bytes).map_err(|e| err(&e))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    // (name, dtype, shape, id, raw bytes, pruned values of a chosen parameter's moment)
    let mut parts = Vec::new();
    for t in reader.into_tensors().map_err(|e| err(&e))? {
        let (name, dtype, shape, id, bytes) = t.into_parts().map_err(|e| err(&e))?;
        let pruned = if id.is_some_and(|i| ids.contains(&i)) && dtype == DType::F32 {
            let data = TensorData::from_bytes(bytes.clone(), shape.clone(), dtype);
            let mut v: Vec<f32> = data
                .try_to_vec::<f32>()
                .map_err(|e| err(&format!("{e:?}")))?;
            zero_smallest(&mut v, fraction);
            Some(v)
        } else {
            None
        };
        parts.push((name, dtype, shape, id, bytes, pruned));
    }
    // No first moment without its second.
    let second: HashMap<u64, Vec<bool>> = parts
        .iter()
        .filter(|p| p.0.ends_with("moment_2"))
        .filter_map(|p| Some((p.3?, p.5.as_ref()?.iter().map(|x| *x == 0.0).collect())))
        .collect();
    for p in parts.iter_mut().filter(|p| p.0.ends_with("moment_1")) {
        if let (Some(id), Some(m)) = (p.3, p.5.as_mut())
            && let Some(zero) = second.get(&id)
        {
            for (x, z) in m.iter_mut().zip(zero) {
                if *z {
                    *x = 0.0;
                }
            }
        }
    }
    let tensors = parts
        .into_iter()
        .map(|(name, dtype, shape, id, bytes, pruned)| {
            let bytes = match pruned {
                Some(v) => TensorData::new(v, shape.clone()).into_bytes(),
                None => bytes,
            };
            burn_pack::Tensor::new(name, dtype, shape, id, bytes)
        })
        .collect();
    let mut writer = burn_pack::Writer::new(tensors);
    for (k, v) in &scalars {
        writer = writer.with_scalar(k, *v);
    }
    for (k, v) in &metadata {
        writer = writer.with_metadata(k, v);
    }
    let bytes = writer.into_bytes().map_err(|e| err(&e))?;
    let record = burn::optim::OptimizerRecord::from_bytes(bytes).map_err(|e| err(&e))?;
    Ok(optim.load_record(record))
}

/// Set the `⌊fraction·n⌋` entries of smallest magnitude to zero.
fn zero_smallest(values: &mut [f32], fraction: f64) {
    let k = ((fraction.clamp(0.0, 1.0) * values.len() as f64) as usize).min(values.len());
    if k == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| values[a].abs().total_cmp(&values[b].abs()));
    for &i in &order[..k] {
        values[i] = 0.0;
    }
}

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
                self.sq.push(if is_cpu(&g.device()) {
                    Tensor::from_dispatch(<Dispatch as GradientOps>::sum_of_squares(
                        g.into_dispatch(),
                    ))
                } else {
                    g.powi_scalar(2).sum()
                });
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
                let scaled = if is_cpu(&g.device()) {
                    Tensor::from_dispatch(<Dispatch as GradientOps>::scaled(
                        g.into_dispatch(),
                        self.factor as f32,
                    ))
                } else {
                    g.mul_scalar(self.factor)
                };
                self.grads.register(id, scaled);
            }
        }
    }
    let mut n = Norm {
        grads,
        sq: Vec::new(),
    };
    module.visit(&mut n);
    if n.sq.is_empty() {
        return 0.0;
    }
    let total: f64 = Tensor::cat(n.sq, 0).sum().into_scalar::<f32>() as f64;
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        module.visit(&mut Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        });
    }
    norm
}

/// The gradient arithmetic of [`clip_grad_norm`] as backend operations: on the CPU one
/// parallel pass each. burn's ops walk each gradient on one thread, twice for its norm (`powi`,
/// then `sum`) and once more to scale it: a full fine-tuning step of the benchmark Llama (about
/// 21M parameters) took 0.96 of the time with these (`scripts/bench_ab.py`, observed).
#[backend_extension(Flex, Autodiff)]
pub trait GradientOps: Backend {
    /// `Σ x²`, as a one-value f32 tensor.
    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `factor · x`.
    fn scaled(x: FloatTensor<Self>, factor: f32) -> FloatTensor<Self>;
}

/// Values per parallel task of [`GradientOps`] (64 KiB).
const GRADIENT_CHUNK: usize = 1 << 14;

impl GradientOps for Flex {
    fn sum_of_squares(x: FlexTensor) -> FlexTensor {
        let v = f32_values(&x);
        // Per-task sums added in task order: the same result whatever the thread count.
        let sums: Vec<f64> = v
            .par_chunks(GRADIENT_CHUNK)
            .map(|c| dot(c, c) as f64)
            .collect();
        flex_tensor(vec![sums.iter().sum::<f64>() as f32], [1], DType::F32)
    }

    fn scaled(x: FlexTensor, factor: f32) -> FlexTensor {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let v = f32_values(&x);
        let out = par_fill(
            v.len(),
            GRADIENT_CHUNK,
            v.par_chunks(GRADIENT_CHUNK),
            |o, x| write_each(o, x.iter().map(|x| factor * x)),
        );
        flex_tensor(out, shape, dtype)
    }
}

impl<B: Backend + GradientOps, C: CheckpointStrategy> GradientOps for Autodiff<B, C> {
    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::sum_of_squares(x.into_primitive()))
    }

    fn scaled(x: FloatTensor<Self>, factor: f32) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::scaled(x.into_primitive(), factor))
    }
}

/// The shape of the learning rate over a run. All but [`Schedule::CosineFloor`] are
/// transformers' (`get_*_schedule_with_warmup`): step `s` of the warmup uses `peak · s /
/// warmup` (so the first step's rate is 0), then the rate decays to 0 at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Warmup from `peak / warmup`, then cosine decay to `floor · peak` (this crate's default
    /// since its first release; floor 0.1).
    #[default]
    CosineFloor,
    /// transformers' `linear`.
    Linear,
    /// transformers' `cosine` (half a cycle).
    Cosine,
    /// transformers' `constant_with_warmup`.
    Constant,
    /// transformers' `cosine_with_restarts` with `cycles` hard restarts.
    CosineRestarts { cycles: usize },
}

impl Schedule {
    /// Parse a `--schedule` name: cosine-floor, linear, cosine, constant or
    /// cosine-restarts[:CYCLES] (default 2 cycles).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "cosine-floor" => Self::CosineFloor,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "cosine-restarts" => Self::CosineRestarts { cycles: 2 },
            other => {
                let cycles = other
                    .strip_prefix("cosine-restarts:")?
                    .parse()
                    .ok()
                    .filter(|c| *c > 0)?;
                Self::CosineRestarts { cycles }
            }
        })
    }
}

/// Warmup to `peak`, then the decay of `kind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub kind: Schedule,
}

impl LrSchedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let (warmup, total) = (self.warmup_steps, self.total_steps);
        if let Schedule::CosineFloor = self.kind {
            if step < warmup {
                return self.peak * (step + 1) as f64 / warmup as f64;
            }
            let decay_steps = total.saturating_sub(warmup).max(1);
            let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
            let floor = 0.1;
            let shape = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            return self.peak * (floor + (1.0 - floor) * shape);
        }
        if step < warmup {
            return self.peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        let pi = std::f64::consts::PI;
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => {
                ((total as f64 - step as f64) / total.saturating_sub(warmup).max(1) as f64).max(0.0)
            }
            Schedule::Cosine => (0.5 * (1.0 + (pi * progress).cos())).max(0.0),
            Schedule::CosineRestarts { cycles } => {
                if progress >= 1.0 {
                    0.0
                } else {
                    0.5 * (1.0 + (pi * ((cycles as f64 * progress) % 1.0)).cos())
                }
            }
            Schedule::CosineFloor => unreachable!("handled above"),
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[derive(Module, Debug)]
    struct Two {
        a: Param<Tensor<1>>,
        b: Param<Tensor<1>>,
    }

    /// The state tensors of parameter `id` (name, values) from the optimizer's record.
    fn state_of(optim: &ModuleOptimizer, id: ParamId) -> Vec<(String, Vec<f32>)> {
        let reader =
            burn_pack::Reader::from_bytes(optim.to_record().into_bytes().unwrap()).unwrap();
        reader
            .into_tensors()
            .unwrap()
            .into_iter()
            .filter_map(|t| {
                let (name, dtype, shape, pid, bytes) = t.into_parts().unwrap();
                (pid == Some(id.val())).then(|| {
                    let v = TensorData::from_bytes(bytes, shape, dtype)
                        .try_to_vec::<f32>()
                        .unwrap();
                    (name, v)
                })
            })
            .collect()
    }

    #[test]
    fn pruning_zeroes_the_smallest_state_of_the_chosen_parameters_only() {
        let device = Device::flex().autodiff();
        let values: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let mut model = Two {
            a: Param::from_tensor(Tensor::from_floats(values.as_slice(), &device)),
            b: Param::from_tensor(Tensor::from_floats(values.as_slice(), &device)),
        };
        let mut optim = ModuleOptimizer::from(AdamW::new(0.0));
        for _ in 0..2 {
            let loss = (model.a.val().powi_scalar(2) + model.b.val().powi_scalar(3)).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.1, model, grads);
        }
        let (a, b) = (model.a.id, model.b.id);
        let before_b = state_of(&optim, b);
        let optim = prune_state(optim, &[a], 0.7).unwrap();
        let after_a = state_of(&optim, a);
        assert_eq!(after_a.len(), 2, "both moments: {after_a:?}");
        let mut names: Vec<&str> = after_a.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert!(
            names[0].ends_with("moment_1") && names[1].ends_with("moment_2"),
            "{names:?}"
        );
        for (name, v) in &after_a {
            assert_eq!(v.iter().filter(|x| **x == 0.0).count(), 7, "{name}: {v:?}");
            // The largest magnitudes (the last entries: gradient 2x grows with x) are kept.
            assert!(v[7..].iter().all(|x| *x != 0.0), "{name}: {v:?}");
        }
        assert_eq!(state_of(&optim, b), before_b, "other parameters untouched");
    }

    #[test]
    fn pruning_leaves_no_first_moment_without_its_second() {
        let device = Device::flex().autodiff();
        let mut model = Two {
            a: Param::from_tensor(Tensor::zeros([3], &device)),
            b: Param::from_tensor(Tensor::zeros([3], &device)),
        };
        let mut optim = ModuleOptimizer::from(AdamW::new(0.0));
        // Gradients (10, 3, 4) then (-9, 3, 4): entry 0 ends with the largest second moment
        // and a first moment near 0, entry 2 with the largest first moment.
        for g in [[10.0f32, 3.0, 4.0], [-9.0, 3.0, 4.0]] {
            let c = Tensor::<1>::from_floats(g.as_slice(), &device);
            let loss = (model.a.val() * c).sum() + model.b.val().sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.0, model, grads);
        }
        let optim = prune_state(optim, &[model.a.id], 0.67).unwrap();
        for (name, v) in state_of(&optim, model.a.id) {
            if name.ends_with("moment_2") {
                assert!(v[0] > 0.0 && v[1] == 0.0 && v[2] == 0.0, "{name}: {v:?}");
            } else {
                // Its own pruning kept entry 2, whose second moment is gone.
                assert_eq!(v, vec![0.0; 3], "{name}");
            }
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            peak: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            kind: Schedule::CosineFloor,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!(s.at(9) < s.at(5));
    }

    /// transformers' schedules (`get_*_schedule_with_warmup`, evaluated by hand): peak 1,
    /// warmup 2, 10 steps.
    #[test]
    fn schedules_follow_transformers() {
        let at = |kind, step| {
            LrSchedule {
                peak: 1.0,
                warmup_steps: 2,
                total_steps: 10,
                kind,
            }
            .at(step)
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        for kind in [
            Schedule::Linear,
            Schedule::Cosine,
            Schedule::Constant,
            Schedule::CosineRestarts { cycles: 2 },
        ] {
            close(at(kind, 0), 0.0);
            close(at(kind, 1), 0.5);
            close(at(kind, 2), 1.0);
        }
        close(at(Schedule::Linear, 6), 0.5);
        close(at(Schedule::Linear, 10), 0.0);
        close(at(Schedule::Cosine, 6), 0.5);
        close(at(Schedule::Cosine, 10), 0.0);
        close(at(Schedule::Constant, 9), 1.0);
        // Two cycles over 8 decay steps: back to the peak at step 6, 0.5 at steps 4 and 8.
        close(at(Schedule::CosineRestarts { cycles: 2 }, 4), 0.5);
        close(at(Schedule::CosineRestarts { cycles: 2 }, 6), 1.0);
        close(at(Schedule::CosineRestarts { cycles: 2 }, 8), 0.5);
        close(at(Schedule::CosineRestarts { cycles: 2 }, 10), 0.0);
        assert_eq!(
            Schedule::parse("cosine-restarts:3"),
            Some(Schedule::CosineRestarts { cycles: 3 })
        );
        assert_eq!(Schedule::parse("cosine-restarts:0"), None);
        assert_eq!(Schedule::parse("warm"), None);
    }

    /// The fused CPU step equals burn's AdamW with the same settings over several steps (state
    /// carried), with and without weight decay.
    #[test]
    fn fused_adamw_matches_burn_adamw() {
        let device = Device::flex();
        for wd in [0.0f32, 0.1] {
            let fused = AdamW::new(wd);
            let composed = fused.composed.clone();
            let p0 = Tensor::<2>::from_data(
                TensorData::new(
                    (0..600)
                        .map(|i| (i as f32 * 0.37).sin())
                        .collect::<Vec<_>>(),
                    [20, 30],
                ),
                &device,
            );
            let (mut pa, mut pb) = (p0.clone(), p0);
            let (mut sa, mut sb) = (None, None);
            for step in 0..4 {
                let g = Tensor::<2>::from_data(
                    TensorData::new(
                        (0..600)
                            .map(|i| ((i * 7 + step * 13) as f32 * 0.11).cos() * 1e-3)
                            .collect::<Vec<_>>(),
                        [20, 30],
                    ),
                    &device,
                );
                (pa, sa) = fused.step(1e-2, pa, g.clone(), sa);
                (pb, sb) = composed.step(1e-2, pb, g, sb);
            }
            let tol = burn::tensor::Tolerance::<f32>::rel_abs(1e-5, 1e-7);
            pa.into_data().assert_approx_eq::<f32>(&pb.into_data(), tol);
            let (ma, mb) = (sa.unwrap().momentum, sb.unwrap().momentum);
            assert_eq!(ma.time, mb.time);
            ma.moment_1
                .into_data()
                .assert_approx_eq::<f32>(&mb.moment_1.into_data(), tol);
            ma.moment_2
                .into_data()
                .assert_approx_eq::<f32>(&mb.moment_2.into_data(), tol);
        }
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
        let loss = m.a.val().powi_scalar(2).sum().div_scalar(2.0)
            + m.b.val().powi_scalar(2).sum().div_scalar(2.0);
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        let norm = clip_grad_norm(&m, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let ga: f32 = grads.get::<1>(m.a.id).unwrap().into_scalar();
        let gb: f32 = grads.get::<2>(m.b.id).unwrap().sum().into_scalar();
        assert!(
            (ga - 0.6).abs() < 1e-4 && (gb - 0.8).abs() < 1e-4,
            "{ga} {gb}"
        );
    }

    /// On the CPU the norm and the scaling run as parallel passes over each gradient: a
    /// gradient of several tasks (and a partial last one) gets the exact norm and every value
    /// scaled; one below the limit is left as it was.
    #[test]
    fn clipping_large_gradients_on_the_cpu() {
        #[derive(Module, Debug)]
        struct One {
            w: Param<Tensor<2>>,
        }
        let device = Device::flex().autodiff();
        let (rows, cols) = (317, 331);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let exact = values
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        for (max_norm, factor) in [(1.0, 1.0 / (exact + 1e-6)), (1e9, 1.0)] {
            let m = One {
                w: Param::from_tensor(Tensor::from_data(
                    TensorData::new(values.clone(), [rows, cols]),
                    &device,
                )),
            };
            // d/dw Σ w²/2 = w.
            let loss = m.w.val().powi_scalar(2).sum().div_scalar(2.0);
            let mut grads = GradientsParams::from_grads(loss.backward(), &m);
            let norm = clip_grad_norm(&m, &mut grads, max_norm);
            assert!((norm - exact).abs() <= 1e-5 * exact, "{norm} vs {exact}");
            let g = grads.get::<2>(m.w.id).unwrap().into_data();
            for (g, &v) in g.iter::<f32>().zip(&values) {
                assert!(
                    (g as f64 - v as f64 * factor).abs() <= 1e-6,
                    "{g} vs {v}·{factor}"
                );
            }
        }
    }
}
