//! `PEFT_CPU_ISA` caps the instruction set of our own CPU kernels (what `cargo xtask bench
//! --isa avx2` relies on), and `peft-bench isa` reports it.

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
    // gemm's kernels follow the build, not the environment.
    assert_eq!(
        report(Some("avx2"))["dense products (gemm)"],
        native["dense products (gemm)"]
    );
}
