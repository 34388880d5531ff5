//! Patched for peft (see ../PATCHED.md): which x86 kernels the f32 product uses where the
//! processor has AVX-512F and the crate was built with `x86-v4`.
//!
//! AMD's Zen 4 (family 19h) executes a 512-bit operation as two 256-bit halves, so the
//! AVX-512 kernels bring no more arithmetic per cycle there and measured slower than the
//! AVX2 + FMA ones (a LoRA training step of peft's benchmark Llama: 298-331 against
//! 261-271 ms). On that family the AVX2 + FMA kernels are used; elsewhere (Zen 5, Intel)
//! the AVX-512 ones. The environment variable `PEFT_CPU_ISA` overrides the choice when the
//! process starts: `avx512` forces the AVX-512 kernels, `avx2` or `scalar` the AVX2 + FMA
//! ones (`scalar` only caps peft's own kernels further).

/// Whether the AVX-512 kernels are to be used where the processor has them.
pub fn use_avx512() -> bool {
    #[cfg(feature = "std")]
    {
        match std::env::var("PEFT_CPU_ISA").as_deref() {
            Ok("avx512") => return true,
            Ok("avx2") | Ok("scalar") => return false,
            _ => {}
        }
    }
    !splits_512_bit_operations()
}

/// AMD family 19h with AVX-512 (Zen 4): 512-bit operations run as two 256-bit halves.
pub fn splits_512_bit_operations() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let cpuid = raw_cpuid::CpuId::new();
        let amd = cpuid
            .get_vendor_info()
            .is_some_and(|v| v.as_str() == "AuthenticAMD");
        let family = cpuid.get_feature_info().map(|f| f.family_id());
        amd && family == Some(0x19)
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// The kernels the f32 product runs with: `"avx512"`, `"avx2"` (AVX2 + FMA) or `"scalar"`
/// on x86; `"other"` elsewhere.
pub fn kernels() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        #[cfg(feature = "x86-v4")]
        if gemm_common::feature_detected!("avx512f") && use_avx512() {
            return "avx512";
        }
        if gemm_common::feature_detected!("fma") {
            "avx2"
        } else {
            "scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        "other"
    }
}
