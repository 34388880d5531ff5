//! `cargo xtask bench [--peer] [--gpu|--no-gpu] [--gpu-peak-gbps GBPS] [--rounds N]
//! [--only PREFIX] [--no-criterion]`: the criterion benches of `peft-bench`, and with `--peer`
//! the same workloads run side by side with Hugging Face PEFT / transformers / bitsandbytes in
//! the reference venv, interleaved round by round. Where `nvidia-smi` finds a GPU (or with
//! `--gpu`), the device kernels and model work also run on it through wgpu, with the bandwidth
//! the memory-bound kernels reach as a fraction of the device's copy and peak. Writes `report.md`, `results.json` and `chart.svg` under `<target>/bench-report/`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use peft_bench::{WORKLOADS, Workload};
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::{cargo, workspace_root};

/// Both sides run with this many threads (rayon / torch), whatever the machine has.
const THREADS: &str = "2";

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The quickest of the times (NaN when there are none).
fn quickest(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::min).unwrap_or(f64::NAN)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Iterations per round: fewer for the slow workloads, so a round takes seconds.
fn iterations(id: &str) -> usize {
    match id.split('/').next() {
        Some("train_step" | "generate") => 2,
        Some("nf4") if id == "nf4/quantize" => 2,
        Some("merge" | "linear") => 10,
        Some("init") => 2,
        _ => 5,
    }
}

/// Untimed iterations before each timed burst: as many as it has for the workloads of a few
/// milliseconds. After the pause between bursts two-thread work often runs slowly for some
/// tens of milliseconds (observed on a 2-core VM, without the other side running and before
/// our threads were pinned: a 2.8 ms linear forward and backward took 3.5-8 ms in the bursts
/// that followed a 100 ms pause, 2.8-3.0 ms after a 10 ms one), which would otherwise be most
/// of what such a burst measures; both sides get the same start. The longer workloads
/// (training steps, generation) outlast it and get none.
fn warm_up(id: &str) -> usize {
    match iterations(id) {
        n if n >= 5 => n,
        _ => 0,
    }
}

/// Median milliseconds per workload from criterion's `estimates.json` files.
fn criterion_medians(selected: &[&Workload]) -> Result<Vec<(String, f64)>> {
    let dir = target_dir().join("criterion");
    let mut out = Vec::new();
    for w in selected {
        let file = dir.join(w.id).join("new/estimates.json");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let ns = v["median"]["point_estimate"]
            .as_f64()
            .with_context(|| format!("{}: no median", file.display()))?;
        out.push((w.id.to_string(), ns / 1e6));
    }
    Ok(out)
}

/// A process speaking the `ID ITERATIONS` -> `{"id", "ms"}` protocol.
struct Worker {
    name: &'static str,
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    /// The dense products' GFLOP of one iteration of each workload, where the worker reports
    /// it (ours; the latest answer).
    gflop: std::collections::HashMap<String, f64>,
}

impl Worker {
    fn spawn(name: &'static str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} worker: {cmd:?}"))?;
        let input = child.stdin.take().expect("piped");
        let output = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            name,
            child,
            input,
            output,
            gflop: Default::default(),
        })
    }

    /// The times of `iters` iterations of `id`, after a pause and `warm_up(id)` untimed ones.
    fn run(&mut self, id: &str, iters: usize) -> Result<Vec<f64>> {
        // Let the other side's worker threads stop spinning (OpenMP and rayon busy-wait a
        // moment after parallel work), so neither side runs on cores the other still holds.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let warm = warm_up(id);
        if warm > 0 {
            self.request(id, warm)?;
        }
        self.request(id, iters)
    }

    fn request(&mut self, id: &str, iters: usize) -> Result<Vec<f64>> {
        writeln!(self.input, "{id} {iters}")
            .and_then(|_| self.input.flush())
            .with_context(|| format!("the {} worker stopped before `{id}`", self.name))?;
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "the {} worker failed on `{id}` (its stderr is above)",
                self.name
            )
        })?;
        let ms: Vec<f64> = v["ms"]
            .as_array()
            .context("no `ms`")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        if let Some(g) = v["gflop"].as_f64() {
            self.gflop.insert(id.to_string(), g);
        }
        Ok(ms)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory of one iteration in a fresh process, in MiB: resident before and at peak, and (our
/// side only; NaN for the peer, whose torch CPU allocator keeps no statistics) the allocator's
/// live bytes before and their high-water mark during the step.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_before: f64,
    rss_peak: f64,
    alloc_before: f64,
    alloc_peak: f64,
}

fn memory(mut cmd: Command, side: &str, id: &str) -> Result<Memory> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{side} memory of {id}"))?;
    if !out.status.success() {
        bail!("{side}: measuring the memory of `{id}` failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("{side} memory of {id}: `{line}`"))?;
    let mib = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / (1024.0 * 1024.0);
    Ok(Memory {
        rss_before: mib("rss_before"),
        rss_peak: mib("rss_peak"),
        alloc_before: mib("alloc_before"),
        alloc_peak: mib("alloc_peak"),
    })
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    };
    let cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
    // Family and model tell processor generations apart where the name does not ("AMD EPYC":
    // family 25 is Zen 3 or Zen 4, 26 is Zen 5).
    let cpu = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{cpu} (family {f}, model {m})"),
        _ => cpu,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem} RAM; {THREADS} threads on each side. {}",
        cpu0_topology()
    )
}

/// What the OS says the first CPU shares with others (its SMT siblings and caches), which
/// decides how a dense product scales to two threads; `linear/plain_fwd_1t` measures it.
fn cpu0_topology() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let base = "/sys/devices/system/cpu/cpu0";
    let siblings =
        read(&format!("{base}/topology/thread_siblings_list")).unwrap_or_else(|| "unknown".into());
    let mut caches = Vec::new();
    for i in 0..8 {
        let dir = format!("{base}/cache/index{i}");
        let (Some(level), Some(kind), Some(size)) = (
            read(&format!("{dir}/level")),
            read(&format!("{dir}/type")),
            read(&format!("{dir}/size")),
        ) else {
            continue;
        };
        if kind == "Instruction" {
            continue;
        }
        let shared = read(&format!("{dir}/shared_cpu_list")).unwrap_or_default();
        caches.push(format!("L{level} {size} (CPUs {shared})"));
    }
    let caches = if caches.is_empty() {
        "caches not reported".to_string()
    } else {
        caches.join(", ")
    };
    format!("CPU 0: SMT siblings {siblings}; {caches}")
}

struct Options {
    peer: bool,
    criterion: bool,
    rounds: usize,
    only: Option<String>,
    /// Run the GPU side: `Some(true)` forced by `--gpu`, `Some(false)` by `--no-gpu`, `None`
    /// when an NVIDIA GPU is found.
    gpu: Option<bool>,
    /// The GPU's peak memory bandwidth in GB/s (`--gpu-peak-gbps`), else looked up by name.
    gpu_peak: Option<f64>,
    /// `--isa avx2`: both sides without AVX-512, so an AVX-512 machine imitates an AVX2 one.
    avx2: bool,
}

/// The environment that keeps each side off AVX-512 under `--isa avx2`: our kernels and
/// gemm's (`peft_core::cpu::{isa, gemm_isa}`), and PyTorch's own kernels, MKL and oneDNN.
const OURS_AVX2_ENV: [(&str, &str); 1] = [("PEFT_CPU_ISA", "avx2")];
const PEER_AVX2_ENV: [(&str, &str); 3] = [
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
];

/// What one side reports of the instruction sets it ran with (`isa` subcommand of either
/// worker: one JSON object of strings).
fn isa_report(mut cmd: Command, side: &str) -> Result<Value> {
    let out = cmd
        .arg("isa")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("asking the {side} worker for its instruction sets"))?;
    if !out.status.success() {
        bail!("the {side} worker could not report its instruction sets");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("{side} isa report `{text}`"))
}

fn options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        peer: false,
        criterion: true,
        rounds: 5,
        only: None,
        gpu: None,
        gpu_peak: None,
        avx2: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peer" => o.peer = true,
            "--no-criterion" => o.criterion = false,
            "--gpu" => o.gpu = Some(true),
            "--no-gpu" => o.gpu = Some(false),
            "--gpu-peak-gbps" => {
                let v: f64 = it
                    .next()
                    .context("--gpu-peak-gbps needs a number")?
                    .parse()
                    .context("--gpu-peak-gbps")?;
                if !(v > 0.0) {
                    bail!("--gpu-peak-gbps must be positive, got {v}");
                }
                o.gpu_peak = Some(v);
            }
            "--isa" => match it.next().map(String::as_str) {
                Some("avx2") => o.avx2 = true,
                Some("native") => o.avx2 = false,
                other => bail!("--isa takes avx2 or native, got {other:?}"),
            },
            "--rounds" => {
                o.rounds = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds")?
            }
            "--only" => {
                o.only = Some(
                    it.next()
                        .context("--only needs workload id prefixes (comma-separated)")?
                        .clone(),
                )
            }
            other => bail!(
                "unknown bench option `{other}` (expected --peer, --gpu, --no-gpu, --gpu-peak-gbps GBPS, --rounds N, --only PREFIX[,PREFIX...], --no-criterion, --isa avx2|native)"
            ),
        }
    }
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(o)
}

/// The first NVIDIA GPU's name, from `nvidia-smi` (absent or failing: none).
fn nvidia_gpu() -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().map(|l| l.trim().to_string()))
        .flatten()
        .filter(|n| !n.is_empty())
}

/// Peak memory bandwidth (GB/s, vendor figures) of common data-centre and desktop GPUs, by a
/// fragment of the name `nvidia-smi` reports; the first match wins, so specific names first.
const GPU_PEAK_GBPS: &[(&str, f64)] = &[
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
];

fn gpu_peak_gbps(name: &str) -> Option<f64> {
    GPU_PEAK_GBPS
        .iter()
        .find(|(fragment, _)| name.contains(fragment))
        .map(|&(_, gbps)| gbps)
}

/// The GPU run: which GPU, its peak bandwidth if known, and each workload's times.
struct GpuRun {
    name: String,
    peak_gbps: Option<f64>,
    times: Vec<(&'static Workload, Vec<f64>)>,
}

/// Iterations per round on the GPU: the kernels take milliseconds.
fn gpu_iterations(id: &str) -> usize {
    if id.starts_with("device/") {
        20
    } else {
        iterations(id)
    }
}

/// One workload measured on both sides.
struct Pair {
    workload: &'static Workload,
    ours: Vec<f64>,
    peer: Vec<f64>,
    /// Our dense products' GFLOP per iteration (0 or absent: none went through them).
    gflop: Option<f64>,
}

/// Whether `--only` (comma-separated id prefixes) selects workload `id`.
fn selects(only: Option<&str>, id: &str) -> bool {
    only.is_none_or(|list| list.split(',').any(|p| id.starts_with(p)))
}

pub fn bench(args: &[String]) -> Result<()> {
    let o = options(args)?;
    let selected: Vec<&'static Workload> = WORKLOADS
        .iter()
        .filter(|w| selects(o.only.as_deref(), w.id))
        .collect();
    let gpu_name = nvidia_gpu();
    let run_gpu = o.gpu.unwrap_or(gpu_name.is_some());
    let on_device: Vec<&'static Workload> = peft_bench::ON_DEVICE
        .iter()
        .filter(|id| run_gpu && selects(o.only.as_deref(), id))
        .map(|id| peft_bench::workload(id))
        .collect::<Result<_>>()?;
    if selected.is_empty() && on_device.is_empty() {
        bail!("--only {:?} selects no workload", o.only);
    }
    let report_dir = target_dir().join("bench-report");
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let mut our_env = vec![("RAYON_NUM_THREADS", THREADS)];
    // Under `--isa avx2` our side keeps its own kernels and gemm's (vendor/gemm-f32) to AVX2.
    if o.avx2 {
        our_env.extend(OURS_AVX2_ENV);
    }

    let criterion = if o.criterion && !selected.is_empty() {
        let mut bench_args = vec![
            "bench",
            "-p",
            "peft-bench",
            "--profile",
            "dev",
            "--bench",
            "hot_paths",
        ];
        // Criterion's filter is a regular expression: the prefixes as alternatives.
        let filter = o.only.as_ref().map(|p| p.replace(',', "|"));
        if let Some(f) = &filter {
            bench_args.extend(["--", f.as_str()]);
        }
        cargo(&bench_args, &our_env)?;
        criterion_medians(&selected)?
    } else {
        Vec::new()
    };

    let bin = target_dir().join("debug/peft-bench");
    if (o.peer && !selected.is_empty()) || run_gpu {
        // One worker binary for both sides; with the GPU run it also has the wgpu backend.
        let features = if run_gpu { "wgpu" } else { "" };
        let build_args = vec![
            "build",
            "-p",
            "peft-bench",
            "--profile",
            "dev",
            "--bin",
            "peft-bench",
            "--features",
            features,
        ];
        cargo(&build_args, &[])?;
    }

    let mut pairs = Vec::new();
    let mut memory_rows = Vec::new();
    // Each side's instruction sets, as its worker reports them.
    let mut isa: Vec<(String, Value)> = Vec::new();
    if o.peer && !selected.is_empty() {
        // Each workload's peer: Hugging Face PEFT, or AdapterHub (its own venv) for the
        // bottleneck adapters PEFT does not have.
        let needs = |ah: bool| selected.iter().any(|w| adapterhub_peer(w.id) == ah);
        let python = if needs(false) {
            Some(reference_python()?)
        } else {
            None
        };
        let ah_python = if needs(true) {
            Some(adapters_python()?)
        } else {
            None
        };
        let script = workspace_root().join("scripts/bench_peer.py");
        // Our side (`python` None) or a peer's command with `args`, all pinned to the same
        // thread count.
        let side = |python: Option<&PathBuf>, args: &[&str]| {
            let mut c = match python {
                None => Command::new(&bin),
                Some(p) => {
                    let mut c = Command::new(p);
                    c.arg(&script);
                    c
                }
            };
            c.args(args).current_dir(workspace_root());
            c.env("RAYON_NUM_THREADS", THREADS)
                .env("OMP_NUM_THREADS", THREADS)
                .env("PEFT_BENCH_THREADS", THREADS);
            if o.avx2 {
                let env: &[(&str, &str)] = if python.is_none() {
                    &OURS_AVX2_ENV
                } else {
                    &PEER_AVX2_ENV
                };
                c.envs(env.iter().copied());
            }
            c
        };
        isa.push(("peft".into(), isa_report(side(None, &[]), "peft")?));
        if let Some(p) = &python {
            isa.push((
                "PEFT (PyTorch)".into(),
                isa_report(side(Some(p), &[]), "python")?,
            ));
        }
        if let Some(p) = &ah_python {
            isa.push((
                "AdapterHub (PyTorch)".into(),
                isa_report(side(Some(p), &[]), "python (AdapterHub)")?,
            ));
        }
        let peer_of = |id: &str| {
            if adapterhub_peer(id) {
                ah_python.as_ref()
            } else {
                python.as_ref()
            }
        };
        let mut ours = Worker::spawn("peft", side(None, &["serve"]))?;
        let mut peft_peer = match &python {
            Some(p) => Some(Worker::spawn("python", side(Some(p), &["serve"]))?),
            None => None,
        };
        let mut ah_peer = match &ah_python {
            Some(p) => Some(Worker::spawn(
                "python (AdapterHub)",
                side(Some(p), &["serve"]),
            )?),
            None => None,
        };
        pairs = selected
            .iter()
            .map(|&w| Pair {
                workload: w,
                ours: Vec::new(),
                peer: Vec::new(),
                gflop: None,
            })
            .collect();
        for round in 0..o.rounds {
            eprintln!("side by side: round {}/{}", round + 1, o.rounds);
            for p in &mut pairs {
                let n = iterations(p.workload.id);
                let peer = if adapterhub_peer(p.workload.id) {
                    ah_peer.as_mut()
                } else {
                    peft_peer.as_mut()
                }
                .expect("spawned for the selected workloads");
                // Alternate who goes first so neither side always runs on a warmer machine.
                if round % 2 == 0 {
                    p.ours.extend(ours.run(p.workload.id, n)?);
                    p.peer.extend(peer.run(p.workload.id, n)?);
                } else {
                    p.peer.extend(peer.run(p.workload.id, n)?);
                    p.ours.extend(ours.run(p.workload.id, n)?);
                }
            }
        }
        for p in &mut pairs {
            p.gflop = ours.gflop.get(p.workload.id).copied();
        }
        drop((ours, peft_peer, ah_peer));
        for w in selected.iter().filter(|w| w.id.starts_with("train_step/")) {
            eprintln!("peak memory: {}", w.id);
            let mine = memory(side(None, &["memory", w.id]), "peft", w.id)?;
            let theirs = memory(side(peer_of(w.id), &["memory", w.id]), "python", w.id)?;
            memory_rows.push((w.id, mine, theirs));
        }
    }

    let gpu = if !on_device.is_empty() {
        let mut worker = Worker::spawn("peft (wgpu)", {
            let mut c = Command::new(&bin);
            c.args(["serve", "--device", "wgpu"])
                .current_dir(workspace_root())
                .env("RAYON_NUM_THREADS", THREADS);
            c
        })?;
        let mut times: Vec<(&'static Workload, Vec<f64>)> =
            on_device.iter().map(|&w| (w, Vec::new())).collect();
        for round in 0..o.rounds {
            eprintln!("GPU (wgpu): round {}/{}", round + 1, o.rounds);
            for (w, ms) in &mut times {
                ms.extend(worker.run(w.id, gpu_iterations(w.id))?);
            }
        }
        let name = gpu_name.unwrap_or_else(|| "the default adapter (no `nvidia-smi`)".into());
        let peak_gbps = o.gpu_peak.or_else(|| gpu_peak_gbps(&name));
        Some(GpuRun {
            name,
            peak_gbps,
            times,
        })
    } else {
        None
    };

    let report = render(&o, &criterion, &pairs, &memory_rows, &isa, gpu.as_ref());
    std::fs::write(report_dir.join("report.md"), &report)?;
    let results = json!({
        "machine": machine(),
        "isa": isa.iter().map(|(side, v)| json!({"side": side, "report": v})).collect::<Vec<_>>(),
        "criterion_ms": criterion.iter().map(|(id, ms)| json!({"id": id, "median_ms": ms})).collect::<Vec<_>>(),
        "pairs": pairs.iter().map(|p| json!({"id": p.workload.id, "ours_ms": p.ours, "peer_ms": p.peer, "gflop": p.gflop})).collect::<Vec<_>>(),
        "memory_mib": memory_rows.iter().map(|(id, m, t)| json!({"id": id,
            "ours": {"rss": [m.rss_before, m.rss_peak], "alloc": [m.alloc_before, m.alloc_peak]},
            "peer": {"rss": [t.rss_before, t.rss_peak]}})).collect::<Vec<_>>(),
        "gpu": gpu.as_ref().map(|g| json!({
            "name": g.name,
            "peak_gbps": g.peak_gbps,
            "times": g.times.iter().map(|(w, ms)| json!({"id": w.id, "ms": ms})).collect::<Vec<_>>(),
        })),
    });
    std::fs::write(
        report_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let chart = report_dir.join("chart.svg");
    if pairs.is_empty() {
        let rows: Vec<(String, f64)> = criterion.clone();
        bar_chart(
            &rows,
            "median time per iteration (ms, log scale)",
            None,
            &chart,
        )?;
    } else {
        let rows: Vec<(String, f64)> = pairs
            .iter()
            .map(|p| (p.workload.id.to_string(), median(&p.peer) / median(&p.ours)))
            .collect();
        bar_chart(
            &rows,
            "peer time / our time (log scale; right of 1 = we are faster)",
            Some(1.0),
            &chart,
        )?;
    }
    println!("{report}");
    println!("report: {}", report_dir.join("report.md").display());
    Ok(())
}

/// Workloads whose peer is AdapterHub `adapters` (bottleneck adapters; PEFT has none).
fn adapterhub_peer(id: &str) -> bool {
    matches!(
        id,
        "train_step/pfeiffer"
            | "train_step/houlsby"
            | "train_step/parallel_adapter"
            | "train_step/fusion"
    )
}

/// The AdapterHub venv's python: `$PEFT_ADAPTERS_PYTHON`, else the one
/// scripts/adapters_venv.sh creates once.
fn adapters_python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PEFT_ADAPTERS_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/adapters_venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/adapters_venv.sh")?;
    if !out.status.success() {
        bail!("scripts/adapters_venv.sh could not set up the AdapterHub venv");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The reference venv's python (created once by scripts/ref_venv.sh).
fn reference_python() -> Result<PathBuf> {
    let script = workspace_root().join("scripts/ref_venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/ref_venv.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/ref_venv.sh could not set up the reference venv (needs python3 and the package registry)"
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// The GPU section: median time per workload, and for memory-bound work the bandwidth it
/// reaches, against the device's copy and its peak.
fn render_gpu(g: &GpuRun, rounds: usize) -> String {
    let gbps = |w: &Workload, ms: f64| w.bytes as f64 / (ms / 1e3) / 1e9;
    let copy = g
        .times
        .iter()
        .find(|(w, _)| w.id == "device/copy")
        .map(|(w, ms)| gbps(w, median(ms)));
    let peak = match g.peak_gbps {
        Some(p) => format!("peak {p:.0} GB/s"),
        None => "peak unknown: pass `--gpu-peak-gbps`".into(),
    };
    let mut s = format!(
        "## GPU through wgpu: {} ({peak})\n\n{rounds} rounds; medians. Bandwidth = the bytes the work must move \
         (packed codes, scales, f32 output) / time.\n\n| work | median | GB/s | of peak | of device copy |\n|---|---|---|---|---|\n",
        g.name
    );
    for (w, ms) in &g.times {
        let t = median(ms);
        let rate = match w.tokens {
            0 => String::new(),
            n => format!(" ({:.0} tok/s)", n as f64 / (t / 1e3)),
        };
        let (bw, of_peak, of_copy) = if w.bytes == 0 {
            (String::new(), String::new(), String::new())
        } else {
            let b = gbps(w, t);
            let pct = |reference: Option<f64>| {
                reference
                    .map(|r| format!("{:.0}%", 100.0 * b / r))
                    .unwrap_or_default()
            };
            (
                if b < 10.0 {
                    format!("{b:.1}")
                } else {
                    format!("{b:.0}")
                },
                pct(g.peak_gbps),
                pct(copy),
            )
        };
        s += &format!(
            "| `{}`: {} | {}{rate} | {bw} | {of_peak} | {of_copy} |\n",
            w.id,
            w.what,
            fmt_ms(t)
        );
    }
    s + "\n"
}

/// Each training step's dense-product arithmetic set against the products' speed in the same
/// run (the quickest `linear/plain_fwd`: a 512-row product on every thread, the shape of the
/// benchmark model's): the time the products alone would take at that speed, and so the
/// highest ratio to the peer the step could reach if everything else in it took no time.
/// Empty without `linear/plain_fwd` or our arithmetic counts.
fn floor_section(pairs: &[Pair]) -> String {
    let rate = |p: &Pair| Some(p.gflop.filter(|&g| g > 0.0)? / (quickest(&p.ours) / 1e3));
    let Some(peak) = pairs
        .iter()
        .find(|p| p.workload.id == "linear/plain_fwd")
        .and_then(rate)
    else {
        return String::new();
    };
    let mut s = format!(
        "\n### The training steps against the dense products' speed\n\n\
         The products' speed in this run: {peak:.0} GFLOP/s (the quickest `linear/plain_fwd`). \
         GFLOP: the dense products' arithmetic in one of our steps (2 per multiply-add; the \
         attention's products included). Floor: that arithmetic at that speed, the time of the \
         products alone. Ceiling: the peer's quickest step over the floor, the ratio the step \
         could reach if nothing but its products took time (the peer does at least the same \
         arithmetic: the method's products).\n\n\
         | step | GFLOP | ours: quickest, GFLOP/s (of the products' speed) | floor | peer: quickest | ratio (quickest) | ceiling |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for p in pairs
        .iter()
        .filter(|p| p.workload.id.starts_with("train_step/"))
    {
        let (Some(g), Some(r)) = (p.gflop, rate(p)) else {
            continue;
        };
        let (ours, peer) = (quickest(&p.ours), quickest(&p.peer));
        let floor = g / peak * 1e3;
        s += &format!(
            "| `{}` | {g:.1} | {} at {r:.0} ({:.0}%) | {} | {} | {:.2} | {:.2} |\n",
            p.workload.id,
            fmt_ms(ours),
            100.0 * r / peak,
            fmt_ms(floor),
            fmt_ms(peer),
            peer / ours,
            peer / floor
        );
    }
    s
}

fn render(
    o: &Options,
    criterion: &[(String, f64)],
    pairs: &[Pair],
    memory: &[(&str, Memory, Memory)],
    isa: &[(String, Value)],
    gpu: Option<&GpuRun>,
) -> String {
    let mut s = String::new();
    s += "# peft benchmark report\n\n";
    s += &format!(
        "Machine: {}. Build: dev profile (dependencies and peft-bench at opt-level 3).\n\n",
        machine()
    );
    if o.avx2 {
        s += "`--isa avx2`: both sides kept off AVX-512 (ours run with PEFT_CPU_ISA=avx2, \
              which gemm follows too; PyTorch run with ATEN_CPU_CAPABILITY=avx2, \
              MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2).\n\n";
    }
    if !isa.is_empty() {
        s += "Instruction sets each side reported:\n";
        for (side, v) in isa {
            let fields: Vec<String> = v
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            s += &format!("- {side}: {}\n", fields.join(", "));
        }
        s += "\n";
    }
    let what = |id: &str| {
        WORKLOADS
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.what)
            .unwrap_or("")
    };
    let tokens = |id: &str| {
        WORKLOADS
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.tokens)
            .unwrap_or(0)
    };
    if !pairs.is_empty() {
        s += &format!(
            "## Side by side with Hugging Face PEFT 0.21.2 / transformers 5.23 / bitsandbytes 0.50.2 (torch 2.15, CPU)\n\n\
             {} interleaved rounds; medians over every iteration of every round. Ratio = peer time / our time \
             (above 1: we are faster). The last column is the same ratio of each side's quickest iteration: interference from \
             other work on the machine only adds time, so on a shared or virtual machine it shows more steadily what each side's \
             code can do. The bottleneck adapters' and fusion's peer (`train_step/pfeiffer`, `houlsby`, `parallel_adapter`, `fusion`) \
             is AdapterHub `adapters` 1.3.0 on transformers 4.57.6 (PEFT has none).\n\n\
             | work | ours | peer | ratio | quickest: ours / peer (ratio) |\n|---|---|---|---|---|\n",
            o.rounds
        );
        for p in pairs {
            let (a, b) = (median(&p.ours), median(&p.peer));
            let id = p.workload.id;
            let rate = |ms: f64| match tokens(id) {
                0 => String::new(),
                t => format!(" ({:.0} tok/s)", t as f64 / (ms / 1e3)),
            };
            let (qa, qb) = (quickest(&p.ours), quickest(&p.peer));
            s += &format!(
                "| `{id}`: {} | {}{} | {}{} | {:.2} | {} / {} ({:.2}) |\n",
                what(id),
                fmt_ms(a),
                rate(a),
                fmt_ms(b),
                rate(b),
                b / a,
                fmt_ms(qa),
                fmt_ms(qb),
                qb / qa
            );
        }
        let step = |id: &str, peer: bool| {
            pairs
                .iter()
                .find(|p| p.workload.id == id)
                .map(|p| median(if peer { &p.peer } else { &p.ours }))
        };
        if let (Some(lo), Some(fo), Some(lp), Some(fp)) = (
            step("train_step/lora", false),
            step("train_step/full", false),
            step("train_step/lora", true),
            step("train_step/full", true),
        ) {
            s += &format!(
                "| LoRA step time / full fine-tuning step time | {:.2} | {:.2} | | |\n",
                lo / fo,
                lp / fp
            );
        }
        if let (Some(d), Some(c)) = (step("nf4/dequantize", false), step("nf4/copy", false)) {
            s += &format!(
                "| dequantize speed as a fraction of a copy of the same bytes | {:.0}% | ",
                100.0 * c / d
            );
            if let (Some(dp), Some(cp)) = (step("nf4/dequantize", true), step("nf4/copy", true)) {
                s += &format!("{:.0}% | | |\n", 100.0 * cp / dp);
            } else {
                s += "| | |\n";
            }
        }
        s += &floor_section(pairs);
        if !memory.is_empty() {
            s += "\n### Memory of one training step (fresh process each, after two warm-up steps)\n\n\
                  Ours: the allocator's live bytes before the step and their high-water mark during it (reset at its \
                  start), then the resident size. Peer: the resident size only (torch's CPU allocator keeps no \
                  statistics). Resident figures include what an allocator keeps mapped after frees.\n\n\
                  | step | ours: live before / step peak | ours: resident before / peak | peer: resident before / peak | resident peak ratio |\n|---|---|---|---|---|\n";
            for (id, m, t) in memory {
                s += &format!(
                    "| `{id}` | {:.0} / {:.0} MiB | {:.0} / {:.0} MiB | {:.0} / {:.0} MiB | {:.2} |\n",
                    m.alloc_before,
                    m.alloc_peak,
                    m.rss_before,
                    m.rss_peak,
                    t.rss_before,
                    t.rss_peak,
                    t.rss_peak / m.rss_peak
                );
            }
        }
        s += "\n";
    }
    if !criterion.is_empty() {
        s += "## Criterion (ours alone)\n\n| work | median |\n|---|---|\n";
        for (id, ms) in criterion {
            s += &format!("| `{id}`: {} | {} |\n", what(id), fmt_ms(*ms));
        }
        s += "\n";
    }
    if let Some(g) = gpu {
        s += &render_gpu(g, o.rounds);
    }
    s += "Chart: `chart.svg`; raw times: `results.json`.\n";
    s
}

/// Horizontal bars on a log axis, one per row, starting at `baseline` (or the axis start).
fn bar_chart(
    rows: &[(String, f64)],
    x_desc: &str,
    baseline: Option<f64>,
    out: &Path,
) -> Result<()> {
    let values: Vec<f64> = rows
        .iter()
        .map(|r| r.1)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    let lo = values
        .iter()
        .copied()
        .fold(baseline.unwrap_or(f64::MAX), f64::min)
        / 2.0;
    let hi = values
        .iter()
        .copied()
        .fold(baseline.unwrap_or(0.0), f64::max)
        * 2.0;
    let n = rows.len();
    let root = SVGBackend::new(out, (1000, 60 + 28 * n as u32)).into_drawing_area();
    // Row i is drawn at height n - 1 - i so the first row is on top; its name labels the axis.
    let name_at = |y: &f64| -> String {
        let i = n as f64 - 1.0 - y.floor();
        rows.get(i as usize)
            .filter(|_| (0.0..n as f64).contains(&i))
            .map(|r| r.0.clone())
            .unwrap_or_default()
    };
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(260)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..n as f64)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .disable_y_mesh()
            .y_labels(2 * n + 1)
            .y_label_formatter(&|y| {
                if (y.fract() - 0.5).abs() < 1e-6 {
                    name_at(y)
                } else {
                    String::new()
                }
            })
            .y_label_style(("sans-serif", 13))
            .draw()?;
        let start = baseline.unwrap_or(lo);
        for (i, (_, v)) in rows.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            if !(v.is_finite() && *v > 0.0) {
                continue;
            }
            let color = match baseline {
                Some(b) if *v < b => RED.mix(0.6),
                Some(_) => GREEN.mix(0.6),
                None => BLUE.mix(0.5),
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [(start, y + 0.15), (*v, y + 0.85)],
                color.filled(),
            )))?;
            // The value just past the bar's end.
            let value = if baseline.is_some() {
                format!("{v:.2}")
            } else {
                fmt_ms(*v)
            };
            chart.draw_series(std::iter::once(Text::new(
                value,
                (v.max(start) * 1.04, y + 0.7),
                ("sans-serif", 13),
            )))?;
        }
        if let Some(b) = baseline {
            chart.draw_series(LineSeries::new([(b, 0.0), (b, n as f64)], BLACK))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{}: cannot draw the chart: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peak bandwidth by the names `nvidia-smi` prints: specific variants before the family.
    #[test]
    fn gpu_peaks_match_the_most_specific_name() {
        assert_eq!(gpu_peak_gbps("NVIDIA H100 80GB HBM3"), Some(3350.0));
        assert_eq!(gpu_peak_gbps("NVIDIA H100 PCIe"), Some(2000.0));
        assert_eq!(gpu_peak_gbps("NVIDIA H200"), Some(4800.0));
        assert_eq!(gpu_peak_gbps("NVIDIA L40S"), Some(864.0));
        assert_eq!(gpu_peak_gbps("llvmpipe (LLVM 19.1.7, 256 bits)"), None);
    }

    /// A kernel's GB/s is its bytes over its median time, shown against the device copy and
    /// the peak; work that is not memory-bound gets a time only.
    #[test]
    fn gpu_section_reports_bandwidth_against_copy_and_peak() {
        let w = |id: &str| peft_bench::workload(id).unwrap();
        let ms_at = |w: &Workload, gbps: f64| w.bytes as f64 / (gbps * 1e9) * 1e3;
        let (copy, deq, step) = (
            w("device/copy"),
            w("device/dequantize"),
            w("train_step/lora"),
        );
        let name = "NVIDIA H100 80GB HBM3".to_string();
        let times = vec![
            (
                copy,
                vec![
                    ms_at(copy, 2400.0),
                    ms_at(copy, 2500.0),
                    ms_at(copy, 2600.0),
                ],
            ),
            (deq, vec![ms_at(deq, 2000.0)]),
            (step, vec![25.6]),
        ];
        let s = render_gpu(
            &GpuRun {
                peak_gbps: gpu_peak_gbps(&name),
                name,
                times,
            },
            3,
        );
        assert!(
            s.contains("## GPU through wgpu: NVIDIA H100 80GB HBM3 (peak 3350 GB/s)"),
            "{s}"
        );
        assert!(s.contains("| 2500 | 75% | 100% |"), "{s}");
        assert!(s.contains("| 2000 | 60% | 80% |"), "{s}");
        assert!(s.contains("25.6 ms (20000 tok/s) |  |  |  |"), "{s}");
        let unknown = render_gpu(
            &GpuRun {
                name: "some GPU".into(),
                peak_gbps: None,
                times: vec![(copy, vec![ms_at(copy, 7.5)])],
            },
            1,
        );
        assert!(
            unknown.contains("peak unknown: pass `--gpu-peak-gbps`")
                && unknown.contains("| 7.5 |  | 100% |"),
            "{unknown}"
        );
    }

    /// Every row's name labels the axis and its value is printed by its bar.
    #[test]
    fn chart_names_every_row_and_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let rows = vec![
            ("train step LoRA".to_string(), 0.6),
            ("NF4 quantize".to_string(), 3.6),
            ("copy".to_string(), 2.57),
        ];
        bar_chart(&rows, "peer / ours", Some(1.0), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "train step LoRA",
            "NF4 quantize",
            "copy",
            "0.60",
            "3.60",
            "2.57",
        ] {
            assert_eq!(svg.matches(needle).count(), 1, "`{needle}` in the chart");
        }
        // As many rows as the full report has: still one label per row.
        let rows: Vec<(String, f64)> = (0..17)
            .map(|i| (format!("workload-{i:02}"), 1.0 + i as f64))
            .collect();
        bar_chart(&rows, "ms", None, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            rows.iter()
                .all(|(name, _)| svg.matches(name.as_str()).count() == 1),
            "a row label is missing or repeated"
        );
    }
}
