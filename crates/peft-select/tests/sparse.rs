//! Fixed-mask selection as sparse adapters, against Hugging Face PEFT 0.21.2's `SUPERTUNING`
//! (fixtures: `scripts/make_fixtures.py --only sparse`): PaFi's smallest-magnitude masks are
//! PEFT's `select_top=False` masks, PEFT's adapters load here with the same logits, greedy
//! text and value gradients and save back bit for bit; masked entries never move in training
//! (weight decay on, random masks); merging changes only the selected entries; Fisher scores
//! are the summed squared gradients.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::params::ParamReport;
use peft_core::tensors::{StoredDtype, TensorMap};
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_models::generate::greedy;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::reference::{Expected, max_abs_diff};
use peft_select::fisher::fisher_scores;
use peft_select::sparse::{Scores, top_k};
use peft_select::{Selection, SparseConfig};
use peft_sites::{LinearPart, SiteHost, merge_and_unload};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("methods_tiny").join(case)
}

fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model
}

fn python_config(case: &str) -> (SparseConfig, TensorMap) {
    let files = load_adapter(&case_dir(case).join("adapter")).unwrap();
    (
        SparseConfig::from_json(&files.config).unwrap(),
        files.tensors,
    )
}

fn loaded<M: SiteHost>(case: &str, model: M) -> M {
    let (config, tensors) = python_config(case);
    let model = config.apply(model, "default").unwrap();
    let file = case_dir(case).join("adapter").join(WEIGHTS_FILE);
    config.load_state(model, "default", tensors, &file).unwrap()
}

#[test]
fn pafi_masks_are_peft_select_top_false_masks() {
    let device = Device::flex();
    let (config, theirs) = python_config("pafi_llama");
    assert!(!config.select_top);
    let model = config.apply(llama(&device), "default").unwrap();
    let ours = config.state(&model, "default").unwrap();
    let mut checked = 0;
    for key in theirs
        .keys()
        .filter(|k| k.ends_with(".supertuning_indices"))
    {
        let t = theirs.get(key).unwrap();
        assert_eq!(t.dtype, StoredDtype::I32);
        let mine: Vec<i32> = ours.get(key).unwrap().i32_values().collect();
        let python: Vec<i32> = t.i32_values().collect();
        assert_eq!(mine, python, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 6, "q, v and down of both layers");
}

#[test]
fn python_adapter_gives_the_same_logits_and_greedy_text_and_saves_back() {
    let device = Device::flex();
    let exp = Expected::read(&case_dir("pafi_llama").join("expected.safetensors")).unwrap();
    let base_err = max_abs_diff(
        llama(&device).forward(exp.ids(&device), None),
        exp.logits(&device),
    );
    assert!(
        base_err > 1e-3,
        "the adapter must change the output ({base_err})"
    );
    let model = loaded("pafi_llama", llama(&device));
    let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
    let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[2])
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(Some(ours), exp.greedy);

    let (config, theirs) = python_config("pafi_llama");
    let out = tempfile::tempdir().unwrap();
    config.save(&model, "default", out.path()).unwrap();
    let saved = load_adapter(out.path()).unwrap();
    assert_eq!(
        saved.tensors.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, t) in &theirs.tensors {
        assert_eq!(saved.tensors.get(k).unwrap(), t, "{k}");
    }
    assert_eq!(saved.config["peft_type"], "SUPERTUNING");
}

/// Our packed layout (`SUPERTUNING_PACKED`): the same adapter in under three quarters of the
/// bytes, loading to the same model (up to the order of each output's sum); a flat file under the packed type names the missing key.
#[test]
fn packed_adapter_is_smaller_and_loads_to_the_same_model() {
    let device = Device::flex();
    let exp = Expected::read(&case_dir("pafi_llama").join("expected.safetensors")).unwrap();
    let model = loaded("pafi_llama", llama(&device));
    let (config, theirs) = python_config("pafi_llama");
    let packed = config.clone().packed(true);
    let out = tempfile::tempdir().unwrap();
    packed.save(&model, "default", out.path()).unwrap();
    let saved = load_adapter(out.path()).unwrap();
    assert_eq!(saved.config["peft_type"], "SUPERTUNING_PACKED");
    let mut positions = 0;
    for (k, t) in &saved.tensors.tensors {
        assert!(!k.ends_with(".supertuning_indices"), "{k}");
        if k.ends_with(".supertuning_packed_indices") {
            assert_eq!(t.dtype, StoredDtype::U8, "{k}");
            positions += 1;
            // The same (position, value) pairs as PEFT's file, in position order.
            let flat_key = k.replace("packed_indices", "indices");
            let values_key = k.replace("packed_indices", "values");
            let mut pairs: Vec<(i32, f32)> = theirs
                .get(&flat_key)
                .unwrap()
                .i32_values()
                .zip(theirs.get(&values_key).unwrap().data.iter().copied())
                .collect();
            pairs.sort_by_key(|p| p.0);
            let values: Vec<f32> = pairs.iter().map(|p| p.1).collect();
            assert_eq!(saved.tensors.get(&values_key).unwrap().data, values, "{k}");
        }
    }
    assert_eq!(positions, 6, "q, v and down of both layers");
    let size = |dir: &Path| std::fs::metadata(dir.join(WEIGHTS_FILE)).unwrap().len();
    let flat_dir = case_dir("pafi_llama").join("adapter");
    assert!(
        size(out.path()) * 4 < size(&flat_dir) * 3,
        "{} bytes packed against {} flat",
        size(out.path()),
        size(&flat_dir)
    );

    // Loaded from the packed folder: bit for bit the model loaded from PEFT's.
    let files = load_adapter(out.path()).unwrap();
    let back = SparseConfig::from_json(&files.config).unwrap();
    assert!(back.packs_indices());
    let again = back.apply(llama(&device), "default").unwrap();
    let again = back
        .load_state(
            again,
            "default",
            files.tensors,
            &out.path().join(WEIGHTS_FILE),
        )
        .unwrap();
    // Only the order of each output's sum differs.
    let logits = |m: &LlamaForCausalLM| m.forward(exp.ids(&device), None);
    let err = max_abs_diff(logits(&again), logits(&model));
    assert!(err < 1e-6, "packed against flat: {err}");
    // And saved flat again, PEFT's file bit for bit.
    let flat_again = tempfile::tempdir().unwrap();
    config.save(&again, "default", flat_again.path()).unwrap();
    let resaved = load_adapter(flat_again.path()).unwrap();
    for (k, t) in &theirs.tensors {
        let pairs = |m: &TensorMap| -> Vec<(i32, u32)> {
            if !k.ends_with(".supertuning_indices") {
                return Vec::new();
            }
            let v = m.get(&k.replace("indices", "values")).unwrap();
            let mut p: Vec<(i32, u32)> = m
                .get(k)
                .unwrap()
                .i32_values()
                .zip(v.data.iter().map(|x| x.to_bits()))
                .collect();
            p.sort();
            p
        };
        assert_eq!(pairs(&resaved.tensors), pairs(&theirs), "{k}");
        assert_eq!(
            resaved.tensors.get(k).map(|r| r.shape.clone()),
            Some(t.shape.clone())
        );
    }

    // PEFT's flat file under the packed type: the missing key is named.
    let model = packed.apply(llama(&device), "default").unwrap();
    let err = packed
        .load_state(model, "default", theirs, &flat_dir.join(WEIGHTS_FILE))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("supertuning_packed_indices"), "{err}");
}

#[test]
fn value_gradients_match_pytorch() {
    let device = Device::flex().autodiff();
    let model = loaded("pafi_llama", llama(&device));
    let theirs =
        TensorMap::read_safetensors(&case_dir("pafi_llama").join("grads.safetensors")).unwrap();
    let exp = Expected::read(&case_dir("pafi_llama").join("expected.safetensors")).unwrap();
    let ids: Tensor<2, Int> = exp.ids(&device);
    let loss = model.causal_lm_loss(ids.clone(), Tensor::ones(ids.dims(), &device));
    let their_loss = theirs.get("loss").unwrap().data[0];
    let our_loss: f32 = loss.clone().into_scalar();
    assert!(
        (our_loss - their_loss).abs() < 1e-5 * their_loss.abs(),
        "{our_loss} vs {their_loss}"
    );
    let grads = loss.backward();
    let mut checked = 0;
    for (path, s) in model.linears() {
        let Some(LinearPart::Sparse(d)) = s.part("default") else {
            continue;
        };
        let ours =
            peft_core::tensors::HostTensor::from_tensor(d.values.val().grad(&grads).unwrap()).data;
        let key = format!("base_model.model.{path}.supertuning_values.default");
        let theirs = &theirs.get(&key).unwrap().data;
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{path}: gradient differs by {diff} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn python_bert_adapter_with_its_classifier_gives_the_same_logits() {
    let device = Device::flex();
    let exp = Expected::read(&case_dir("supertuning_bert").join("expected.safetensors")).unwrap();
    let bert = load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, &device)
        .unwrap()
        .0;
    let model = loaded("supertuning_bert", bert);
    let (ids, mask) = exp.padded_batch(&device);
    let err = max_abs_diff(model.forward(ids, mask), exp.logits(&device));
    assert!(err < 1e-5, "max |ours - PEFT| = {err}");
}

#[test]
fn merging_changes_only_the_selected_entries_and_keeps_the_outputs() {
    let device = Device::flex();
    let base = llama(&device).to_tensors();
    let model = loaded("pafi_llama", llama(&device));
    let (_, theirs) = python_config("pafi_llama");
    let exp = Expected::read(&case_dir("pafi_llama").join("expected.safetensors")).unwrap();
    let unmerged = model.forward(exp.ids(&device), None);
    let merged = merge_and_unload(model).unwrap();
    let err = max_abs_diff(merged.forward(exp.ids(&device), None), unmerged);
    assert!(err < 1e-5, "merged vs unmerged {err}");
    let after = merged.to_tensors();
    for key in base.keys() {
        let (b, a) = (&base.get(key).unwrap().data, &after.get(key).unwrap().data);
        let module = key.trim_end_matches(".weight");
        let selected: Vec<usize> = theirs
            .get(&format!("base_model.model.{module}.supertuning_indices"))
            .map(|t| t.i32_values().map(|v| v as usize).collect())
            .unwrap_or_default();
        for (at, (x, y)) in b.iter().zip(a).enumerate() {
            if !selected.contains(&at) {
                assert_eq!(x.to_bits(), y.to_bits(), "{key}[{at}] moved");
            }
        }
    }
}

fn ids(device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..18).map(|i| if i % 2 == 0 { 17 } else { 42 }).collect();
    Tensor::from_data(TensorData::new(ids, [2, 9]), device)
}

type Batch = (Tensor<2, Int>, Tensor<2>);

fn loss_fn(m: &LlamaForCausalLM, b: &[Batch]) -> (Tensor<1>, usize) {
    (m.causal_lm_loss(b[0].0.clone(), b[0].1.clone()), 18)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4))]
    /// Random masks (random scores), a few AdamW steps with weight decay: after merging, every
    /// entry outside the mask is bit-identical to the base, and the loss went down.
    #[test]
    fn masked_entries_never_move(seed in 0u64..1000, density in 0.01f64..0.3, steps in 2usize..5) {
        let device = Device::flex().autodiff();
        let base = llama(&device);
        let before = base.to_tensors();
        let config = SparseConfig {
            target_modules: Some(peft_core::target::ModuleSelector::Pattern(".*_proj".into())),
            ..SparseConfig::with_density(density, Selection::Fishmask, true).unwrap()
        };
        let mut state = seed | 1;
        let mut scores = Scores::new();
        for path in config.targets(&base).unwrap() {
            let s = base.linears().into_iter().find(|(p, _)| *p == path).unwrap().1;
            let n = s.base.d_input() * s.base.d_output();
            scores.insert(path, (0..n).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                (state >> 40) as f32
            }).collect());
        }
        let model = config.apply_scored(base, "default", &scores).unwrap();
        let trainable = ParamReport::of(&model).trainable;
        let expected: usize = scores.values().map(|s| config.entries(s.len())).sum();
        prop_assert_eq!(trainable, expected);
        let train = TrainConfig {
            learning_rate: 1e-2, warmup_steps: 0, weight_decay: 0.1, steps, batch_size: 1,
            ..TrainConfig::default()
        };
        let batch = vec![(ids(&device), Tensor::<2>::ones([2, 9], &device))];
        let mut trainer = Trainer::new(model, train);
        let first = trainer.step(&batch, loss_fn).loss;
        let mut last = first;
        while !trainer.is_done() {
            last = trainer.step(&batch, loss_fn).loss;
        }
        prop_assert!(last < first, "loss {} -> {}", first, last);
        let model = trainer.into_model();
        let masks: Vec<(String, Vec<u32>)> = model.linears().into_iter().filter_map(|(p, s)| match s.part("default") {
            Some(LinearPart::Sparse(d)) => Some((p, d.support.0.flat.clone())),
            _ => None,
        }).collect();
        let after = merge_and_unload(model).unwrap().to_tensors();
        let mut moved = 0;
        for key in before.keys() {
            let (b, a) = (&before.get(key).unwrap(), &after.get(key).unwrap());
            let module = key.trim_end_matches(".weight");
            let mask = masks.iter().find(|(p, _)| p == module).map(|(_, m)| m.clone()).unwrap_or_default();
            for (at, (x, y)) in b.data.iter().zip(&a.data).enumerate() {
                if x.to_bits() != y.to_bits() {
                    prop_assert!(mask.contains(&(at as u32)), "{}[{}] moved outside the mask", key, at);
                    moved += 1;
                }
            }
        }
        prop_assert!(moved > 0);
    }
}

#[test]
fn fisher_scores_are_summed_squared_gradients_and_the_model_comes_back_frozen() {
    let device = Device::flex().autodiff();
    let paths = vec!["model.layers.0.self_attn.q_proj".to_string()];
    let batches: Vec<Vec<Batch>> = (0..3)
        .map(|b| {
            let v: Vec<i64> = (0..9).map(|i| (i * 7 + b * 13) % 100 + 1).collect();
            vec![(
                Tensor::from_data(TensorData::new(v, [1, 9]), &device),
                Tensor::ones([1, 9], &device),
            )]
        })
        .collect();
    let lf = |m: &LlamaForCausalLM, b: &[Batch]| loss_fn(m, b).0;
    let mut seen = 0;
    let (model, scores) =
        fisher_scores(llama(&device), &paths, &batches, lf, |n| seen = n).unwrap();
    assert_eq!(seen, 3);
    assert_eq!(ParamReport::of(&model).trainable, 0);
    // The same by hand with the whole weight trainable.
    let mut expected = vec![0f32; 64 * 64];
    for batch in &batches {
        let mut m = llama(&device);
        let s = m.linear_mut(&paths[0]).unwrap();
        let w = s.base.dense_weight(&device);
        s.base.set_weight(w, true).unwrap();
        let grads = lf(&m, batch).backward();
        let site = m
            .linears()
            .into_iter()
            .find(|(p, _)| *p == paths[0])
            .unwrap()
            .1;
        let peft_quant::BaseLinear::Dense(d) = &site.base else {
            unreachable!()
        };
        let g = peft_core::tensors::HostTensor::from_tensor(d.weight.val().grad(&grads).unwrap())
            .transposed()
            .data;
        for (e, v) in expected.iter_mut().zip(g) {
            *e += v * v;
        }
    }
    let ours = &scores[&paths[0]];
    let scale = expected.iter().fold(0f32, |m, v| m.max(*v));
    assert!(scale > 0.0);
    for (a, b) in ours.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-5 * scale);
    }
    // The mask of the top entries is the top of these scores.
    assert_eq!(top_k(ours, 3, true).len(), 3);
}

#[test]
fn bad_input_is_a_clear_error() {
    let device = Device::flex();
    let err = SparseConfig::with_density(0.0, Selection::Magnitude, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("density 0") && err.contains("(0, 1]"), "{err}");
    // An adapter for another base: an index past the weight.
    let (config, mut tensors) = python_config("pafi_llama");
    let key = "base_model.model.model.layers.0.self_attn.v_proj.supertuning_indices";
    let t = tensors.remove(key).unwrap();
    let mut v: Vec<i32> = t.i32_values().collect();
    v[0] = 64 * 64 * 10;
    tensors.insert(
        key,
        peft_core::tensors::HostTensor::from_i32(t.shape.clone(), &v),
    );
    let model = config.apply(llama(&device), "default").unwrap();
    let err = config
        .load_state(
            model,
            "default",
            tensors,
            Path::new("adapter_model.safetensors"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("v_proj") && err.contains("past the weight"),
        "{err}"
    );
    let err = SparseConfig {
        r: Some(4),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("Supra"), "{err}");
}
