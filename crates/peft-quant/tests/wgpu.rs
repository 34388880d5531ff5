//! The CubeCL 4-bit kernels on a GPU device through wgpu (lavapipe on CI machines without a
//! GPU), against the CPU kernels: the dequantize kernel, the GEMV (batch up to 4, aligned and
//! odd row lengths, more outputs than one grid dimension holds) and the dequantize-then-matmul
//! path, in f32 and half precision.
#![cfg(feature = "wgpu")]

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData, Tolerance};
use peft_core::device::device_by_name;
use peft_quant::linear::has_4bit_kernel;
use peft_quant::{Linear4bit, QuantType, Quantized4bit};

fn gpu() -> Device {
    let gpu = device_by_name("wgpu").unwrap();
    assert!(
        has_4bit_kernel(&gpu),
        "the test must run the CubeCL kernels"
    );
    gpu
}

fn layer(n: usize, k: usize, qtype: QuantType, blocksize: usize, device: &Device) -> Linear4bit {
    let cpu = Device::flex();
    cpu.seed(n as u64 * 31 + k as u64);
    let w = Tensor::<1>::random([n * k], Distribution::Normal(0.0, 0.5), &cpu).into_data();
    let q = Quantized4bit::quantize(
        w.as_slice::<f32>().unwrap(),
        &[n, k],
        qtype,
        blocksize,
        true,
    )
    .unwrap();
    Linear4bit::new(q, None, device.clone()).unwrap()
}

fn input(m: usize, k: usize) -> TensorData {
    Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &Device::flex()).into_data()
}

/// An NF4 `[n, k]` layer (blocks of 64, the same weights on every device) applied to `x`.
fn nf4_forward(n: usize, k: usize, x: Tensor<2>) -> Tensor<2> {
    layer(n, k, QuantType::Nf4, 64, &x.device()).forward(x)
}

#[test]
fn dequantize_kernel_matches_the_host_bit_for_bit() {
    let gpu = gpu();
    // 33x63 takes the value-by-value kernel, the others (whole words) the word kernel; 40x1000
    // leaves the last cube part-empty.
    for (n, k, qtype, blocksize) in [
        (33, 63, QuantType::Nf4, 64),
        (16, 256, QuantType::Fp4, 128),
        (40, 1000, QuantType::Nf4, 64),
    ] {
        let l = layer(n, k, qtype, blocksize, &gpu);
        let on_gpu = l.dequantized(&gpu).into_data();
        assert_eq!(on_gpu.shape().to_vec(), vec![n, k]);
        assert_eq!(
            on_gpu.as_slice::<f32>().unwrap(),
            l.weight_hf().data.as_slice(),
            "{n}x{k} {qtype:?}"
        );
    }
}

/// Batches of 1 to 4 rows take the GEMV (which decodes each weight once for all of them), 5 rows
/// the dequantize-then-matmul path; rows of 1024 make each GEMV thread stride several times, 63
/// takes the value-by-value path. Neither 42 nor 33 outputs fill the last GEMV cube (4 outputs
/// each).
#[test]
fn forward_matches_the_cpu_kernel_on_both_gpu_paths() {
    let (cpu, gpu) = (Device::flex(), gpu());
    for (n, k) in [(42, 1024), (33, 63)] {
        for m in [1, 2, 3, 4, 5] {
            let x = input(m, k);
            let expected = nf4_forward(n, k, Tensor::from_data(x.clone(), &cpu));
            let got = nf4_forward(n, k, Tensor::from_data(x, &gpu));
            got.into_data()
                .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::rel_abs(1e-4, 1e-4));
        }
    }
}

/// More outputs than one grid dimension holds (65535 cubes of 4 outputs): the GEMV spills into
/// a second grid dimension and still writes every output once.
#[test]
fn gemv_covers_outputs_beyond_one_grid_dimension() {
    let (cpu, gpu) = (Device::flex(), gpu());
    let (n, k) = (65535 * 4 + 70, 16);
    let x = input(1, k);
    let expected = nf4_forward(n, k, Tensor::from_data(x.clone(), &cpu));
    let got = nf4_forward(n, k, Tensor::from_data(x, &gpu));
    got.into_data()
        .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::rel_abs(1e-4, 1e-4));
}

/// A half-precision input computes in its own type on both paths (the GEMV sums in f32) and
/// returns that type: f16 always (lavapipe has it), bf16 where the device supports it.
#[test]
fn half_precision_inputs_compute_in_their_own_type() {
    let (cpu, gpu) = (Device::flex(), gpu());
    let (n, k) = (48, 256);
    assert!(
        gpu.supports_dtype(DType::F16),
        "the wgpu device must hold f16"
    );
    let dtypes: Vec<DType> = [DType::F16, DType::BF16]
        .into_iter()
        .filter(|d| gpu.supports_dtype(*d))
        .collect();
    eprintln!("half-precision dtypes on this device: {dtypes:?}");
    for dtype in dtypes {
        for m in [1, 3, 6] {
            let x = input(m, k);
            let expected = nf4_forward(n, k, Tensor::from_data(x.clone(), &cpu));
            let x = Tensor::<2>::from_data(x, &gpu).cast(dtype);
            assert_eq!(x.dtype(), dtype);
            let got = nf4_forward(n, k, x);
            assert_eq!(got.dtype(), dtype, "batch {m}");
            // f16 keeps ~3 decimal digits, bf16 ~2; outputs reach ~30.
            let tol = if dtype == DType::F16 {
                Tolerance::rel_abs(1e-2, 5e-2)
            } else {
                Tolerance::rel_abs(2e-2, 2e-1)
            };
            got.into_data()
                .convert_dtype(DType::F32)
                .assert_approx_eq::<f32>(&expected.into_data(), tol);
        }
    }
}
