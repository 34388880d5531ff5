//! A sparse delta on a linear: trainable values at fixed positions of the weight, the way
//! parameter selection (PaFi, FishMask, Child-Tuning-D; Hugging Face PEFT's `SUPERTUNING`)
//! trains a subset of a frozen weight.
//!
//! The positions are flat indices into the Hugging Face weight `[out, in]` (`o·in + i`), as
//! PEFT's `supertuning_indices` hold them. The forward pass adds `x·Sᵀ` to the base's output,
//! where `S` is zero except `S[o_j, i_j] = v_j`: the same as training those entries of the
//! weight, since the base is frozen and only the values get gradients.
//!
//! On the CPU backend this is a backend operation with its own backward pass
//! ([`SparseDeltaOps`]): it keeps only the input and the `[k]` values for the backward, and
//! computes `∂x = g·S` and `∂v_j = Σ_rows x[·, i_j]·g[·, o_j]` directly, so the memory of a
//! step grows with the number of selected entries, never with the weight. On a dense f32
//! base whose output no scale touches, the layer instead folds the values into a copy of the
//! base's weight ([`SparseDelta::tuned_product`]): one dense product each way in place of the
//! base's product plus the sparse kernels, the copy made again for the backward pass rather
//! than kept. Other devices compose it from `select` / `select_assign`, which autodiff
//! differentiates; that keeps a `[rows, k]` product per layer for the backward.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::flex::FlexTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor,
};
use burn::module::{Module, Param};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};
use peft_core::cpu::{dot, f32_values, flex_tensor, sum_partials};
use peft_core::device::is_cpu;
use peft_core::matmul::DenseProductOps;
use peft_core::params::trainable;
use peft_core::simd_dispatch;
use peft_core::tensors::HostTensor;
use peft_core::{PeftError, Result};
use rayon::prelude::*;

use crate::linear::ADAPTER_DTYPE;

/// The fixed positions of a sparse delta in a weight `[d_out, d_in]`.
#[derive(Debug, PartialEq)]
pub struct Support {
    pub d_out: usize,
    pub d_in: usize,
    /// Flat positions `o·d_in + i` into the Hugging Face weight, in the values' order.
    pub flat: Vec<u32>,
    /// `o_j` of each position.
    rows: Vec<u32>,
    /// `i_j` of each position.
    cols: Vec<u32>,
    /// The entries ordered by `o_j` (then `j`), and by `i_j`: the kernels sum each output's
    /// entries in a local accumulator.
    by_row: Vec<u32>,
    by_col: Vec<u32>,
}

impl Support {
    /// Positions `flat` in a `[d_out, d_in]` weight; `what` names them in errors (a key, a
    /// module path). Positions past the weight are an error; repeated positions add up, as
    /// PEFT's `scatter_add` does.
    pub fn new(d_out: usize, d_in: usize, flat: Vec<u32>, what: &str) -> Result<Self> {
        let numel = d_out * d_in;
        if let Some((j, &p)) = flat.iter().enumerate().find(|(_, p)| **p as usize >= numel) {
            return Err(PeftError::Config(format!(
                "{what}: index {p} (entry {j}) is past the weight's {numel} entries \
                 ([{d_out}, {d_in}]); is the adapter for another base model?"
            )));
        }
        let rows: Vec<u32> = flat.iter().map(|&p| p / d_in as u32).collect();
        let cols: Vec<u32> = flat.iter().map(|&p| p % d_in as u32).collect();
        let order = |key: &[u32]| {
            let mut perm: Vec<u32> = (0..key.len() as u32).collect();
            perm.sort_by_key(|&j| key[j as usize]);
            perm
        };
        let (by_row, by_col) = (order(&rows), order(&cols));
        Ok(Self {
            d_out,
            d_in,
            flat,
            rows,
            cols,
            by_row,
            by_col,
        })
    }

    /// Positions read from an `I32` tensor (`supertuning_indices`).
    pub fn from_host(d_out: usize, d_in: usize, t: &HostTensor, what: &str) -> Result<Self> {
        let mut flat = Vec::with_capacity(t.numel());
        for v in t.i32_values() {
            let p = u32::try_from(v).map_err(|_| {
                PeftError::Config(format!("{what}: negative index {v} in the sparse support"))
            })?;
            flat.push(p);
        }
        if flat.len() != t.numel() || t.shape.len() != 1 {
            return Err(PeftError::Config(format!(
                "{what}: indices must be a 1-d I32 tensor, found {} of shape {:?}",
                t.dtype.name(),
                t.shape
            )));
        }
        Self::new(d_out, d_in, flat, what)
    }

    /// The positions as an `I32` tensor `[k]`.
    pub fn to_host(&self) -> HostTensor {
        let v: Vec<i32> = self.flat.iter().map(|&p| p as i32).collect();
        HostTensor::from_i32(vec![v.len()], &v)
    }

    /// The positions packed: sorted, each the gap from the one before (the first from 0) as
    /// an unsigned LEB128 varint, in a `U8` tensor (about 1.3 bytes per position at 1%
    /// density, against the 4 of [`Support::to_host`]). Also returns the order of the values
    /// that goes with them: `order[j]` is the entry of this support at sorted place `j`.
    pub fn to_packed(&self) -> (HostTensor, Vec<usize>) {
        let mut order: Vec<usize> = (0..self.flat.len()).collect();
        order.sort_by_key(|&j| self.flat[j]);
        let mut bytes = Vec::with_capacity(self.flat.len() * 2);
        let mut last = 0u32;
        for &j in &order {
            let mut gap = self.flat[j] - last;
            last = self.flat[j];
            while gap >= 0x80 {
                bytes.push((gap as u8 & 0x7f) | 0x80);
                gap >>= 7;
            }
            bytes.push(gap as u8);
        }
        (HostTensor::from_bytes(vec![bytes.len()], bytes), order)
    }

    /// Positions read from the `U8` tensor of [`Support::to_packed`]; `what` names it in errors.
    pub fn from_packed(d_out: usize, d_in: usize, t: &HostTensor, what: &str) -> Result<Self> {
        if t.dtype != peft_core::tensors::StoredDtype::U8 || t.shape.len() != 1 {
            return Err(PeftError::Config(format!(
                "{what}: packed indices must be a 1-d U8 tensor, found {} of shape {:?}",
                t.dtype.name(),
                t.shape
            )));
        }
        let mut flat = Vec::new();
        let (mut at, mut gap, mut shift) = (0u64, 0u64, 0u32);
        for (i, &b) in t.bytes.iter().enumerate() {
            // A u32 gap needs at most 5 bytes; past that (or past u32) the data is not ours.
            if shift > 28 {
                return Err(PeftError::Config(format!(
                    "{what}: byte {i} continues a gap beyond 5 bytes (not packed indices)"
                )));
            }
            gap |= u64::from(b & 0x7f) << shift;
            if b & 0x80 != 0 {
                shift += 7;
                continue;
            }
            at += gap;
            if at > u64::from(u32::MAX) {
                return Err(PeftError::Config(format!(
                    "{what}: position {at} (byte {i}) is past any weight"
                )));
            }
            flat.push(at as u32);
            (gap, shift) = (0, 0);
        }
        if shift != 0 {
            return Err(PeftError::Config(format!(
                "{what}: the last gap is cut off (its final byte has the continuation bit)"
            )));
        }
        Self::new(d_out, d_in, flat, what)
    }

    pub fn len(&self) -> usize {
        self.flat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }
}

/// A shared handle to a [`Support`], passed to the backend operation.
#[derive(Clone, Debug)]
pub struct SupportHandle(pub Arc<Support>);

/// Trainable values at the fixed positions of a frozen weight.
#[derive(Module, Debug)]
pub struct SparseDelta {
    /// `[k]`, f32 (PEFT's `supertuning_values`).
    pub values: Param<Tensor<1>>,
    #[module(skip)]
    pub support: SupportHandle,
}

impl SparseDelta {
    /// Values `values` (trainable, f32) at `support`.
    pub fn new(support: Support, values: Tensor<1>) -> Self {
        assert_eq!(values.dims()[0], support.len(), "one value per position");
        Self {
            values: trainable(values.cast(ADAPTER_DTYPE)),
            support: SupportHandle(Arc::new(support)),
        }
    }

    pub fn len(&self) -> usize {
        self.support.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.support.0.is_empty()
    }

    /// `x·Sᵀ` (`[.., in] -> [.., out]`), in the input's dtype.
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(ADAPTER_DTYPE);
        let y = if is_cpu(&x.device()) {
            Tensor::from_dispatch(<Dispatch as SparseDeltaOps>::sparse_delta(
                x.into_dispatch(),
                self.values.val().into_dispatch(),
                self.support.clone(),
            ))
        } else {
            self.delta_composed(x)
        };
        y.cast(dtype)
    }

    /// `x·(W + Sᵀ)` for the frozen burn-layout weight `w` `[in, out]` of the layer this delta
    /// is on: the base's product with the delta folded into a copy of its weight, one dense
    /// product each way instead of the base's product plus this delta's sparse kernels (a
    /// PaFi training step of the benchmark Llama spent about 9% of its samples in those,
    /// observed). `None` where that does not apply (another device, another type than f32, a
    /// weight that trains): then [`delta`](Self::delta) goes beside the base.
    pub fn tuned_product<const D: usize>(&self, x: &Tensor<D>, w: &Tensor<2>) -> Option<Tensor<D>> {
        let f32_on_cpu = is_cpu(&x.device()) && x.dtype() == DType::F32 && w.dtype() == DType::F32;
        if !f32_on_cpu || w.is_require_grad() || D < 2 {
            return None;
        }
        let s = &self.support.0;
        let mut dims = x.dims();
        assert_eq!(
            dims[D - 1],
            s.d_in,
            "input's last dimension does not fit the sparse delta ({} expected)",
            s.d_in
        );
        let rows = dims[..D - 1].iter().product();
        let y = Tensor::<2>::from_dispatch(<Dispatch as SparseDeltaOps>::sparse_tuned_product(
            x.clone().reshape([rows, s.d_in]).into_dispatch(),
            w.clone().into_dispatch(),
            self.values.val().into_dispatch(),
            self.support.clone(),
        ));
        dims[D - 1] = s.d_out;
        Some(y.reshape(dims))
    }

    /// The delta from burn's indexing ops (devices without the host kernel).
    fn delta_composed<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let s = &self.support.0;
        let device = x.device();
        let mut dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let index = |v: &[u32]| {
            let v: Vec<i64> = v.iter().map(|&p| p as i64).collect();
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
        };
        let picked = x.reshape([rows, s.d_in]).select(1, index(&s.cols))
            * self.values.val().unsqueeze::<2>();
        let y = Tensor::<2>::zeros([rows, s.d_out], (&device, ADAPTER_DTYPE)).select_assign(
            1,
            index(&s.rows),
            picked,
            IndexingUpdateOp::Add,
        );
        dims[D - 1] = s.d_out;
        y.reshape(dims)
    }

    /// `w[o_j, i_j] += v_j` (`undo`: `-=`) on a burn-layout weight `[in, out]`; every other
    /// entry keeps its bits.
    pub fn fold_into(&self, w: Tensor<2>, undo: bool) -> Tensor<2> {
        let s = &self.support.0;
        let (device, dtype) = (w.device(), w.dtype());
        let mut data = HostTensor::from_tensor(w).data;
        let values = HostTensor::from_tensor(self.values.val()).data;
        for (j, v) in values.iter().enumerate() {
            // burn's [in, out] layout: entry (o, i) sits at i·out + o.
            let at = s.cols[j] as usize * s.d_out + s.rows[j] as usize;
            if undo {
                data[at] -= v;
            } else {
                data[at] += v;
            }
        }
        Tensor::<2>::from_data(TensorData::new(data, [s.d_in, s.d_out]), &device).cast(dtype)
    }
}

/// The sparse delta as a backend operation (CPU backend and its autodiff).
#[backend_extension(Flex, Autodiff)]
pub trait SparseDeltaOps: Backend {
    /// `y [.., out] = x [.., in] · Sᵀ`, `S[o_j, i_j] = values[j]`.
    fn sparse_delta(
        x: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self>;

    /// `g [.., out] · S -> [.., in]` (the input's gradient).
    fn sparse_delta_transposed(
        g: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self>;

    /// `[k]`: `Σ_rows x[·, i_j]·g[·, o_j]` (the values' gradient).
    fn sparse_delta_values_grad(
        x: FloatTensor<Self>,
        g: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self>;

    /// `x [rows, in] · (W + Sᵀ)` for a frozen burn-layout weight `W` `[in, out]`: the base's
    /// product and the delta's in one dense product.
    fn sparse_tuned_product(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self>;

    /// `g [rows, out] · (W + Sᵀ)ᵀ -> [rows, in]` (the input's gradient of the above).
    fn sparse_tuned_input_grad(
        g: FloatTensor<Self>,
        w: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self>;
}

/// Up to this many rows the kernels loop over rows (generation: one row). Above it they work
/// on blocks of rows transposed, so that each entry is one vectorized `axpy` or dot product
/// over the block's rows instead of a scalar gather per row.
const ROW_LOOP_MAX: usize = 8;

/// Rows per block of the transposed kernels: a block of the input, transposed, stays in the
/// second-level cache.
const BLOCK_ROWS: usize = 128;

/// Rows per block of the values' gradient: each value's dot product over a block ends in a
/// sum across vector lanes, so longer blocks need fewer of them (the two transposed blocks,
/// 1 MiB at 512 features, still fit a second-level cache of 2 MiB). With 256 rows its share of
/// a PaFi step's samples was 3.5%, with 128 3.9% (`perf`, AVX-512, observed once each).
const GRAD_BLOCK_ROWS: usize = 256;

/// `a [rows, cols]` transposed into `out [cols, rows]`: eight source rows at a time, read
/// in order, each pass writing eight adjacent values of every destination row (index
/// arithmetic the compiler proves in bounds; a 16x16 tiling with indices computed per value
/// was a third of the values' gradient's time).
#[inline(always)]
fn transpose_into(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    assert!(a.len() == rows * cols && out.len() == rows * cols);
    if cols == 0 {
        return;
    }
    let full = rows / 8 * 8;
    for r0 in (0..full).step_by(8) {
        let src: [&[f32]; 8] = std::array::from_fn(|k| &a[(r0 + k) * cols..][..cols]);
        for (c, dst) in out.chunks_exact_mut(rows).enumerate() {
            for (d, s) in dst[r0..r0 + 8].iter_mut().zip(src) {
                *d = s[c];
            }
        }
    }
    for r in full..rows {
        for (c, &v) in a[r * cols..][..cols].iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
}

/// One block of rows of [`scatter_rows`]: `dst[r, dst_j] += src[r, src_j]·v_j`, through the
/// transposed block: the entries of one destination column (`order` groups them) are summed
/// as vectorized `axpy`s over the rows into a local accumulator, stored once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scatter_block(
    src: &[f32],
    src_len: usize,
    src_idx: &[u32],
    dst_len: usize,
    dst_idx: &[u32],
    order: &[u32],
    values: &[f32],
    dst: &mut [f32],
) {
    let rows = src.len() / src_len;
    if rows <= ROW_LOOP_MAX {
        for (d, s) in dst.chunks_exact_mut(dst_len).zip(src.chunks_exact(src_len)) {
            for j in 0..values.len() {
                d[dst_idx[j] as usize] += s[src_idx[j] as usize] * values[j];
            }
        }
        return;
    }
    let mut src_t = vec![0f32; src.len()];
    transpose_into(src, rows, src_len, &mut src_t);
    let mut dst_t = vec![0f32; dst.len()];
    let mut acc = [0f32; BLOCK_ROWS];
    let acc = &mut acc[..rows];
    let mut at = 0;
    while at < order.len() {
        let d = dst_idx[order[at] as usize];
        acc.fill(0.0);
        while at < order.len() && dst_idx[order[at] as usize] == d {
            let j = order[at] as usize;
            let (s, v) = (src_idx[j] as usize * rows, values[j]);
            for (o, &x) in acc.iter_mut().zip(&src_t[s..s + rows]) {
                *o += v * x;
            }
            at += 1;
        }
        dst_t[d as usize * rows..][..rows].copy_from_slice(acc);
    }
    transpose_into(&dst_t, dst_len, rows, dst);
}

simd_dispatch! {
    #[allow(clippy::too_many_arguments)]
    fn scatter_block_simd(
        src: &[f32], src_len: usize, src_idx: &[u32], dst_len: usize, dst_idx: &[u32],
        order: &[u32], values: &[f32], dst: &mut [f32],
    ) => scatter_block
}

/// `out[r, dst_j] += src[r, src_j]·v_j` for every row: the forward (`src = x`, `dst = o`) and
/// the input gradient (`src = g`, `dst = i`). Blocks of rows run in parallel; each writes its
/// own rows, so the result does not depend on the thread count.
fn scatter_rows(
    src: &[f32],
    src_len: usize,
    src_idx: &[u32],
    dst_len: usize,
    dst_idx: &[u32],
    order: &[u32],
    values: &[f32],
) -> Vec<f32> {
    let rows = src.len() / src_len.max(1);
    let mut out = vec![0f32; rows * dst_len];
    if src_len == 0 || dst_len == 0 {
        return out;
    }
    out.par_chunks_mut(dst_len * BLOCK_ROWS)
        .zip(src.par_chunks(src_len * BLOCK_ROWS))
        .for_each(|(dst, src)| {
            scatter_block_simd(src, src_len, src_idx, dst_len, dst_idx, order, values, dst)
        });
    out
}

/// One block of rows of the values' gradient: `Σ_rows x[·, i_j]·g[·, o_j]` per entry.
#[inline(always)]
fn values_grad_block(
    x: &[f32],
    d_in: usize,
    g: &[f32],
    d_out: usize,
    rows_idx: &[u32],
    cols_idx: &[u32],
    out: &mut [f32],
) {
    let rows = x.len() / d_in;
    if rows <= ROW_LOOP_MAX {
        for (xr, gr) in x.chunks_exact(d_in).zip(g.chunks_exact(d_out)) {
            for (j, acc) in out.iter_mut().enumerate() {
                *acc += xr[cols_idx[j] as usize] * gr[rows_idx[j] as usize];
            }
        }
        return;
    }
    let (mut x_t, mut g_t) = (vec![0f32; x.len()], vec![0f32; g.len()]);
    transpose_into(x, rows, d_in, &mut x_t);
    transpose_into(g, rows, d_out, &mut g_t);
    for (j, acc) in out.iter_mut().enumerate() {
        let (i, o) = (cols_idx[j] as usize * rows, rows_idx[j] as usize * rows);
        *acc += dot(&x_t[i..i + rows], &g_t[o..o + rows]);
    }
}

simd_dispatch! {
    fn values_grad_block_simd(
        x: &[f32], d_in: usize, g: &[f32], d_out: usize, rows_idx: &[u32], cols_idx: &[u32],
        out: &mut [f32],
    ) => values_grad_block
}

/// `t [.., src_len]` through [`scatter_rows`] to `[.., dst_len]` (the forward and the input
/// gradient are the same operation with the roles of the two dimensions swapped).
fn scatter_op(
    t: FlexTensor,
    values: FlexTensor,
    (src_len, src_idx): (usize, &[u32]),
    (dst_len, dst_idx): (usize, &[u32]),
    order: &[u32],
) -> FlexTensor {
    let mut shape = t.layout().shape().to_vec();
    assert_eq!(
        shape.last(),
        Some(&src_len),
        "input's last dimension does not fit the sparse delta ({src_len} expected)"
    );
    let (t, v) = (f32_values(&t), f32_values(&values));
    let out = scatter_rows(&t, src_len, src_idx, dst_len, dst_idx, order, &v);
    *shape.last_mut().expect("rank >= 1") = dst_len;
    flex_tensor(out, shape, DType::F32)
}

/// `W + Sᵀ` as a new `[in, out]` tensor: a copy of the frozen weight with the values added
/// at their positions (the weight itself is left alone).
fn folded_weight(w: &FlexTensor, values: &FlexTensor, s: &Support) -> FlexTensor {
    assert_eq!(
        w.layout().shape().to_vec(),
        [s.d_in, s.d_out],
        "the weight does not fit the sparse delta"
    );
    let mut data = f32_values(w).into_owned();
    let v = f32_values(values);
    for ((&o, &i), &v) in s.rows.iter().zip(&s.cols).zip(v.iter()) {
        data[i as usize * s.d_out + o as usize] += v;
    }
    flex_tensor(data, [s.d_in, s.d_out], DType::F32)
}

impl SparseDeltaOps for Flex {
    fn sparse_tuned_product(
        x: FlexTensor,
        w: FlexTensor,
        values: FlexTensor,
        support: SupportHandle,
    ) -> FlexTensor {
        let w = folded_weight(&w, &values, &support.0);
        <Flex as DenseProductOps>::dense_product(x, w)
    }

    fn sparse_tuned_input_grad(
        g: FlexTensor,
        w: FlexTensor,
        values: FlexTensor,
        support: SupportHandle,
    ) -> FlexTensor {
        // Folded again rather than kept from the forward pass: a copy of the weight costs
        // less than holding one per layer until the backward pass.
        let w = folded_weight(&w, &values, &support.0);
        <Flex as DenseProductOps>::dense_product_input_grad(g, w)
    }

    fn sparse_delta(x: FlexTensor, values: FlexTensor, support: SupportHandle) -> FlexTensor {
        let s = &support.0;
        scatter_op(x, values, (s.d_in, &s.cols), (s.d_out, &s.rows), &s.by_row)
    }

    fn sparse_delta_transposed(
        g: FlexTensor,
        values: FlexTensor,
        support: SupportHandle,
    ) -> FlexTensor {
        let s = &support.0;
        scatter_op(g, values, (s.d_out, &s.rows), (s.d_in, &s.cols), &s.by_col)
    }

    fn sparse_delta_values_grad(
        x: FlexTensor,
        g: FlexTensor,
        support: SupportHandle,
    ) -> FlexTensor {
        let s = &support.0;
        let (x, g) = (f32_values(&x), f32_values(&g));
        // One partial sum per block of rows, added in block order: the same result whatever
        // the thread count.
        let partials: Vec<Vec<f32>> = x
            .par_chunks(s.d_in * GRAD_BLOCK_ROWS)
            .zip(g.par_chunks(s.d_out * GRAD_BLOCK_ROWS))
            .map(|(xb, gb)| {
                let mut out = vec![0f32; s.len()];
                values_grad_block_simd(xb, s.d_in, gb, s.d_out, &s.rows, &s.cols, &mut out);
                out
            })
            .collect();
        flex_tensor(sum_partials(&partials, s.len()), [s.len()], DType::F32)
    }
}

/// The backward pass of `y = x·Sᵀ` (no weight kept) and of `y = x·(W + Sᵀ)` with `W` frozen
/// (the weight kept): `∂x = g·S` or `g·(W + Sᵀ)ᵀ`, `∂v = Σ_rows x[·, i]·g[·, o]`.
#[derive(Debug)]
struct SparseDeltaBackward;

impl<B: Backend + SparseDeltaOps> Backward<B, 2> for SparseDeltaBackward {
    /// The input (when the values train); the frozen weight, if the product has one, and the
    /// values (when the input needs a gradient); the positions.
    type State = (
        Option<B::FloatTensorPrimitive>,
        Option<(Option<B::FloatTensorPrimitive>, B::FloatTensorPrimitive)>,
        SupportHandle,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, weight_values, support) = ops.state;
        let s2 = support.clone();
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |g| match weight_values.expect("kept for ∂x") {
                (Some(w), values) => B::sparse_tuned_input_grad(g, w, values, support),
                (None, values) => B::sparse_delta_transposed(g, values, support),
            },
            |g| B::sparse_delta_values_grad(x.expect("kept for ∂v"), g, s2),
        );
    }
}

/// `forward(x, values)` on the autodiff backend, keeping for [`SparseDeltaBackward`] the input
/// (when the values train) and, when the input needs a gradient, the frozen weight of a folded
/// product (if any) with the values.
fn tracked_sparse<B: Backend + SparseDeltaOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    values: FloatTensor<Autodiff<B, C>>,
    weight: Option<FloatTensor<B>>,
    support: SupportHandle,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let (x_tracked, v_tracked) = (x.is_tracked(), values.is_tracked());
    let parents = [x.node(), values.node()];
    let (x, values) = (x.into_primitive(), values.into_primitive());
    let y = forward(x.clone(), values.clone());
    match SparseDeltaBackward
        .prepare::<C>(parents)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                v_tracked.then_some(x),
                x_tracked.then_some((weight, values)),
                support,
            );
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

impl<B: Backend + SparseDeltaOps, C: CheckpointStrategy> SparseDeltaOps for Autodiff<B, C> {
    fn sparse_tuned_product(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self> {
        assert!(
            !w.is_tracked(),
            "sparse_tuned_product: the weight must be frozen"
        );
        let w = w.into_primitive();
        tracked_sparse::<B, C>(x, values, Some(w.clone()), support.clone(), |x, values| {
            B::sparse_tuned_product(x, w, values, support)
        })
    }

    fn sparse_tuned_input_grad(
        g: FloatTensor<Self>,
        w: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::sparse_tuned_input_grad(
            g.into_primitive(),
            w.into_primitive(),
            values.into_primitive(),
            support,
        ))
    }

    fn sparse_delta(
        x: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self> {
        tracked_sparse::<B, C>(x, values, None, support.clone(), |x, values| {
            B::sparse_delta(x, values, support)
        })
    }

    fn sparse_delta_transposed(
        g: FloatTensor<Self>,
        values: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::sparse_delta_transposed(
            g.into_primitive(),
            values.into_primitive(),
            support,
        ))
    }

    fn sparse_delta_values_grad(
        x: FloatTensor<Self>,
        g: FloatTensor<Self>,
        support: SupportHandle,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::sparse_delta_values_grad(
            x.into_primitive(),
            g.into_primitive(),
            support,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};
    use proptest::prelude::*;

    /// The dense `[out, in]` matrix of a sparse delta.
    fn dense(d: &SparseDelta) -> Tensor<2> {
        let s = &d.support.0;
        let device = d.values.device();
        let w = Tensor::<2>::zeros([s.d_in, s.d_out], &device);
        d.fold_into(w, false).transpose()
    }

    fn random_support(d_out: usize, d_in: usize, k: usize, seed: u64) -> Support {
        // A deterministic shuffle of all positions, cut to k (unique, in no order).
        let mut all: Vec<u32> = (0..(d_out * d_in) as u32).collect();
        let mut state = seed | 1;
        for i in (1..all.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            all.swap(i, (state % (i as u64 + 1)) as usize);
        }
        all.truncate(k);
        Support::new(d_out, d_in, all, "test").unwrap()
    }

    fn check(d_out: usize, d_in: usize, k: usize, rows: usize, seed: u64, device: &Device) {
        device.seed(seed);
        let support = random_support(d_out, d_in, k, seed);
        let delta = SparseDelta::new(support, Tensor::random([k], Distribution::Default, device));
        let x = Tensor::<3>::random([2, rows, d_in], Distribution::Default, device).require_grad();
        let g = Tensor::<3>::random([2, rows, d_out], Distribution::Default, device);
        let y = delta.delta(x.clone());
        let grads = (y.clone() * g.clone()).sum().backward();
        let (gx, gv) = (
            x.grad(&grads).unwrap(),
            delta.values.val().grad(&grads).unwrap(),
        );
        // The same with the dense matrix: y = x·Sᵀ, ∂S = gᵀ·x gathered at the positions.
        let s = dense(&delta).detach().require_grad();
        let x2 = x.clone().detach().require_grad();
        let y2 = x2.clone().matmul(s.clone().transpose().unsqueeze::<3>());
        let grads2 = (y2.clone() * g).sum().backward();
        let tol = Tolerance::absolute(1e-4);
        y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
        gx.into_data()
            .assert_approx_eq::<f32>(&x2.grad(&grads2).unwrap().into_data(), tol);
        let gs = HostTensor::from_tensor(s.grad(&grads2).unwrap()).data;
        let expected: Vec<f32> = delta
            .support
            .0
            .flat
            .iter()
            .map(|&p| gs[p as usize])
            .collect();
        gv.into_data()
            .assert_approx_eq::<f32>(&TensorData::new(expected, [k]), tol);
    }

    /// The base's product with the delta folded into its weight equals the base's product
    /// plus the delta, in value and in the gradients of the input and the values (repeated
    /// positions included); the weight itself keeps its values.
    #[test]
    fn the_folded_product_is_the_base_plus_the_delta() {
        let device = Device::default().autodiff();
        let (d_out, d_in, rows) = (24, 40, 37);
        let mut support = random_support(d_out, d_in, 60, 11);
        support = Support::new(
            d_out,
            d_in,
            [support.flat.clone(), support.flat[..5].to_vec()].concat(),
            "test",
        )
        .unwrap();
        let k = support.len();
        let delta = SparseDelta::new(support, Tensor::random([k], Distribution::Default, &device));
        let w = Tensor::<2>::random([d_in, d_out], Distribution::Default, &device);
        let before = w.to_data();
        let x = Tensor::<3>::random([2, rows, d_in], Distribution::Default, &device).require_grad();
        let g = Tensor::<3>::random([2, rows, d_out], Distribution::Default, &device);
        let ours = delta
            .tuned_product(&x, &w)
            .expect("f32 on the CPU, a frozen weight");
        let grads = (ours.clone() * g.clone()).sum().backward();
        let x2 = x.clone().detach().require_grad();
        let want = x2.clone().matmul(w.clone().unsqueeze::<3>()) + delta.delta(x2.clone());
        let grads2 = (want.clone() * g).sum().backward();
        let tol = Tolerance::absolute(1e-4);
        ours.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tol);
        x.grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&x2.grad(&grads2).unwrap().into_data(), tol);
        delta
            .values
            .val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&delta.values.val().grad(&grads2).unwrap().into_data(), tol);
        w.to_data().assert_eq(&before, true);
        // A weight that trains is not folded.
        assert!(delta.tuned_product(&x, &w.require_grad()).is_none());
    }

    #[test]
    fn packed_positions_are_sorted_leb128_gaps() {
        let s = Support::new(4, 100, vec![300, 5, 5, 399], "t").unwrap();
        let (t, order) = s.to_packed();
        // Sorted 5, 5, 300, 399: gaps 5, 0, 295 (0x27 | 0x80, then 2) and 99.
        assert_eq!(t.bytes, vec![5, 0, 0xa7, 0x02, 99]);
        assert_eq!(t.dtype, peft_core::tensors::StoredDtype::U8);
        assert_eq!(order, vec![1, 2, 0, 3]);
        let back = Support::from_packed(4, 100, &t, "t").unwrap();
        assert_eq!(back.flat, vec![5, 5, 300, 399]);
    }

    #[test]
    fn bad_packed_positions_are_refused_naming_the_key() {
        let err = |bytes: Vec<u8>, d_out: usize| {
            let t = HostTensor::from_bytes(vec![bytes.len()], bytes);
            Support::from_packed(d_out, 10, &t, "k.supertuning_index_gaps")
                .unwrap_err()
                .to_string()
        };
        let cut = err(vec![5, 0x85], 4);
        assert!(
            cut.contains("k.supertuning_index_gaps") && cut.contains("cut off"),
            "{cut}"
        );
        let long = err(vec![0xff; 6], 4);
        assert!(long.contains("beyond 5 bytes"), "{long}");
        let past = err(vec![39, 1], 4);
        assert!(
            past.contains("index 40") && past.contains("[4, 10]"),
            "{past}"
        );
        let huge = err(
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff, 0xff, 0xff, 0x0f],
            4,
        );
        assert!(huge.contains("past any weight"), "{huge}");
        let i32s = HostTensor::from_i32(vec![2], &[1, 2]);
        let wrong = Support::from_packed(4, 10, &i32s, "k")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("U8") && wrong.contains("I32"), "{wrong}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn packed_positions_read_back_in_sorted_order(
            d_out in 1usize..300, d_in in 1usize..300, frac in 0.0f64..1.0, seed in 0u64..1000,
        ) {
            let k = ((d_out * d_in) as f64 * frac * 0.1) as usize;
            let s = random_support(d_out, d_in, k, seed);
            let (t, order) = s.to_packed();
            let back = Support::from_packed(d_out, d_in, &t, "t").unwrap();
            let expected: Vec<u32> = order.iter().map(|&j| s.flat[j]).collect();
            prop_assert!(expected.windows(2).all(|w| w[0] <= w[1]));
            prop_assert_eq!(back.flat, expected);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn the_host_kernels_match_the_dense_product(
            d_out in 1usize..9, d_in in 1usize..9, frac in 0.05f64..1.0, rows in 1usize..80,
            seed in 0u64..1000,
        ) {
            let k = ((d_out * d_in) as f64 * frac).ceil() as usize;
            check(d_out, d_in, k, rows, seed, &Device::flex().autodiff());
        }
    }

    /// Blocks of rows: several, the last one partial, for the forward and input-gradient
    /// kernels (128 rows a block) and the values' gradient (256).
    #[test]
    fn the_host_kernels_match_the_dense_product_over_many_blocks() {
        check(40, 24, 300, 300, 5, &Device::flex().autodiff());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn transposes_move_every_value(rows in 0usize..40, cols in 0usize..40) {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut out = vec![f32::NAN; rows * cols];
            transpose_into(&a, rows, cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    prop_assert_eq!(out[c * rows + r], a[r * cols + c]);
                }
            }
        }
    }

    #[test]
    fn the_composed_path_matches_the_host_kernels() {
        let device = Device::flex();
        device.seed(3);
        let delta = SparseDelta::new(
            random_support(7, 5, 12, 3),
            Tensor::random([12], Distribution::Default, &device),
        );
        let x = Tensor::<3>::random([2, 3, 5], Distribution::Default, &device);
        delta.delta(x.clone()).into_data().assert_approx_eq::<f32>(
            &delta.delta_composed(x).into_data(),
            Tolerance::absolute(1e-6),
        );
    }

    #[test]
    fn folding_touches_only_the_positions() {
        let device = Device::flex();
        let support = Support::new(3, 4, vec![0, 5, 11], "t").unwrap();
        let delta = SparseDelta::new(support, Tensor::from_floats([1.0, 2.0, 3.0], &device));
        let w = Tensor::<2>::from_floats(
            [
                [0.5, -0.0, 2.0],
                [3.0, 4.0, 5.0],
                [6.0, 7.0, 8.0],
                [9.0, 10.0, 11.0],
            ],
            &device,
        );
        let before = HostTensor::from_tensor(w.clone()).data;
        let after = HostTensor::from_tensor(delta.fold_into(w, false)).data;
        // HF (o, i): 0 -> (0, 0), 5 -> (1, 1), 11 -> (2, 3); burn [in, out] at i·3 + o.
        let changed = [0usize, 4, 11];
        for (at, (b, a)) in before.iter().zip(&after).enumerate() {
            if changed.contains(&at) {
                assert_ne!(b.to_bits(), a.to_bits(), "entry {at}");
            } else {
                assert_eq!(b.to_bits(), a.to_bits(), "entry {at} moved");
            }
        }
    }

    #[test]
    fn positions_past_the_weight_are_refused_with_the_name() {
        let err = Support::new(2, 3, vec![0, 6], "model.layers.0.q_proj")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.0.q_proj") && err.contains("index 6"),
            "{err}"
        );
    }
}
