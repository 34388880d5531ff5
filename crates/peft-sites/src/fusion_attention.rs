//! AdapterFusion's attention at every token over the fused adapters' outputs, as one
//! operation: `p = softmax_n(q · k_n / T)`, `ctx = Σ_n p_n v_n`.
//!
//! burn computes it as a broadcast product over `[batch, seq, adapters, hidden]`, a sum, a
//! softmax, another broadcast product and a sum, forward and backward, each a pass on the
//! calling thread alone (burn's ops in a fusion training step: about 3% of its samples in
//! `perf`). On the CPU in f32 this operation runs in parallel over the tokens: forward the
//! weights then the mix; backward the weights and the scores' gradient, then each input's
//! gradient in one pass. Other devices and types, and dropout on the scores (which sits between
//! the scores and the softmax), use burn's composition.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Shape, Tensor};
use peft_core::cpu::{
    dot, f32_values, flex_tensor, no_gradient, par_fill, softmax_in_place, write_each, write_rows,
};
use peft_core::device::is_cpu;
use peft_core::simd_dispatch;
use rayon::prelude::*;

use crate::ops::dropout_while_training;

/// The fused context `[batch, seq, hidden]` of query `q` `[batch, seq, hidden]` over keys `k`
/// and values `v` `[batch, seq, adapters, hidden]`: scores `q · k_n` per adapter, with dropout
/// while `training` (probability `dropout`), divided by `temperature` when given, softmax over
/// the adapters, then the values weighted by it and summed. Differentiable in all three.
///
/// # Panics
/// When the shapes do not fit together as above.
pub fn fusion_attention(
    q: Tensor<3>,
    k: Tensor<4>,
    v: Tensor<4>,
    temperature: Option<f64>,
    dropout: f64,
    training: bool,
) -> Tensor<3> {
    let [b, s, n, h] = k.dims();
    assert!(
        q.dims() == [b, s, h] && v.dims() == [b, s, n, h],
        "fusion_attention: query {:?}, keys {:?}, values {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let f32_on_cpu = is_cpu(&q.device())
        && [q.dtype(), k.dtype(), v.dtype()]
            .iter()
            .all(|&d| d == DType::F32);
    let drops = training && dropout > 0.0;
    if !f32_on_cpu || drops || n == 0 || h == 0 {
        return composed(q, k, v, temperature, dropout, training);
    }
    Tensor::from_dispatch(<Dispatch as FusionAttentionOps>::fusion_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        temperature.unwrap_or(1.0) as f32,
    ))
}

/// burn's composition, as AdapterHub's `BertFusion` computes it.
fn composed(
    q: Tensor<3>,
    k: Tensor<4>,
    v: Tensor<4>,
    temperature: Option<f64>,
    dropout: f64,
    training: bool,
) -> Tensor<3> {
    // scores[b, s, n] = q[b, s] · k[b, s, n]
    let mut scores = (k * q.unsqueeze_dim::<4>(2)).sum_dim(3);
    scores = dropout_while_training(scores, dropout, training);
    if let Some(t) = temperature {
        scores = scores.div_scalar(t as f32);
    }
    let p = softmax(scores, 2);
    // p is [batch, seq, adapters, 1]: weight each adapter's value and sum them.
    let [b, s, _, h] = v.dims();
    (v * p).sum_dim(2).reshape([b, s, h])
}

/// The operation and its gradients as backend operations (f32).
#[backend_extension(Flex, Autodiff)]
pub trait FusionAttentionOps: Backend {
    /// The context of [`fusion_attention`] without dropout (`temperature` 1: none).
    fn fusion_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        temperature: f32,
    ) -> FloatTensor<Self>;

    /// The gradients in `q`, `k` and `v` from the context's gradient `grad`; one that `need`
    /// leaves out is an empty tensor.
    fn fusion_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        need: [bool; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Tokens per parallel task.
const TOKENS_PER_TASK: usize = 16;

/// Per token of `q` `[tokens, h]` and `k` `[tokens, n, h]`: the weights
/// `softmax_n(q · k_n / temperature)` into `p` `[tokens, n]`.
#[inline(always)]
fn weights_body(q: &[f32], k: &[f32], n: usize, h: usize, temperature: f32, p: &mut [f32]) {
    for ((q, k), p) in q
        .chunks_exact(h)
        .zip(k.chunks_exact(n * h))
        .zip(p.chunks_exact_mut(n))
    {
        for (p, k) in p.iter_mut().zip(k.chunks_exact(h)) {
            *p = dot(q, k) / temperature;
        }
        softmax_in_place(p);
    }
}

/// Per token: the scores' gradient `p_n (g · v_n − Σ_m p_m g · v_m) / temperature` into `ds`
/// `[tokens, n]`, from the weights `p` `[tokens, n]`, values `v` `[tokens, n, h]` and the
/// context's gradient `g` `[tokens, h]`.
#[inline(always)]
fn score_grads_body(
    p: &[f32],
    v: &[f32],
    g: &[f32],
    n: usize,
    h: usize,
    temperature: f32,
    ds: &mut [f32],
) {
    for (((p, v), g), ds) in p
        .chunks_exact(n)
        .zip(v.chunks_exact(n * h))
        .zip(g.chunks_exact(h))
        .zip(ds.chunks_exact_mut(n))
    {
        for (d, v) in ds.iter_mut().zip(v.chunks_exact(h)) {
            *d = dot(g, v);
        }
        let mean = dot(p, ds);
        for (d, &p) in ds.iter_mut().zip(p) {
            *d = p * (*d - mean) / temperature;
        }
    }
}

/// `out[t] = Σ_n w[t, n] · x[t, n]` per token: `x` `[tokens, n, h]`, `w` `[tokens, n]`, `out`
/// `[tokens, h]` (the context from the values; the query's gradient from the keys).
#[inline(always)]
fn mix_body<'o>(
    x: &[f32],
    w: &[f32],
    n: usize,
    h: usize,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    write_rows(
        out,
        h,
        #[inline(always)]
        |t, out| {
            let (x, w) = (&x[t * n * h..][..n * h], &w[t * n..][..n]);
            let out = write_each(out, x[..h].iter().map(|&x| w[0] * x));
            for (x, &w) in x.chunks_exact(h).zip(w).skip(1) {
                for (o, &x) in out.iter_mut().zip(x) {
                    *o += w * x;
                }
            }
            out
        },
    )
}

/// `out[t, n] = w[t, n] · a[t]` per token: `a` `[tokens, h]`, `w` `[tokens, n]`, `out`
/// `[tokens, n, h]` (the values' gradient from the context's; the keys' from the query).
#[inline(always)]
fn spread_body<'o>(
    a: &[f32],
    w: &[f32],
    n: usize,
    h: usize,
    out: &'o mut [MaybeUninit<f32>],
) -> &'o mut [f32] {
    write_rows(
        out,
        h,
        #[inline(always)]
        |row, out| {
            let (t, j) = (row / n, row % n);
            let w = w[t * n + j];
            write_each(out, a[t * h..][..h].iter().map(|&a| w * a))
        },
    )
}

simd_dispatch! {
    fn weights(q: &[f32], k: &[f32], n: usize, h: usize, temperature: f32, p: &mut [f32]) => weights_body
}

simd_dispatch! {
    fn score_grads(p: &[f32], v: &[f32], g: &[f32], n: usize, h: usize, temperature: f32, ds: &mut [f32]) => score_grads_body
}

simd_dispatch! {
    fn mix<'o>(x: &[f32], w: &[f32], n: usize, h: usize, out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => mix_body
}

simd_dispatch! {
    fn spread<'o>(a: &[f32], w: &[f32], n: usize, h: usize, out: &'o mut [MaybeUninit<f32>]) -> &'o mut [f32] => spread_body
}

/// The sizes of one call: tokens (batch · seq), adapters, hidden.
fn sizes(k: &FlexTensor) -> (usize, usize, usize, Shape) {
    let [b, s, n, h]: [usize; 4] = k.layout().shape().dims();
    (b * s, n, h, Shape::new([b, s, h]))
}

/// The weights of every token `[tokens, n]`, in parallel.
fn all_weights(q: &[f32], k: &[f32], tokens: usize, n: usize, h: usize, t: f32) -> Vec<f32> {
    let mut p = vec![0f32; tokens * n];
    p.par_chunks_mut(TOKENS_PER_TASK * n)
        .zip(q.par_chunks(TOKENS_PER_TASK * h))
        .zip(k.par_chunks(TOKENS_PER_TASK * n * h))
        .for_each(|((p, q), k)| weights(q, k, n, h, t, p));
    p
}

impl FusionAttentionOps for Flex {
    fn fusion_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        temperature: f32,
    ) -> FlexTensor {
        let (tokens, n, h, shape) = sizes(&k);
        let (qv, kv, vv) = (f32_values(&q), f32_values(&k), f32_values(&v));
        let p = all_weights(&qv, &kv, tokens, n, h, temperature);
        let inputs = vv
            .par_chunks(TOKENS_PER_TASK * n * h)
            .zip(p.par_chunks(TOKENS_PER_TASK * n));
        let ctx = par_fill(tokens * h, TOKENS_PER_TASK * h, inputs, |out, (v, p)| {
            mix(v, p, n, h, out)
        });
        flex_tensor(ctx, shape, DType::F32)
    }

    fn fusion_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        grad: FlexTensor,
        temperature: f32,
        [need_q, need_k, need_v]: [bool; 3],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (tokens, n, h, shape) = sizes(&k);
        let kv_shape = k.layout().shape().clone();
        let (qv, kv, vv, g) = (
            f32_values(&q),
            f32_values(&k),
            f32_values(&v),
            f32_values(&grad),
        );
        let p = all_weights(&qv, &kv, tokens, n, h, temperature);
        let (per_task, wide) = (TOKENS_PER_TASK * n, TOKENS_PER_TASK * n * h);
        let mut ds = vec![0f32; tokens * n];
        ds.par_chunks_mut(per_task)
            .zip(p.par_chunks(per_task))
            .zip(vv.par_chunks(wide))
            .zip(g.par_chunks(TOKENS_PER_TASK * h))
            .for_each(|(((ds, p), v), g)| score_grads(p, v, g, n, h, temperature, ds));
        let dq = if need_q {
            let inputs = kv.par_chunks(wide).zip(ds.par_chunks(per_task));
            let dq = par_fill(tokens * h, TOKENS_PER_TASK * h, inputs, |out, (k, ds)| {
                mix(k, ds, n, h, out)
            });
            flex_tensor(dq, shape, DType::F32)
        } else {
            no_gradient()
        };
        // The keys' and the values' gradients: a token's row of `a` spread over its adapters.
        let spread_all = |a: &[f32], w: &[f32]| {
            let inputs = a
                .par_chunks(TOKENS_PER_TASK * h)
                .zip(w.par_chunks(per_task));
            let out = par_fill(tokens * n * h, wide, inputs, |out, (a, w)| {
                spread(a, w, n, h, out)
            });
            flex_tensor(out, kv_shape.clone(), DType::F32)
        };
        let dk = if need_k {
            spread_all(&qv, &ds)
        } else {
            no_gradient()
        };
        let dv = if need_v {
            spread_all(&g, &p)
        } else {
            no_gradient()
        };
        (dq, dk, dv)
    }
}

/// The backward pass: the query, keys and values are kept (the weights are recomputed from
/// them: `[tokens, adapters]`, a few dot products per token).
#[derive(Debug)]
struct FusionAttentionBackward;

impl<B: Backend + FusionAttentionOps> Backward<B, 3> for FusionAttentionBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let [node_q, node_k, node_v] = ops.parents;
        let (q, k, v, temperature) = ops.state;
        let need = [node_q.is_some(), node_k.is_some(), node_v.is_some()];
        let (dq, dk, dv) = B::fusion_attention_backward(q, k, v, grad, temperature, need);
        for (node, gradient) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

impl<B: Backend + FusionAttentionOps, C: CheckpointStrategy> FusionAttentionOps for Autodiff<B, C> {
    fn fusion_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        temperature: f32,
    ) -> FloatTensor<Self> {
        let parents = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let ctx = B::fusion_attention(q.clone(), k.clone(), v.clone(), temperature);
        match FusionAttentionBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((q, k, v, temperature), ctx),
            OpsKind::UnTracked(prep) => prep.finish(ctx),
        }
    }

    fn fusion_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        need: [bool; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::fusion_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            grad.into_primitive(),
            temperature,
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
    use crate::test_support::random;
    use burn::tensor::{Device, Tolerance};

    /// Equal to burn's composition, value and all three gradients, on the CPU autodiff device:
    /// one adapter and several, hidden sizes below and above a vector register, one task and
    /// several with a partial last one; with and without a temperature.
    #[test]
    fn matches_the_composition_forward_and_backward() {
        let device = Device::default().autodiff();
        for ([b, s, n, h], temperature) in [
            ([1, 1, 1, 1], None),
            ([2, 3, 2, 5], Some(50.0)),
            ([2, 9, 3, 40], None),
            ([3, 50, 2, 512], Some(7.5)),
        ] {
            let q = random([b, s, h], &device).require_grad();
            let k = random([b, s, n, h], &device).require_grad();
            let v = random([b, s, n, h], &device).require_grad();
            let w = random([b, s, h], &device);
            let ours = fusion_attention(q.clone(), k.clone(), v.clone(), temperature, 0.0, true);
            let want = composed(q.clone(), k.clone(), v.clone(), temperature, 0.0, true);
            let tol = Tolerance::rel_abs(1e-5, 1e-5);
            ours.to_data().assert_approx_eq::<f32>(&want.to_data(), tol);
            let g_ours = (ours * w.clone()).sum().backward();
            let g_want = (want * w).sum().backward();
            for x in [&k, &v] {
                x.grad(&g_ours)
                    .unwrap()
                    .into_data()
                    .assert_approx_eq::<f32>(&x.grad(&g_want).unwrap().into_data(), tol);
            }
            q.grad(&g_ours)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&q.grad(&g_want).unwrap().into_data(), tol);
        }
    }

    /// Only the tracked operands get gradients (here the values alone, then the query alone).
    #[test]
    fn only_tracked_operands_get_gradients() {
        let device = Device::default().autodiff();
        let (q, k, v) = (
            random([2, 4, 8], &device),
            random([2, 4, 2, 8], &device),
            random([2, 4, 2, 8], &device),
        );
        let vt = v.clone().require_grad();
        let g = fusion_attention(q.clone(), k.clone(), vt.clone(), None, 0.0, false)
            .sum()
            .backward();
        let want = composed(q.clone(), k.clone(), vt.clone(), None, 0.0, false)
            .sum()
            .backward();
        vt.grad(&g).unwrap().into_data().assert_approx_eq::<f32>(
            &vt.grad(&want).unwrap().into_data(),
            Tolerance::rel_abs(1e-5, 1e-5),
        );
        let qt = q.require_grad();
        let g = fusion_attention(qt.clone(), k.clone(), v.clone(), None, 0.0, false)
            .sum()
            .backward();
        let want = composed(qt.clone(), k, v, None, 0.0, false)
            .sum()
            .backward();
        qt.grad(&g).unwrap().into_data().assert_approx_eq::<f32>(
            &qt.grad(&want).unwrap().into_data(),
            Tolerance::rel_abs(1e-5, 1e-5),
        );
    }

    #[test]
    #[should_panic(expected = "fusion_attention: query [2, 4, 8], keys [2, 4, 2, 7]")]
    fn shapes_that_do_not_fit_are_refused() {
        let device = Device::default();
        fusion_attention(
            random([2, 4, 8], &device),
            random([2, 4, 2, 7], &device),
            random([2, 4, 2, 7], &device),
            None,
            0.0,
            false,
        );
    }
}
