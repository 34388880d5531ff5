//! What the fused CPU operations (peft-models' loss, SwiGLU, causal softmax and RMSNorm;
//! peft-sites' sparse deltas) share: an exponential and a dot product the compiler vectorizes (libm's `expf` is a call per value), a runtime pick of the widest vector
//! instructions the processor has, f32 views of flex tensors and back, outputs written in
//! parallel without a fill pass ([`fill`]), and the backward step of an operation whose one
//! kernel yields the gradients of both its inputs.

use std::borrow::Cow;

use burn::backend::Backend;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Ops;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, TensorData};

pub mod fill;
pub use fill::{
    par_fill, par_fill_pair, write_each, write_each_pair, write_rows, write_split, zeroed, zeros,
};

/// Accumulator lanes: one AVX-512 register of f32. Loops that sum into `LANES` separate
/// accumulators vectorize (a float sum is not reassociated otherwise).
pub const LANES: usize = 16;

/// `e^x` to within 2 ulp over the f32 range where it is normal (arguments are clamped to
/// `[-87, 88]`): `2^k · e^r` with `k = round(x / ln 2)`, `r` reduced in two parts
/// (Cody–Waite) and `e^r` a degree-7 polynomial (the Cephes `expf` coefficients).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 · 2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons, not `clamp`/`max`, which add NaN handling that keeps LLVM scalar.
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    // The low mantissa bits of `shifted` hold k: 2^k from integer operations only.
    let two_k = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    );
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * two_k
}

/// `max(row)` (`-inf` for an empty row), with lane-wise maxima (which vectorize).
#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// `x = softmax(x)` in place: the maximum subtracted, the exponentials summed in lane-wise
/// accumulators (which vectorize), then one scaling pass.
#[inline(always)]
pub fn softmax_in_place(x: &mut [f32]) {
    let max = max(x);
    let mut sums = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (v, s) in c.iter_mut().zip(sums.iter_mut()) {
            *v = exp(*v - max);
            *s += *v;
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `Σ a · b` over the common length, with lane-wise accumulators (which vectorize).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut sums = [0f32; LANES];
    for (a, b) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((s, &a), &b) in sums.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    let done = n / LANES * LANES;
    sums.iter().sum::<f32>()
        + a[done..]
            .iter()
            .zip(&b[done..])
            .map(|(a, b)| a * b)
            .sum::<f32>()
}

/// The widest x86 vector instructions the CPU kernels use (`scalar` elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain code as built (no run-time vector path).
    Scalar,
    /// AVX2 + FMA (256-bit vectors).
    Avx2,
    /// AVX-512F (512-bit vectors).
    Avx512,
}

impl Isa {
    /// `avx512`, `avx2` or `scalar`: what `PEFT_CPU_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// What the processor has, ignoring `PEFT_CPU_ISA`.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// The instruction set our own CPU kernels run with: what the processor has, capped by the
/// environment variable `PEFT_CPU_ISA` (`avx2` or `scalar`), so that an AVX-512 machine can
/// imitate one without it (`cargo xtask bench --isa avx2`). Read once per process; an unknown
/// value is ignored with a warning. The dense products (`gemm`, inside burn's CPU backend)
/// choose their kernels by a rule of their own: see [`gemm_isa`].
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match isa_setting().as_deref() {
            None | Some("") | Some("avx512") => Isa::Avx512,
            Some("avx2") => Isa::Avx2,
            Some("scalar") => Isa::Scalar,
            Some(other) => {
                eprintln!("warning: PEFT_CPU_ISA={other:?} is not avx512, avx2 or scalar; ignored");
                Isa::Avx512
            }
        };
        Isa::detected().min(cap)
    })
}

fn isa_setting() -> Option<String> {
    std::env::var("PEFT_CPU_ISA").ok()
}

/// The instruction set of the dense products (`gemm` in burn's CPU backend, patched in this
/// workspace: `vendor/gemm-f32`). Its AVX-512 kernels run where the processor has AVX-512F,
/// except on AMD Zen 4 (family 19h), which splits each 512-bit operation in two and runs
/// gemm's AVX2 + FMA kernels faster, and except when `PEFT_CPU_ISA` is `avx2` or `scalar`
/// (`avx512` forces them, even on Zen 4). Otherwise AVX2 + FMA. A build without the
/// workspace's patch (a crate depending on peft-core from elsewhere) runs gemm's AVX-512
/// kernels wherever there is AVX-512F, whatever this says.
pub fn gemm_isa() -> Isa {
    let detected = Isa::detected();
    let avx512 = match isa_setting().as_deref() {
        Some("avx512") => true,
        Some("avx2") | Some("scalar") => false,
        _ => !splits_512_bit_operations(),
    };
    if detected == Isa::Avx512 && avx512 {
        Isa::Avx512
    } else {
        detected.min(Isa::Avx2)
    }
}

/// An AMD processor of family 19h (Zen 3 and Zen 4; of these only Zen 4 has AVX-512), whose
/// 512-bit operations run as two 256-bit halves.
pub fn splits_512_bit_operations() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86_64 processor.
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1)) };
        let amd = [vendor.ebx, vendor.edx, vendor.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"AuthenticAMD");
        let base = (signature.eax >> 8) & 0xf;
        let family = if base == 0xf {
            base + ((signature.eax >> 20) & 0xff)
        } else {
            base
        };
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `fn $name<'lifetimes>(args) -> ret` that runs the `#[inline(always)]` function `$body` compiled for
/// AVX-512F, else AVX2 + FMA, as [`isa`] allows (checked at run time), else as built. The
/// body is written once, as plain loops the compiler vectorizes.
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($lt:lifetime),+>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512 $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2 $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::cpu::isa() {
                    // SAFETY: `isa` reports only what the processor has.
                    $crate::cpu::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above (AVX2 and FMA).
                    $crate::cpu::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::Isa::Scalar => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// Make the calling thread one of the threads of rayon's global pool (the pool burn's CPU
/// backend and our kernels run their parallel loops on), with as many threads in all as
/// rayon would start (`RAYON_NUM_THREADS`, else one per CPU the process may use). Call it
/// first thing in a program's main thread, before anything runs in parallel.
///
/// Otherwise the main thread hands each parallel operation to the pool and sleeps until it is
/// done, so every operation waits for a pool thread to wake. As a pool thread, the main
/// thread starts the work itself and the others join in.
///
/// When the pool has one thread per CPU the process may use (the default), each thread is
/// also kept on its own CPU (`PEFT_PIN_THREADS=0` leaves them free). Without that, after a
/// pause of some tens of milliseconds Linux often woke the second thread on the first one's
/// CPU and left it there for the next tens of milliseconds, so a short product ran at one
/// thread's speed (a 512x512x512 forward on 2 threads: 1.8-2.5 ms instead of 1.2 in bursts
/// after a 100 ms pause; observed on a 2-core VM).
///
/// An error when the global pool already exists (it is then left as it is).
pub fn join_thread_pool() -> Result<(), rayon::ThreadPoolBuildError> {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let builder = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread();
    let cpus = affinity::allowed_cpus();
    let pin = threads > 1
        && cpus.len() == threads
        && std::env::var("PEFT_PIN_THREADS").as_deref() != Ok("0");
    if !pin {
        return builder.build_global();
    }
    let for_workers = cpus.clone();
    builder
        .start_handler(move |i| affinity::pin_to(for_workers[i]))
        .build_global()?;
    // The calling thread is thread 0 (rayon runs no start handler for it).
    affinity::pin_to(cpus[0]);
    Ok(())
}

/// The CPUs a thread may run on (Linux; elsewhere none are listed and nothing is pinned).
mod affinity {
    /// The CPUs this process may run on, in increasing order.
    pub fn allowed_cpus() -> Vec<usize> {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
                return Vec::new();
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect()
        }
        #[cfg(not(target_os = "linux"))]
        {
            Vec::new()
        }
    }

    /// Keep the calling thread on `cpu` (advice: a failure leaves it free).
    pub fn pin_to(cpu: usize) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: as above; `cpu` comes from the allowed set, below CPU_SETSIZE.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe {
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = cpu;
    }
}

/// The values of `t` as f32 in logical order: borrowed when `t` already is contiguous f32,
/// converted otherwise.
pub fn f32_values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(x) => Cow::Borrowed(x),
        None => {
            let data = t.clone().into_data().convert_dtype(DType::F32);
            Cow::Owned(data.try_into_vec::<f32>().expect("converted to f32"))
        }
    }
}

/// The element-wise sum of per-task partial sums (each of length `n`), added in task order:
/// the same result whatever the thread count.
pub fn sum_partials(partials: &[Vec<f32>], n: usize) -> Vec<f32> {
    let mut sum = vec![0f32; n];
    for p in partials {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// `values` (f32) as a flex tensor of `shape` in `dtype`: the way back from [`f32_values`].
pub fn flex_tensor(values: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape).convert_dtype(dtype))
}

/// An empty f32 tensor: what a backward kernel returns for a gradient it was not asked for.
pub fn no_gradient() -> FlexTensor {
    FlexTensor::from_data(TensorData::new(Vec::<f32>::new(), Shape::new([0])))
}

/// The backward step of a one-input operation: `gradient` turns the kept state and the
/// output's gradient into the input's gradient (only when the input is tracked).
pub fn backward_single<B: Backend, S>(
    ops: Ops<S, 1>,
    grads: &mut Gradients,
    gradient: impl FnOnce(S, FloatTensor<B>) -> FloatTensor<B>,
) {
    let grad = grads.consume::<B>(&ops.node);
    let [parent] = ops.parents;
    if let Some(node) = parent {
        grads.register::<B>(node.id, gradient(ops.state, grad));
    }
}

/// The backward step of a two-input operation whose kernel `gradients` computes both inputs'
/// gradients from the kept state and the output's gradient in one pass (burn's `binary` runs
/// one closure per input).
pub fn backward_pair<B: Backend, S>(
    ops: Ops<S, 2>,
    grads: &mut Gradients,
    gradients: impl FnOnce(S, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
) {
    let grad = grads.consume::<B>(&ops.node);
    let (first, second) = gradients(ops.state, grad);
    let [first_node, second_node] = ops.parents;
    if let Some(node) = first_node {
        grads.register::<B>(node.id, first);
    }
    if let Some(node) = second_node {
        grads.register::<B>(node.id, second);
    }
}

/// Subnormal floats treated as zero, in and out (x86's MXCSR flags FTZ and DAZ), on the calling
/// thread while the guard lives and, from the first guard on, on every thread of rayon's global
/// pool. On Intel processors an arithmetic operation that meets or makes a subnormal takes a
/// microcode assist, about 75 times slower (a loop of multiply-adds on one of them, observed):
/// a BERT LoRA training run whose values had drifted into that range ran its products at 8
/// GFLOP/s instead of 300. A training step loses nothing by flushing numbers below 1.2e-38.
pub struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

#[cfg(target_arch = "x86_64")]
mod mxcsr {
    /// Flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    pub const FTZ_DAZ: u32 = 0x8040;

    pub fn get() -> u32 {
        let mut csr = 0u32;
        // SAFETY: stmxcsr stores the 4-byte register at the address, which is `csr`'s.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
        csr
    }

    pub fn set(csr: u32) {
        // SAFETY: ldmxcsr loads the register from `csr`; only rounding and exception flags and
        // masks live there, and the callers change nothing but FTZ and DAZ.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly)) };
    }
}

impl FlushDenormals {
    /// Sets FTZ and DAZ here (and once on the global pool's threads); drop restores this
    /// thread's flags.
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // Not a `Once`: a pool thread blocked on one could not run its part of the
            // broadcast. The first caller broadcasts; the others go on without waiting (their
            // own flags are set below).
            static POOL_FLUSHES: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            // A load first: every product passes here, and a swap would write the shared flag.
            if !POOL_FLUSHES.load(std::sync::atomic::Ordering::Relaxed)
                && !POOL_FLUSHES.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                rayon::broadcast(|_| mxcsr::set(mxcsr::get() | mxcsr::FTZ_DAZ));
            }
            let saved = mxcsr::get();
            mxcsr::set(saved | mxcsr::FTZ_DAZ);
            Self { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self {}
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        mxcsr::set(self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under the guard a product that would be subnormal is 0, on this thread and on every
    /// thread of the global pool; after it, this thread computes subnormals again.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn flush_denormals_is_scoped_to_its_guard_here_and_set_on_the_pool() {
        use std::hint::black_box;
        let subnormal_product = || black_box(1e-38f32) * black_box(0.25f32);
        assert!(
            subnormal_product() > 0.0,
            "subnormals are computed by default"
        );
        {
            let _flush = FlushDenormals::new();
            assert_eq!(subnormal_product(), 0.0);
            // A subnormal operand counts as 0 too (DAZ), though the product would be normal.
            assert_eq!(black_box(1e-39f32) * black_box(1e10f32), 0.0);
        }
        assert!(
            subnormal_product() > 0.0,
            "the guard restores this thread's flags"
        );
        let pool = rayon::broadcast(|_| black_box(1e-38f32) * black_box(0.25f32));
        assert!(
            pool.iter().all(|&p| p == 0.0),
            "pool threads flush: {pool:?}"
        );
    }

    /// Within 2 ulp of the correctly rounded `e^x` (f64 reference) across the clamped range,
    /// including tiny results.
    #[test]
    fn exponential_is_within_two_ulp() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    /// This account of the dense products' kernels is the one the patched gemm acts on.
    #[test]
    fn gemm_isa_is_what_gemm_chooses() {
        assert_eq!(
            gemm_f32::isa::splits_512_bit_operations(),
            splits_512_bit_operations()
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(gemm_isa().name(), gemm_f32::isa::kernels());
    }
}
