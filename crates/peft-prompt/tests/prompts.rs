//! Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT 0.21.2 on the tiny Llama
//! (fixtures: scripts/make_fixtures.py --only prompts): PEFT's adapters load here with the same
//! logits and greedy text, ours save what PEFT saves, our encoders compute what torch's do
//! from the same weights, the `TEXT` init takes the same rows, and training moves only the
//! virtual tokens.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::adapter_io::{AdapterFiles, load_adapter};
use peft_core::params::ParamReport;
use peft_core::tensors::TensorMap;
use peft_core::tuner::Tuner;
use peft_models::bert::BertForSequenceClassification;
use peft_models::generate::greedy;
use peft_models::llama::{KvCache, LlamaForCausalLM};
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::reference::{Expected, max_abs_diff};
use peft_prompt::{PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig};
use peft_sites::SiteHost;

const CASES: &[&str] = &[
    "prompt_random_llama",
    "prompt_text_llama",
    "p_tuning_mlp_llama",
    "p_tuning_lstm_llama",
    "prefix_llama",
    "prefix_proj_llama",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("prompts_tiny").join(case)
}

fn base_dir() -> PathBuf {
    fixtures().join("lora_tiny/base_plain")
}

fn llama(device: &Device) -> LlamaForCausalLM {
    load_causal_lm(&base_dir(), device).unwrap().model
}

/// A config of whichever prompt method a JSON value names.
enum Prompt {
    Tuning(PromptTuningConfig),
    PTuning(PromptEncoderConfig),
    Prefix(PrefixTuningConfig),
}

impl Prompt {
    fn from_json(v: &serde_json::Value) -> Self {
        match v["peft_type"].as_str().unwrap() {
            "PROMPT_TUNING" => Self::Tuning(PromptTuningConfig::from_json(v).unwrap()),
            "P_TUNING" => Self::PTuning(PromptEncoderConfig::from_json(v).unwrap()),
            "PREFIX_TUNING" => Self::Prefix(PrefixTuningConfig::from_json(v).unwrap()),
            other => panic!("{other}"),
        }
    }

    fn tuner<M: SiteHost>(&self) -> &dyn Tuner<M> {
        match self {
            Self::Tuning(c) => c,
            Self::PTuning(c) => c,
            Self::Prefix(c) => c,
        }
    }
}

fn adapter(case: &str) -> AdapterFiles {
    load_adapter(&case_dir(case).join("adapter")).unwrap()
}

fn loaded(case: &str, device: &Device) -> LlamaForCausalLM {
    let files = adapter(case);
    let config = Prompt::from_json(&files.config);
    config
        .tuner()
        .apply_and_load(llama(device), "default", files)
        .unwrap()
}

fn expected(case: &str) -> Expected {
    Expected::read(&case_dir(case).join("expected.safetensors")).unwrap()
}

/// The same config as for training (PEFT saves `inference_mode: true`).
fn training_config(case: &str) -> Prompt {
    let mut v = adapter(case).config;
    v["inference_mode"] = false.into();
    Prompt::from_json(&v)
}

#[test]
fn python_adapters_give_the_same_logits_and_greedy_text() {
    let device = Device::flex();
    for case in CASES {
        let exp = expected(case);
        let base_err = max_abs_diff(
            llama(&device).forward(exp.ids(&device), None),
            exp.logits(&device),
        );
        assert!(
            base_err > 1e-3,
            "{case}: the adapter must change the output"
        );
        let model = loaded(case, &device);
        let err = max_abs_diff(model.forward(exp.ids(&device), None), exp.logits(&device));
        assert!(err < 1e-5, "{case}: max |ours - PEFT| = {err}");
        let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &[])
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(Some(ours), exp.greedy, "{case}");
    }
}

#[test]
fn cached_decoding_equals_the_full_forward_with_virtual_tokens() {
    let device = Device::flex();
    for case in ["prompt_random_llama", "prefix_llama"] {
        let model = loaded(case, &device);
        let ids = expected(case).ids(&device);
        let full = model.forward(ids.clone(), None);
        let mut cache = KvCache::new();
        let head = model.forward(ids.clone().narrow(1, 0, 4), Some(&mut cache));
        let tail = model.forward(ids.narrow(1, 4, 3), Some(&mut cache));
        let err = max_abs_diff(Tensor::cat(vec![head, tail], 1), full);
        assert!(err < 1e-5, "{case}: {err}");
        assert_eq!(
            cache.len(),
            5 + 7,
            "{case}: the virtual tokens stay in the cache"
        );
    }
}

#[test]
fn saved_adapters_are_what_peft_saved() {
    let device = Device::flex();
    for case in CASES {
        let theirs = adapter(case);
        let config = Prompt::from_json(&theirs.config);
        let model = loaded(case, &device);
        let out = tempfile::tempdir().unwrap();
        config.tuner().save(&model, "default", out.path()).unwrap();
        let ours = load_adapter(out.path()).unwrap();
        assert_eq!(ours.tensors, theirs.tensors, "{case}");
        let mut want = theirs.config.clone();
        // Ours keeps the fields PEFT writes; compare those.
        for (k, v) in want.as_object_mut().unwrap() {
            assert_eq!(ours.config.get(k), Some(&*v), "{case}: {k}");
        }
    }
}

#[test]
fn our_encoders_compute_what_torch_computes_from_the_same_weights() {
    let device = Device::flex();
    let file = |case: &str| case_dir(case).join("encoder.safetensors");
    // (The TEXT init is a table of word embeddings: `text_init_takes_the_rows_peft_takes`.)
    for case in CASES.iter().filter(|c| **c != "prompt_text_llama") {
        let config = training_config(case);
        let tuner = config.tuner();
        let model = tuner.apply(llama(&device), "default").unwrap();
        let torch = TensorMap::read_safetensors(&file(case)).unwrap();
        let model = tuner
            .load_training_extras(model, "default", torch.clone(), &file(case))
            .unwrap();
        let ours = tuner.state(&model, "default").unwrap();
        let theirs = adapter(case).tensors;
        let (a, b) = (
            &ours.get("prompt_embeddings").unwrap(),
            &theirs.get("prompt_embeddings").unwrap(),
        );
        assert_eq!(a.shape, b.shape, "{case}");
        let err = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{case}: max |ours - torch| = {err}");
        // The checkpoint form holds every encoder weight under PEFT's names.
        let extras = tuner.training_extras(&model, "default").unwrap();
        let mut names: Vec<_> = extras.keys().cloned().collect();
        let mut want: Vec<_> = torch.keys().cloned().collect();
        names.sort();
        want.sort();
        if matches!(*case, "prompt_random_llama" | "prefix_llama") {
            assert!(names.is_empty(), "{case}: a table needs no extras");
        } else {
            assert_eq!(names, want, "{case}");
        }
    }
}

#[test]
fn text_init_takes_the_rows_peft_takes() {
    let device = Device::flex();
    let loaded = load_causal_lm(&base_dir(), &device).unwrap();
    let Prompt::Tuning(mut config) = training_config("prompt_text_llama") else {
        unreachable!()
    };
    let text = config.prompt_tuning_init_text.clone().unwrap();
    config.init_token_ids = Some(loaded.tokenizer.encode(&text).unwrap());
    let model = config.apply(loaded.model, "default").unwrap();
    let ours = config.state(&model, "default").unwrap();
    assert_eq!(ours, adapter("prompt_text_llama").tensors);
    // Without the ids a TEXT init says what is missing.
    config.init_token_ids = None;
    let err = config.apply(llama(&device), "x").err().unwrap().to_string();
    assert!(err.contains("prompt_tuning_init_text"), "{err}");
}

/// Two rows alternating two words: a pattern virtual tokens alone can steer the model to.
fn batch(device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
    let ids: Vec<i64> = (0..2 * 9)
        .map(|i| if i % 2 == 0 { 17 } else { 42 })
        .collect();
    (
        Tensor::from_data(TensorData::new(ids, [2, 9]), device),
        Tensor::ones([2, 9], device),
    )
}

#[test]
fn training_moves_only_the_virtual_tokens_and_lowers_the_loss() {
    use peft_core::train::{TrainConfig, Trainer};
    let device = Device::flex().autodiff();
    device.seed(7);
    for case in [
        "prompt_random_llama",
        "p_tuning_lstm_llama",
        "prefix_proj_llama",
    ] {
        let config = training_config(case);
        let model = config.tuner().apply(llama(&device), "default").unwrap();
        let report = ParamReport::of(&model);
        let base = llama(&Device::flex()).to_tensors();
        assert!(
            report.trainable > 0 && report.trainable < report.all / 5,
            "{case}: {report:?}"
        );
        let (ids, mask) = batch(&device);
        let examples = vec![(ids, mask)];
        let loss_fn = |m: &LlamaForCausalLM, b: &[(Tensor<2, Int>, Tensor<2>)]| {
            (m.causal_lm_loss(b[0].0.clone(), b[0].1.clone()), 18)
        };
        let mut trainer = Trainer::new(
            model,
            TrainConfig {
                // Virtual tokens want a high rate (the prompt-tuning paper uses 0.3).
                learning_rate: 0.3,
                warmup_steps: 0,
                steps: 40,
                batch_size: 1,
                ..TrainConfig::default()
            },
        );
        let first = trainer.step(&examples, &loss_fn).loss;
        let mut last = first;
        while !trainer.is_done() {
            last = trainer.step(&examples, &loss_fn).loss;
        }
        eprintln!("{case}: loss {first} -> {last}");
        assert!(last < first * 0.9, "{case}: loss {first} -> {last}");
        let model = trainer.into_model();
        assert_eq!(model.to_tensors(), base, "{case}: the base never moves");
        // Checkpoint round trip: state + extras rebuild the same encoder output.
        let tuner = config.tuner();
        let state = tuner.state(&model, "default").unwrap();
        let extras = tuner.training_extras(&model, "default").unwrap();
        let fresh = tuner.apply(llama(&device), "default").unwrap();
        let fresh = tuner
            .load_state(fresh, "default", state.clone(), Path::new("state"))
            .unwrap();
        let fresh = tuner
            .load_training_extras(fresh, "default", extras, Path::new("extras"))
            .unwrap();
        assert_eq!(tuner.state(&fresh, "default").unwrap(), state, "{case}");
    }
}

#[test]
fn wrong_shapes_and_missing_sites_are_clear_errors() {
    let device = Device::flex();
    // The error of loading `case`'s adapter with one config field changed.
    let load_err = |case: &str, field: &str, value: usize| {
        let mut files = adapter(case);
        files.config[field] = value.into();
        Prompt::from_json(&files.config)
            .tuner()
            .apply_and_load(llama(&device), "default", files)
            .err()
            .unwrap()
            .to_string()
    };
    let err = load_err("prefix_llama", "num_virtual_tokens", 6);
    assert!(
        err.contains("prompt_embeddings") && err.contains("[6, 128]"),
        "{err}"
    );
    let err = load_err("prompt_random_llama", "token_dim", 32);
    assert!(
        err.contains("token_dim") && err.contains("another base model"),
        "{err}"
    );
    let model = loaded("prompt_random_llama", &device);
    let err = peft_sites::merge_and_unload(model)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot be merged"), "{err}");
    assert_eq!(
        llama(&device)
            .prompt_sites()
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>(),
        ["model.embed_tokens", "model.layers"]
    );
}

/// SmolLM2-135M-Instruct (grouped-query attention: 9 query and 3 key/value heads): PEFT's
/// prompt and prefix adapters give the last position's logits within 1e-3 (the tolerance of
/// the base model's own parity test, `peft-models/tests/smollm2.rs`) and the same answer.
#[test]
fn python_smollm2_adapters_give_the_same_answer() {
    let device = Device::flex();
    let gguf = peft_models::assets::SMOLLM2
        .ensure(&peft_models::assets::models_dir())
        .unwrap();
    for case in ["prompt_smollm2", "prefix_smollm2"] {
        let exp = expected(case);
        let base = load_causal_lm(&gguf, &device).unwrap();
        let eos = base.tokenizer.eos_ids.clone();
        let [_, s] = exp.ids_shape;
        let last = |m: &LlamaForCausalLM| m.forward(exp.ids(&device), None).narrow(1, s - 1, 1);
        let base_err = max_abs_diff(last(&base.model), exp.logits(&device));
        let files = adapter(case);
        let model = Prompt::from_json(&files.config)
            .tuner()
            .apply_and_load(base.model, "default", files)
            .unwrap();
        let err = max_abs_diff(last(&model), exp.logits(&device));
        assert!(
            err < 1e-3 && base_err > 1e-2,
            "{case}: max |ours - PEFT| = {err}, base {base_err}"
        );
        let ours: Vec<i64> = greedy(&model, &exp.prompt(), 8, &eos)
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(Some(ours), exp.greedy, "{case}");
    }
}

/// The tiny BERT classifier with PEFT's prompt-tuning, P-tuning and prefix-tuning adapters (and their
/// trained classifier, saved as `base_model.classifier.*`): the same logits on a padded batch,
/// and saved back bit for bit.
#[test]
fn python_bert_adapters_give_the_same_logits_and_save_back() {
    let device = Device::flex();
    let bert = || -> BertForSequenceClassification {
        load_bert_classifier(&fixtures().join("bert_tiny/model"), 3, &device)
            .unwrap()
            .0
    };
    for case in ["prompt_random_bert", "p_tuning_mlp_bert", "prefix_bert"] {
        let exp = expected(case);
        let (ids, mask) = exp.padded_batch(&device);
        let base_err = max_abs_diff(
            bert().forward(ids.clone(), mask.clone()),
            exp.logits(&device),
        );
        let files = adapter(case);
        let config = Prompt::from_json(&files.config);
        let model = config
            .tuner()
            .apply_and_load(bert(), "default", files)
            .unwrap();
        let err = max_abs_diff(model.forward(ids, mask), exp.logits(&device));
        assert!(
            err < 1e-5 && base_err > 1e-3,
            "{case}: max |ours - PEFT| = {err}, base {base_err}"
        );
        let out = tempfile::tempdir().unwrap();
        config.tuner().save(&model, "default", out.path()).unwrap();
        assert_eq!(
            load_adapter(out.path()).unwrap().tensors,
            adapter(case).tensors,
            "{case}"
        );
    }
}

/// A left-padded batch with a soft prompt or a prefix: each row's greedy tokens are what it
/// gets alone (the virtual tokens are real positions of every row, padding is masked).
#[test]
fn padded_batches_with_virtual_tokens_generate_what_each_row_generates_alone() {
    let device = Device::flex();
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2, 33, 7, 8], vec![12], vec![40, 41, 3]];
    for case in ["prompt_random_llama", "p_tuning_mlp_llama", "prefix_llama"] {
        let model = loaded(case, &device);
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&model, p, 6, &[])).collect();
        assert_eq!(
            peft_models::generate::greedy_batch(&model, &prompts, 6, &[]),
            alone,
            "{case}"
        );
    }
}

/// `SAMPLE_VOCAB` takes whole rows of the word embeddings; prefix tuning's `init_weights =
/// "zero"` zeroes the prefixes (or the projection's last layer, so its output is zero too).
#[test]
fn sample_vocab_and_zero_inits_are_what_peft_defines() {
    let device = Device::flex();
    let model = llama(&device);
    let words: Vec<Vec<f32>> = {
        let e = model.input_embeddings().unwrap();
        let [v, d] = e.dims();
        let flat: Vec<f32> = e.into_data().iter::<f32>().collect();
        (0..v).map(|i| flat[i * d..(i + 1) * d].to_vec()).collect()
    };
    let config = PromptTuningConfig::from_json(
        &serde_json::json!({"prompt_tuning_init": "SAMPLE_VOCAB", "num_virtual_tokens": 6}),
    )
    .unwrap();
    let m = config.apply(model, "default").unwrap();
    let table = config.state(&m, "default").unwrap();
    let table = table.get("prompt_embeddings").unwrap();
    assert_eq!(table.shape, [6, 64]);
    for row in table.data.chunks(64) {
        assert!(
            words.iter().any(|w| w == row),
            "a row that is no word's embedding"
        );
    }
    for projection in [false, true] {
        let config = PrefixTuningConfig::from_json(&serde_json::json!({
            "init_weights": "zero", "num_virtual_tokens": 3, "prefix_projection": projection
        }))
        .unwrap();
        let m = config.apply(llama(&device), "default").unwrap();
        let saved = config.state(&m, "default").unwrap();
        let t = saved.get("prompt_embeddings").unwrap();
        assert_eq!(t.shape, [3, 2 * 2 * 32]);
        assert!(t.data.iter().all(|&x| x == 0.0), "projection {projection}");
    }
}
