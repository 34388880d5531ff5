//! Criterion benchmarks of every workload in `peft_bench::WORKLOADS` on the CPU, one
//! criterion group per id prefix (`train_step/lora` is group `train_step`, function `lora`).
//! `cargo xtask bench` runs them and reads criterion's estimates into its report; alone:
//! `cargo bench -p peft-bench --profile dev --bench hot_paths [-- FILTER]`.

use std::time::Duration;

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use peft_bench::{WORKLOADS, prepare};

/// Large buffers on transparent huge pages (see `peft_core::alloc`).
#[global_allocator]
static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let mut groups: Vec<&str> = WORKLOADS
        .iter()
        .map(|w| w.id.split('/').next().expect("group"))
        .collect();
    groups.dedup();
    for group in groups {
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for w in WORKLOADS
            .iter()
            .filter(|w| w.id.starts_with(&format!("{group}/")))
        {
            let name = &w.id[group.len() + 1..];
            // Set up only when criterion's filter selects this benchmark.
            let mut run: Option<Box<dyn FnMut()>> = None;
            g.bench_function(name, |b| {
                let run =
                    run.get_or_insert_with(|| prepare(w.id, &device).expect("workload set-up"));
                b.iter(|| run())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
