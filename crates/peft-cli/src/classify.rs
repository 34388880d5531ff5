//! Sequence classification from the command line: a BERT folder, a CSV of texts and labels,
//! LoRA on the encoder and a trained classification head (PEFT `modules_to_save`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::adapter_io::load_adapter;
use peft_core::tensors::write_atomic;

use peft_cli::methods::MethodConfig;
use peft_models::bert::{BertForSequenceClassification, encode_batch};
use peft_models::data::read_labeled_csv;
use peft_models::load::load_bert_classifier;
use peft_models::tokenizer::TextTokenizer;

use crate::train::{Run, apply_method, hold_out, train_loop};

/// Token ids and class index of one text.
type Encoded = (Vec<u32>, i64);

const LABELS_FILE: &str = "labels.json";

fn encode(
    path: &Path,
    text_col: &str,
    label_col: &str,
    labels: &[String],
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<Encoded>> {
    read_labeled_csv(path, text_col, label_col)?
        .into_iter()
        .map(|r| {
            let class = labels.iter().position(|l| *l == r.label).with_context(|| {
                format!(
                    "{}: label `{}` is not one of {labels:?}",
                    path.display(),
                    r.label
                )
            })?;
            Ok((tok.encode_with_special(&r.text, max_len)?, class as i64))
        })
        .collect()
}

pub(crate) fn train(run: Run) -> Result<()> {
    let a = &run.args;
    let (model_dir, data) = (
        a.model.clone().expect("checked"),
        a.data.clone().expect("checked"),
    );
    let text_col = a.text_column.clone().unwrap_or_else(|| "text".into());
    let label_col = a.label_column.clone().unwrap_or_else(|| "label".into());
    // The label set: fixed by the first run, reused on --resume.
    let labels_path = run.out.join(LABELS_FILE);
    let labels: Vec<String> = if run.resume_from.is_some() && labels_path.exists() {
        serde_json::from_str(&std::fs::read_to_string(&labels_path)?)
            .with_context(|| format!("{}", labels_path.display()))?
    } else {
        let mut l: Vec<String> = read_labeled_csv(&data, &text_col, &label_col)?
            .into_iter()
            .map(|r| r.label)
            .collect();
        l.sort();
        l.dedup();
        l
    };
    if labels.len() < 2 {
        bail!(
            "{}: classification needs at least 2 labels, found {labels:?}",
            data.display()
        );
    }
    eprintln!("loading {}", model_dir.display());
    let (model, tok) = load_bert_classifier(&model_dir, labels.len(), &run.device)?;
    let max_len = peft_cli::usage::max_len(
        a.max_len,
        128,
        model.config.max_position_embeddings,
        run.method.virtual_tokens(),
    )?;
    let train_set = encode(&data, &text_col, &label_col, &labels, &tok, max_len)?;
    let eval = a
        .eval_data
        .as_ref()
        .map(|p| encode(p, &text_col, &label_col, &labels, &tok, max_len))
        .transpose()?;
    let (train_set, eval_set) = hold_out(train_set, eval);
    std::fs::create_dir_all(&run.out).with_context(|| format!("{}", run.out.display()))?;
    write_atomic(&labels_path, serde_json::to_string(&labels)?.as_bytes())?;
    let mut run = run;
    run.method = run.method.resolved_for(&model)?;
    let loss_fn = |m: &BertForSequenceClassification, batch: &[Encoded]| {
        let ids: Vec<Vec<u32>> = batch.iter().map(|e| e.0.clone()).collect();
        let (tokens, mask) = encode_batch(&ids, &m.device());
        let y: Vec<i64> = batch.iter().map(|e| e.1).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(y, [batch.len()]), &m.device());
        (
            m.loss(tokens, mask, y),
            batch.iter().map(|e| e.0.len()).sum(),
        )
    };
    let model = crate::train::load_fused(&run, model)?;
    let model = apply_method(&run, model, &train_set, loss_fn)?;
    eprintln!(
        "{} labels {labels:?}; {} texts for training, {} held out; {}",
        labels.len(),
        train_set.len(),
        eval_set.len(),
        peft_lora::param_report(&model)
    );
    let n = labels.len();
    train_loop(&run, model, &train_set, loss_fn, |m| {
        let mut metrics = serde_json::Map::new();
        if !eval_set.is_empty() {
            let (acc, f1) = peft_models::bert::accuracy_and_macro_f1(m, &eval_set, n);
            metrics.insert("eval_accuracy".into(), acc.into());
            metrics.insert("eval_macro_f1".into(), f1.into());
        }
        metrics
    })
}

/// `peft eval --task classification`: accuracy and macro-F1 of a trained adapter, or of an
/// AdapterFusion (`fusion`, trained with its head) over the bottleneck adapters `adapters`.
#[allow(clippy::too_many_arguments)]
pub fn eval(
    model_dir: &Path,
    adapters: &[PathBuf],
    fusion: Option<&Path>,
    data: &Path,
    text_col: &str,
    label_col: &str,
    max_len: Option<usize>,
    device: &burn::tensor::Device,
) -> Result<serde_json::Value> {
    let (model, tok, labels, max_len) = match fusion {
        None => {
            let adapter = &adapters[0];
            let labels = read_labels(adapter)?;
            let files = load_adapter(adapter)?;
            let config = MethodConfig::from_json(&files.config)
                .with_context(|| format!("{}", adapter.display()))?;
            let (model, tok) = load_bert_classifier(model_dir, labels.len(), device)?;
            let max_len = check_max_len(&model, max_len, config.virtual_tokens())?;
            let model = config.tuner().apply_and_load(model, "default", files)?;
            (model, tok, labels, max_len)
        }
        Some(fusion) => {
            let labels = read_labels(fusion)?;
            let (mut model, tok) = load_bert_classifier(model_dir, labels.len(), device)?;
            let (mut names, mut configs) = (Vec::new(), Vec::new());
            for dir in adapters {
                let name = dir
                    .file_name()
                    .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
                let (m, config) =
                    crate::train::load_bottleneck_without_head(model, dir, Some(&name))?;
                model = m;
                names.push(name);
                configs.push(config);
            }
            let max_len = check_max_len(&model, max_len, 0)?;
            let model = crate::fuse(model, fusion, &names, &configs)?;
            (model, tok, labels, max_len)
        }
    };
    let set = encode(data, text_col, label_col, &labels, &tok, max_len)?;
    let (acc, f1) = peft_models::bert::accuracy_and_macro_f1(&model, &set, labels.len());
    Ok(serde_json::json!({"accuracy": acc, "macro_f1": f1, "examples": set.len()}))
}

/// `--max-len` (default 128) within the model's positions less the virtual tokens.
fn check_max_len(
    model: &BertForSequenceClassification,
    max_len: Option<usize>,
    virtual_tokens: usize,
) -> Result<usize> {
    peft_cli::usage::max_len(
        max_len,
        128,
        model.config.max_position_embeddings,
        virtual_tokens,
    )
}

/// The class names a classification run wrote beside its adapter.
fn read_labels(adapter: &Path) -> Result<Vec<String>> {
    let labels_path = adapter.join(LABELS_FILE);
    let text = std::fs::read_to_string(&labels_path).with_context(|| {
        format!(
            "{} (written by peft train --task classification)",
            labels_path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", labels_path.display()))
}

/// `peft merge` for a BERT classifier: the adapter (and the head trained with it) folded into
/// the weights, written as a Hugging Face folder: the source's config with the run's labels
/// (and `quantization_config` when `quantize` asks for 4 bits), `model.safetensors` and the
/// tokenizer files.
pub fn merge_folder(
    model_dir: &Path,
    adapter: &Path,
    out: &Path,
    quantize: Option<peft_quant::QuantSpec>,
) -> Result<()> {
    let labels = read_labels(adapter)?;
    let files = load_adapter(adapter)?;
    let config =
        MethodConfig::from_json(&files.config).with_context(|| format!("{}", adapter.display()))?;
    let device = burn::tensor::Device::flex();
    let (model, _) = load_bert_classifier(model_dir, labels.len(), &device)?;
    let model = config.tuner().apply_and_load(model, "default", files)?;
    let model = peft_lora::dequantize_base(model)?;
    let model = config.tuner().merge(model, "default")?;
    let mut model = peft_sites::merge_and_unload(model)?;
    let config_path = model_dir.join("config.json");
    let mut hf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| config_path.display().to_string())?,
    )
    .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    hf["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    hf["num_labels"] = labels.len().into();
    hf["id2label"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    hf["label2id"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), serde_json::json!(i)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    if let Some(obj) = hf.as_object_mut() {
        obj.remove("quantization_config");
    }
    if let Some(spec) = quantize {
        model = peft_lora::quantize_base(model, spec)?;
        hf["quantization_config"] = model
            .quantization_config()
            .context("no linear weight to quantize")?;
    }
    let tensors = model.to_tensors();
    peft_core::folder::write_folder(out, |tmp| -> Result<()> {
        write_atomic(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&hf)?.as_bytes(),
        )?;
        tensors.write_safetensors(&tmp.join("model.safetensors"))?;
        copy_tokenizer_files(model_dir, tmp)
    })?;
    Ok(())
}

/// Copy the tokenizer files of a Hugging Face folder into `to`.
fn copy_tokenizer_files(model_dir: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(model_dir).with_context(|| model_dir.display().to_string())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file()
            && (name.starts_with("tokenizer")
                || name == "special_tokens_map.json"
                || name == "vocab.txt")
        {
            std::fs::copy(&path, to.join(name)).with_context(|| path.display().to_string())?;
        }
    }
    Ok(())
}

/// `peft quantize` for a BERT folder: the encoder's linear weights to 4 bits (the classifier
/// stays full precision), written as a bitsandbytes-compatible folder beside the source's
/// config (plus `quantization_config`) and tokenizer files. A folder without a classifier
/// (a plain encoder) is written without one. Returns the quantized weights and their bytes.
pub fn quantize_folder(
    model_dir: &Path,
    out: &Path,
    spec: peft_quant::QuantSpec,
) -> Result<(usize, usize)> {
    let config_path = model_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| config_path.display().to_string())?,
    )
    .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    let num_labels = peft_models::bert::BertConfig::from_file(&config_path)?
        .num_labels
        .unwrap_or(2);
    let (model, _) = load_bert_classifier(model_dir, num_labels, &burn::tensor::Device::flex())?;
    let model = peft_lora::quantize_base(model, spec)?;
    let mut tensors = model.to_tensors();
    if !model.head_from_checkpoint {
        tensors.tensors.retain(|k, _| !k.starts_with("classifier."));
    }
    config["quantization_config"] = model
        .quantization_config()
        .context("no linear weight to quantize")?;

    peft_core::folder::write_folder(out, |tmp| -> Result<()> {
        write_atomic(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        tensors.write_safetensors(&tmp.join("model.safetensors"))?;
        copy_tokenizer_files(model_dir, tmp)
    })?;
    Ok(peft_lora::quantized_footprint(&model))
}
