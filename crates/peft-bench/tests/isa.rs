//! `PEFT_CPU_ISA` caps the instruction set of our own CPU kernels and of gemm's (what `cargo
//! xtask bench --isa avx2` relies on), and `peft-bench isa` reports it.

use std::process::Command;

use peft_core::cpu::Isa;

fn report(cap: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft-bench"));
    cmd.arg("isa").env_remove("PEFT_CPU_ISA");
    if let Some(c) = cap {
        cmd.env("PEFT_CPU_ISA", c);
    }
    let out = cmd.output().expect("running peft-bench isa");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn the_environment_caps_our_kernels_and_the_report_says_so() {
    let detected = Isa::detected();
    let native = report(None);
    assert_eq!(native["processor"], detected.name());
    assert_eq!(native["own kernels"], detected.name());
    assert_eq!(
        report(Some("avx2"))["own kernels"],
        detected.min(Isa::Avx2).name()
    );
    assert_eq!(report(Some("scalar"))["own kernels"], "scalar");
    // An unknown value is ignored (with a warning), not a failure.
    assert_eq!(report(Some("sse9"))["own kernels"], detected.name());
    // gemm's kernels follow the environment too, at run time (the patched vendor/gemm-f32):
    // AVX-512 where there is AVX-512F, except on Zen 4 unless asked for.
    let avx2_or_less = detected.min(Isa::Avx2).name();
    assert_eq!(report(Some("avx2"))["dense products (gemm)"], avx2_or_less);
    assert_eq!(
        report(Some("scalar"))["dense products (gemm)"],
        avx2_or_less
    );
    assert_eq!(
        report(Some("avx512"))["dense products (gemm)"],
        detected.name()
    );
    let by_default = if peft_core::cpu::splits_512_bit_operations() {
        avx2_or_less
    } else {
        detected.name()
    };
    assert_eq!(native["dense products (gemm)"], by_default);
}
