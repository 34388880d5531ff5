//! LoRAHub (Huang et al., 2023): LoRA adapters trained on other tasks, composed for a new task
//! from a few of its examples, without gradients.
//!
//! The composition of adapters `1..n` with weights `w` is the LoRA adapter
//! `A = Σ wᵢ·Aᵢ`, `B = Σ wᵢ·Bᵢ` of every module (the paper's element-wise sum of the adapters'
//! state dicts). The weights minimise the loss on the examples plus the paper's L1 penalty
//! `l1 · mean|wᵢ|` (0.05), each held in `[-bound, bound]` (1.5), starting from `w = 0` (the
//! base model) with a budget of `max_evals` loss evaluations (40), as the paper's code sets
//! them. The paper searches with nevergrad's `NGOpt`, which picks an optimiser by itself; here
//! it is CMA-ES (the `cmaes` crate).
//!
//! Adapters of different scalings (`lora_alpha / r`, rsLoRA) are composed by folding each
//! one's scaling into its B relative to the first adapter's, whose config the composition
//! keeps: with equal scalings this is exactly the paper's sum.

use std::path::Path;

use cmaes::{CMAESOptions, DVector};
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::tuner::Tuner;
use peft_core::{PeftError, Result};
use peft_sites::SiteHost;

use crate::combine::{AdapterToCombine, check_same_modules, lora_key, modules_of};
use crate::config::LoraConfig;

/// The search's settings; the defaults are the paper's.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraHubConfig {
    /// Loss evaluations in all (the paper's `max_inference_step`, 40).
    pub max_evals: usize,
    /// Weight of the L1 penalty `l1 · mean|wᵢ|` (0.05).
    pub l1: f64,
    /// Each weight stays in `[-bound, bound]` (1.5).
    pub bound: f64,
    /// CMA-ES's initial step size around `w = 0` (0.5: a third of the bound).
    pub sigma: f64,
    /// Seed of CMA-ES's samples.
    pub seed: u64,
    /// Evaluate the uniform average (every weight `1/n`) first, so the result is never worse
    /// on the examples than the baseline the paper compares against (one evaluation of the
    /// budget; not in the paper, whose search starts and stays with `w = 0`).
    pub try_uniform: bool,
}

impl Default for LoraHubConfig {
    fn default() -> Self {
        Self {
            max_evals: 40,
            l1: 0.05,
            bound: 1.5,
            sigma: 0.5,
            seed: 0,
            try_uniform: true,
        }
    }
}

impl LoraHubConfig {
    /// The settings are usable: one-line errors name the setting.
    pub fn validate(&self) -> Result<()> {
        if self.max_evals == 0 {
            return Err(PeftError::Config(
                "max_evals 0: the search needs at least one loss evaluation".into(),
            ));
        }
        if !(self.l1 >= 0.0 && self.l1.is_finite()) {
            return Err(PeftError::Config(format!(
                "l1 {}: must be a finite number >= 0",
                self.l1
            )));
        }
        if !(self.bound > 0.0 && self.bound.is_finite()) {
            return Err(PeftError::Config(format!(
                "bound {}: must be a finite number > 0",
                self.bound
            )));
        }
        if !(self.sigma > 0.0 && self.sigma.is_finite()) {
            return Err(PeftError::Config(format!(
                "sigma {}: must be a finite number > 0",
                self.sigma
            )));
        }
        Ok(())
    }

    /// The search's objective: `loss + l1 · mean|wᵢ|`.
    pub fn objective(&self, loss: f64, weights: &[f64]) -> f64 {
        let mean_abs = weights.iter().map(|w| w.abs()).sum::<f64>() / weights.len().max(1) as f64;
        loss + self.l1 * mean_abs
    }
}

/// One module's factors of every adapter, B already scaled relative to the first adapter.
struct ModuleFactors {
    path: String,
    /// `[r, in]` per adapter.
    a: Vec<HostTensor>,
    /// `[out, r]` per adapter, times `sᵢ / s₁`.
    b: Vec<HostTensor>,
}

/// Adapters checked to compose (same modules, shapes and ranks), ready to compose with any
/// weights.
pub struct Composer {
    config: LoraConfig,
    labels: Vec<String>,
    modules: Vec<ModuleFactors>,
}

impl Composer {
    /// Check `adapters` (plain LoRA: no DoRA, `modules_to_save` or trained biases; the same
    /// modules with the same shapes and ranks, on the same base) and keep their factors.
    pub fn new(adapters: &[AdapterToCombine]) -> Result<Self> {
        if adapters.is_empty() {
            return Err(PeftError::Config("no adapters to compose".into()));
        }
        for a in adapters {
            if a.config.init_lora_weights.base_init()?.is_some() {
                return Err(PeftError::Config(format!(
                    "{}: init_lora_weights = {:?} moved part of the base into the adapter; such adapters hold different bases and cannot be composed",
                    a.label, a.config.init_lora_weights
                )));
            }
        }
        let modules: Vec<_> = adapters.iter().map(modules_of).collect::<Result<_>>()?;
        check_same_modules(adapters, &modules)?;
        let mut out = Vec::new();
        for (m, (path, f0)) in modules[0].iter().enumerate() {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for (adapter, theirs) in adapters.iter().zip(&modules) {
                let f = &theirs[m].1;
                if f.rank() != f0.rank() {
                    return Err(PeftError::Config(format!(
                        "`{path}` has rank {} in {} and {} in {}: LoRAHub sums A and B, which needs one rank per module",
                        f0.rank(),
                        adapters[0].label,
                        f.rank(),
                        adapter.label
                    )));
                }
                let rel = (f.scale / f0.scale) as f32;
                let mut scaled = f.b.clone();
                scaled.data.iter_mut().for_each(|x| *x *= rel);
                a.push(f.a.clone());
                b.push(scaled);
            }
            out.push(ModuleFactors {
                path: path.clone(),
                a,
                b,
            });
        }
        Ok(Self {
            config: adapters[0].config.clone(),
            labels: adapters.iter().map(|a| a.label.to_string()).collect(),
            modules: out,
        })
    }

    /// The number of adapters.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no adapters (never: [`Composer::new`] refuses none).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The adapters' labels, in order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The config of every composition: the first adapter's.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The composition `Σ wᵢ·Aᵢ`, `Σ wᵢ·Bᵢ` under PEFT's keys.
    pub fn compose(&self, weights: &[f64]) -> Result<TensorMap> {
        if weights.len() != self.len() {
            return Err(PeftError::Config(format!(
                "{} weights for {} adapters: give one weight per adapter",
                weights.len(),
                self.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(PeftError::Config(format!(
                "weight {w} is not a finite number"
            )));
        }
        let sum = |parts: &[HostTensor]| {
            let mut acc = vec![0f32; parts[0].data.len()];
            for (t, &w) in parts.iter().zip(weights) {
                let w = w as f32;
                for (x, y) in acc.iter_mut().zip(&t.data) {
                    *x += w * y;
                }
            }
            HostTensor::new(parts[0].shape.clone(), acc)
        };
        let mut out = TensorMap::new();
        for m in &self.modules {
            out.insert(lora_key(&m.path, "A"), sum(&m.a));
            out.insert(lora_key(&m.path, "B"), sum(&m.b));
        }
        Ok(out)
    }
}

/// One evaluated point of the search.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The weights, inside the bounds.
    pub weights: Vec<f64>,
    /// The loss on the examples.
    pub loss: f64,
    /// `loss + l1 · mean|wᵢ|`, what the search minimises.
    pub objective: f64,
}

/// What a search found.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// The evaluation of least objective.
    pub best: Evaluation,
    /// Every evaluation, in order.
    pub history: Vec<Evaluation>,
}

/// Stand-in objective for a point that was not evaluated or gave no finite loss: far above any
/// real loss, finite (CMA-ES stops on a NaN).
const REJECTED: f64 = 1e30;

/// Minimise `config.objective(loss(w), w)` over `n` weights with CMA-ES from `w = 0` (after
/// the uniform average with `config.try_uniform`): at most
/// `config.max_evals` calls of `loss`, each with weights inside the bounds (CMA-ES's samples are
/// clamped to them). `on_eval` sees each evaluation and the best so far. An error of `loss`
/// ends the search with that error; a non-finite loss is kept in the history and never chosen.
pub fn search(
    n: usize,
    config: &LoraHubConfig,
    mut loss: impl FnMut(&[f64]) -> Result<f64>,
    mut on_eval: impl FnMut(&Evaluation, &Evaluation),
) -> Result<SearchResult> {
    config.validate()?;
    if n == 0 {
        return Err(PeftError::Config("no adapters to compose".into()));
    }
    let mut history: Vec<Evaluation> = Vec::new();
    let mut best: Option<Evaluation> = None;
    let mut failure: Option<PeftError> = None;
    {
        let mut objective = |x: &[f64]| -> f64 {
            if failure.is_some() || history.len() >= config.max_evals {
                return REJECTED;
            }
            let w: Vec<f64> = x
                .iter()
                .map(|v| v.clamp(-config.bound, config.bound))
                .collect();
            let l = match loss(&w) {
                Ok(l) => l,
                Err(e) => {
                    failure = Some(e);
                    return REJECTED;
                }
            };
            let objective = if l.is_finite() {
                config.objective(l, &w)
            } else {
                REJECTED
            };
            let e = Evaluation {
                weights: w,
                loss: l,
                objective,
            };
            if l.is_finite() && best.as_ref().is_none_or(|b| objective < b.objective) {
                best = Some(e.clone());
            }
            on_eval(&e, best.as_ref().unwrap_or(&e));
            history.push(e);
            objective
        };
        if config.try_uniform {
            objective(&vec![1.0 / n as f64; n]);
        }
        let left = config
            .max_evals
            .saturating_sub(usize::from(config.try_uniform));
        if left > 0 {
            let mut cmaes = CMAESOptions::new(vec![0.0; n], config.sigma)
                .max_function_evals(left)
                .seed(config.seed)
                .build(|x: &DVector<f64>| objective(x.as_slice()))
                .map_err(|e| PeftError::Config(format!("CMA-ES: {e:?}")))?;
            let _ = cmaes.run();
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let best = best.ok_or_else(|| {
        PeftError::Other(format!(
            "no composition gave a finite loss in {} evaluations",
            history.len()
        ))
    })?;
    Ok(SearchResult { best, history })
}

/// Where [`Tuner::load_state`] errors point: the composition is no file.
const COMPOSED: &str = "<LoRAHub composition>";

/// Load the composition with `weights` into adapter `name` of `model` (added by
/// [`Composer::config`]'s `apply`).
pub fn load_composition<M: SiteHost>(
    model: M,
    composer: &Composer,
    name: &str,
    weights: &[f64],
) -> Result<M> {
    let tensors = composer.compose(weights)?;
    composer
        .config()
        .load_state(model, name, tensors, Path::new(COMPOSED))
}

/// LoRAHub on `model`: add adapter `name` in the composer's config and search its weights,
/// `loss` measuring the model on the few examples. Returns the model with the best
/// composition loaded and the search.
pub fn lorahub<M: SiteHost>(
    model: M,
    composer: &Composer,
    name: &str,
    config: &LoraHubConfig,
    mut loss: impl FnMut(&M) -> f64,
    on_eval: impl FnMut(&Evaluation, &Evaluation),
) -> Result<(M, SearchResult)> {
    config.validate()?;
    let mut holder = Some(composer.config().apply(model, name)?);
    let result = search(
        composer.len(),
        config,
        |w| {
            let m = load_composition(holder.take().expect("model"), composer, name, w)?;
            let l = loss(&m);
            holder = Some(m);
            Ok(l)
        },
        on_eval,
    )?;
    let model = load_composition(
        holder.take().expect("model"),
        composer,
        name,
        &result.best.weights,
    )?;
    Ok((model, result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quadratic(target: &[f64]) -> impl FnMut(&[f64]) -> Result<f64> + '_ {
        move |w| {
            Ok(w.iter()
                .zip(target)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>())
        }
    }

    #[test]
    fn search_finds_the_minimum_within_budget_and_bounds() {
        let target = [0.8, -0.4, 0.3];
        let config = LoraHubConfig {
            max_evals: 400,
            l1: 0.0,
            ..Default::default()
        };
        let r = search(3, &config, quadratic(&target), |_, _| {}).unwrap();
        assert!(r.history.len() <= 400);
        for (w, t) in r.best.weights.iter().zip(target) {
            assert!((w - t).abs() < 0.05, "{:?}", r.best.weights);
        }
        // Same seed, same search.
        let again = search(3, &config, quadratic(&target), |_, _| {}).unwrap();
        assert_eq!(again.best, r.best);
    }

    #[test]
    fn weights_stay_in_bounds_and_the_budget_is_kept_exactly() {
        // The minimum lies outside the bounds: the search ends on the bound.
        let target = [3.0, -3.0];
        let config = LoraHubConfig {
            max_evals: 37,
            l1: 0.0,
            ..Default::default()
        };
        let mut calls = 0;
        let r = search(
            2,
            &config,
            |w| {
                calls += 1;
                assert!(w.iter().all(|x| x.abs() <= 1.5), "{w:?}");
                quadratic(&target)(w)
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!(calls, 37);
        assert_eq!(r.history.len(), 37);
        assert!(
            r.best.weights[0] > 1.2 && r.best.weights[1] < -1.2,
            "{:?}",
            r.best.weights
        );
    }

    #[test]
    fn the_uniform_average_is_tried_first_unless_asked_not_to() {
        // A loss whose only good region is around the uniform point (0.25 each).
        let loss = |w: &[f64]| {
            Ok(if w.iter().all(|x| (x - 0.25).abs() < 1e-9) {
                0.0
            } else {
                1.0
            })
        };
        let config = LoraHubConfig {
            max_evals: 10,
            ..Default::default()
        };
        let r = search(4, &config, loss, |_, _| {}).unwrap();
        assert_eq!(r.history[0].weights, vec![0.25; 4]);
        assert_eq!(r.best.weights, vec![0.25; 4]);
        assert_eq!(r.history.len(), 10);
        let paper = LoraHubConfig {
            try_uniform: false,
            ..config
        };
        let r = search(4, &paper, loss, |_, _| {}).unwrap();
        assert_ne!(r.best.weights, vec![0.25; 4]);
        assert_eq!(r.history.len(), 10);
    }

    #[test]
    fn the_l1_penalty_pulls_useless_weights_to_zero() {
        // The loss ignores the second weight: only the penalty decides it.
        let config = LoraHubConfig {
            max_evals: 300,
            l1: 1.0,
            ..Default::default()
        };
        let r = search(2, &config, |w| Ok((w[0] - 1.0).powi(2)), |_, _| {}).unwrap();
        assert!(r.best.weights[1].abs() < 0.1, "{:?}", r.best.weights);
        let o = config.objective(r.best.loss, &r.best.weights);
        assert_eq!(o, r.best.objective);
    }

    #[test]
    fn non_finite_losses_are_never_chosen_and_errors_end_the_search() {
        let config = LoraHubConfig::default();
        let r = search(
            2,
            &config,
            |w| Ok(if w[0] > 0.0 { f64::NAN } else { -w[0] }),
            |_, _| {},
        )
        .unwrap();
        assert!(r.best.loss.is_finite() && r.best.weights[0] <= 0.0);
        assert!(r.history.iter().any(|e| e.loss.is_nan()));

        let mut calls = 0;
        let e = search(
            2,
            &config,
            |_| {
                calls += 1;
                Err(PeftError::Other("boom".into()))
            },
            |_, _| {},
        )
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(e.to_string().contains("boom"));
        for bad in [
            LoraHubConfig {
                max_evals: 0,
                ..Default::default()
            },
            LoraHubConfig {
                l1: -1.0,
                ..Default::default()
            },
            LoraHubConfig {
                bound: 0.0,
                ..Default::default()
            },
            LoraHubConfig {
                sigma: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(search(2, &bad, |_| Ok(0.0), |_, _| {}).is_err());
        }
    }
}
