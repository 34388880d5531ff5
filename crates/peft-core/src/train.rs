//! A model-agnostic training loop: AdamW over the trainable parameters (with parameter groups
//! of their own learning rate and weight decay), transformers' schedules, gradient
//! accumulation, global-norm clipping, a seeded data order, hooks where methods change
//! training ([`TrainHook`]), and checkpoints that resume to the same result as an
//! uninterrupted run.

use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamGroup, ParamId};
use burn::optim::GradientsAccumulator;
pub use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::optim::Schedule;
use crate::optim::{AdamW, LrSchedule, clip_grad_norm};
use crate::{PeftError, Result};

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Optimizer steps (each over `grad_accum` micro-batches).
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// The learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// Parameters with their own learning rate or weight decay (the last matching group wins).
    #[serde(default)]
    pub param_groups: Vec<ParamGroupSpec>,
}

/// Parameters (by a regex over their module path, e.g. `.*classifier.*`) trained with their own
/// learning rate (the schedule's times `lr_scale`) and weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroupSpec {
    pub pattern: String,
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// `None`: the run's weight decay.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// What a method changes in training, beyond its loss. Every method is optional; the state
/// a hook keeps is saved with checkpoints and restored on resume ([`TrainHook::state`]).
pub trait TrainHook<M: Module> {
    /// A term added to the loss of every micro-batch (e.g. AdaLoRA's orthogonality penalty).
    fn extra_loss(&self, _model: &M) -> Option<Tensor<1>> {
        None
    }

    /// Sees and may change the gradients of step `step` before clipping and the optimizer
    /// (e.g. Child-Tuning's masks).
    fn on_gradients(&mut self, _model: &M, _grads: &mut GradientsParams, _step: usize) {}

    /// Multiplies the scheduled learning rate of step `step` (e.g. ReLoRA's warmup after each
    /// restart, which makes the schedule jagged); 1 by default.
    fn lr_factor(&self, _step: usize) -> f64 {
        1.0
    }

    /// Runs after the optimizer step `step`, with the optimizer (its state can be reset for a
    /// group of parameters: e.g. ReLoRA's restarts, AdaLoRA's rank allocation).
    fn after_step(&mut self, model: M, _optim: &mut ModuleOptimizer, _step: usize) -> M {
        model
    }

    /// The hook's state, for checkpoints.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restore a state saved by [`TrainHook::state`].
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 5,
            steps: 50,
            batch_size: 8,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            seed: 42,
            schedule: Schedule::default(),
            param_groups: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Check what a user can get wrong that the types do not: the parameter-group patterns.
    pub fn check(&self) -> Result<()> {
        for g in &self.param_groups {
            ParamGroup::from_regex(&g.pattern).map_err(|e| {
                PeftError::Config(format!("param_groups pattern `{}`: {e:?}", g.pattern))
            })?;
            if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
                return Err(PeftError::Config(format!(
                    "param_groups `{}`: lr_scale {} is not a finite number >= 0",
                    g.pattern, g.lr_scale
                )));
            }
        }
        Ok(())
    }

    /// The fields in which `other` differs from `self`, as `name: ours -> theirs`.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).expect("config"),
            serde_json::to_value(other).expect("config"),
        );
        let (a, b) = (
            a.as_object().expect("object"),
            b.as_object().expect("object"),
        );
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} -> {}", b[k]))
            .collect()
    }
}

/// File of a checkpoint that records the [`TrainConfig`] it was made with.
const CONFIG_FILE: &str = "train_config.json";

/// File of a checkpoint with the hooks' states.
const HOOKS_FILE: &str = "hooks.json";

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Tokens (or examples) processed by the step.
    pub tokens: usize,
    /// The loss or the gradient norm was NaN or infinite, so the update was not applied (the
    /// model is as before the step; the data position and step count moved on).
    #[serde(default)]
    pub skipped: bool,
}

/// Where a run is: enough to continue it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Data passes started (the order of pass `e` is `shuffled(n, seed + e)`).
    pub epoch: u64,
    /// Position in the current pass.
    pub cursor: usize,
}

/// Deterministic permutation of `0..n` (splitmix64 keys).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut keyed: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            (z ^ (z >> 31), i)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Give trainable parameters ids by their order in the module tree, so optimizer state saved
/// by one process finds its parameters in another.
fn stable_ids<M: Module>(model: M) -> M {
    struct Renumber(u64);
    impl ModuleMapper for Renumber {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !param.val().is_require_grad() {
                return param;
            }
            self.0 += 1;
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(ParamId::from(0x5EED_0000_0000 + self.0), value, mapper)
        }
    }
    model.map(&mut Renumber(0))
}

/// Trains the parameters of `M` that require gradients (`M` must live on an autodiff device).
pub struct Trainer<M: Module> {
    model: Option<M>,
    optim: ModuleOptimizer,
    schedule: LrSchedule,
    pub config: TrainConfig,
    state: TrainerState,
    order: Vec<usize>,
    hooks: Vec<Box<dyn TrainHook<M>>>,
}

impl<M: Module> Trainer<M> {
    /// A trainer for `model`. Parameter-group patterns are checked by
    /// [`TrainConfig::check`]; an invalid one here panics.
    pub fn new(model: M, config: TrainConfig) -> Self {
        let wd = config.weight_decay;
        let mut optim = ModuleOptimizer::from(AdamW::new(wd as f32));
        for g in &config.param_groups {
            let group = ParamGroup::from_regex(&g.pattern)
                .expect("param_groups checked by TrainConfig::check");
            let adam = AdamW::new(g.weight_decay.unwrap_or(wd) as f32).with_lr_scale(g.lr_scale);
            optim = optim.with_group(group, adam, None);
        }
        let schedule = LrSchedule {
            peak: config.learning_rate,
            warmup_steps: config.warmup_steps,
            total_steps: config.steps,
            kind: config.schedule,
        };
        Self {
            model: Some(stable_ids(model)),
            optim,
            schedule,
            config,
            state: TrainerState {
                step: 0,
                epoch: 0,
                cursor: 0,
            },
            order: Vec::new(),
            hooks: Vec::new(),
        }
    }

    /// The states of the hooks, in the order added.
    pub fn hooks_state(&self) -> Vec<serde_json::Value> {
        self.hooks.iter().map(|h| h.state()).collect()
    }

    /// Add a hook (they run in the order added).
    pub fn with_hook(mut self, hook: impl TrainHook<M> + 'static) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    pub fn model(&self) -> &M {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn into_model(mut self) -> M {
        self.model.take().expect("model present between steps")
    }

    pub fn state(&self) -> TrainerState {
        self.state
    }

    pub fn is_done(&self) -> bool {
        self.state.step >= self.config.steps
    }

    /// Indices of the next batch of `n` examples, in the seeded order.
    fn next_batch(&mut self, n: usize) -> Vec<usize> {
        next_batch(&mut self.state, &mut self.order, n, &self.config)
    }

    /// One optimizer step over `grad_accum` batches of `data`. `loss_fn` returns the mean loss
    /// of a batch and how many tokens it covered.
    pub fn step<E: Clone>(
        &mut self,
        data: &[E],
        loss_fn: impl Fn(&M, &[E]) -> (Tensor<1>, usize),
    ) -> StepReport {
        assert!(!data.is_empty(), "no training examples");
        let model = self.model.take().expect("model present between steps");
        // Dropout masks depend on the step only, so a resumed run draws the same ones.
        model_device(&model).seed(
            self.config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(self.state.step as u64),
        );
        let accum = self.config.grad_accum.max(1);
        let mut accumulator = GradientsAccumulator::<M>::new();
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for _ in 0..accum {
            let batch: Vec<E> = self
                .next_batch(data.len())
                .into_iter()
                .map(|i| data[i].clone())
                .collect();
            let (mut loss, n) = loss_fn(&model, &batch);
            for hook in &self.hooks {
                if let Some(extra) = hook.extra_loss(&model) {
                    loss = loss + extra;
                }
            }
            let loss = loss.div_scalar(accum as f64);
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            tokens += n;
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let mut grads = accumulator.grads();
        for hook in &mut self.hooks {
            hook.on_gradients(&model, &mut grads, self.state.step);
        }
        // The norm is measured even without clipping: a NaN or infinite gradient must not reach
        // the weights.
        let grad_norm = clip_grad_norm(
            &model,
            &mut grads,
            self.config.max_grad_norm.unwrap_or(f64::INFINITY),
        );
        let step = self.state.step;
        let lr = self.schedule.at(step)
            * self
                .hooks
                .iter()
                .map(|h| h.lr_factor(step))
                .product::<f64>();
        let skipped = !(loss_sum.is_finite() && grad_norm.is_finite());
        let mut model = if skipped {
            model
        } else {
            self.optim.step(lr, model, grads)
        };
        for hook in &mut self.hooks {
            model = hook.after_step(model, &mut self.optim, self.state.step);
        }
        self.model = Some(model);
        let report = StepReport {
            step: self.state.step,
            loss: loss_sum,
            learning_rate: lr,
            grad_norm,
            tokens,
            skipped,
        };
        self.state.step += 1;
        report
    }

    /// The settings a checkpoint in `dir` was made with (`None` for checkpoints that predate
    /// `train_config.json`).
    pub fn saved_config(dir: &Path) -> Result<Option<TrainConfig>> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| PeftError::format(&path, e.to_string()))
    }

    /// Save the optimizer state and the position in the data (the model's own tensors are
    /// saved by the method, e.g. as an adapter).
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let optim = dir.join("optimizer.bpk");
        self.optim.save(&optim).map_err(|e| {
            PeftError::format(&optim, format!("cannot save optimizer state: {e:?}"))
        })?;
        let config = serde_json::to_string_pretty(&self.config).expect("config serialises");
        crate::tensors::write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())?;
        let hooks = serde_json::to_string(&self.hooks_state()).expect("hook states serialise");
        crate::tensors::write_atomic(&dir.join(HOOKS_FILE), hooks.as_bytes())?;
        // Written last: a folder with trainer_state.json is a complete checkpoint.
        let text = serde_json::to_string_pretty(&self.state).expect("state serialises");
        crate::tensors::write_atomic(&dir.join("trainer_state.json"), text.as_bytes())
    }

    /// Continue from a state saved by [`Trainer::save_state`]; the model must already hold the
    /// checkpoint's trained tensors.
    ///
    /// A checkpoint made with other settings (steps, learning rate, batch, ...) is refused: the
    /// schedule and data order would silently change.
    pub fn load_state(mut self, dir: &Path) -> Result<Self> {
        if let Some(saved) = Self::saved_config(dir)? {
            let changed = saved.differences(&self.config);
            if !changed.is_empty() {
                return Err(PeftError::Config(format!(
                    "{}: the checkpoint was made with other settings ({}); resume with the same ones",
                    dir.display(),
                    changed.join(", ")
                )));
            }
        }
        let state_path = dir.join("trainer_state.json");
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| PeftError::io(&state_path, e))?;
        self.state = serde_json::from_str(&text)
            .map_err(|e| PeftError::format(&state_path, e.to_string()))?;
        let optim = dir.join("optimizer.bpk");
        self.optim = self.optim.load(&optim).map_err(|e| {
            PeftError::format(&optim, format!("cannot load optimizer state: {e:?}"))
        })?;
        let hooks_path = dir.join(HOOKS_FILE);
        if hooks_path.exists() {
            let text =
                std::fs::read_to_string(&hooks_path).map_err(|e| PeftError::io(&hooks_path, e))?;
            let states: Vec<serde_json::Value> = serde_json::from_str(&text)
                .map_err(|e| PeftError::format(&hooks_path, e.to_string()))?;
            if states.len() != self.hooks.len() {
                return Err(PeftError::format(
                    &hooks_path,
                    format!(
                        "{} hook states for {} hooks; resume with the same method",
                        states.len(),
                        self.hooks.len()
                    ),
                ));
            }
            for (hook, state) in self.hooks.iter_mut().zip(&states) {
                hook.load_state(state)?;
            }
        }
        // next_batch rebuilds the current pass's order and continues at the cursor.
        self.order = Vec::new();
        Ok(self)
    }
}

/// The next `config.batch_size` indices of `0..n` from `state`, in the seeded order of the
/// current pass (`order` caches it; empty after a resume).
fn next_batch(
    state: &mut TrainerState,
    order: &mut Vec<usize>,
    n: usize,
    config: &TrainConfig,
) -> Vec<usize> {
    let mut idx = Vec::with_capacity(config.batch_size);
    while idx.len() < config.batch_size {
        // A fresh or resumed trainer has no order yet: build the current pass's.
        if order.len() != n {
            *order = shuffled(n, config.seed.wrapping_add(state.epoch));
        }
        if state.cursor >= n {
            state.epoch += 1;
            state.cursor = 0;
            *order = shuffled(n, config.seed.wrapping_add(state.epoch));
        }
        idx.push(order[state.cursor]);
        state.cursor += 1;
    }
    idx
}

/// The example indices of every batch a run of `config` over `n` examples takes, in order
/// (`steps × grad_accum` batches): what a reference implementation needs to train on the
/// same batches.
pub fn batch_plan(config: &TrainConfig, n: usize) -> Vec<Vec<usize>> {
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        cursor: 0,
    };
    let mut order = Vec::new();
    (0..config.steps * config.grad_accum.max(1))
        .map(|_| next_batch(&mut state, &mut order, n, config))
        .collect()
}

fn model_device<M: Module>(model: &M) -> Device {
    model.devices().into_iter().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[derive(Module, Debug)]
    struct Line {
        w: Param<Tensor<1>>,
        frozen: Param<Tensor<1>>,
    }

    fn fit(steps: usize, resume_at: Option<usize>) -> Vec<f32> {
        let device = Device::flex().autodiff();
        device.seed(1);
        let line = || Line {
            w: Param::from_tensor(Tensor::zeros([2], &device)),
            frozen: crate::params::frozen(Tensor::random([2], Distribution::Default, &device)),
        };
        let data: Vec<(f32, f32)> = (0..7)
            .map(|i| (i as f32 / 6.0, 3.0 * i as f32 / 6.0 - 1.0))
            .collect();
        let loss = |m: &Line, batch: &[(f32, f32)]| {
            let x: Vec<f32> = batch.iter().map(|p| p.0).collect();
            let y: Vec<f32> = batch.iter().map(|p| p.1).collect();
            let x = Tensor::<1>::from_floats(x.as_slice(), &device);
            let y = Tensor::<1>::from_floats(y.as_slice(), &device);
            let w = m.w.val();
            let pred = x * w.clone().narrow(0, 0, 1)
                + w.narrow(0, 1, 1)
                + m.frozen.val().sum().mul_scalar(0.0);
            ((pred - y).powi_scalar(2).mean(), batch.len())
        };
        let config = TrainConfig {
            learning_rate: 0.2,
            steps,
            batch_size: 3,
            grad_accum: 2,
            warmup_steps: 2,
            ..Default::default()
        };
        let first = line();
        let frozen_before = first.frozen.val().into_data();
        let mut t = Trainer::new(first, config.clone());
        let dir = tempfile::tempdir().unwrap();
        while !t.is_done() {
            if Some(t.state().step) == resume_at {
                t.save_state(dir.path()).unwrap();
                let w = t.model().w.val().into_data();
                // A new process: fresh model with the saved trained tensor, fresh trainer.
                let mut m = line();
                m.w = Param::from_tensor(Tensor::from_data(w, &device));
                t = Trainer::new(m, config.clone())
                    .load_state(dir.path())
                    .unwrap();
            }
            t.step(&data, loss);
        }
        let m = t.into_model();
        if resume_at.is_none() {
            assert_eq!(
                m.frozen.val().into_data(),
                frozen_before,
                "a frozen parameter moved"
            );
        }
        m.w.val().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn training_reduces_the_loss_and_frozen_params_do_not_move() {
        let w = fit(150, None);
        assert!(
            (w[0] - 3.0).abs() < 0.2 && (w[1] + 1.0).abs() < 0.2,
            "{w:?}"
        );
    }

    #[test]
    fn resumed_run_equals_uninterrupted_run() {
        let straight = fit(9, None);
        let resumed = fit(9, Some(4));
        for (a, b) in straight.iter().zip(&resumed) {
            assert!((a - b).abs() <= 1e-6, "{straight:?} vs {resumed:?}");
        }
    }

    #[test]
    fn non_finite_steps_leave_the_model_alone_and_changed_settings_are_refused() {
        let device = Device::flex().autodiff();
        let m = Line {
            w: Param::from_tensor(Tensor::ones([2], &device)),
            frozen: crate::params::frozen(Tensor::zeros([2], &device)),
        };
        let config = TrainConfig {
            steps: 3,
            batch_size: 1,
            ..Default::default()
        };
        let mut t = Trainer::new(m, config.clone());
        let data = [f32::NAN];
        let r = t.step(&data, |m: &Line, b: &[f32]| {
            ((m.w.val().sum() * b[0]).reshape([1]), 1)
        });
        assert!(r.skipped && r.loss.is_nan(), "{r:?}");
        assert_eq!(
            t.model().w.val().into_data().try_to_vec::<f32>().unwrap(),
            vec![1.0, 1.0]
        );
        assert_eq!(t.state().step, 1);

        let dir = tempfile::tempdir().unwrap();
        t.save_state(dir.path()).unwrap();
        let other = TrainConfig {
            steps: 5,
            ..config.clone()
        };
        let m = Line {
            w: Param::from_tensor(Tensor::ones([2], &device)),
            frozen: crate::params::frozen(Tensor::zeros([2], &device)),
        };
        let err = Trainer::new(m, other)
            .load_state(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("steps: 3 -> 5"), "{err}");
        assert_eq!(
            Trainer::<Line>::saved_config(dir.path()).unwrap(),
            Some(config)
        );
    }

    #[derive(Module, Debug)]
    struct Pair {
        a: Param<Tensor<1>>,
        b: Param<Tensor<1>>,
    }

    fn pair(device: &Device) -> Pair {
        Pair {
            a: Param::from_tensor(Tensor::from_floats([1.0, -1.0], device)),
            b: Param::from_tensor(Tensor::from_floats([0.5], device)),
        }
    }

    fn pair_loss(m: &Pair, batch: &[f32]) -> (Tensor<1>, usize) {
        let x = batch.iter().sum::<f32>();
        let pred = m.a.val().sum().mul_scalar(x) + m.b.val().sum();
        (
            (pred.sub_scalar(2.0)).powi_scalar(2).reshape([1]),
            batch.len(),
        )
    }

    fn values(p: &Param<Tensor<1>>) -> Vec<f32> {
        p.val().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn parameter_groups_have_their_own_rate_and_bad_patterns_are_refused() {
        let device = Device::flex().autodiff();
        let config = TrainConfig {
            steps: 4,
            batch_size: 2,
            warmup_steps: 0,
            learning_rate: 0.1,
            param_groups: vec![ParamGroupSpec {
                pattern: "(^|.*\\.)b$".into(),
                lr_scale: 0.0,
                weight_decay: None,
            }],
            ..Default::default()
        };
        config.check().unwrap();
        let mut t = Trainer::new(pair(&device), config);
        while !t.is_done() {
            t.step(&[0.5, 1.0, 1.5], pair_loss);
        }
        let m = t.into_model();
        assert_eq!(
            values(&m.b),
            vec![0.5],
            "a group with lr_scale 0 does not move"
        );
        assert_ne!(values(&m.a), vec![1.0, -1.0]);
        let bad = TrainConfig {
            param_groups: vec![ParamGroupSpec {
                pattern: "(".into(),
                lr_scale: 1.0,
                weight_decay: None,
            }],
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().to_string().contains("`(`"));
    }

    /// A hook of every kind: an extra loss, a gradient mask on odd steps, an optimizer reset
    /// after step 2, and a step counter as its state.
    struct Probe {
        count: usize,
        b_id: ParamId,
    }

    impl TrainHook<Pair> for Probe {
        fn extra_loss(&self, model: &Pair) -> Option<Tensor<1>> {
            Some(
                model
                    .a
                    .val()
                    .powi_scalar(2)
                    .sum()
                    .mul_scalar(0.1)
                    .reshape([1]),
            )
        }
        fn on_gradients(&mut self, _model: &Pair, grads: &mut GradientsParams, step: usize) {
            if step % 2 == 1 {
                grads.remove::<1>(self.b_id);
            }
        }
        fn after_step(&mut self, model: Pair, optim: &mut ModuleOptimizer, step: usize) -> Pair {
            self.count += 1;
            if step == 2 {
                let o = std::mem::replace(optim, ModuleOptimizer::from(AdamW::new(0.0)));
                *optim = o.with_group(
                    ParamGroup::from_regex(".*a$").unwrap(),
                    AdamW::new(0.0),
                    None,
                );
            }
            model
        }
        fn state(&self) -> serde_json::Value {
            serde_json::json!({"count": self.count})
        }
        fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
            self.count = state["count"].as_u64().unwrap() as usize;
            Ok(())
        }
    }

    fn hooked(resume_at: Option<usize>) -> (Vec<f32>, Vec<f32>, usize, Vec<bool>) {
        let device = Device::flex().autodiff();
        let config = TrainConfig {
            steps: 6,
            batch_size: 2,
            warmup_steps: 1,
            learning_rate: 0.05,
            ..Default::default()
        };
        let trainer = |m: Pair| {
            let m = stable_ids(m);
            let b_id = m.b.id;
            Trainer::new(m, config.clone()).with_hook(Probe { count: 0, b_id })
        };
        let mut t = trainer(pair(&device));
        let dir = tempfile::tempdir().unwrap();
        let mut b_moved = Vec::new();
        while !t.is_done() {
            if Some(t.state().step) == resume_at {
                t.save_state(dir.path()).unwrap();
                let (a, b) = (t.model().a.val().into_data(), t.model().b.val().into_data());
                let m = Pair {
                    a: Param::from_tensor(Tensor::from_data(a, &device)),
                    b: Param::from_tensor(Tensor::from_data(b, &device)),
                };
                t = trainer(m).load_state(dir.path()).unwrap();
            }
            let before = values(&t.model().b);
            let step = t.state().step;
            let report = t.step(&[0.5, 1.0, 1.5], pair_loss);
            if step == 0 {
                // The reported loss includes the extra term: 0.1 * (1 + 1) over the data term.
                let data_term: f32 = pair_loss(&pair(&device), &[0.5, 1.0]).0.into_scalar();
                assert!(
                    (report.loss - (data_term as f64 + 0.2)).abs() < 1e-5,
                    "{report:?}"
                );
            }
            b_moved.push(values(&t.model().b) != before);
        }
        let m = t.model();
        let count = t.hooks_state()[0]["count"].as_u64().unwrap() as usize;
        (values(&m.a), values(&m.b), count, b_moved)
    }

    #[test]
    fn hooks_change_loss_gradients_and_optimizer_and_resume_exactly() {
        let (a, b, count, moved) = hooked(None);
        assert_eq!(count, 6);
        assert_eq!(
            moved,
            vec![true, false, true, false, true, false],
            "odd steps had b's gradient removed"
        );
        let (ra, rb, rcount, _) = hooked(Some(3));
        assert_eq!(
            (ra, rb, rcount),
            (a, b, count),
            "resumed with the hook's state"
        );
    }

    #[test]
    fn the_batch_plan_is_the_trainers_order() {
        let device = Device::flex().autodiff();
        let config = TrainConfig {
            steps: 7,
            batch_size: 3,
            grad_accum: 2,
            ..Default::default()
        };
        let plan = batch_plan(&config, 10);
        assert_eq!(plan.len(), 14);
        let seen = std::cell::RefCell::new(Vec::new());
        let mut t = Trainer::new(pair(&device), config);
        while !t.is_done() {
            t.step(&(0..10).collect::<Vec<usize>>(), |m, b: &[usize]| {
                seen.borrow_mut().push(b.to_vec());
                pair_loss(m, &[1.0])
            });
        }
        assert_eq!(seen.into_inner(), plan);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut s = shuffled(50, 9);
        assert_ne!(s, (0..50).collect::<Vec<_>>());
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
