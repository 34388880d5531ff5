//! Weighted combinations of LoRA adapters against Hugging Face PEFT 0.21.2's
//! `add_weighted_adapter`: every combination type on the same three adapters (fixtures:
//! `scripts/make_fixtures.py --only combine`), DARE with the masks torch drew.

use std::path::{Path, PathBuf};

use peft_core::adapter_io::load_adapter;
use peft_core::tensors::{HostTensor, TensorMap};
use peft_core::{PeftError, Result};
use peft_lora::combine::{MaskSource, SeededMasks};
use peft_lora::{
    AdapterToCombine, Combination, CombineSpec, LoraConfig, combine, combine_with_masks,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/combine_tiny")
}

fn adapter(name: &str) -> (LoraConfig, TensorMap) {
    let files = load_adapter(&dir().join("adapters").join(name)).unwrap();
    (LoraConfig::from_json(&files.config).unwrap(), files.tensors)
}

/// The masks torch drew, in its order.
struct Recorded(Vec<HostTensor>);

impl MaskSource for Recorded {
    fn mask(&mut self, len: usize, _density: f64) -> Result<Vec<bool>> {
        if self.0.is_empty() {
            return Err(PeftError::Other(
                "more masks asked for than torch drew".into(),
            ));
        }
        let m = self.0.remove(0);
        assert_eq!(m.numel(), len, "mask size");
        Ok(m.bytes.iter().map(|&b| b != 0).collect())
    }
}

fn spec_of(case: &serde_json::Value) -> CombineSpec {
    let mut spec = CombineSpec::new(
        case["combination_type"].as_str().unwrap().parse().unwrap(),
        case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .collect(),
    );
    spec.density = case["density"].as_f64();
    spec.svd_rank = case["svd_rank"].as_u64().map(|r| r as usize);
    spec.svd_clamp = case["svd_clamp"].as_f64();
    if let Some(m) = case["majority_sign_method"].as_str() {
        spec.majority_sign = m.parse().unwrap();
    }
    spec
}

/// `B·A` `[out, in]` of a module's factors.
fn product(a: &HostTensor, b: &HostTensor) -> Vec<f32> {
    let (out, r, d_in) = (b.shape[0], b.shape[1], a.shape[1]);
    let mut p = vec![0f32; out * d_in];
    for o in 0..out {
        for k in 0..r {
            for j in 0..d_in {
                p[o * d_in + j] += b.data[o * r + k] * a.data[k * d_in + j];
            }
        }
    }
    p
}

fn max_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_combination_type_matches_peft() {
    let mut cases: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "adapters")
        .collect();
    cases.sort();
    assert!(cases.len() >= 16, "{cases:?}");
    for case in cases {
        let d = dir().join(&case);
        let args: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
        let spec = spec_of(&args);
        let names: Vec<String> = args["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let loaded: Vec<(LoraConfig, TensorMap)> = names.iter().map(|n| adapter(n)).collect();
        let inputs: Vec<AdapterToCombine> = names
            .iter()
            .zip(&loaded)
            .map(|(n, (c, t))| AdapterToCombine {
                label: n,
                config: c,
                tensors: t,
            })
            .collect();
        let masks_file = d.join("masks.safetensors");
        let (config, ours) = if masks_file.exists() {
            let masks = TensorMap::read_safetensors(&masks_file).unwrap();
            let mut ordered: Vec<(usize, HostTensor)> = masks
                .tensors
                .into_iter()
                .map(|(k, t)| (k.trim_start_matches("mask_").parse().unwrap(), t))
                .collect();
            ordered.sort_by_key(|(i, _)| *i);
            let mut source = Recorded(ordered.into_iter().map(|(_, t)| t).collect());
            let out = combine_with_masks(&inputs, &spec, &mut source).unwrap();
            assert!(source.0.is_empty(), "{case}: every mask torch drew is used");
            out
        } else {
            combine(&inputs, &spec).unwrap()
        };
        let theirs = load_adapter(&d).unwrap();
        assert_eq!(
            config.r as u64,
            theirs.config["r"].as_u64().unwrap(),
            "{case}: rank"
        );
        assert_eq!(
            config.lora_alpha,
            theirs.config["lora_alpha"].as_f64().unwrap(),
            "{case}: alpha"
        );
        let ours_targets = serde_json::to_value(&config.target_modules).unwrap();
        let mut a: Vec<String> = serde_json::from_value(ours_targets).unwrap();
        let mut b: Vec<String> =
            serde_json::from_value(theirs.config["target_modules"].clone()).unwrap();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: targets");
        assert_eq!(ours.len(), theirs.tensors.len(), "{case}: tensor count");
        let svd = spec.combination.is_svd() && names.len() > 1;
        for (key, t) in &theirs.tensors.tensors {
            let mine = ours.get(key).unwrap_or_else(|| panic!("{case}: no {key}"));
            assert_eq!(mine.shape, t.shape, "{case}: {key}");
            if !svd {
                let err = max_diff(&mine.data, &t.data);
                assert!(err < 1e-5, "{case}: {key} differs by {err}");
            }
        }
        if let Some(q) = spec.svd_clamp {
            // The clamp is at a quantile of the signed entries of U·S and Vᴴ, which depends on
            // the sign each SVD routine gives each component (PEFT's own result changes with
            // the torch driver): check what it promises instead.
            let all: Vec<f32> = ours.tensors.values().flat_map(|t| t.data.clone()).collect();
            let bound = all.iter().map(|x| x.abs()).fold(0.0, f32::max);
            let mut unclamped_spec = spec.clone();
            unclamped_spec.svd_clamp = None;
            let (_, unclamped) = combine(&inputs, &unclamped_spec).unwrap();
            let raw: Vec<f32> = unclamped
                .tensors
                .values()
                .flat_map(|t| t.data.clone())
                .collect();
            let raw_max = raw.iter().map(|x| x.abs()).fold(0.0, f32::max);
            assert!(
                bound < raw_max,
                "{case}: the {q}-quantile clamp cuts the largest entries"
            );
            continue;
        }
        if svd {
            // Singular vectors have a sign per component that each SVD routine picks its own
            // way; the update B·A does not depend on it.
            for key in theirs
                .tensors
                .keys()
                .filter(|k| k.ends_with("lora_A.weight"))
            {
                let bkey = key.replace("lora_A", "lora_B");
                let p_ours = product(ours.get(key).unwrap(), ours.get(&bkey).unwrap());
                let p_theirs = product(
                    theirs.tensors.get(key).unwrap(),
                    theirs.tensors.get(&bkey).unwrap(),
                );
                let scale = p_theirs.iter().map(|x| x.abs()).fold(0.0, f32::max);
                let err = max_diff(&p_ours, &p_theirs) / scale;
                assert!(err < 1e-4, "{case}: {key} B·A differs by {err} (relative)");
            }
        }
    }
}

#[test]
fn cat_is_exact_and_dare_keeps_the_expected_fraction() {
    let (ca, ta) = adapter("a");
    let (cc, tc) = adapter("c");
    let inputs = [
        AdapterToCombine {
            label: "a",
            config: &ca,
            tensors: &ta,
        },
        AdapterToCombine {
            label: "c",
            config: &cc,
            tensors: &tc,
        },
    ];
    let (config, cat) = combine(
        &inputs,
        &CombineSpec::new(Combination::Cat, vec![0.7, -0.2]),
    )
    .unwrap();
    assert_eq!((config.r, config.lora_alpha), (6, 6.0));
    for key in ta.keys().filter(|k| k.ends_with("lora_A.weight")) {
        let bkey = key.replace("lora_A", "lora_B");
        let delta = |t: &TensorMap, s: f32| -> Vec<f32> {
            product(t.get(key).unwrap(), t.get(&bkey).unwrap())
                .into_iter()
                .map(|x| x * s)
                .collect()
        };
        let (da, dc) = (delta(&ta, 2.0), delta(&tc, 2.0));
        let expected: Vec<f32> = da.iter().zip(&dc).map(|(a, c)| 0.7 * a - 0.2 * c).collect();
        let err = max_diff(&delta(&cat, 1.0), &expected);
        assert!(err < 1e-5, "cat: ΔW = Σ wᵢΔWᵢ ({err})");
    }
    // DARE keeps each entry with probability `density`: over 10 000 draws, within 3%.
    let mut masks = SeededMasks::new(9);
    let kept = masks
        .mask(10_000, 0.3)
        .unwrap()
        .iter()
        .filter(|k| **k)
        .count();
    assert!((kept as f64 / 1e4 - 0.3).abs() < 0.03, "{kept}");
}

#[test]
fn bad_combinations_are_one_line_errors() {
    let (ca, ta) = adapter("a");
    let (cc, tc) = adapter("c");
    let a = AdapterToCombine {
        label: "A",
        config: &ca,
        tensors: &ta,
    };
    let c = AdapterToCombine {
        label: "C",
        config: &cc,
        tensors: &tc,
    };
    let err = |inputs: &[AdapterToCombine], spec: CombineSpec| {
        let e = combine(inputs, &spec).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    };
    let e = err(
        &[a, c],
        CombineSpec::new(Combination::Linear, vec![0.5, 0.5]),
    );
    assert!(e.contains("one rank") && e.contains("[4, 2]"), "{e}");
    let (a, c) = (
        AdapterToCombine {
            label: "A",
            config: &ca,
            tensors: &ta,
        },
        AdapterToCombine {
            label: "C",
            config: &cc,
            tensors: &tc,
        },
    );
    let e = err(&[a, c], CombineSpec::new(Combination::Cat, vec![0.5]));
    assert!(e.contains("1 weights for 2 adapters"), "{e}");
    let e = "ties_fast".parse::<Combination>().unwrap_err().to_string();
    assert!(
        e.contains("ties_fast") && e.contains("dare_ties_svd"),
        "{e}"
    );
    let mk = || AdapterToCombine {
        label: "A",
        config: &ca,
        tensors: &ta,
    };
    let e = err(
        &[mk(), mk()],
        CombineSpec::new(Combination::Ties, vec![0.5, 0.5]),
    );
    assert!(e.contains("density"), "{e}");

    // Different targets: one adapter lacks a module the other has.
    let mut fewer = ta.clone();
    let key = fewer
        .keys()
        .find(|k| k.contains("layers.1") && k.ends_with("lora_A.weight"))
        .unwrap()
        .clone();
    fewer.remove(&key);
    fewer.remove(&key.replace("lora_A", "lora_B"));
    let short = AdapterToCombine {
        label: "SHORT",
        config: &ca,
        tensors: &fewer,
    };
    let e = err(
        &[mk(), short],
        CombineSpec::new(Combination::Svd, vec![0.5, 0.5]),
    );
    assert!(e.contains("SHORT") && e.contains("layers.1"), "{e}");

    // Another base: the same module with another shape.
    let mut wider = ta.clone();
    for k in ta.keys().filter(|k| k.ends_with("lora_A.weight")) {
        let t = wider.get(k).unwrap().clone();
        let r = t.shape[0];
        wider.insert(k.clone(), HostTensor::new(vec![r, 3], vec![0.0; r * 3]));
    }
    let other = AdapterToCombine {
        label: "OTHER",
        config: &ca,
        tensors: &wider,
    };
    let e = err(
        &[mk(), other],
        CombineSpec::new(Combination::Svd, vec![0.5, 0.5]),
    );
    assert!(e.contains("OTHER") && e.contains("different base"), "{e}");

    let mut dora = ca.clone();
    dora.use_dora = true;
    let d = AdapterToCombine {
        label: "D",
        config: &dora,
        tensors: &ta,
    };
    let e = err(
        &[mk(), d],
        CombineSpec::new(Combination::Svd, vec![0.5, 0.5]),
    );
    assert!(e.contains("DoRA"), "{e}");
}
