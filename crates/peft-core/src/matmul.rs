//! The product of a linear layer, `x·W (+ b)`, differentiable in `x` and `W`: on the CPU
//! backend one `gemm` call per product (forward, input gradient, weight gradient), each
//! writing straight into its output.
//!
//! burn's CPU backend makes every product's output zero-filled as bytes and then copies it
//! into a 16-byte-aligned buffer (cubecl's `Bytes::from_bytes_vec` goes by the element type,
//! not by the address it got): two more passes over each output than the product needs.
//! Here gemm writes every output value once, into a buffer nothing has filled, and operands
//! enter with their strides (a transposed weight is not copied). Other devices, other float
//! types and inputs of rank below 2 take burn's `linear`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor};

use crate::device::is_cpu;
use std::sync::atomic::{AtomicU64, Ordering};

/// `x·W + b` over the last dimension of `x` (`[..., in]`), with `W` `[in, out]` and `b`
/// `[out]`: what `burn::tensor::module::linear` computes, faster on the CPU.
///
/// # Panics
/// When `x`'s last dimension is not `W`'s first.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let f32_on_cpu = is_cpu(&x.device()) && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if D < 2 || !f32_on_cpu {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: the input has {} features, the weight {d_in}",
        dims[D - 1]
    );
    let rows = dims[..D - 1].iter().product();
    let y = Tensor::<2>::from_dispatch(<Dispatch as DenseProductOps>::dense_product(
        x.reshape([rows, d_in]).into_dispatch(),
        weight.into_dispatch(),
    ));
    let mut out = dims;
    out[D - 1] = d_out;
    let y = y.reshape(out);
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// The product and its gradients as backend operations (rank 2, f32).
#[backend_extension(Flex, Autodiff)]
pub trait DenseProductOps: Backend {
    /// `x·w`: `[m, k]·[k, n]`.
    fn dense_product(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient in `x` of `Σ g ⊙ (x·w)`: `g·wᵀ`, `[m, k]`.
    fn dense_product_input_grad(g: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient in `w` of `Σ g ⊙ (x·w)`: `xᵀ·g`, `[k, n]`.
    fn dense_product_weight_grad(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// A rank-2 f32 operand as gemm reads it: its first value and its row and column strides
/// (swapped for the transpose).
struct Operand<'a> {
    values: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Operand<'a> {
    /// `t` (f32) as stored, with its own strides, or its transpose.
    fn of(t: &'a FlexTensor, transposed: bool) -> Self {
        assert_eq!(t.dtype(), DType::F32, "dense product: f32 operands only");
        let layout = t.layout();
        let shape = layout.shape();
        assert_eq!(shape.num_dims(), 2, "dense product: a rank-2 operand");
        let strides = layout.strides();
        let (rows, cols, row_stride, col_stride) = (shape[0], shape[1], strides[0], strides[1]);
        let op = Operand {
            values: t.storage::<f32>(),
            offset: layout.start_offset(),
            rows,
            cols,
            row_stride,
            col_stride,
        };
        if transposed { op.transposed() } else { op }
    }

    fn transposed(self) -> Self {
        Operand {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Products at least this large (m·n·k) run on all threads, as burn's CPU backend decides.
const PARALLEL_FROM: usize = 192 * 192 * 192;

/// Smaller products down to this size run on all threads too, each thread a one-thread gemm
/// over its share of the output's rows (or columns, when it is wider than tall). On skinny
/// shapes (a LoRA rank or an adapter bottleneck of 16-64) gemm's own split gained little or
/// lost: `[512, 512]·[512, 16]` 75 µs on one thread, 51-86 with gemm's split, 44 split here;
/// `[512, 16]·[16, 512]` 97, 132 and 77 µs (2 threads; observed).
const SPLIT_FROM: usize = 1 << 20;

/// Large products with at least this many rows (and 128 output columns a thread) run as one
/// one-thread gemm per thread, each over its share of the output's columns, at multiples of
/// 64 (the AVX-512 kernel's panel), instead of gemm's own split over the output's rows. Each
/// thread then packs only its share of the operand that spans the columns (the weight, in a
/// forward or input-gradient product). That was the reason to try it, but a profile of a LoRA
/// step kept gemm's packing near a tenth of the samples either way, so why it is faster is not
/// pinned down. Measured on an Intel AVX-512 machine: LoRA and full fine-tuning steps 0.95-0.96
/// of the time, the 512x512 forward 0.90-1.00 (`scripts/bench_ab.py`, 6 rounds of 3; under
/// `PEFT_CPU_ISA=avx2` 0.99-1.01; observed). Prefills of a few tokens keep gemm's split
/// (generation with them split too: 1.04 of the time in one A/B, observed).
const COLUMN_SPLIT_ROWS: usize = 64;

/// Multiply-adds done by [`product_into`] since the process started (each `m·n·k`), on every
/// thread: how much arithmetic a piece of work needed, to set its time against the product's
/// peak speed (`cargo xtask bench`). One relaxed atomic addition per call.
static MULTIPLY_ADDS: AtomicU64 = AtomicU64::new(0);

/// The multiply-adds [`product_into`] has done so far in this process.
pub fn multiply_adds() -> u64 {
    MULTIPLY_ADDS.load(Ordering::Relaxed)
}

/// A strided f32 matrix as [`product_into`] reads it: the address of its first value, its row
/// stride and its column stride (in values).
pub type Strided = (*const f32, isize, isize);

/// `dst = scale · a·b`, or `dst += scale · a·b` when `accumulate`: `a` `[m, k]`, `b` `[k, n]`,
/// `dst` `[m, n]` with adjacent columns and rows `dst_rs` apart. One gemm call, on all threads
/// when `parallel`, else on the calling one; nothing happens when `m` or `n` is 0.
///
/// # Safety
/// Every operand's strides must stay inside its storage, and no other thread may touch `dst`'s
/// values meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    MULTIPLY_ADDS.fetch_add((m * n * k) as u64, Ordering::Relaxed);
    let _flush = crate::cpu::FlushDenormals::new();
    // gemm takes each operand's column stride before its row stride.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// `a·b` into a new contiguous `[a.rows, b.cols]` f32 tensor.
fn product(a: Operand, b: Operand) -> FlexTensor {
    assert_eq!(
        a.cols, b.rows,
        "dense product: [{}, {}] times [{}, {}]",
        a.rows, a.cols, b.rows, b.cols
    );
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let len = m * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if k == 0 {
        out.resize(len, 0.0);
    } else if len > 0 {
        let size = m * n * k;
        let threads = rayon::current_num_threads();
        // SAFETY (every call below): the operands' pointers and strides describe `m×k` and
        // `k×n` views inside their storage (burn's layouts); `out` has room for `m·n` values,
        // which gemm writes all of (`read_dst` false: nothing is read from it) before the
        // length is set, each block by one call.
        // Addresses, which threads may share (pointers may not).
        let (a_at, b_at, dst) = (
            unsafe { a.values.as_ptr().add(a.offset) } as usize,
            unsafe { b.values.as_ptr().add(b.offset) } as usize,
            out.as_mut_ptr() as usize,
        );
        let block = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, parallel| unsafe {
            product_into(
                (rows.len(), cols.len(), k),
                (dst as *mut f32).add(rows.start * n + cols.start),
                n,
                false,
                (
                    (a_at as *const f32).offset(rows.start as isize * a.row_stride),
                    a.row_stride,
                    a.col_stride,
                ),
                (
                    (b_at as *const f32).offset(cols.start as isize * b.col_stride),
                    b.row_stride,
                    b.col_stride,
                ),
                1.0,
                parallel,
            )
        };
        let column_split =
            size >= PARALLEL_FROM && threads > 1 && m >= COLUMN_SPLIT_ROWS && n >= threads * 128;
        if size >= PARALLEL_FROM && !column_split {
            block(0..m, 0..n, true);
        } else if size >= SPLIT_FROM && threads > 1 {
            use rayon::prelude::*;
            // Large products by columns at multiples of 64; smaller ones along the longer side.
            let by_rows = !column_split && m >= n;
            let long = if by_rows { m } else { n };
            let share = if column_split {
                n.div_ceil(threads).next_multiple_of(64)
            } else {
                long.div_ceil(threads)
            };
            (0..long.div_ceil(share)).into_par_iter().for_each(|i| {
                let part = i * share..((i + 1) * share).min(long);
                if by_rows {
                    block(part, 0..n, false)
                } else {
                    block(0..m, part, false)
                }
            });
        } else {
            block(0..m, 0..n, false);
        }
        unsafe { out.set_len(len) };
    }
    FlexTensor::from_data(burn::tensor::TensorData::new(out, Shape::new([m, n])))
}

impl DenseProductOps for Flex {
    fn dense_product(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        product(Operand::of(&x, false), Operand::of(&w, false))
    }

    fn dense_product_input_grad(g: FlexTensor, w: FlexTensor) -> FlexTensor {
        product(Operand::of(&g, false), Operand::of(&w, true))
    }

    fn dense_product_weight_grad(x: FlexTensor, g: FlexTensor) -> FlexTensor {
        product(Operand::of(&x, true), Operand::of(&g, false))
    }
}

/// The backward pass of `y = x·w`: `∂x = g·wᵀ`, `∂w = xᵀ·g`.
#[derive(Debug)]
struct DenseProductBackward;

impl<B: Backend + DenseProductOps> Backward<B, 2> for DenseProductBackward {
    /// The input (kept only when the weight trains) and the weight (only when the input
    /// needs a gradient).
    type State = (
        Option<B::FloatTensorPrimitive>,
        Option<B::FloatTensorPrimitive>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w) = ops.state;
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |g| B::dense_product_input_grad(g, w.expect("kept for ∂x")),
            |g| B::dense_product_weight_grad(x.expect("kept for ∂w"), g),
        );
    }
}

impl<B: Backend + DenseProductOps, C: CheckpointStrategy> DenseProductOps for Autodiff<B, C> {
    fn dense_product(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        let parents = [x.node(), w.node()];
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let y = B::dense_product(x.clone(), w.clone());
        match DenseProductBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((w_tracked.then_some(x), x_tracked.then_some(w)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn dense_product_input_grad(g: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::dense_product_input_grad(
            g.into_primitive(),
            w.into_primitive(),
        ))
    }

    fn dense_product_weight_grad(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::dense_product_weight_grad(
            x.into_primitive(),
            g.into_primitive(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// Value and both gradients equal burn's `linear` (3-d input, with and without bias;
    /// products too small to split, split by rows, split by columns (wider than tall, as the
    /// fourth case's forward) and, at 1×1×1, tiny), and a weight that is a transposed view
    /// enters without a copy and gives the same.
    #[test]
    fn matches_burn_linear_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(11);
        for (batch, seq, d_in, d_out, with_bias) in [
            (2, 3, 5, 7, false),
            (2, 96, 200, 130, true),
            (1, 24, 300, 400, false),
            // Large enough for all threads: gemm's own split (200 columns), and one gemm a
            // thread over a share of the columns that is not a multiple of 64 (700, and 300
            // for the input gradient; the weight gradient is [300, 700]).
            (2, 96, 300, 200, true),
            (1, 96, 300, 700, false),
            (1, 1, 1, 1, true),
        ] {
            let x = random([batch, seq, d_in], &device);
            let w = random([d_in, d_out], &device);
            let b = random([d_out], &device);
            let weights = random([batch, seq, d_out], &device);
            let run = |f: &dyn Fn(Tensor<3>, Tensor<2>, Option<Tensor<1>>) -> Tensor<3>| {
                let (x, w, b) = (
                    x.clone().detach().require_grad(),
                    w.clone().detach().require_grad(),
                    b.clone().detach().require_grad(),
                );
                let y = f(x.clone(), w.clone(), with_bias.then(|| b.clone()));
                let g = (y.clone() * weights.clone()).sum().backward();
                let gb = with_bias.then(|| b.grad(&g).unwrap().into_data());
                (
                    y.into_data(),
                    x.grad(&g).unwrap().into_data(),
                    w.grad(&g).unwrap().into_data(),
                    gb,
                )
            };
            let ours = run(&|x, w, b| linear(x, w, b));
            let burns = run(&|x, w, b| burn::tensor::module::linear(x, w, b));
            // Sums of up to 300 products, in gemm's order here and burn's there.
            let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
            ours.0.assert_approx_eq::<f32>(&burns.0, tol);
            ours.1.assert_approx_eq::<f32>(&burns.1, tol);
            ours.2.assert_approx_eq::<f32>(&burns.2, tol);
            if let (Some(a), Some(b)) = (ours.3, burns.3) {
                a.assert_approx_eq::<f32>(&b, tol);
            }

            // The weight as the transpose of an `[out, in]` tensor (a strided view).
            let w_t = w.clone().transpose().detach();
            let x_in = x.clone().detach().require_grad();
            let y = linear(x_in.clone(), w_t.transpose(), None);
            let g = (y.clone() * weights.clone()).sum().backward();
            let want = burn::tensor::module::linear(x.clone().detach(), w.clone().detach(), None);
            y.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), tol);
            x_in.grad(&g)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&burns.1, tol);
        }
    }

    /// A frozen weight gets no gradient and is not kept for one; an untracked input likewise.
    #[test]
    fn only_tracked_operands_get_gradients() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let x = random([4, 6], &device).require_grad();
        let w = random([6, 5], &device);
        let g = linear(x.clone(), w.clone(), None).sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(w.grad(&g).is_none());

        let x = random([4, 6], &device);
        let w = random([6, 5], &device).require_grad();
        let g = linear(x.clone(), w.clone(), None).sum().backward();
        assert!(w.grad(&g).is_some());
        assert!(x.grad(&g).is_none());
    }

    /// No inner dimension: zeros, not whatever the fresh buffer held.
    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let device = Device::flex();
        let y = linear(
            Tensor::<2>::zeros([3, 0], &device),
            Tensor::<2>::zeros([0, 4], &device),
            None,
        );
        assert_eq!(y.dims(), [3, 4]);
        assert!(
            y.into_data()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .all(|v| *v == 0.0)
        );
    }

    /// A forward and backward of a tracked linear count their three products' multiply-adds
    /// (other tests may add theirs meanwhile: at least these).
    #[test]
    fn products_count_their_multiply_adds() {
        let device = Device::flex().autodiff();
        let x = random([6, 5], &device).require_grad();
        let w = random([5, 7], &device).require_grad();
        let before = multiply_adds();
        let _ = linear(x, w, None).sum().backward();
        assert!(multiply_adds() - before >= 3 * 6 * 5 * 7);
    }

    #[test]
    #[should_panic(expected = "the input has 3 features, the weight 4")]
    fn mismatched_features_are_refused() {
        let device = Device::flex();
        let _ = linear(
            Tensor::<2>::zeros([2, 3], &device),
            Tensor::<2>::zeros([4, 5], &device),
            None,
        );
    }
}
