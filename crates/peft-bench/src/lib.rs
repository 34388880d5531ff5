//! The work `cargo xtask bench` measures, defined once and addressed by id
//! (`group/name`). The criterion benches (`benches/hot_paths.rs`), the interleaved comparison
//! with Hugging Face PEFT and bitsandbytes (the `peft-bench serve` worker beside
//! `scripts/bench_peer.py`, which builds the same work under the same ids) and the memory
//! measurements (`peft-bench memory ID`) all run [`prepare`]'s closures.
//!
//! Shapes follow shared DESIGN.md §6: a random Llama (hidden 512, 4 layers, 8 heads,
//! intermediate 1376, vocab 8192), batch 4 x 128 tokens, LoRA r=16 (alpha 32) on q_proj and
//! v_proj, AdamW; a 4096 x 4096 matrix for the 4-bit work. Everything is f32 but the one f16
//! device workload.

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_core::linear::FrozenLinear;
use peft_core::params::unfreeze_all;
use peft_core::tensors::HostTensor;
use peft_core::train::{TrainConfig, Trainer};
use peft_core::tuner::Tuner;
use peft_lora::{
    LoraConfig, LoraInit, LoraLayer, LoraLinear, SiteHost, quantize_base, unmerge_all,
};
use peft_models::config::LlamaConfig;
use peft_models::generate::greedy;
use peft_models::llama::LlamaForCausalLM;
use peft_models::train::{Example, lm_batch_loss};
use peft_quant::{Linear4bit, QuantSpec};

/// Sequences per training batch and tokens per sequence.
pub const BATCH: usize = 4;
pub const SEQ: usize = 128;
/// LoRA rank and alpha of every LoRA workload.
pub const RANK: usize = 16;
pub const ALPHA: f64 = 32.0;
/// Side of the square matrix of the 4-bit workloads.
pub const QUANT_DIM: usize = 4096;
/// Batch-1 generation: prompt length and new tokens.
pub const PROMPT: usize = 16;
pub const NEW_TOKENS: usize = 32;

/// One measured piece of work.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// `group/name`; the Python side uses the same ids.
    pub id: &'static str,
    /// What one iteration does, for the report.
    pub what: &'static str,
    /// Tokens one iteration processes (for tokens/s), 0 where that means nothing.
    pub tokens: usize,
    /// Bytes one iteration must read and write in memory at least (for GB/s), 0 where that
    /// means nothing.
    pub bytes: usize,
}

const fn w(id: &'static str, what: &'static str, tokens: usize) -> Workload {
    Workload {
        id,
        what,
        tokens,
        bytes: 0,
    }
}

/// A memory-bound workload moving `bytes` per iteration.
const fn mem(id: &'static str, what: &'static str, bytes: usize) -> Workload {
    Workload {
        id,
        what,
        tokens: 0,
        bytes,
    }
}

/// Elements of the 4-bit workloads' matrix.
const QUANT_NUMEL: usize = QUANT_DIM * QUANT_DIM;
/// What a 4-bit weight of the default setting occupies where it computes: half a byte per value
/// plus one f32 scale per block of 64 (the device keeps the scales decoded).
const PACKED_BYTES: usize = QUANT_NUMEL / 2 + QUANT_NUMEL / 64 * 4;

/// Every workload, in report order.
pub const WORKLOADS: &[Workload] = &[
    w(
        "linear/plain_fwd",
        "frozen 512x512 linear, 512 rows, forward",
        0,
    ),
    w(
        "linear/plain_fwd_1t",
        "same forward on one thread (how the product scales to two: cores or SMT siblings)",
        0,
    ),
    w(
        "linear/lora_fwd",
        "same with LoRA r=16 on the side path, forward",
        0,
    ),
    w(
        "linear/plain_fwd_bwd",
        "frozen linear forward + backward (input gradient)",
        0,
    ),
    w(
        "linear/lora_fwd_bwd",
        "LoRA linear forward + backward (input, A and B gradients)",
        0,
    ),
    w(
        "attention/causal_fwd_bwd",
        "causal attention of the benchmark Llama (batch 4, 8 heads, 128 tokens, head size 64), forward + backward",
        0,
    ),
    w(
        "merge/merge_unmerge",
        "merge then unmerge LoRA r=16 on q,v of the 4-layer Llama",
        0,
    ),
    w(
        "nf4/quantize",
        "NF4 quantize 4096x4096 f32, blocks of 64, double quantization",
        0,
    ),
    w("nf4/dequantize", "NF4 dequantize 4096x4096 to f32", 0),
    w(
        "nf4/copy",
        "copy of the 64 MiB the dequantize writes (memcpy reference)",
        0,
    ),
    w(
        "matmul_4bit/batch1",
        "4-bit NF4 linear 4096x4096 forward, 1 row",
        0,
    ),
    w(
        "matmul_4bit/batch8",
        "4-bit NF4 linear 4096x4096 forward, 8 rows",
        0,
    ),
    w(
        "matmul_4bit/batch128",
        "4-bit NF4 linear 4096x4096 forward, 128 rows",
        0,
    ),
    w(
        "train_step/lora",
        "AdamW step, LoRA r=16 on q,v, batch 4x128",
        BATCH * SEQ,
    ),
    w(
        "train_step/full",
        "AdamW step, every parameter trained, batch 4x128",
        BATCH * SEQ,
    ),
    w(
        "train_step/qlora",
        "AdamW step, LoRA r=16 on q,v over an NF4 (double-quant) base",
        BATCH * SEQ,
    ),
    w(
        "train_step/dora",
        "AdamW step, DoRA r=16 on q,v (LoRA with a magnitude per output row)",
        BATCH * SEQ,
    ),
    w(
        "train_step/adalora",
        "AdamW step, AdaLoRA init_r 12 -> target_r 8 on q,v: orthogonality penalty, importance update and rank masking every step",
        BATCH * SEQ,
    ),
    w(
        "train_step/select",
        "AdamW step, the last layer of four trained whole (attention, MLP, norms)",
        BATCH * SEQ,
    ),
    w(
        "train_step/child_tuning_f",
        "AdamW step, Child-Tuning-F: every layer trained whole through a fresh Bernoulli(0.3) gradient mask",
        BATCH * SEQ,
    ),
    w(
        "train_step/pafi",
        "AdamW step, PaFi: the smallest-magnitude 6.25% of q,v train as a sparse delta (as many values as LoRA r=16)",
        BATCH * SEQ,
    ),
    w(
        "train_step/relora",
        "AdamW step, ReLoRA r=16 on q,v restarting every 10 steps (merge, new factors, optimizer state pruned)",
        BATCH * SEQ,
    ),
    w(
        "init/pissa",
        "PiSSA initialisation of LoRA r=16 on q,v of the 4-layer Llama (full SVD of each weight)",
        0,
    ),
    w(
        "init/pissa_niter_4",
        "PiSSA initialisation with a randomized SVD (4 subspace iterations)",
        0,
    ),
    w(
        "train_step/ia3",
        "AdamW step, IA3 with Hugging Face's Llama defaults (k, v, down)",
        BATCH * SEQ,
    ),
    w(
        "train_step/ln_tuning",
        "AdamW step, LN tuning with Hugging Face's Llama defaults (every norm)",
        BATCH * SEQ,
    ),
    w(
        "train_step/beft",
        "AdamW step, BEFT biases on v_proj (bias tuning on a model without biases)",
        BATCH * SEQ,
    ),
    w(
        "train_step/prompt_tuning",
        "AdamW step, prompt tuning with 20 virtual tokens",
        BATCH * SEQ,
    ),
    w(
        "train_step/prefix_tuning",
        "AdamW step, prefix tuning with 20 virtual tokens (keys and values in every layer)",
        BATCH * SEQ,
    ),
    w(
        "train_step/pfeiffer",
        "AdamW step, Pfeiffer bottleneck adapters (AdapterHub seq_bn, reduction 16) after every MLP",
        BATCH * SEQ,
    ),
    w(
        "train_step/houlsby",
        "AdamW step, Houlsby bottleneck adapters (AdapterHub double_seq_bn) after attention and MLP",
        BATCH * SEQ,
    ),
    w(
        "train_step/parallel_adapter",
        "AdamW step, a parallel bottleneck adapter (AdapterHub par_bn, reduction 2) beside every MLP",
        BATCH * SEQ,
    ),
    w(
        "train_step/fusion",
        "AdamW step, AdapterFusion (dynamic) over two frozen Pfeiffer adapters",
        BATCH * SEQ,
    ),
    w(
        "generate/base",
        "greedy generation, batch 1, 16-token prompt + 32 new tokens, no adapter",
        NEW_TOKENS,
    ),
    w(
        "generate/unmerged",
        "same with LoRA r=16 on q,v computed on the side path",
        NEW_TOKENS,
    ),
    w(
        "generate/merged",
        "same with the LoRA merged into the weights",
        NEW_TOKENS,
    ),
    w(
        "generate/prefix",
        "same with a 20-token prefix (prefix tuning) in every layer's keys and values",
        NEW_TOKENS,
    ),
    w(
        "generate/mixed_batch",
        "8 prompts over 4 LoRA adapters (r=16 on q,v; 2 prompts each) in one batched pass, 16 + 32 tokens each",
        MIXED_PROMPTS * NEW_TOKENS,
    ),
    w(
        "generate/one_by_one",
        "the same 8 prompts one at a time, each with its adapter active",
        MIXED_PROMPTS * NEW_TOKENS,
    ),
];

/// Prompts and adapters of the mixed-batch workloads.
const MIXED_PROMPTS: usize = 8;
const MIXED_ADAPTERS: usize = 4;

/// The device kernels, measured against a device copy: only in the GPU run.
pub const DEVICE_KERNELS: &[Workload] = &[
    mem(
        "device/dequantize",
        "NF4 dequantize 4096x4096 to f32 on the compute device",
        PACKED_BYTES + QUANT_NUMEL * 4,
    ),
    mem(
        "device/copy",
        "f32 copy of the 64 MiB the dequantize writes, on the compute device",
        QUANT_NUMEL * 8,
    ),
    mem(
        "device/matmul_4bit_batch1",
        "4-bit NF4 linear 4096x4096 forward, 1 row, on the compute device",
        PACKED_BYTES,
    ),
    mem("device/matmul_4bit_batch1_f16", "same in f16", PACKED_BYTES),
    w(
        "device/matmul_4bit_batch128",
        "4-bit NF4 linear 4096x4096 forward, 128 rows, on the compute device",
        0,
    ),
];

/// What `cargo xtask bench` runs on a GPU (through wgpu), in report order: the device kernels
/// and model work of [`WORKLOADS`].
pub const ON_DEVICE: &[&str] = &[
    "device/dequantize",
    "device/copy",
    "device/matmul_4bit_batch1",
    "device/matmul_4bit_batch1_f16",
    "device/matmul_4bit_batch128",
    "train_step/lora",
    "train_step/full",
    "train_step/qlora",
    "generate/base",
];

/// Every workload: [`WORKLOADS`] then [`DEVICE_KERNELS`].
pub fn all_workloads() -> impl Iterator<Item = &'static Workload> {
    WORKLOADS.iter().chain(DEVICE_KERNELS)
}

/// Look a workload up by id.
pub fn workload(id: &str) -> Result<&'static Workload> {
    all_workloads().find(|w| w.id == id).with_context(|| {
        let ids: Vec<&str> = all_workloads().map(|w| w.id).collect();
        format!("unknown workload `{id}` (known: {})", ids.join(", "))
    })
}

/// The random Llama of every model workload (DESIGN.md §6).
pub fn llama_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": false
    }))
    .expect("a valid Llama config")
}

/// Deterministic pseudo-random values in [-1, 1) (the same formula on the Python side).
pub fn wave(n: usize, freq: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * freq).sin()).collect()
}

fn random_llama(device: &Device) -> Result<LlamaForCausalLM> {
    Device::flex().seed(0);
    Ok(LlamaForCausalLM::random(llama_config(), device)?)
}

fn lora_config() -> LoraConfig {
    LoraConfig::new(RANK, ALPHA, &["q_proj", "v_proj"])
}

/// The selections of `train_step/select` (the last of the four layers) and
/// `train_step/child_tuning_f` (every layer, gradients kept with probability 0.3), as
/// `scripts/bench_peer.py` has them.
fn select_config(id: &str) -> peft_select::SelectConfig {
    use peft_select::SelectConfig;
    match id {
        "train_step/select" => SelectConfig::new(&["attention", "mlp", "norms"], &[3]),
        _ => SelectConfig {
            density: Some(0.3),
            ..SelectConfig::default()
        },
    }
}

/// `train_step/pafi`: the smallest-magnitude 6.25% of q and v (16384 values per weight, as
/// many as LoRA r=16 has), as `scripts/bench_peer.py` sets PEFT's SUPERTUNING.
fn pafi_config() -> peft_select::SparseConfig {
    peft_select::SparseConfig {
        target_modules: Some(peft_core::target::ModuleSelector::List(vec![
            "q_proj".into(),
            "v_proj".into(),
        ])),
        ..peft_select::SparseConfig::with_density(0.0625, peft_select::Selection::Magnitude, false)
            .expect("a valid density")
    }
}

/// ReLoRA's restart interval and warmup in `train_step/relora` (as `scripts/bench_peer.py`).
const RELORA_STEPS: usize = 10;
const RELORA_WARMUP: usize = 2;

/// AdaLoRA as `scripts/bench_peer.py` sets it: PEFT's defaults (init_r 12, target_r 8, alpha
/// 8, masking every step from step 0) on q and v, a budget schedule longer than any run.
fn adalora_config() -> peft_lora::AdaLoraConfig {
    peft_lora::AdaLoraConfig {
        target_modules: Some(peft_core::target::ModuleSelector::List(vec![
            "q_proj".into(),
            "v_proj".into(),
        ])),
        total_step: Some(1_000_000),
        ..Default::default()
    }
}

/// AdaLoRA's orthogonality penalty in the loss (what `peft train` adds through its method hook).
struct AdaLoraPenalty(peft_lora::AdaLoraConfig);

impl peft_core::train::TrainHook<LlamaForCausalLM> for AdaLoraPenalty {
    fn extra_loss(&self, model: &LlamaForCausalLM) -> Option<Tensor<1>> {
        self.0.extra_loss(model, "default")
    }
}

/// The weight of the 4-bit workloads, as `scripts/bench_peer.py` builds it.
fn quant_matrix() -> HostTensor {
    let data = wave(QUANT_DIM * QUANT_DIM, 0.618)
        .into_iter()
        .map(|v| v * 0.05)
        .collect();
    HostTensor::new(vec![QUANT_DIM, QUANT_DIM], data)
}

/// A workload's closure handed to a rayon pool's `install`, which needs `Send`.
struct RunOnPool<'a>(&'a mut Box<dyn FnMut()>);
// SAFETY: `install` blocks the calling thread until the closure returns, so the closure is only
// ever used by one thread at a time, and the flex tensors it holds are plain host buffers.
unsafe impl Send for RunOnPool<'_> {}

/// Set up workload `id` on `device` (a plain device; training workloads add autodiff) and
/// return the closure one iteration runs. The closure waits for the device to finish.
pub fn prepare(id: &str, device: &Device) -> Result<Box<dyn FnMut()>> {
    let dev = device.clone();
    let sync = move || dev.sync().expect("device sync");
    let (rows, d) = (BATCH * SEQ, 512);
    let tensor = |shape: [usize; 2], device: &Device| {
        Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device)
    };
    Ok(match id {
        "linear/plain_fwd" | "linear/lora_fwd" | "linear/plain_fwd_bwd" | "linear/lora_fwd_bwd" => {
            let backward = id.ends_with("bwd");
            let device = if backward {
                device.clone().autodiff()
            } else {
                device.clone()
            };
            device.seed(1);
            let weight = tensor([d, d], &device).mul_scalar(0.02);
            let x = tensor([rows, d], &device);
            let mut layer = LoraLinear::from_base(FrozenLinear::new(weight, None));
            if id.contains("lora") {
                layer.add_adapter("default", RANK, ALPHA, false, 0.0, LoraInit::Random);
            }
            Box::new(move || {
                if backward {
                    let x = x.clone().require_grad();
                    let grads = layer.forward(x.clone()).sum().backward();
                    let _ = x.grad(&grads).expect("input gradient");
                } else {
                    let _ = layer.forward(x.clone());
                }
                sync();
            })
        }
        "attention/causal_fwd_bwd" => {
            let device = device.clone().autodiff();
            device.seed(1);
            let (heads, head_dim) = (8, 64);
            // As the model passes them: heads-first views of the projections' token-major output.
            let input = || {
                Tensor::<4>::random(
                    [BATCH, SEQ, heads, head_dim],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                )
            };
            let (q, k, v) = (input(), input(), input());
            Box::new(move || {
                let [q, k, v] = [&q, &k, &v].map(|x| x.clone().require_grad());
                let out = peft_models::attention::causal_attention(
                    q.clone().swap_dims(1, 2),
                    k.clone().swap_dims(1, 2),
                    v.clone().swap_dims(1, 2),
                    None,
                    1.0 / (head_dim as f64).sqrt(),
                );
                let grads = out.sum().backward();
                for x in [&q, &k, &v] {
                    let _ = x.grad(&grads).expect("input gradient");
                }
                sync();
            })
        }
        "linear/plain_fwd_1t" => {
            let mut forward = prepare("linear/plain_fwd", device)?;
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .map_err(|e| anyhow::anyhow!("a one-thread pool: {e}"))?;
            Box::new(move || {
                let run = RunOnPool(&mut forward);
                one.install(move || {
                    // The whole wrapper moves in (a field alone would be captured otherwise).
                    let run = run;
                    (run.0)()
                })
            })
        }
        "merge/merge_unmerge" => {
            let config = lora_config();
            let mut model = Some(config.apply(random_llama(device)?, "default")?);
            Box::new(move || {
                let merged = config
                    .merge(model.take().expect("model"), "default")
                    .expect("merge");
                model = Some(unmerge_all(merged).expect("unmerge"));
                sync();
            })
        }
        // NF4, blocks of 64, double quantization: QuantSpec's default.
        "nf4/quantize" => {
            let w = quant_matrix();
            Box::new(move || {
                QuantSpec::default().quantize(&w).expect("quantize");
            })
        }
        "nf4/dequantize" => {
            let q = QuantSpec::default().quantize(&quant_matrix())?;
            Box::new(move || {
                std::hint::black_box(q.dequantize());
            })
        }
        "nf4/copy" => {
            let src = vec![1u8; QUANT_DIM * QUANT_DIM * 4];
            Box::new(move || {
                std::hint::black_box(src.clone());
            })
        }
        "device/dequantize" => {
            let q = QuantSpec::default().quantize(&quant_matrix())?;
            let layer = Linear4bit::new(q, None, device.clone())?;
            let device = device.clone();
            Box::new(move || {
                // Held until the device is done, so a lazy backend cannot skip the work.
                let w = layer.dequantized(&device);
                sync();
                drop(w);
            })
        }
        "device/copy" => {
            let x = Tensor::<1>::ones([QUANT_NUMEL], device);
            Box::new(move || {
                let y = x.clone().add_scalar(1.0);
                sync();
                drop(y);
            })
        }
        _ if id.starts_with("matmul_4bit/batch") || id.starts_with("device/matmul_4bit_batch") => {
            let (rows, f16) = id
                .rsplit_once("batch")
                .map(|(_, r)| r.split_once('_').unwrap_or((r, "")))
                .expect("matched");
            let m: usize = rows.parse().with_context(|| format!("workload `{id}`"))?;
            let q = QuantSpec::default().quantize(&quant_matrix())?;
            let layer = Linear4bit::new(q, None, device.clone())?;
            let x = Tensor::<2>::from_data(
                TensorData::new(
                    wave(m * QUANT_DIM, 0.377)
                        .into_iter()
                        .map(f32::cos)
                        .collect::<Vec<_>>(),
                    [m, QUANT_DIM],
                ),
                device,
            );
            let x = if f16 == "f16" {
                x.cast(burn::tensor::DType::F16)
            } else {
                x
            };
            Box::new(move || {
                let y = layer.forward(x.clone());
                sync();
                drop(y);
            })
        }
        "init/pissa" | "init/pissa_niter_4" => {
            let method = id.strip_prefix("init/").expect("init/ id");
            let config = LoraConfig {
                init_lora_weights: peft_lora::InitLoraWeights::Method(method.into()),
                ..lora_config()
            };
            let model = random_llama(device)?;
            Box::new(move || {
                let adapted = config.apply(model.clone(), "default").expect("pissa");
                sync();
                drop(adapted);
            })
        }
        "train_step/lora"
        | "train_step/full"
        | "train_step/qlora"
        | "train_step/dora"
        | "train_step/adalora"
        | "train_step/relora"
        | "train_step/select"
        | "train_step/child_tuning_f"
        | "train_step/pafi"
        | "train_step/ia3"
        | "train_step/ln_tuning"
        | "train_step/beft"
        | "train_step/prompt_tuning"
        | "train_step/prefix_tuning"
        | "train_step/pfeiffer"
        | "train_step/houlsby"
        | "train_step/parallel_adapter"
        | "train_step/fusion" => {
            let model = random_llama(&device.clone().autodiff())?;
            let model = match id {
                "train_step/full" => unfreeze_all(model),
                "train_step/qlora" => {
                    lora_config().apply(quantize_base(model, QuantSpec::default())?, "default")?
                }
                "train_step/dora" => LoraConfig {
                    use_dora: true,
                    ..lora_config()
                }
                .apply(model, "default")?,
                "train_step/adalora" => adalora_config().apply(model, "default")?,
                "train_step/select" | "train_step/child_tuning_f" => {
                    select_config(id).apply(model, "default")?
                }
                "train_step/pafi" => pafi_config().apply(model, "default")?,
                "train_step/ia3" => peft_adapter::Ia3Config::default().apply(model, "default")?,
                "train_step/ln_tuning" => {
                    peft_select::LnTuningConfig::default().apply(model, "default")?
                }
                "train_step/beft" => peft_select::BeftConfig::default().apply(model, "default")?,
                "train_step/prompt_tuning" => {
                    peft_prompt::PromptTuningConfig::default().apply(model, "default")?
                }
                "train_step/prefix_tuning" => {
                    peft_prompt::PrefixTuningConfig::default().apply(model, "default")?
                }
                "train_step/pfeiffer" => {
                    peft_adapter::BottleneckConfig::preset("seq_bn")?.apply(model, "default")?
                }
                "train_step/houlsby" => peft_adapter::BottleneckConfig::preset("double_seq_bn")?
                    .apply(model, "default")?,
                "train_step/parallel_adapter" => {
                    peft_adapter::BottleneckConfig::preset("par_bn")?.apply(model, "default")?
                }
                "train_step/fusion" => {
                    let mut model = model;
                    for name in ["a", "b"] {
                        let adapter = peft_adapter::BottleneckConfig {
                            name: name.into(),
                            ..peft_adapter::BottleneckConfig::preset("seq_bn")?
                        };
                        model = adapter.apply(model, name)?;
                    }
                    peft_adapter::FusionConfig::new(&["a".into(), "b".into()], "dynamic")?
                        .apply(model, "default")?
                }
                _ => lora_config().apply(model, "default")?,
            };
            let config = TrainConfig {
                learning_rate: 1e-4,
                warmup_steps: 0,
                steps: usize::MAX,
                batch_size: BATCH,
                max_grad_norm: Some(1.0),
                ..Default::default()
            };
            let vocab = llama_config().vocab_size as u32;
            let data: Vec<Example> = (0..BATCH as u32)
                .map(|b| Example {
                    tokens: (0..SEQ as u32)
                        .map(|i| (i * 31 + b * 977) % vocab)
                        .collect(),
                    loss_mask: vec![1.0; SEQ],
                })
                .collect();
            let mut trainer = Trainer::new(model, config);
            match id {
                "train_step/adalora" => {
                    let c = adalora_config();
                    trainer = trainer
                        .with_hook(AdaLoraPenalty(c.clone()))
                        .with_hook(c.allocator("default"));
                }
                "train_step/child_tuning_f" => {
                    let mask = select_config(id).gradient_mask(trainer.model(), 0)?;
                    trainer = trainer.with_hook(mask.expect("a density"));
                }
                "train_step/relora" => {
                    let c = peft_lora::ReloraConfig {
                        relora_warmup: RELORA_WARMUP,
                        ..peft_lora::ReloraConfig::new(lora_config(), RELORA_STEPS)
                    };
                    trainer = trainer.with_hook(c.hook("default", usize::MAX));
                }
                _ => {}
            }
            Box::new(move || {
                trainer.step(&data, |m, b| lm_batch_loss(m, b, 0));
                sync();
            })
        }
        "generate/base" | "generate/unmerged" | "generate/merged" | "generate/prefix" => {
            let config = lora_config();
            let base = random_llama(device)?;
            let model = match id {
                "generate/base" => base,
                "generate/prefix" => {
                    peft_prompt::PrefixTuningConfig::default().apply(base, "default")?
                }
                "generate/unmerged" => config.apply(base, "default")?,
                _ => config.merge(config.apply(base, "default")?, "default")?,
            };
            let prompt: Vec<u32> = (0..PROMPT as u32)
                .map(|i| (i * 131 + 7) % llama_config().vocab_size as u32)
                .collect();
            Box::new(move || {
                let out = greedy(&model, &prompt, NEW_TOKENS, &[]);
                assert_eq!(out.len(), NEW_TOKENS);
            })
        }
        "generate/mixed_batch" | "generate/one_by_one" => {
            let mut model = random_llama(device)?;
            let config = LoraConfig {
                init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
                ..lora_config()
            };
            let names: Vec<String> = (0..MIXED_ADAPTERS).map(|a| format!("a{a}")).collect();
            for name in &names {
                model = config.apply(model, name)?;
            }
            let rows: Vec<String> = (0..MIXED_PROMPTS)
                .map(|p| names[p % MIXED_ADAPTERS].clone())
                .collect();
            let vocab = llama_config().vocab_size as u32;
            let prompts: Vec<Vec<u32>> = (0..MIXED_PROMPTS as u32)
                .map(|p| {
                    (0..PROMPT as u32)
                        .map(|i| (i * 131 + 7 + p * 17) % vocab)
                        .collect()
                })
                .collect();
            if id == "generate/mixed_batch" {
                peft_sites::set_row_adapters(&mut model, Some(&rows))?;
                Box::new(move || {
                    let out =
                        peft_models::generate::greedy_batch(&model, &prompts, NEW_TOKENS, &[]);
                    assert!(out.iter().all(|o| o.len() == NEW_TOKENS));
                })
            } else {
                Box::new(move || {
                    for (prompt, name) in prompts.iter().zip(&rows) {
                        for (_, site) in model.sites_mut() {
                            if let peft_sites::SiteMut::Linear(l) = site
                                && l.part(name).is_some()
                            {
                                l.set_active(&[name]).expect("loaded");
                            }
                        }
                        let out = greedy(&model, prompt, NEW_TOKENS, &[]);
                        assert_eq!(out.len(), NEW_TOKENS);
                    }
                })
            }
        }
        other => {
            workload(other)?;
            bail!("workload `{other}` has no Rust side")
        }
    })
}

/// This process's resident memory now and its peak since the last [`reset_peak_rss`], in
/// bytes (Linux `/proc/self/status`: VmRSS, VmHWM).
pub fn rss() -> Result<(u64, u64)> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing {line}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Reset the peak resident size to the current one (Linux ≥ 4.0: `5` into `clear_refs`).
pub fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("writing /proc/self/clear_refs")
}

/// Memory of one iteration of `id`, after two warm-up iterations (the optimizer state exists
/// by then), in bytes.
#[derive(Debug, Clone, Copy)]
pub struct StepMemory {
    /// Resident size before the step, and its peak during the step (`VmHWM` reset at the start).
    pub rss_before: u64,
    pub rss_peak: u64,
    /// Bytes live in the global allocator before the step, and their high-water mark during it
    /// (reset at the start): what the step needs, without what the allocator keeps mapped. Zero
    /// unless the binary uses `peft_core::alloc::HugePageAlloc`.
    pub alloc_before: u64,
    pub alloc_peak: u64,
}

/// [`StepMemory`] of one iteration of `id`.
pub fn measure_memory(id: &str, device: &Device) -> Result<StepMemory> {
    let mut run = prepare(id, device)?;
    run();
    run();
    let (rss_before, _) = rss()?;
    let alloc_before = peft_core::alloc::live_bytes() as u64;
    reset_peak_rss()?;
    peft_core::alloc::reset_peak();
    run();
    let (_, rss_peak) = rss()?;
    let alloc_peak = peft_core::alloc::peak_bytes() as u64;
    Ok(StepMemory {
        rss_before,
        rss_peak,
        alloc_before,
        alloc_peak,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_resolve() {
        let all: Vec<&Workload> = all_workloads().collect();
        for (i, w) in all.iter().enumerate() {
            assert!(all[..i].iter().all(|o| o.id != w.id), "duplicate {}", w.id);
            assert_eq!(workload(w.id).unwrap().id, w.id);
        }
        for id in ON_DEVICE {
            workload(id).unwrap();
        }
        let err = workload("train_step/nope").unwrap_err().to_string();
        assert!(
            err.contains("train_step/nope") && err.contains("train_step/lora"),
            "{err}"
        );
    }

    #[test]
    fn small_workloads_run() {
        let device = Device::flex();
        for id in [
            "linear/lora_fwd_bwd",
            "linear/plain_fwd",
            "matmul_4bit/batch1",
            "device/copy",
            "device/matmul_4bit_batch1_f16",
        ] {
            prepare(id, &device).unwrap()();
        }
    }
}
