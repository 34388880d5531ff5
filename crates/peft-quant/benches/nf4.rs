//! The 4-bit product on a training shape against the dense f32 matmul. (Quantize, dequantize
//! and the 4-bit linear at batch 1/8/128 are in `cargo xtask bench`, beside bitsandbytes.)

use criterion::{Criterion, criterion_group, criterion_main};
use peft_quant::{QuantType, Quantized4bit};

/// A training-sized product on SmolLM2's MLP shapes (480 token rows, 1536x576 weight), forward
/// and input gradient, against the dense f32 matmul.
fn linear_training(c: &mut Criterion) {
    use burn::tensor::{Device, Tensor, TensorData};
    let (m, n, k) = (480, 1536, 576);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i as f32 * 0.618).sin()) * 0.05)
        .collect();
    let q = Quantized4bit::quantize(&w, &[n, k], QuantType::Nf4, 64, true).unwrap();
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.377).cos()).collect();
    let g: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.213).sin()).collect();
    let device = Device::flex();
    let dense = Tensor::<2>::from_data(TensorData::new(q.dequantize(), [n, k]), &device);
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
    let gt = Tensor::<2>::from_data(TensorData::new(g.clone(), [m, n]), &device);
    let mut grp = c.benchmark_group("linear_480x576x1536");
    grp.sample_size(20);
    grp.bench_function("nf4_forward", |b| {
        b.iter(|| peft_quant::kernel::matmul_4bit(&x, m, &q))
    });
    grp.bench_function("nf4_input_grad", |b| {
        b.iter(|| peft_quant::kernel::matmul_4bit_transposed(&g, m, &q))
    });
    grp.bench_function("dense_forward", |b| {
        b.iter(|| xt.clone().matmul(dense.clone().transpose()).into_data())
    });
    grp.bench_function("dense_input_grad", |b| {
        b.iter(|| gt.clone().matmul(dense.clone()).into_data())
    });
    grp.finish();
}

criterion_group!(benches, linear_training);
criterion_main!(benches);
