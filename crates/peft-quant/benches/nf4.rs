//! NF4 quantize/dequantize throughput on a 4096x4096 f32 matrix (the size of the bitsandbytes
//! comparison in shared DESIGN.md).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peft_quant::{QuantType, Quantized4bit};

fn bench(c: &mut Criterion) {
    let n = 4096 * 4096;
    let data: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618).sin()) * 0.05).collect();
    let mut g = c.benchmark_group("nf4_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("quantize_double_quant", |b| {
        b.iter(|| Quantized4bit::quantize(&data, &[4096, 4096], QuantType::Nf4, 64, true).unwrap())
    });
    let q = Quantized4bit::quantize(&data, &[4096, 4096], QuantType::Nf4, 64, true).unwrap();
    g.bench_function("dequantize_f32", |b| b.iter(|| q.dequantize()));
    let src = vec![1u8; n * 4];
    g.bench_function("memcpy_same_output_bytes", |b| b.iter(|| src.clone()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
