//! `peft combine`: the combined adapter is PEFT's `add_weighted_adapter` result (fixtures:
//! `scripts/make_fixtures.py --only combine`), loads for generation here and in Python PEFT,
//! and mistakes are usage errors that name the option.

mod common;

use std::path::{Path, PathBuf};

use common::{agrees_on_tiny_in_python, peft, s, stderr, tiny};
use peft_core::adapter_io::load_adapter;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/combine_tiny")
        .join(name)
}

fn adapters() -> [PathBuf; 2] {
    [fixture("adapters/a"), fixture("adapters/b")]
}

#[test]
fn combines_as_peft_does_and_the_result_loads_here_and_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = adapters();
    for (kind, extra) in [("cat", &[][..]), ("ties", &["--density", "0.5"][..])] {
        let out = tmp.path().join(kind);
        let mut args = vec![
            "combine",
            "--adapter",
            s(&a),
            "--adapter",
            s(&b),
            "--weights",
            "0.7,-0.4",
            "--type",
            kind,
            "--out",
            s(&out),
        ];
        args.extend(extra);
        let o = peft(&args);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let ours = load_adapter(&out).unwrap();
        let theirs = load_adapter(&fixture(kind)).unwrap();
        assert_eq!(ours.config["r"], theirs.config["r"]);
        for (k, t) in &theirs.tensors.tensors {
            let mine = ours.tensors.get(k).unwrap();
            let err = mine
                .data
                .iter()
                .zip(&t.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{kind}: {k} differs from PEFT's by {err}");
        }
        let o = peft(&[
            "generate",
            "--model",
            s(&tiny()),
            "--adapter",
            s(&out),
            "--prompt",
            "hello what",
            "--raw",
            "--max-new-tokens",
            "4",
        ]);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        agrees_on_tiny_in_python(&out, &[]);
    }
}

#[test]
fn mistakes_are_usage_errors_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = adapters();
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "combine",
            "--adapter",
            s(&a),
            "--adapter",
            s(&b),
            "--out",
            s(&out),
        ];
        args.extend(extra);
        peft(&args)
    };
    for (extra, says) in [
        (&["--weights", "0.5"][..], "1 weights for 2"),
        (
            &["--weights", "0.5,0.5", "--type", "mean"][..],
            "--type mean",
        ),
        (
            &["--weights", "0.5,0.5", "--type", "ties"][..],
            "give a density",
        ),
        (
            &["--weights", "0.5,0.5", "--type", "ties", "--density", "2"][..],
            "--density 2",
        ),
    ] {
        let o = run(extra);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
        assert!(!out.exists(), "{extra:?}: nothing written");
    }
    let o = run(&["--weights", "0.5,0.5", "--type", "mean"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    // A prompt-tuning folder is not a LoRA adapter.
    let prompt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/prompts_tiny/prompt_random_llama/adapter");
    let o = peft(&[
        "combine",
        "--adapter",
        s(&a),
        "--adapter",
        s(&prompt),
        "--weights",
        "1,1",
        "--out",
        s(&out),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("PROMPT_TUNING"),
        "{err}"
    );
    // An existing output folder is kept unless --overwrite.
    std::fs::create_dir_all(&out).unwrap();
    let o = run(&["--weights", "0.5,0.5", "--type", "cat"]);
    assert!(stderr(&o).contains("--overwrite"));
    let o = run(&["--weights", "0.5,0.5", "--type", "cat", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
