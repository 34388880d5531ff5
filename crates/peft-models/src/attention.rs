//! Attention, `softmax(scale · Q·Kᵀ + key_bias)·V` over the keys each query may see, as one
//! operation: a decoder's causal attention ([`causal_attention`]) and an encoder's, where every
//! query sees every key ([`encoder_attention`]).
//!
//! Composed from burn ops it is a copy of each of Q, K and V into heads-first layout (and of K
//! and V once more per query head under grouped-query attention), two batched products over
//! every (query, key) pair, the causal softmax, and a copy of the output back into the
//! projections' layout, with about twice that backward. On the CPU this operation reads Q, K
//! and V where they are (any strides), maps each query head to its key/value head, writes the
//! output straight into `[batch, seq, heads, head_dim]` memory, and multiplies only the blocks
//! of rows and keys a query can see: with 128 queries in blocks of 32, 5/8 of the square.
//! Autodiff keeps the attention weights (as before) and the three inputs. Other devices use
//! the burn composition.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor, TensorData};
use peft_core::cpu::{dot, no_gradient, softmax_in_place, zeros};
use peft_core::device::is_cpu;
use peft_core::matmul::product_into;
use peft_core::simd_dispatch;
use rayon::prelude::*;

use crate::causal_softmax::causal_softmax;

/// Attention of queries `q` `[batch, heads, s, head_dim]` over keys `k` and values `v`
/// `[batch, kv_heads, t, head_dim]` (`t ≥ s`; `heads` a multiple of `kv_heads`, query head `i`
/// reading key/value head `i / (heads / kv_heads)`): query `i` sees keys `0..=i + t - s` (the
/// queries are the last ones of the sequence, as with a KV cache), each score scaled by `scale`
/// and shifted by `key_bias[batch, key]` when given (e.g. a large negative number on padding).
/// Returns `[batch, heads, s, head_dim]`; differentiable in `q`, `k` and `v`.
///
/// # Panics
/// When the shapes do not fit together as above.
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
    scale: f64,
) -> Tensor<4> {
    attention(q, k, v, key_bias, scale, true)
}

/// The same as [`causal_attention`] with every query seeing every key (an encoder's attention,
/// e.g. BERT's with its padding mask as the key bias).
///
/// # Panics
/// When the shapes do not fit together as for [`causal_attention`].
pub fn encoder_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
    scale: f64,
) -> Tensor<4> {
    attention(q, k, v, key_bias, scale, false)
}

fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
    scale: f64,
    causal: bool,
) -> Tensor<4> {
    let [b, h, s, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    assert!(
        k.dims() == v.dims()
            && k.dims()[0] == b
            && k.dims()[3] == d
            && kvh > 0
            && h % kvh == 0
            && s <= t
            && key_bias.as_ref().is_none_or(|m| m.dims() == [b, t]),
        "attention: queries {:?}, keys {:?}, values {:?}, key bias {:?}",
        q.dims(),
        k.dims(),
        v.dims(),
        key_bias.as_ref().map(|m| m.dims())
    );
    let f32_on_cpu = is_cpu(&q.device())
        && [q.dtype(), k.dtype(), v.dtype()]
            .iter()
            .all(|&t| t == DType::F32);
    if !f32_on_cpu {
        return composed(q, k, v, key_bias, scale, causal);
    }
    let (q, k, v, scale) = (
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale as f32,
    );
    let (out, _weights) = match key_bias {
        None => <Dispatch as AttentionOps>::fused_attention(q, k, v, scale, causal),
        Some(m) => <Dispatch as AttentionOps>::key_biased_fused_attention(
            q,
            k,
            v,
            m.detach().into_dispatch(),
            scale,
            causal,
        ),
    };
    Tensor::from_dispatch(out)
}

/// The same from burn ops (other devices, other float types; the reference of the tests).
/// The softmax runs in f32 whatever the compute type, as transformers does.
fn composed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
    scale: f64,
    causal: bool,
) -> Tensor<4> {
    let [b, h, _, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let rep = h / kvh;
    let (k, v) = if rep > 1 {
        let expand = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kvh, rep, t, d])
                .reshape([b, h, t, d])
        };
        (expand(k), expand(v))
    } else {
        (k, v)
    };
    let mut scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32);
    if let Some(bias) = key_bias {
        // The scale applies to the scores only: the bias enters unscaled.
        scores = scores + bias.reshape([b, 1, 1, t]).div_scalar(scale);
    }
    let weights = if causal {
        causal_softmax(scores, scale)
    } else {
        softmax(scores.mul_scalar(scale), 3)
    };
    weights.cast(v.dtype()).matmul(v)
}

/// The operation and its gradient as backend operations (f32).
#[backend_extension(Flex, Autodiff)]
pub trait AttentionOps: Backend {
    /// The output of [`causal_attention`] (`causal`) or [`encoder_attention`] without a key
    /// bias, and the attention weights `[batch, heads, s, t]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The same with a key bias `[batch, t]` (a constant: no gradient reaches it).
    fn key_biased_fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        scale: f32,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients in `q`, `k` and `v` from the weights `p` and the output's gradient
    /// `grad`; one that `need_q`, `need_k` or `need_v` leaves out is an empty tensor.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
        causal: bool,
        need: [bool; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Query rows per product: smaller blocks skip more of the hidden keys, larger ones run the
/// products at a better speed.
const ROW_BLOCK: usize = 32;

/// A rank-4 f32 tensor's storage as the kernels address it: the address of its first value
/// and its strides (so views of any layout enter without a copy).
#[derive(Clone, Copy)]
struct View {
    base: usize,
    strides: [isize; 4],
}

impl View {
    fn of(t: &FlexTensor) -> Self {
        assert_eq!(t.dtype(), DType::F32, "causal attention: f32 tensors only");
        let layout = t.layout();
        let strides: [isize; 4] = layout
            .strides()
            .try_into()
            .expect("causal attention: a rank-4 tensor");
        let values = t.storage::<f32>();
        // SAFETY: the layout's offset lies inside its storage.
        let base = unsafe { values.as_ptr().add(layout.start_offset()) } as usize;
        View { base, strides }
    }

    /// Row `row` of matrix (`i`, `j`) (dims 2 and 3 are rows and columns).
    fn at(&self, i: usize, j: usize, row: usize) -> *const f32 {
        let [s0, s1, s2, _] = self.strides;
        (self.base as *const f32)
            .wrapping_offset(i as isize * s0 + j as isize * s1 + row as isize * s2)
    }
}

/// An output matrix written in place: its first value's address and its row stride (columns
/// are adjacent).
#[derive(Clone, Copy)]
struct Out {
    base: usize,
    row_stride: usize,
}

impl Out {
    fn of(values: &mut Vec<f32>, row_stride: usize) -> Self {
        Out {
            base: values.as_mut_ptr() as usize,
            row_stride,
        }
    }

    fn row(&self, offset: usize, row: usize) -> *mut f32 {
        (self.base as *mut f32).wrapping_add(offset + row * self.row_stride)
    }
}

/// `row[..n] = softmax(row[..n] + bias[..n])` (`bias` empty: none), `row[n..] = 0`.
#[inline(always)]
fn softmax_body(row: &mut [f32], bias: &[f32], n: usize) {
    let (seen, hidden) = row.split_at_mut(n);
    if !bias.is_empty() {
        for (x, &b) in seen.iter_mut().zip(bias) {
            *x += b;
        }
    }
    softmax_in_place(seen);
    hidden.fill(0.0);
}

/// `g = scale · p · (g - Σ g · p)` over one row (the scores' gradient from the weights').
#[inline(always)]
fn softmax_backward_body(p: &[f32], g: &mut [f32], scale: f32) {
    let pg = dot(p, g);
    for (g, &p) in g.iter_mut().zip(p) {
        *g = scale * p * (*g - pg);
    }
}

simd_dispatch! {
    fn softmax_row(row: &mut [f32], bias: &[f32], n: usize) => softmax_body
}

simd_dispatch! {
    fn softmax_backward_row(p: &[f32], g: &mut [f32], scale: f32) => softmax_backward_body
}

/// The sizes of one call: batch, query heads, key/value heads, queries, keys, head size; and
/// whether query `i` sees only keys `0..=i + t - s` (else all).
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
    causal: bool,
}

impl Dims {
    fn of(q: &FlexTensor, k: &FlexTensor, causal: bool) -> Self {
        let [b, h, s, d]: [usize; 4] = q.layout().shape().dims();
        let [_, kvh, t, _]: [usize; 4] = k.layout().shape().dims();
        Dims {
            b,
            h,
            kvh,
            s,
            t,
            d,
            causal,
        }
    }

    /// The keys query `i` sees (a prefix of them).
    fn seen(&self, i: usize) -> usize {
        if self.causal {
            i + self.t - self.s + 1
        } else {
            self.t
        }
    }

    /// Query blocks `(first row, rows, keys seen by the block)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let dims = *self;
        (0..dims.s).step_by(ROW_BLOCK).map(move |i0| {
            let rows = ROW_BLOCK.min(dims.s - i0);
            (i0, rows, dims.seen(i0 + rows - 1))
        })
    }

    /// One parallel task per (batch row, key/value head): it alone writes the gradients of
    /// its keys and values.
    fn tasks(&self) -> usize {
        self.b * self.kvh
    }
}

/// Room for `n` output values that the kernel writes in full (no fill pass first), as long as
/// there are keys (`t > 0`); with none there is nothing to write, and the output is zeros.
/// Either way its length is set once the kernel is done.
fn unfilled(n: usize, t: usize) -> Vec<f32> {
    if t > 0 {
        Vec::with_capacity(n)
    } else {
        zeros(n)
    }
}

/// `[b, x, y, d]` values written as `[b, y, x, d]` memory, returned as the `[b, x, y, d]` view
/// of it (the layout the projections produce and consume).
fn token_major(values: Vec<f32>, [b, x, y, d]: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [b, y, x, d])).transpose(1, 2)
}

/// The forward kernel: the output (token-major memory) and the weights.
fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: Option<&[f32]>,
    scale: f32,
    causal: bool,
) -> (FlexTensor, FlexTensor) {
    let dims = Dims::of(q, k, causal);
    let Dims {
        b, h, kvh, s, t, d, ..
    } = dims;
    let rep = h / kvh;
    let (qv, kv, vv) = (View::of(q), View::of(k), View::of(v));
    let (np, no) = (b * h * s * t, b * s * h * d);
    // Below, the products and the softmax write every value.
    let (mut p, mut out) = (unfilled(np, t), unfilled(no, t));
    let (p_out, o_out) = (Out::of(&mut p, t), Out::of(&mut out, h * d));
    (0..dims.tasks()).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kvh, task % kvh);
        let bias = bias.map_or(&[][..], |m| &m[bi * t..(bi + 1) * t]);
        for hh in g * rep..(g + 1) * rep {
            let p_head = (bi * h + hh) * s * t;
            for (i0, rows, keys) in dims.blocks() {
                // SAFETY: the views come from the tensors' layouts; this task alone
                // writes head `hh` of batch row `bi` of `p` and `out`.
                unsafe {
                    product_into(
                        (rows, keys, d),
                        p_out.row(p_head, i0),
                        t,
                        false,
                        (qv.at(bi, hh, i0), qv.strides[2], qv.strides[3]),
                        (kv.at(bi, g, 0), kv.strides[3], kv.strides[2]),
                        scale,
                        false,
                    );
                }
                for r in 0..rows {
                    let i = i0 + r;
                    // SAFETY: as above; row `i` of this head's weights, whose first `keys`
                    // values the product wrote and the rest are zeroed here.
                    let row = unsafe {
                        let row = p_out.row(p_head, i);
                        std::ptr::write_bytes(row.add(keys), 0, t - keys);
                        std::slice::from_raw_parts_mut(row, t)
                    };
                    let seen = dims.seen(i);
                    softmax_row(
                        row,
                        if bias.is_empty() { bias } else { &bias[..seen] },
                        seen,
                    );
                }
                unsafe {
                    product_into(
                        (rows, d, keys),
                        o_out.row((bi * s * h + hh) * d, i0),
                        h * d,
                        false,
                        (p_out.row(p_head, i0), t as isize, 1),
                        (vv.at(bi, g, 0), vv.strides[2], vv.strides[3]),
                        1.0,
                        false,
                    );
                }
            }
        }
    });
    // SAFETY: every value was written above (or the vectors are zeros already).
    unsafe {
        p.set_len(np);
        out.set_len(no);
    }
    let p = FlexTensor::from_data(TensorData::new(p, [b, h, s, t]));
    (token_major(out, [b, h, s, d]), p)
}

impl AttentionOps for Flex {
    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f32,
        causal: bool,
    ) -> (FlexTensor, FlexTensor) {
        attention_forward(&q, &k, &v, None, scale, causal)
    }

    fn key_biased_fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        key_bias: FlexTensor,
        scale: f32,
        causal: bool,
    ) -> (FlexTensor, FlexTensor) {
        let bias = peft_core::cpu::f32_values(&key_bias);
        attention_forward(&q, &k, &v, Some(&bias), scale, causal)
    }

    fn fused_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        p: FlexTensor,
        grad: FlexTensor,
        scale: f32,
        causal: bool,
        [need_q, need_k, need_v]: [bool; 3],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let dims = Dims::of(&q, &k, causal);
        let Dims {
            b, h, kvh, s, t, d, ..
        } = dims;
        let rep = h / kvh;
        let (qv, kv, vv, gv) = (View::of(&q), View::of(&k), View::of(&v), View::of(&grad));
        let p = peft_core::cpu::f32_values(&p);
        // ∂Q is all written by products, and each task zeroes its own rows of ∂K and ∂V before
        // adding into them.
        let sized = |need: bool, n: usize| match need {
            false => (Vec::new(), 0),
            true => (unfilled(n, t), n),
        };
        let (mut dq, nq) = sized(need_q, b * s * h * d);
        let (mut dk, nk) = sized(need_k, b * t * kvh * d);
        let (mut dv, nv) = sized(need_v, b * t * kvh * d);
        let (dq_out, dk_out, dv_out) = (
            Out::of(&mut dq, h * d),
            Out::of(&mut dk, kvh * d),
            Out::of(&mut dv, kvh * d),
        );
        let p_base = p.as_ptr() as usize;
        (0..dims.tasks()).into_par_iter().for_each(|task| {
            let (bi, g) = (task / kvh, task % kvh);
            let kv_at = (bi * t * kvh + g) * d;
            for (need, out) in [(need_k, &dk_out), (need_v, &dv_out)] {
                for j in 0..t * usize::from(need) {
                    // SAFETY: row `j` of key/value head `g` of batch row `bi`: this task's.
                    unsafe { std::ptr::write_bytes(out.row(kv_at, j), 0, d) };
                }
            }
            // The scores' gradient of one block of rows.
            let mut ds = vec![0f32; ROW_BLOCK * t];
            for hh in g * rep..(g + 1) * rep {
                let p_head = (p_base as *const f32).wrapping_add((bi * h + hh) * s * t);
                for (i0, rows, keys) in dims.blocks() {
                    let p_rows = (p_head.wrapping_add(i0 * t), t as isize, 1);
                    let grad_rows = (gv.at(bi, hh, i0), gv.strides[2], gv.strides[3]);
                    // SAFETY: the views come from the tensors' layouts; this task alone
                    // writes the gradients of key/value head `g` of batch row `bi` and of its
                    // query heads.
                    unsafe {
                        if need_v {
                            // ∂V[..keys] += P[rows, ..keys]ᵀ · ∂O[rows]
                            product_into(
                                (keys, d, rows),
                                dv_out.row(kv_at, 0),
                                kvh * d,
                                true,
                                (p_rows.0, 1, t as isize),
                                grad_rows,
                                1.0,
                                false,
                            );
                        }
                        if !(need_q || need_k) {
                            continue;
                        }
                        // ∂P = ∂O[rows] · V[..keys]ᵀ, then the softmax's backward.
                        product_into(
                            (rows, keys, d),
                            ds.as_mut_ptr(),
                            keys,
                            false,
                            grad_rows,
                            (vv.at(bi, g, 0), vv.strides[3], vv.strides[2]),
                            1.0,
                            false,
                        );
                    }
                    for r in 0..rows {
                        // SAFETY: row `i0 + r` of this head's weights, `keys` long.
                        let p_row =
                            unsafe { std::slice::from_raw_parts(p_rows.0.add(r * t), keys) };
                        softmax_backward_row(p_row, &mut ds[r * keys..(r + 1) * keys], scale);
                    }
                    let ds_rows = (ds.as_ptr(), keys as isize, 1);
                    unsafe {
                        if need_q {
                            // ∂Q[rows] = ∂S · K[..keys]
                            product_into(
                                (rows, d, keys),
                                dq_out.row((bi * s * h + hh) * d, i0),
                                h * d,
                                false,
                                ds_rows,
                                (kv.at(bi, g, 0), kv.strides[2], kv.strides[3]),
                                1.0,
                                false,
                            );
                        }
                        if need_k {
                            // ∂K[..keys] += ∂Sᵀ · Q[rows]
                            product_into(
                                (keys, d, rows),
                                dk_out.row(kv_at, 0),
                                kvh * d,
                                true,
                                (ds.as_ptr(), 1, keys as isize),
                                (qv.at(bi, hh, i0), qv.strides[2], qv.strides[3]),
                                1.0,
                                false,
                            );
                        }
                    }
                }
            }
        });
        // SAFETY: every value of each gradient was written above (or it is zeros already).
        unsafe {
            dq.set_len(nq);
            dk.set_len(nk);
            dv.set_len(nv);
        }
        let gradient = |need: bool, values: Vec<f32>, dims: [usize; 4]| {
            if need {
                token_major(values, dims)
            } else {
                no_gradient()
            }
        };
        (
            gradient(need_q, dq, [b, h, s, d]),
            gradient(need_k, dk, [b, kvh, t, d]),
            gradient(need_v, dv, [b, kvh, t, d]),
        )
    }
}

/// The backward pass: the inputs and the attention weights are kept.
#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + AttentionOps> Backward<B, 3> for AttentionBackward {
    /// Q, K, V, the weights, the scale and whether the attention is causal.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f32,
        bool,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, p, scale, causal) = ops.state;
        let [nq, nk, nv] = ops.parents;
        let need = [nq.is_some(), nk.is_some(), nv.is_some()];
        let (dq, dk, dv) = B::fused_attention_backward(q, k, v, p, grad, scale, causal, need);
        for (node, gradient) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// The output of an attention call and its weights, on backend `B`.
type OutputAndWeights<B> = (FloatTensor<B>, FloatTensor<B>);

/// The attention on the autodiff backend: `forward` on the inner tensors, keeping them and
/// the weights (and `scale`) for the backward pass, which both operations share.
fn tracked_attention<B: Backend + AttentionOps, C: CheckpointStrategy>(
    [q, k, v]: [FloatTensor<Autodiff<B, C>>; 3],
    scale: f32,
    causal: bool,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> OutputAndWeights<B>,
) -> OutputAndWeights<Autodiff<B, C>> {
    let parents = [q.node(), k.node(), v.node()];
    let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
    let (out, p) = forward(q.clone(), k.clone(), v.clone());
    let weights = <Autodiff<B, C> as AutodiffBackend>::from_inner(p.clone());
    let out = match AttentionBackward
        .prepare::<C>(parents)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((q, k, v, p, scale, causal), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    (out, weights)
}

impl<B: Backend + AttentionOps, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tracked_attention::<B, C>([q, k, v], scale, causal, |q, k, v| {
            B::fused_attention(q, k, v, scale, causal)
        })
    }

    fn key_biased_fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        scale: f32,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let key_bias = key_bias.into_primitive();
        tracked_attention::<B, C>([q, k, v], scale, causal, |q, k, v| {
            B::key_biased_fused_attention(q, k, v, key_bias, scale, causal)
        })
    }

    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        p: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
        causal: bool,
        need: [bool; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::fused_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            p.into_primitive(),
            grad.into_primitive(),
            scale,
            causal,
            need,
        );
        (
            <Self as AutodiffBackend>::from_inner(dq),
            <Self as AutodiffBackend>::from_inner(dk),
            <Self as AutodiffBackend>::from_inner(dv),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// Value and the three gradients equal the burn composition's: a training case longer
    /// than one row block (a partial last block), grouped-query attention, a KV-cache case
    /// with fewer queries than keys, one query, padding keys, and inputs that are heads-first
    /// views of token-major tensors (as the model passes them) or contiguous; causal and not.
    #[test]
    fn matches_the_burn_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(5);
        // (batch, heads, kv heads, queries, keys, head size, padded, token-major views)
        for (b, h, kvh, s, t, d, padded, views) in [
            (2, 4, 4, 70, 70, 16, false, true),
            (2, 6, 2, 37, 37, 8, true, true),
            (1, 3, 1, 5, 41, 12, true, false),
            (3, 2, 2, 1, 9, 4, false, false),
            (2, 2, 1, 33, 40, 5, true, true),
        ] {
            let make = |heads: usize, len: usize| {
                if views {
                    random([b, len, heads, d], &device).swap_dims(1, 2)
                } else {
                    random([b, heads, len, d], &device)
                }
            };
            let (q, k, v) = (make(h, s), make(kvh, t), make(kvh, t));
            let bias = padded.then(|| {
                let values: Vec<f32> = (0..b * t)
                    .map(|i| if (i / t + i % t) % 4 == 1 { -1e9 } else { 0.0 })
                    .collect();
                Tensor::<2>::from_data(TensorData::new(values, [b, t]), &device)
            });
            let w = random([b, h, s, d], &device);
            let scale = 1.0 / (d as f64).sqrt();

            let run = |fused: bool, causal: bool| {
                let (q, k, v) = (
                    q.clone().detach().require_grad(),
                    k.clone().detach().require_grad(),
                    v.clone().detach().require_grad(),
                );
                let (q_, k_, v_, bias) = (q.clone(), k.clone(), v.clone(), bias.clone());
                let out = if fused {
                    attention(q_, k_, v_, bias, scale, causal)
                } else {
                    composed(q_, k_, v_, bias, scale, causal)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                let g = |x: &Tensor<4>| x.grad(&grads).unwrap().into_data();
                (out.into_data(), g(&q), g(&k), g(&v))
            };
            for causal in [true, false] {
                let (fused, reference) = (run(true, causal), run(false, causal));
                let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-5);
                let case = format!("b {b} h {h} kvh {kvh} s {s} t {t} d {d} causal {causal}");
                for (name, got, want) in [
                    ("output", fused.0, reference.0),
                    ("∂q", fused.1, reference.1),
                    ("∂k", fused.2, reference.2),
                    ("∂v", fused.3, reference.3),
                ] {
                    assert_eq!(got.shape(), want.shape(), "{case}: {name}");
                    got.assert_approx_eq::<f32>(&want, tol);
                }
            }
        }
    }

    /// Only the tracked inputs get gradients (a frozen key projection's output is not
    /// tracked), and they equal the composition's.
    #[test]
    fn untracked_inputs_get_no_gradient() {
        let device = Device::flex().autodiff();
        device.seed(6);
        let (q, k, v) = (
            random([1, 2, 9, 4], &device).require_grad(),
            random([1, 2, 9, 4], &device),
            random([1, 2, 9, 4], &device).require_grad(),
        );
        let grads = causal_attention(q.clone(), k.clone(), v.clone(), None, 0.5)
            .sum()
            .backward();
        assert!(k.grad(&grads).is_none());
        let reference = composed(q.clone(), k, v.clone(), None, 0.5, true)
            .sum()
            .backward();
        let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-5);
        for x in [&q, &v] {
            x.grad(&grads)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&x.grad(&reference).unwrap().into_data(), tol);
        }
    }

    #[test]
    #[should_panic(expected = "attention: queries [1, 3, 2, 4], keys [1, 2, 5, 4]")]
    fn heads_must_group_evenly() {
        let device = Device::flex();
        let _ = causal_attention(
            Tensor::zeros([1, 3, 2, 4], &device),
            Tensor::zeros([1, 2, 5, 4], &device),
            Tensor::zeros([1, 2, 5, 4], &device),
            None,
            1.0,
        );
    }
}
