//! `peft-bench`: runs the workloads of [`peft_bench`] for `cargo xtask bench`.
//!
//! - `peft-bench serve [--device cpu|wgpu]`: reads `ID ITERATIONS` lines on stdin and answers
//!   each with one JSON line `{"id": .., "ms": [..], "gflop": ..}`, the time of every
//!   iteration and the dense products' arithmetic in one (`peft_core::matmul::multiply_adds`;
//!   0 on the GPU, whose products do not go through it). A workload
//!   is set up (and run once to warm up) on its first request and kept for later ones, so
//!   `xtask` can interleave rounds with the Python peer, which speaks the same protocol.
//! - `peft-bench memory ID [--device ..]`: in this fresh process, the resident memory before
//!   and the peak during one iteration, as one JSON line.
//! - `peft-bench list`: the workload ids.
//! - `peft-bench isa`: the instruction sets the processor has, our kernels use
//!   (`PEFT_CPU_ISA` caps them) and the dense products use, as one JSON line.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use peft_bench::{all_workloads, measure_memory, prepare};
use peft_core::device::device_by_name;

/// Large buffers on transparent huge pages (see `peft_core::alloc`).
#[global_allocator]
static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;

fn device_arg(args: &[String]) -> Result<burn::tensor::Device> {
    let name = match args.iter().position(|a| a == "--device") {
        Some(i) => args.get(i + 1).context("--device needs a name")?.as_str(),
        None => "cpu",
    };
    Ok(device_by_name(name)?)
}

fn serve(args: &[String]) -> Result<()> {
    let device = device_arg(args)?;
    let mut ready: HashMap<String, Box<dyn FnMut()>> = HashMap::new();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut parts = line.split_whitespace();
        let (Some(id), Some(iters)) = (parts.next(), parts.next()) else {
            bail!("expected `ID ITERATIONS`, got `{line}`");
        };
        let iters: usize = iters
            .parse()
            .with_context(|| format!("iterations in `{line}`"))?;
        if !ready.contains_key(id) {
            let mut run = prepare(id, &device)?;
            run();
            ready.insert(id.to_string(), run);
        }
        let run = ready.get_mut(id).expect("prepared above");
        let multiply_adds = peft_core::matmul::multiply_adds();
        let ms: Vec<f64> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        // The dense products' arithmetic per iteration (2 flops a multiply-add).
        let gflop = (peft_core::matmul::multiply_adds() - multiply_adds) as f64 * 2.0
            / iters.max(1) as f64
            / 1e9;
        writeln!(
            out,
            "{}",
            serde_json::json!({ "id": id, "ms": ms, "gflop": gflop })
        )?;
        out.flush()?;
    }
    Ok(())
}

fn main() -> Result<()> {
    // Nothing has run in parallel yet, so the pool does not exist.
    peft_core::cpu::join_thread_pool().context("joining the thread pool")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("memory") => {
            let id = args.get(1).context("memory needs a workload id")?;
            let m = measure_memory(id, &device_arg(&args[2..])?)?;
            println!(
                "{}",
                serde_json::json!({ "id": id, "rss_before": m.rss_before, "rss_peak": m.rss_peak,
                    "alloc_before": m.alloc_before, "alloc_peak": m.alloc_peak })
            );
            Ok(())
        }
        Some("isa") => {
            use peft_core::cpu::{Isa, gemm_isa, isa};
            println!(
                "{}",
                serde_json::json!({ "processor": Isa::detected().name(), "own kernels": isa().name(),
                    "dense products (gemm)": gemm_isa().name() })
            );
            Ok(())
        }
        Some("list") => {
            for w in all_workloads() {
                println!("{}\t{}", w.id, w.what);
            }
            Ok(())
        }
        _ => bail!("usage: peft-bench <serve [--device D] | memory ID [--device D] | list>"),
    }
}
