//! PiSSA and OLoRA adapters converted to plain LoRA adapters of the unchanged base (Hugging
//! Face PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`).
//!
//! Both initialisations move `s·B₀·A₀` out of the base (`W_res = W − s·B₀·A₀`), so their saved
//! factors only mean something on the residual. After training, `W_res + s·B·A = W + s·(B·A −
//! B₀·A₀)`, and `B·A − B₀·A₀ = [B | −B₀]·[A ; A₀]`: a LoRA adapter of rank 2r on the original
//! weight. Its scaling must stay `s`, so `lora_alpha` doubles with `r` (rsLoRA: it grows by √2).

use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};

use crate::config::{InitLoraWeights, LoraConfig};
use crate::layer::BaseInit;

/// The plain LoRA adapter (config and tensors) equal to a trained PiSSA or OLoRA adapter:
/// `trained` and `initial` are the adapter's tensors ([`peft_core::tuner::Tuner::state`]) after
/// training and right after initialisation. Keys other than `lora_A`/`lora_B` (a classifier in
/// `modules_to_save`, trained biases) are kept as trained; PEFT's conversion drops them.
///
/// Refused, as in PEFT or because the result would not be the trained model: an initialisation
/// that leaves the base alone (nothing to convert) or quantizes it (LoftQ), DoRA, rsLoRA with
/// `rank_pattern`/`alpha_pattern`, and initial factors missing or of other shapes.
pub fn to_plain_lora(
    config: &LoraConfig,
    trained: &TensorMap,
    initial: &TensorMap,
) -> Result<(LoraConfig, TensorMap)> {
    check_convertible(config)?;
    let mut tensors = TensorMap::new();
    let mut factors = 0;
    for (key, t) in &trained.tensors {
        let factor = if key.ends_with(".lora_A.weight") {
            Factor::A
        } else if key.ends_with(".lora_B.weight") {
            Factor::B
        } else {
            tensors.insert(key.clone(), t.clone());
            continue;
        };
        let t0 = initial.get(key).ok_or_else(|| {
            PeftError::Config(format!(
                "`{key}`: not among the initial adapter's tensors ({} of them)",
                initial.len()
            ))
        })?;
        tensors.insert(key.clone(), factor.join(key, t, t0)?);
        factors += 1;
    }
    if factors == 0 {
        return Err(PeftError::Config(
            "the adapter holds no lora_A / lora_B tensors to convert".into(),
        ));
    }

    let mut converted = config.clone();
    converted.init_lora_weights = InitLoraWeights::Flag(true);
    converted.r *= 2;
    converted.lora_alpha *= if config.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    converted.rank_pattern.values_mut().for_each(|r| *r *= 2);
    converted.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
    Ok((converted, tensors))
}

/// Whether adapters of `config` can be converted by [`to_plain_lora`] (checked before training,
/// so a run that cannot be converted does not start).
pub fn check_convertible(config: &LoraConfig) -> Result<()> {
    match config.base_init()? {
        Some(BaseInit::Pissa { .. } | BaseInit::Olora) => {}
        Some(BaseInit::Loftq { .. }) => {
            return Err(PeftError::Config(
                "init_lora_weights = \"loftq\": LoftQ replaces the base with its 4-bit values, not with W − s·B·A, so the adapter has no plain-LoRA form on the original base".into(),
            ));
        }
        None => {
            return Err(PeftError::Config(format!(
                "init_lora_weights = {}: only PiSSA and OLoRA adapters change the base; this one already applies to the original weights",
                serde_json::to_string(&config.init_lora_weights).expect("serialises")
            )));
        }
    }
    if config.use_dora {
        return Err(PeftError::Config(
            "use_dora: a DoRA adapter's update is not B·A, so it has no plain-LoRA form".into(),
        ));
    }
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::Config(
            "use_rslora with rank_pattern or alpha_pattern cannot be converted (PEFT refuses it too)"
                .into(),
        ));
    }

    Ok(())
}

enum Factor {
    /// `lora_A` `[r, in]`: the initial rows go below.
    A,
    /// `lora_B` `[out, r]`: the negated initial columns go right.
    B,
}

impl Factor {
    fn join(&self, key: &str, t: &HostTensor, t0: &HostTensor) -> Result<HostTensor> {
        let (&[rows, cols], &[rows0, cols0]) = (t.shape.as_slice(), t0.shape.as_slice()) else {
            return Err(PeftError::Config(format!(
                "`{key}`: shapes {:?} (trained) and {:?} (initial) are not matrices",
                t.shape, t0.shape
            )));
        };
        match self {
            Factor::A if cols == cols0 && rows == rows0 => {
                let data = t.data.iter().chain(&t0.data).copied().collect();
                Ok(HostTensor::new(vec![2 * rows, cols], data))
            }
            Factor::B if rows == rows0 && cols == cols0 => {
                let mut data = Vec::with_capacity(2 * t.numel());
                for (row, row0) in t.data.chunks(cols).zip(t0.data.chunks(cols)) {
                    data.extend_from_slice(row);
                    data.extend(row0.iter().map(|x| -x));
                }
                Ok(HostTensor::new(vec![rows, 2 * cols], data))
            }
            _ => Err(PeftError::Config(format!(
                "`{key}`: trained shape {:?} but initial shape {:?}",
                t.shape, t0.shape
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(init: &str) -> LoraConfig {
        LoraConfig {
            init_lora_weights: InitLoraWeights::Method(init.into()),
            ..LoraConfig::new(2, 8.0, &["q"])
        }
    }

    fn adapter(a: [f32; 6], b: [f32; 4]) -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "base_model.model.q.lora_A.weight",
            HostTensor::new(vec![2, 3], a.to_vec()),
        );
        m.insert(
            "base_model.model.q.lora_B.weight",
            HostTensor::new(vec![2, 2], b.to_vec()),
        );
        m
    }

    #[test]
    fn factors_are_stacked_and_the_scaling_kept() {
        let trained = adapter([1., 2., 3., 4., 5., 6.], [1., 2., 3., 4.]);
        let initial = adapter([7., 8., 9., 10., 11., 12.], [5., 6., 7., 8.]);
        let (c, t) = to_plain_lora(&config("pissa"), &trained, &initial).unwrap();
        let a = t.get("base_model.model.q.lora_A.weight").unwrap();
        assert_eq!(a.shape, [4, 3]);
        assert_eq!(a.data, [1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.]);
        let b = t.get("base_model.model.q.lora_B.weight").unwrap();
        assert_eq!(b.shape, [2, 4]);
        assert_eq!(b.data, [1., 2., -5., -6., 3., 4., -7., -8.]);
        assert_eq!((c.r, c.lora_alpha), (4, 16.0));
        assert_eq!(c.init_lora_weights, InitLoraWeights::Flag(true));

        let rs = LoraConfig {
            use_rslora: true,
            ..config("olora")
        };
        let (c, _) = to_plain_lora(&rs, &trained, &initial).unwrap();
        // alpha / sqrt(r) is unchanged.
        assert!((c.lora_alpha / 4f64.sqrt() - 8.0 / 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn patterns_double_and_other_tensors_stay() {
        let mut c = config("pissa_niter_4");
        c.rank_pattern.insert("q".into(), 2);
        c.alpha_pattern.insert("q".into(), 3.0);
        let mut trained = adapter([0.; 6], [0.; 4]);
        trained.insert(
            "base_model.model.classifier.weight",
            HostTensor::new(vec![1], vec![5.]),
        );
        let (out, t) = to_plain_lora(&c, &trained, &adapter([0.; 6], [0.; 4])).unwrap();
        assert_eq!(out.rank_pattern["q"], 4);
        assert_eq!(out.alpha_pattern["q"], 6.0);
        assert_eq!(
            t.get("base_model.model.classifier.weight").unwrap().data,
            [5.]
        );
    }

    #[test]
    fn bad_input_is_refused_naming_it() {
        let t = adapter([0.; 6], [0.; 4]);
        let err = |c: &LoraConfig, i: &TensorMap| to_plain_lora(c, &t, i).unwrap_err().to_string();
        assert!(err(&LoraConfig::new(2, 8.0, &["q"]), &t).contains("init_lora_weights = true"));
        assert!(err(&config("loftq"), &t).contains("loftq"));
        let dora = LoraConfig {
            use_dora: true,
            ..config("pissa")
        };
        assert!(err(&dora, &t).contains("use_dora"));
        let mut rs = LoraConfig {
            use_rslora: true,
            ..config("pissa")
        };
        rs.rank_pattern.insert("q".into(), 4);
        assert!(err(&rs, &t).contains("rank_pattern"));
        assert!(err(&config("pissa"), &TensorMap::new()).contains("lora_A.weight"));
        let mut other = TensorMap::new();
        other.insert(
            "base_model.model.q.lora_A.weight",
            HostTensor::new(vec![3, 3], vec![0.; 9]),
        );
        other.insert(
            "base_model.model.q.lora_B.weight",
            HostTensor::new(vec![2, 2], vec![0.; 4]),
        );
        let e = err(&config("pissa"), &other);
        assert!(e.contains("[2, 3]") && e.contains("[3, 3]"), "{e}");
    }
}
