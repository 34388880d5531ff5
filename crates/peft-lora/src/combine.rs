//! Weighted combination of LoRA adapters: Hugging Face PEFT's `add_weighted_adapter`, on
//! adapter files (no base model needed; it only takes part through the adapters' shapes).
//!
//! - `cat`: the adapters side by side, rank `Σ rᵢ`; exact: `ΔW = Σ wᵢ ΔWᵢ`.
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the
//!   scaled updates `ΔWᵢ = sᵢ·Bᵢ·Aᵢ` combined, then cut back to rank `svd_rank` (default: the
//!   largest rank) by a singular value decomposition (`B = U·S`, `A = Vᴴ`).
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the operation applied
//!   to the A's and to the B's separately, with weights `√|wᵢsᵢ|·sign(wᵢsᵢ)` on A and
//!   `√|wᵢsᵢ|` on B (PEFT's approximation: `ΣAᵢ·ΣBᵢ` is not `ΣBᵢAᵢ`); all ranks equal.
//!
//! TIES and DARE as PEFT's `merge_utils`: magnitude pruning keeps the `⌊density·n⌋` largest
//! entries, DARE keeps each entry with probability `density` and divides by it, TIES elects a
//! sign per entry (over the unweighted pruned tensors: their sum, `total`, or the sum of their
//! signs, `frequency`) and averages the weighted entries that agree with it.
//!
//! The new adapter's config is the first adapter's with `r = lora_alpha =` the new rank (so
//! its scale is 1; with rsLoRA, √r, as PEFT's copy gives), the targets' union, and no
//! `rank_pattern`/`alpha_pattern`.

use std::collections::BTreeSet;
use std::str::FromStr;

use peft_core::adapter_io::KEY_PREFIX;
use peft_core::target::ModuleSelector;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};
use rand::{Rng, SeedableRng};

use crate::config::LoraConfig;

/// How adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Svd,
    Linear,
    Cat,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

/// Every combination, with its PEFT name.
pub const COMBINATIONS: [(&str, Combination); 11] = [
    ("svd", Combination::Svd),
    ("linear", Combination::Linear),
    ("cat", Combination::Cat),
    ("ties", Combination::Ties),
    ("ties_svd", Combination::TiesSvd),
    ("dare_linear", Combination::DareLinear),
    ("dare_ties", Combination::DareTies),
    ("dare_linear_svd", Combination::DareLinearSvd),
    ("dare_ties_svd", Combination::DareTiesSvd),
    ("magnitude_prune", Combination::MagnitudePrune),
    ("magnitude_prune_svd", Combination::MagnitudePruneSvd),
];

impl FromStr for Combination {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        COMBINATIONS
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = COMBINATIONS.iter().map(|(n, _)| *n).collect();
                PeftError::Config(format!(
                    "combination type `{s}` is not known (one of: {})",
                    names.join(", ")
                ))
            })
    }
}

impl Combination {
    pub fn name(self) -> &'static str {
        COMBINATIONS
            .iter()
            .find(|(_, c)| *c == self)
            .map(|(n, _)| *n)
            .expect("listed")
    }

    /// Combined as full updates and cut back to a rank by an SVD.
    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    /// The pruning and merging step applied to each list of tensors.
    fn merge(self) -> Merge {
        use Combination::*;
        match self {
            Svd | Linear | Cat => Merge::Sum,
            Ties | TiesSvd => Merge::Ties,
            DareLinear | DareLinearSvd => Merge::DareSum,
            DareTies | DareTiesSvd => Merge::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Merge::PrunedSum,
        }
    }
}

/// PEFT's `merge_utils` operations.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Merge {
    Sum,
    PrunedSum,
    Ties,
    DareSum,
    DareTies,
}

impl Merge {
    fn needs_density(self) -> bool {
        self != Merge::Sum
    }
}

/// How TIES elects the sign of each entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned, unweighted) entries.
    #[default]
    Total,
    /// The sign of the sum of their signs.
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            other => Err(PeftError::Config(format!(
                "majority sign method `{other}` is not known (total or frequency)"
            ))),
        }
    }
}

/// The options of a combination.
#[derive(Debug, Clone)]
pub struct CombineSpec {
    pub combination: Combination,
    /// One weight per adapter (negative subtracts).
    pub weights: Vec<f64>,
    /// Fraction of entries kept by the pruning types.
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
    /// The rank of the `*_svd` types (default: the largest of the adapters').
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors to this quantile of their entries (`svd_clamp`).
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

impl CombineSpec {
    pub fn new(combination: Combination, weights: Vec<f64>) -> Self {
        Self {
            combination,
            weights,
            density: None,
            majority_sign: MajoritySign::Total,
            svd_rank: None,
            svd_clamp: None,
            seed: 0,
        }
    }
}

/// An adapter to combine: a label for messages (its folder), its config and tensors.
pub struct AdapterToCombine<'a> {
    pub label: &'a str,
    pub config: &'a LoraConfig,
    pub tensors: &'a TensorMap,
}

/// One adapter's factors of one module, in Hugging Face layout.
pub(crate) struct Factors {
    /// `[r, in]`.
    pub(crate) a: HostTensor,
    /// `[out, r]`.
    pub(crate) b: HostTensor,
    pub(crate) scale: f64,
}

impl Factors {
    pub(crate) fn rank(&self) -> usize {
        self.a.shape[0]
    }

    /// `s·B·A`, `[out, in]`, in f32 as PEFT's `get_delta_weight`.
    fn delta(&self) -> Vec<f32> {
        let (out, r, d_in) = (self.b.shape[0], self.rank(), self.a.shape[1]);
        let mut d = vec![0f32; out * d_in];
        for o in 0..out {
            for k in 0..r {
                let b = self.b.data[o * r + k];
                let row = &self.a.data[k * d_in..(k + 1) * d_in];
                for (x, a) in d[o * d_in..(o + 1) * d_in].iter_mut().zip(row) {
                    *x += b * a;
                }
            }
        }
        let s = self.scale as f32;
        d.iter_mut().for_each(|x| *x *= s);
        d
    }
}

pub(crate) fn lora_key(path: &str, which: &str) -> String {
    format!("{KEY_PREFIX}{path}.lora_{which}.weight")
}

/// Module paths in model order: numbers compare as numbers (`layers.2` before `layers.10`).
fn natural_order(paths: &mut [String]) {
    fn parts(s: &str) -> Vec<(u64, String)> {
        s.split('.')
            .map(|p| match p.parse::<u64>() {
                Ok(n) => (n, String::new()),
                Err(_) => (u64::MAX, p.to_string()),
            })
            .collect()
    }
    paths.sort_by_key(|p| parts(p));
}

/// The adapter's LoRA modules (paths) and their factors, checked.
pub(crate) fn modules_of(adapter: &AdapterToCombine) -> Result<Vec<(String, Factors)>> {
    let label = adapter.label;
    let c = adapter.config;
    if c.use_dora {
        return Err(PeftError::Config(format!(
            "{label}: a DoRA adapter; its magnitudes cannot be combined (PEFT re-initialises them from the base model). Combine plain LoRA adapters"
        )));
    }
    if !c.saved_modules().is_empty() {
        return Err(PeftError::Config(format!(
            "{label}: modules_to_save {:?} are whole trained modules, which a weighted combination cannot combine",
            c.saved_modules()
        )));
    }
    if c.bias != "none" {
        return Err(PeftError::Config(format!(
            "{label}: bias = \"{}\" trains the base's biases, which a weighted combination cannot combine",
            c.bias
        )));
    }
    let mut paths: Vec<String> = adapter
        .tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix(KEY_PREFIX)?
                .strip_suffix(".lora_A.weight")
                .map(str::to_string)
        })
        .collect();
    natural_order(&mut paths);
    let mut out = Vec::new();
    for path in paths {
        let get = |which: &str| {
            let key = lora_key(&path, which);
            adapter
                .tensors
                .get(&key)
                .cloned()
                .ok_or_else(|| PeftError::Config(format!("{label}: `{key}` is missing")))
        };
        let (a, b) = (get("A")?, get("B")?);
        if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
            return Err(PeftError::Config(format!(
                "{label}: `{path}` has lora_A {:?} and lora_B {:?}, which do not make a LoRA pair",
                a.shape, b.shape
            )));
        }
        let (_, alpha) = c.rank_alpha(&path)?;
        let r = a.shape[0] as f64;
        let scale = if c.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        out.push((path, Factors { a, b, scale }));
    }
    if out.is_empty() {
        return Err(PeftError::Config(format!(
            "{label}: no LoRA weights (keys `...lora_A.weight`)"
        )));
    }
    Ok(out)
}

/// The last component of a base model's name or path, to tell different bases apart.
fn base_name(c: &LoraConfig) -> Option<String> {
    let p = c
        .base_model_name_or_path
        .as_deref()?
        .trim_end_matches(['/', '\\']);
    let name = p.rsplit(['/', '\\']).next().unwrap_or(p);
    (!name.is_empty()).then(|| name.to_string())
}

/// The union of the adapters' `target_modules`, as PEFT forms it.
fn target_union(adapters: &[AdapterToCombine]) -> Result<Option<ModuleSelector>> {
    let selectors: Vec<&ModuleSelector> = adapters
        .iter()
        .filter_map(|a| a.config.target_modules.as_ref())
        .collect();
    if selectors.is_empty() {
        return Ok(None);
    }
    if selectors
        .iter()
        .all(|s| matches!(s, ModuleSelector::List(_)))
    {
        let mut names: Vec<String> = Vec::new();
        for s in selectors {
            if let ModuleSelector::List(l) = s {
                for n in l {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
        return Ok(Some(ModuleSelector::List(names)));
    }
    if selectors
        .iter()
        .all(|s| matches!(s, ModuleSelector::Pattern(_)))
    {
        let joined = selectors
            .iter()
            .map(|s| match s {
                ModuleSelector::Pattern(p) => format!("({p})"),
                ModuleSelector::List(_) => unreachable!(),
            })
            .collect::<Vec<_>>()
            .join("|");
        return Ok(Some(ModuleSelector::Pattern(joined)));
    }
    Err(PeftError::Config(
        "the adapters' target_modules mix lists and regular expressions, which PEFT cannot combine either".into(),
    ))
}

/// The adapters adapt the same modules with the same shapes, on the same base (by name where
/// their configs name it); errors name both adapters and the module.
pub(crate) fn check_same_modules(
    adapters: &[AdapterToCombine],
    modules: &[Vec<(String, Factors)>],
) -> Result<()> {
    let first = adapters[0].label;
    let paths: Vec<&String> = modules[0].iter().map(|(p, _)| p).collect();
    for (adapter, theirs) in adapters.iter().zip(modules).skip(1) {
        if let (Some(x), Some(y)) = (base_name(adapters[0].config), base_name(adapter.config))
            && x != y
        {
            return Err(PeftError::Config(format!(
                "{first} was trained on `{x}` and {} on `{y}`: adapters of different base models cannot be combined",
                adapter.label
            )));
        }
        let mine: BTreeSet<&String> = paths.iter().copied().collect();
        let other: BTreeSet<&String> = theirs.iter().map(|(p, _)| p).collect();
        if let Some(p) = mine.difference(&other).next() {
            return Err(PeftError::Config(format!(
                "{first} adapts `{p}` and {} does not: combine adapters of the same target modules",
                adapter.label
            )));
        }
        if let Some(p) = other.difference(&mine).next() {
            return Err(PeftError::Config(format!(
                "{} adapts `{p}` and {first} does not: combine adapters of the same target modules",
                adapter.label
            )));
        }
        for ((p, f0), (_, f)) in modules[0].iter().zip(theirs) {
            if f0.a.shape[1] != f.a.shape[1] || f0.b.shape[0] != f.b.shape[0] {
                return Err(PeftError::Config(format!(
                    "`{p}` is {}x{} in {first} and {}x{} in {}: adapters of different base models cannot be combined",
                    f0.b.shape[0], f0.a.shape[1], f.b.shape[0], f.a.shape[1], adapter.label
                )));
            }
        }
    }
    Ok(())
}

/// Where DARE's keep-masks come from: a seeded generator, or given masks (to follow a
/// reference run exactly). Called in PEFT's order: modules in model order; per module, for the
/// SVD types one mask per adapter's update, for the others one per adapter's A, then one per
/// adapter's B.
pub trait MaskSource {
    /// A keep-mask of `len` entries, each kept with probability `density`.
    fn mask(&mut self, len: usize, density: f64) -> Result<Vec<bool>>;
}

/// Bernoulli masks from a seeded generator.
pub struct SeededMasks(rand::rngs::StdRng);

impl SeededMasks {
    pub fn new(seed: u64) -> Self {
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
}

impl MaskSource for SeededMasks {
    fn mask(&mut self, len: usize, density: f64) -> Result<Vec<bool>> {
        Ok((0..len).map(|_| self.0.random_bool(density)).collect())
    }
}

/// Keep the `⌊density·n⌋` entries of largest magnitude (PEFT's `magnitude_based_pruning`).
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// Keep each entry with probability `density` and divide by it (PEFT's DARE pruning).
fn dare_prune(t: &[f32], density: f64, masks: &mut dyn MaskSource) -> Result<Vec<f32>> {
    if density >= 1.0 {
        return Ok(t.to_vec());
    }
    let keep = masks.mask(t.len(), density)?;
    if keep.len() != t.len() {
        return Err(PeftError::Other(format!(
            "a DARE mask of {} entries for a tensor of {}",
            keep.len(),
            t.len()
        )));
    }
    let d = density as f32;
    Ok(t.iter()
        .zip(keep)
        .map(|(&x, k)| if k { x / d } else { 0.0 })
        .collect())
}

fn sign(x: f32) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// Merge equally shaped tensors with `weights` by `merge` (PEFT's `task_arithmetic`,
/// `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`).
fn merge_tensors(
    merge: Merge,
    tensors: &[Vec<f32>],
    weights: &[f64],
    density: f64,
    majority: MajoritySign,
    masks: &mut dyn MaskSource,
) -> Result<Vec<f32>> {
    let pruned: Vec<Vec<f32>> = match merge {
        Merge::Sum => tensors.to_vec(),
        Merge::PrunedSum | Merge::Ties => tensors
            .iter()
            .map(|t| magnitude_prune(t, density))
            .collect(),
        Merge::DareSum | Merge::DareTies => tensors
            .iter()
            .map(|t| dare_prune(t, density, masks))
            .collect::<Result<_>>()?,
    };
    let n = pruned[0].len();
    let ties = matches!(merge, Merge::Ties | Merge::DareTies);
    let mut out = vec![0f32; n];
    for (j, o) in out.iter_mut().enumerate() {
        if !ties {
            *o = pruned
                .iter()
                .zip(weights)
                .map(|(t, &w)| t[j] * w as f32)
                .sum();
            continue;
        }
        let elected: f32 = match majority {
            MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
            MajoritySign::Frequency => pruned.iter().map(|t| sign(t[j]) as f32).sum(),
        };
        let elected = if elected >= 0.0 { 1 } else { -1 };
        let (mut sum, mut count) = (0f32, 0f32);
        for (t, &w) in pruned.iter().zip(weights) {
            if sign(t[j]) == elected {
                sum += t[j] * w as f32;
                count += 1.0;
            }
        }
        *o = sum / count.max(1.0);
    }
    Ok(out)
}

/// `q`-quantile of `values` with linear interpolation (torch's default).
fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// Rank-`rank` factors of `[out, in]` `delta`: `B = U·S` `[out, rank]`, `A = Vᴴ` `[rank, in]`,
/// optionally clamped to the `clamp`-quantile of their entries.
fn svd_factors(
    delta: &[f32],
    out: usize,
    d_in: usize,
    rank: usize,
    clamp: Option<f64>,
) -> Result<(HostTensor, HostTensor)> {
    let lr = crate::linalg::svd(delta, out, d_in, rank)?;
    let mut b = vec![0f32; out * rank];
    for i in 0..out {
        for k in 0..lr.k {
            b[i * rank + k] = (lr.u[i * lr.k + k] * lr.s[k]) as f32;
        }
    }
    let mut a: Vec<f32> = lr.vt.iter().map(|&x| x as f32).collect();
    a.resize(rank * d_in, 0.0);
    if let Some(q) = clamp {
        let all: Vec<f32> = b.iter().chain(&a).copied().collect();
        let hi = quantile(&all, q);
        for x in b.iter_mut().chain(a.iter_mut()) {
            *x = x.clamp(-hi, hi);
        }
    }
    Ok((
        HostTensor::new(vec![rank, d_in], a),
        HostTensor::new(vec![out, rank], b),
    ))
}

/// Combine `adapters` as `spec` says; the new adapter's config and tensors. DARE's masks come
/// from `masks` (use [`SeededMasks`] with `spec.seed`).
pub fn combine_with_masks(
    adapters: &[AdapterToCombine],
    spec: &CombineSpec,
    masks: &mut dyn MaskSource,
) -> Result<(LoraConfig, TensorMap)> {
    if adapters.is_empty() {
        return Err(PeftError::Config("no adapters to combine".into()));
    }
    if spec.weights.len() != adapters.len() {
        return Err(PeftError::Config(format!(
            "{} weights for {} adapters: give one weight per adapter",
            spec.weights.len(),
            adapters.len()
        )));
    }
    if let Some(w) = spec.weights.iter().find(|w| !w.is_finite()) {
        return Err(PeftError::Config(format!(
            "weight {w} is not a finite number"
        )));
    }
    // One adapter: only a linear combination makes sense (PEFT switches to it too).
    let combination = if adapters.len() == 1 {
        Combination::Linear
    } else {
        spec.combination
    };
    let merge = combination.merge();
    let density = match (merge.needs_density(), spec.density) {
        (true, None) => {
            return Err(PeftError::Config(format!(
                "combination `{}` prunes: give a density (the fraction of entries kept, in [0, 1])",
                combination.name()
            )));
        }
        (_, Some(d)) if !(0.0..=1.0).contains(&d) || d.is_nan() => {
            return Err(PeftError::Config(format!("density {d} is not in [0, 1]")));
        }
        (_, d) => d.unwrap_or(1.0),
    };
    if let Some(q) = spec.svd_clamp
        && !(q > 0.0 && q <= 1.0)
    {
        return Err(PeftError::Config(format!("svd_clamp {q} is not in (0, 1]")));
    }
    let modules: Vec<Vec<(String, Factors)>> =
        adapters.iter().map(modules_of).collect::<Result<_>>()?;

    check_same_modules(adapters, &modules)?;

    // The new rank, as PEFT's `_check_add_weighted_adapter` sets it (per adapter: r, or the
    // largest rank of its rank_pattern).
    let ranks: Vec<usize> = adapters
        .iter()
        .map(|a| {
            let c = a.config;
            c.rank_pattern.values().copied().fold(c.r, usize::max)
        })
        .collect();
    let new_rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        c if c.is_svd() => spec
            .svd_rank
            .unwrap_or(*ranks.iter().max().expect("adapters")),
        _ => {
            if ranks.iter().any(|r| *r != ranks[0]) {
                return Err(PeftError::Config(format!(
                    "combination `{}` needs adapters of one rank; these have r = {ranks:?} (use cat or an *_svd type)",
                    combination.name()
                )));
            }
            ranks[0]
        }
    };
    if new_rank == 0 {
        return Err(PeftError::Config("svd_rank must be positive".into()));
    }

    let mut out = TensorMap::new();
    for (m, (path, f0)) in modules[0].iter().enumerate() {
        let factors: Vec<&Factors> = modules.iter().map(|ms| &ms[m].1).collect();
        let (d_out, d_in) = (f0.b.shape[0], f0.a.shape[1]);
        let (a, b) = match combination {
            Combination::Cat => {
                let mut a = vec![0f32; new_rank * d_in];
                let mut b = vec![0f32; d_out * new_rank];
                let mut at = 0;
                for (f, &w) in factors.iter().zip(&spec.weights) {
                    let r = f.rank();
                    let ws = (w * f.scale) as f32;
                    for (x, y) in a[at * d_in..(at + r) * d_in].iter_mut().zip(&f.a.data) {
                        *x = y * ws;
                    }
                    for o in 0..d_out {
                        b[o * new_rank + at..o * new_rank + at + r]
                            .copy_from_slice(&f.b.data[o * r..(o + 1) * r]);
                    }
                    at += r;
                }
                (
                    HostTensor::new(vec![new_rank, d_in], a),
                    HostTensor::new(vec![d_out, new_rank], b),
                )
            }
            c if c.is_svd() => {
                if new_rank > d_out.min(d_in) {
                    return Err(PeftError::Config(format!(
                        "svd_rank {new_rank} is above the rank `{path}` ({d_out}x{d_in}) can have"
                    )));
                }
                let deltas: Vec<Vec<f32>> = factors.iter().map(|f| f.delta()).collect();
                let delta = merge_tensors(
                    merge,
                    &deltas,
                    &spec.weights,
                    density,
                    spec.majority_sign,
                    masks,
                )?;
                svd_factors(&delta, d_out, d_in, new_rank, spec.svd_clamp)?
            }
            _ => {
                if factors.iter().any(|f| f.rank() != f0.rank()) {
                    return Err(PeftError::Config(format!(
                        "`{path}` has different ranks in the adapters; combination `{}` needs one rank",
                        combination.name()
                    )));
                }
                let ws: Vec<f64> = factors
                    .iter()
                    .zip(&spec.weights)
                    .map(|(f, w)| w * f.scale)
                    .collect();
                let wa: Vec<f64> = ws.iter().map(|w| w.abs().sqrt() * w.signum()).collect();
                let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
                let as_: Vec<Vec<f32>> = factors.iter().map(|f| f.a.data.clone()).collect();
                let bs: Vec<Vec<f32>> = factors.iter().map(|f| f.b.data.clone()).collect();
                let a = merge_tensors(merge, &as_, &wa, density, spec.majority_sign, masks)?;
                let b = merge_tensors(merge, &bs, &wb, density, spec.majority_sign, masks)?;
                (
                    HostTensor::new(f0.a.shape.clone(), a),
                    HostTensor::new(f0.b.shape.clone(), b),
                )
            }
        };
        out.insert(lora_key(path, "A"), a);
        out.insert(lora_key(path, "B"), b);
    }

    let mut config = adapters[0].config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.target_modules = target_union(adapters)?;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    Ok((config, out))
}

/// Combine `adapters` as `spec` says, DARE's masks drawn from `spec.seed`.
pub fn combine(
    adapters: &[AdapterToCombine],
    spec: &CombineSpec,
) -> Result<(LoraConfig, TensorMap)> {
    combine_with_masks(adapters, spec, &mut SeededMasks::new(spec.seed))
}
