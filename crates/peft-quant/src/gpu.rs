//! The 4-bit product on CubeCL devices (wgpu, cuda): a CubeCL kernel dequantizes the weight on
//! the device, burn's matmul multiplies, and the f32 weight is dropped right after. Used
//! through [`crate::ops::Quant4Ops`], whose backward pass does the same with `W`, so autodiff
//! keeps no f32 weight on the GPU either. The packed codes and the scales are uploaded once per
//! weight and device and stay resident while the weight lives.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};

use crate::blockwise::Quantized4bit;
use crate::ops::{PackedWeight, Quant4Ops};

/// `out[i] = code[nibble i] * scales[i / blocksize]`; eight nibbles per `u32` word (bytes in
/// little-endian order, the first value of each byte in its high nibble).
#[cube(launch)]
fn dequantize_4bit_kernel(packed: &Tensor<u32>, scales: &Tensor<f32>, code: &Tensor<f32>, output: &mut Tensor<f32>, blocksize: u32) {
    let i = ABSOLUTE_POS;
    if i >= output.len() {
        terminate!();
    }
    let word = packed[i / 8];
    let byte = (word >> ((((i / 2) % 4) * 8) as u32)) & 255u32;
    let shift = select(i % 2 == 0, 4u32, 0u32);
    let nibble = (byte >> shift) & 15u32;
    output[i] = code[nibble as usize] * scales[i / blocksize as usize];
}

fn upload(client: &cubecl::client::Client, device: &CubeDevice, bytes: &[u8], len: usize, dtype: DType) -> CubeTensor {
    let handle = client.create_from_slice(bytes);
    CubeTensor::new_contiguous(client.clone(), device.clone(), Shape::new([len]), handle, dtype)
}

/// A weight's packed codes, decoded scales and codebook on one device.
struct Resident {
    weight: Weak<Quantized4bit>,
    packed: CubeTensor,
    scales: CubeTensor,
    code: CubeTensor,
}

/// Device copies by (weight address, device). An entry is valid only while its weight lives
/// (checked through the `Weak`, so a new weight at a reused address is never served a stale
/// copy); entries of dropped weights are pruned at the next upload.
static RESIDENT: LazyLock<Mutex<HashMap<(usize, CubeDevice), Resident>>> = LazyLock::new(Default::default);

/// The device copies of `w` on the device of `like`, uploading them the first time.
fn resident(like: &CubeTensor, w: &Arc<Quantized4bit>) -> (CubeTensor, CubeTensor, CubeTensor) {
    let key = (Arc::as_ptr(w) as usize, like.device.clone());
    let mut map = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = map.get(&key)
        && r.weight.upgrade().is_some_and(|live| Arc::ptr_eq(&live, w))
    {
        return (r.packed.clone(), r.scales.clone(), r.code.clone());
    }
    map.retain(|_, r| r.weight.strong_count() > 0);
    let (client, device) = (&like.client, &like.device);
    let mut words = w.packed.clone();
    words.resize(w.numel().div_ceil(8) * 4, 0);
    let packed = upload(client, device, &words, words.len() / 4, DType::U32);
    let scales: Vec<u8> = w.absmax.values().iter().flat_map(|v| v.to_le_bytes()).collect();
    let scales = upload(client, device, &scales, scales.len() / 4, DType::F32);
    let code: Vec<u8> = w.qtype.code().iter().flat_map(|v| v.to_le_bytes()).collect();
    let code = upload(client, device, &code, 16, DType::F32);
    map.insert(key, Resident { weight: Arc::downgrade(w), packed: packed.clone(), scales: scales.clone(), code: code.clone() });
    (packed, scales, code)
}

/// The weight `[n, k]` in f32 on the device of `like`.
fn dequantize_on_device(like: &CubeTensor, w: &Arc<Quantized4bit>) -> CubeTensor {
    let (client, device) = (&like.client, &like.device);
    let numel = w.numel();
    let (packed, scales, code) = resident(like, w);
    let handle = client.empty(numel * 4);
    let output = CubeTensor::new_contiguous(client.clone(), device.clone(), Shape::new([w.shape[0], w.shape[1]]), handle, DType::F32);
    let cube_dim = CubeDim::new(client, numel);
    let cube_count = calculate_cube_count_elemwise(client, numel, cube_dim);
    dequantize_4bit_kernel::launch(
        client,
        cube_count,
        cube_dim,
        packed.into_tensor_arg(),
        scales.into_tensor_arg(),
        code.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        w.blocksize as u32,
    );
    output
}

impl Quant4Ops for CubeBackend {
    fn matmul_4bit(x: CubeTensor, weight: PackedWeight, transposed: bool) -> CubeTensor {
        let w = dequantize_on_device(&x, &weight.0);
        let (n, k) = (weight.0.shape[0], weight.0.shape[1]);
        let (d_in, d_out) = if transposed { (n, k) } else { (k, n) };
        let rhs = if transposed { w } else { Self::float_transpose(w) };
        let dims = x.meta.shape().to_vec();
        assert_eq!(dims.last(), Some(&d_in), "input's last dimension does not fit the 4-bit weight");
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x2 = Self::float_reshape(x, Shape::new([m, d_in]));
        let y = Self::float_matmul(x2, rhs);
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = d_out;
        Self::float_reshape(y, Shape::from(out_dims))
    }
}
