//! The LoRA layer on a GPU device through wgpu (lavapipe on CI machines without a GPU):
//! forward and backward agree with the CPU device.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Distribution, Tensor, TensorData, Tolerance};
use peft_core::device::device_by_name;
use peft_lora::{LoraInit, LoraLayer, LoraLinear};

fn run(
    device: &Device,
    w: &TensorData,
    x: &TensorData,
    a: &TensorData,
    b: &TensorData,
) -> (TensorData, TensorData, TensorData) {
    let mut layer = LoraLinear::new(Tensor::from_data(w.clone(), device), None);
    layer.add_adapter("default", 4, 8.0, false, 0.0, LoraInit::Default);
    layer
        .set_weights(
            "default",
            Tensor::from_data(a.clone(), device),
            Tensor::from_data(b.clone(), device),
        )
        .unwrap();
    let y = layer.forward(Tensor::<2>::from_data(x.clone(), device));
    let grads = y.clone().powi_scalar(2).sum().backward();
    let adapter = layer.lora("default").unwrap();
    let peft_quant::BaseLinear::Dense(base) = &layer.base else {
        unreachable!()
    };
    assert!(
        base.weight.val().grad(&grads).is_none(),
        "frozen base got a gradient"
    );
    (
        y.into_data(),
        adapter.a.val().grad(&grads).unwrap().into_data(),
        adapter.b.val().grad(&grads).unwrap().into_data(),
    )
}

#[test]
fn lora_forward_backward_on_wgpu_matches_cpu() {
    let cpu = Device::flex();
    let data =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Default, &cpu).into_data();
    let (w, x, a, b) = (data([16, 8]), data([5, 16]), data([16, 4]), data([4, 8]));
    let expected = run(&cpu.clone().autodiff(), &w, &x, &a, &b);
    let gpu = device_by_name("wgpu").unwrap().autodiff();
    let got = run(&gpu, &w, &x, &a, &b);
    // GPU reductions sum in another order: compare relatively (values reach ~1e3).
    let tol = Tolerance::rel_abs(1e-5, 1e-4);
    got.0.assert_approx_eq::<f32>(&expected.0, tol);
    got.1.assert_approx_eq::<f32>(&expected.1, tol);
    got.2.assert_approx_eq::<f32>(&expected.2, tol);
}

/// A LoRA layer over a 4-bit (NF4) base: on wgpu the CubeCL dequantize kernel plus burn's
/// matmul compute what the CPU's tiled 4-bit kernel computes, forward and backward, also for a
/// weight whose size is odd and not a multiple of the block.
#[test]
fn lora_over_a_4bit_base_on_wgpu_matches_cpu() {
    let cpu = Device::flex();
    let gpu = device_by_name("wgpu").unwrap();
    assert!(
        peft_quant::linear::has_4bit_kernel(&gpu),
        "the test must run the CubeCL kernel"
    );
    for (d_in, d_out) in [(64, 32), (63, 33)] {
        let data =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Default, &cpu).into_data();
        let (w, x, a, b) = (
            data([d_in, d_out]),
            data([5, d_in]),
            data([d_in, 4]),
            data([4, d_out]),
        );
        let run = |device: &Device| {
            let mut layer = LoraLinear::new(Tensor::from_data(w.clone(), device), None);
            layer
                .base
                .quantize(peft_quant::QuantSpec::default())
                .unwrap();
            layer.add_adapter("default", 4, 8.0, false, 0.0, LoraInit::Default);
            layer
                .set_weights(
                    "default",
                    Tensor::from_data(a.clone(), device),
                    Tensor::from_data(b.clone(), device),
                )
                .unwrap();
            let x = Tensor::<2>::from_data(x.clone(), device).require_grad();
            let y = layer.forward(x.clone());
            let grads = y.clone().powi_scalar(2).sum().backward();
            let ga = layer
                .lora("default")
                .unwrap()
                .a
                .val()
                .grad(&grads)
                .unwrap()
                .into_data();
            // Merging re-quantizes into a new weight: the device must not reuse the old copy.
            layer.merge("default").unwrap();
            let merged = layer.forward(x.clone().detach()).into_data();
            (
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                ga,
                merged,
            )
        };
        let expected = run(&cpu.clone().autodiff());
        let got = run(&gpu.clone().autodiff());
        let tol = Tolerance::rel_abs(1e-4, 1e-4);
        got.0.assert_approx_eq::<f32>(&expected.0, tol);
        got.1.assert_approx_eq::<f32>(&expected.1, tol);
        got.2.assert_approx_eq::<f32>(&expected.2, tol);
        got.3.assert_approx_eq::<f32>(&expected.3, tol);
    }
}
