//! The 4-bit product on CubeCL devices (wgpu, cuda), in the float type of the input (f32, f16,
//! bf16). Up to [`GEMV_MAX_ROWS`] input rows (generation), a GEMV kernel multiplies straight from
//! the packed codes; larger batches (training) dequantize the weight on the device with a CubeCL
//! kernel, multiply with burn's matmul and drop the dense weight right after. Used
//! through [`crate::ops::Quant4Ops`], whose backward pass does the same with `W`, so autodiff
//! keeps no dense weight on the GPU either. The packed codes and the scales are uploaded once per
//! weight and device and stay resident while the weight lives.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};

use crate::blockwise::Quantized4bit;
use crate::ops::{PackedWeight, Quant4Ops};

/// The code index of value `i`: eight nibbles per `u32` word (bytes in little-endian order,
/// the first value of each byte in its high nibble).
#[cube]
fn nibble(packed: &Tensor<u32>, i: usize) -> usize {
    let word = packed[i / 8];
    let shift = ((i / 2) % 4) * 8 + select(i % 2 == 0, 4usize, 0usize);
    ((word >> shift as u32) & 15u32) as usize
}

/// `out[i] = code[nibble i] * scales[i / blocksize]`, in the float type `F` of the output.
#[cube(launch)]
fn dequantize_4bit_kernel<F: Float>(
    packed: &Tensor<u32>,
    scales: &Tensor<f32>,
    code: &Tensor<f32>,
    output: &mut Tensor<F>,
    blocksize: u32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= output.len() {
        terminate!();
    }
    output[i] = F::cast_from(code[nibble(packed, i)] * scales[i / blocksize as usize]);
}

/// The same for whole words: each thread decodes one `u32` of packed codes (8 values, one scale
/// block, since block sizes are multiples of 8) and writes them as `8 / N` vectors of `N`. Per
/// value this is one shift, one mask and one table read; the element kernel above also divides
/// by the block size and re-reads the word for each of its 8 values.
#[cube(launch)]
fn dequantize_words_kernel<F: Float, N: Size>(
    packed: &Tensor<u32>,
    scales: &Tensor<f32>,
    code: &Tensor<f32>,
    output: &mut Tensor<Vector<F, N>>,
    blocksize: u32,
    #[define(F)] _dtype: ElemType,
) {
    let w = ABSOLUTE_POS;
    if w >= packed.len() {
        terminate!();
    }
    let word = packed[w];
    let scale = scales[w * 8 / blocksize as usize];
    // Comptime: the vector size is fixed at launch.
    let n = N::value();
    let per_word = comptime!(8 / n);
    #[unroll]
    for v in 0..per_word {
        let mut out = Vector::<F, N>::empty();
        #[unroll]
        for e in 0..n {
            // Value `i` of the word sits in byte i / 2, high nibble first.
            let i = comptime!(v * n + e);
            let shift = comptime!(((i / 2) * 8 + (1 - i % 2) * 4) as u32);
            out.insert(
                e,
                F::cast_from(code[((word >> shift) & 15u32) as usize] * scale),
            );
        }
        output[w * per_word + v] = out;
    }
}

/// The small-batch product `out[r, j] = Σ_c x[r, c] · W[j, c]` for all `rows` input rows
/// straight from the packed codes. Each cube computes [`GEMV_OUTPUTS`] consecutive outputs
/// `j0..j0 + GEMV_OUTPUTS` (cube number from x and y of the grid): its threads stride over the
/// rows of `W`, read each value of `x` once for all those outputs, decode each word of codes
/// once for every input row and sum in f32 (one accumulator per row and output), then reduce in
/// shared memory. With `aligned` (`k` a multiple of 8) each thread decodes whole words, and one
/// word never straddles two scale blocks (block sizes are multiples of 8); otherwise it decodes
/// value by value.
#[cube(launch)]
fn gemv_4bit_kernel<F: Float>(
    x: &Tensor<F>,
    packed: &Tensor<u32>,
    scales: &Tensor<f32>,
    code: &Tensor<f32>,
    output: &mut Tensor<F>,
    n: u32,
    k: u32,
    blocksize: u32,
    #[comptime] rows: usize,
    #[comptime] aligned: bool,
    #[define(F)] _dtype: ElemType,
) {
    let outs = comptime!(GEMV_OUTPUTS);
    let j0 = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * outs;
    let (n, k, blocksize) = (n as usize, k as usize, blocksize as usize);
    let t = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    // acc[r * outs + o]: input row r against output j0 + o.
    let mut acc = Array::<f32>::new(comptime!(rows * GEMV_OUTPUTS));
    #[unroll]
    for i in 0..rows * outs {
        acc[i] = 0.0f32;
    }
    // Outputs past n (the last cube) are computed from row n - 1 and never written, so every
    // thread runs the same loop and reaches the barriers below.
    if aligned {
        let words = k / 8;
        let mut w = t;
        while w < words {
            let mut xs = Array::<f32>::new(comptime!(rows * 8));
            #[unroll]
            for r in 0..rows {
                #[unroll]
                for e in 0..8usize {
                    xs[r * 8 + e] = f32::cast_from(x[r * k + w * 8 + e]);
                }
            }
            #[unroll]
            for o in 0..outs {
                let j = select(j0 + o < n, j0 + o, n - 1);
                let word = packed[j * words + w];
                let scale = scales[(j * k + w * 8) / blocksize];
                let mut weights = Array::<f32>::new(8usize);
                #[unroll]
                for e in 0..8u32 {
                    let shift = (e / 2) * 8 + (1 - e % 2) * 4;
                    weights[e as usize] = code[((word >> shift) & 15u32) as usize];
                }
                #[unroll]
                for r in 0..rows {
                    let mut part = 0.0f32;
                    #[unroll]
                    for e in 0..8usize {
                        part += weights[e] * xs[r * 8 + e];
                    }
                    acc[r * outs + o] += part * scale;
                }
            }
            w += threads;
        }
    } else {
        let mut c = t;
        while c < k {
            #[unroll]
            for o in 0..outs {
                let i = select(j0 + o < n, j0 + o, n - 1) * k + c;
                let weight = code[nibble(packed, i)] * scales[i / blocksize];
                #[unroll]
                for r in 0..rows {
                    acc[r * outs + o] += weight * f32::cast_from(x[r * k + c]);
                }
            }
            c += threads;
        }
    }
    // One slice of GEMV_THREADS partial sums per (row, output).
    let mut sum =
        Shared::<[f32]>::new_slice(comptime!(GEMV_THREADS as usize * rows * GEMV_OUTPUTS));
    #[unroll]
    for i in 0..rows * outs {
        sum[i * threads + t] = acc[i];
    }
    sync_cube();
    let mut half = threads / 2;
    while half > 0 {
        if t < half {
            #[unroll]
            for i in 0..rows * outs {
                sum[i * threads + t] += sum[i * threads + t + half];
            }
        }
        sync_cube();
        half /= 2;
    }
    if t < rows * outs {
        let (r, o) = (t / outs, t % outs);
        if j0 + o < n {
            output[r * n + j0 + o] = F::cast_from(sum[t * threads]);
        }
    }
}

/// Threads per GEMV cube (a power of two: the reduction halves it).
const GEMV_THREADS: u32 = 64;
/// Outputs per GEMV cube: each value of `x` a thread reads serves this many rows of `W`.
const GEMV_OUTPUTS: usize = 4;
/// Largest number of input rows the GEMV serves; larger batches dequantize once and multiply.
const GEMV_MAX_ROWS: usize = 4;
/// Cubes per grid dimension that every runtime accepts (WebGPU's minimum limit).
const MAX_CUBES_PER_DIM: usize = 65535;

fn upload(
    client: &cubecl::client::Client,
    device: &CubeDevice,
    bytes: &[u8],
    len: usize,
    dtype: DType,
) -> CubeTensor {
    let handle = client.create_from_slice(bytes);
    CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        Shape::new([len]),
        handle,
        dtype,
    )
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
static RESIDENT: LazyLock<Mutex<HashMap<(usize, CubeDevice), Resident>>> =
    LazyLock::new(Default::default);

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
    let scales: Vec<u8> = w
        .absmax
        .values()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let scales = upload(client, device, &scales, scales.len() / 4, DType::F32);
    let code: Vec<u8> = w
        .qtype
        .code()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let code = upload(client, device, &code, 16, DType::F32);
    map.insert(
        key,
        Resident {
            weight: Arc::downgrade(w),
            packed: packed.clone(),
            scales: scales.clone(),
            code: code.clone(),
        },
    );
    (packed, scales, code)
}

/// The weight `[n, k]` on the device and in the float dtype of `like`.
fn dequantize_on_device(like: &CubeTensor, w: &Arc<Quantized4bit>) -> CubeTensor {
    let (client, device) = (&like.client, &like.device);
    let numel = w.numel();
    let (packed, scales, code) = resident(like, w);
    let output = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([w.shape[0], w.shape[1]]),
        like.dtype,
    );
    if numel % 8 == 0 {
        // Whole words (every real layer): the widest store the device likes that divides 8.
        let vector = client
            .io_optimized_vector_sizes(like.dtype.size())
            .filter(|s| 8 % s == 0)
            .max()
            .unwrap_or(1);
        let words = numel / 8;
        let cube_dim = CubeDim::new(client, words);
        dequantize_words_kernel::launch(
            client,
            calculate_cube_count_elemwise(client, words, cube_dim),
            cube_dim,
            vector,
            packed.into_tensor_arg(),
            scales.into_tensor_arg(),
            code.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            w.blocksize as u32,
            dtype_to_storage_type(like.dtype),
        );
        return output;
    }
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
        dtype_to_storage_type(like.dtype),
    );
    output
}

/// `x [m, k] · Wᵀ -> [m, n]` by the GEMV kernel (`x` contiguous).
fn gemv_4bit(x: CubeTensor, w: &Arc<Quantized4bit>) -> CubeTensor {
    let (client, device) = (x.client.clone(), x.device.clone());
    let (m, n, k) = (x.meta.shape()[0], w.shape[0], w.shape[1]);
    let (packed, scales, code) = resident(&x, w);
    let output = empty_device_contiguous_dtype(client.clone(), device, Shape::new([m, n]), x.dtype);
    let cubes = n.div_ceil(GEMV_OUTPUTS);
    let (cubes_x, cubes_y) = (
        cubes.min(MAX_CUBES_PER_DIM),
        cubes.div_ceil(MAX_CUBES_PER_DIM),
    );
    let dtype = dtype_to_storage_type(x.dtype);
    gemv_4bit_kernel::launch(
        &client,
        CubeCount::Static(cubes_x as u32, cubes_y as u32, 1),
        CubeDim::new_1d(GEMV_THREADS),
        x.into_tensor_arg(),
        packed.into_tensor_arg(),
        scales.into_tensor_arg(),
        code.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        n as u32,
        k as u32,
        w.blocksize as u32,
        m,
        k % 8 == 0,
        dtype,
    );
    output
}

impl Quant4Ops for CubeBackend {
    fn matmul_4bit(x: CubeTensor, weight: PackedWeight, transposed: bool) -> CubeTensor {
        let (n, k) = (weight.0.shape[0], weight.0.shape[1]);
        let (d_in, d_out) = if transposed { (n, k) } else { (k, n) };
        let dims = x.meta.shape().to_vec();
        assert_eq!(
            dims.last(),
            Some(&d_in),
            "input's last dimension does not fit the 4-bit weight"
        );
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x2 = Self::float_reshape(x, Shape::new([m, d_in]));
        let y = if !transposed && m <= GEMV_MAX_ROWS {
            // Reads the packed weight once for all rows: no f32 weight is written at all.
            gemv_4bit(into_contiguous(x2), &weight.0)
        } else {
            let w = dequantize_on_device(&x2, &weight.0);
            let rhs = if transposed {
                w
            } else {
                Self::float_transpose(w)
            };
            Self::float_matmul(x2, rhs)
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = d_out;
        Self::float_reshape(y, Shape::from(out_dims))
    }

    fn dequantize_4bit(like: CubeTensor, weight: PackedWeight) -> CubeTensor {
        dequantize_on_device(&like, &weight.0)
    }
}
