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

/// `x [m, 4096] · Wᵀ` with W 4096x4096: the tiled 4-bit kernel against burn's dense f32 matmul
/// on the same device (the weight already dequantized).
fn linear(c: &mut Criterion) {
    use burn::tensor::{Device, Tensor, TensorData};
    let (n, k) = (4096, 4096);
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32 * 0.618).sin()) * 0.05).collect();
    let q = Quantized4bit::quantize(&w, &[n, k], QuantType::Nf4, 64, true).unwrap();
    let device = Device::flex();
    let dense_t = Tensor::<2>::from_data(TensorData::new(q.dequantize(), [n, k]), &device).transpose();
    let mut g = c.benchmark_group("linear_4096x4096");
    g.sample_size(10);
    for m in [1usize, 8, 128] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i as f32 * 0.377).cos())).collect();
        g.bench_function(format!("nf4_batch{m}"), |b| b.iter(|| peft_quant::kernel::matmul_4bit(&x, m, &q)));
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
        g.bench_function(format!("dense_f32_batch{m}"), |b| {
            b.iter(|| xt.clone().matmul(dense_t.clone()).into_data())
        });
    }
    g.finish();
}

/// A training-sized product on SmolLM2's MLP shapes (480 token rows, 1536x576 weight), forward
/// and input gradient, against the dense f32 matmul.
fn linear_training(c: &mut Criterion) {
    use burn::tensor::{Device, Tensor, TensorData};
    let (m, n, k) = (480, 1536, 576);
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32 * 0.618).sin()) * 0.05).collect();
    let q = Quantized4bit::quantize(&w, &[n, k], QuantType::Nf4, 64, true).unwrap();
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32 * 0.377).cos())).collect();
    let g: Vec<f32> = (0..m * n).map(|i| ((i as f32 * 0.213).sin())).collect();
    let device = Device::flex();
    let dense = Tensor::<2>::from_data(TensorData::new(q.dequantize(), [n, k]), &device);
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
    let gt = Tensor::<2>::from_data(TensorData::new(g.clone(), [m, n]), &device);
    let mut grp = c.benchmark_group("linear_480x576x1536");
    grp.sample_size(20);
    grp.bench_function("nf4_forward", |b| b.iter(|| peft_quant::kernel::matmul_4bit(&x, m, &q)));
    grp.bench_function("nf4_input_grad", |b| b.iter(|| peft_quant::kernel::matmul_4bit_transposed(&g, m, &q)));
    grp.bench_function("dense_forward", |b| b.iter(|| xt.clone().matmul(dense.clone().transpose()).into_data()));
    grp.bench_function("dense_input_grad", |b| b.iter(|| gt.clone().matmul(dense.clone()).into_data()));
    grp.finish();
}

criterion_group!(benches, bench, linear, linear_training);
criterion_main!(benches);
