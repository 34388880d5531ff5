//! `peft lorahub`: searches composition weights on a few examples and saves the composition as
//! a plain LoRA adapter whose loss is the one reported; `--weights` composes without a search;
//! mistakes are usage errors that name the option or the adapter.

mod common;

use std::path::{Path, PathBuf};

use common::{agrees_on_tiny_in_python, data, eval_loss, peft, s, stderr, tiny};
use peft_core::adapter_io::load_adapter;

fn adapter(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/combine_tiny/adapters")
        .join(name)
}

fn lorahub(extra: &[&str], data: &Path, out: &Path) -> std::process::Output {
    let (model, a, b) = (tiny(), adapter("a"), adapter("b"));
    let mut args = vec![
        "lorahub",
        "--model",
        s(&model),
        "--adapter",
        s(&a),
        "--adapter",
        s(&b),
        "--data",
        s(data),
        "--max-len",
        "32",
        "--out",
        s(out),
    ];
    args.extend(extra);
    peft(&args)
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("lorahub.json")).unwrap()).unwrap()
}

#[test]
fn the_composition_found_is_saved_as_a_lora_adapter_with_the_loss_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let few = data(tmp.path());
    let out = tmp.path().join("hub");
    let o = lorahub(&["--max-evals", "12", "--seed", "3"], &few, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&out);
    let weights: Vec<f64> = serde_json::from_value(r["weights"].clone()).unwrap();
    assert_eq!(weights.len(), 2);
    assert!(weights.iter().all(|w| w.abs() <= 1.5), "{weights:?}");
    let loss = r["loss"].as_f64().unwrap();
    let objective = r["objective"].as_f64().unwrap();
    let penalty = 0.05 * (weights[0].abs() + weights[1].abs()) / 2.0;
    assert!((objective - loss - penalty).abs() < 1e-9, "{r}");
    assert_eq!(r["searched"], true);
    // The saved folder gives the loss the search measured.
    let reloaded = eval_loss(&tiny(), Some(&out), &few);
    assert!((reloaded - loss).abs() < 1e-5, "{reloaded} vs {loss}");
    // The search tried the uniform average first: its best is no worse in objective.
    let uniform = r["uniform_loss"].as_f64().unwrap();
    assert_eq!(r["uniform_start"], true);
    assert!(objective <= uniform + 0.05 * 0.5 + 1e-9, "{r}");
    // Stdout is the same report.
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(printed, r);

    // --weights: that composition, Σ wᵢ·Aᵢ and Σ wᵢ·(sᵢ/s₁)·Bᵢ (a: alpha 8 / r 4 = 2;
    // b: rsLoRA, 16 / √4 = 8), under a's config.
    let fixed = tmp.path().join("fixed");
    let o = lorahub(&["--weights", "0.7,-0.4"], &few, &fixed);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(&fixed)["searched"], false);
    let (a, b, c) = (
        load_adapter(&adapter("a")).unwrap(),
        load_adapter(&adapter("b")).unwrap(),
        load_adapter(&fixed).unwrap(),
    );
    assert_eq!(c.config["lora_alpha"], a.config["lora_alpha"]);
    for (k, t) in &c.tensors.tensors {
        let rel_b = if k.contains("lora_B") { 4.0 } else { 1.0 };
        let (x, y) = (a.tensors.get(k).unwrap(), b.tensors.get(k).unwrap());
        for i in 0..t.data.len() {
            let want = 0.7 * x.data[i] - 0.4 * rel_b * y.data[i];
            assert!((t.data[i] - want).abs() < 1e-6, "{k}[{i}]");
        }
    }
    agrees_on_tiny_in_python(&fixed, &[]);
}

#[test]
fn mistakes_are_usage_errors_naming_the_option_or_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let few = data(tmp.path());
    let out = tmp.path().join("out");
    for (extra, says) in [
        (&["--weights", "0.5"][..], "1 weights for 2"),
        (&["--max-evals", "0"][..], "max_evals 0"),
        (&["--bound", "0"][..], "bound 0"),
    ] {
        let o = lorahub(extra, &few, &out);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
        assert_eq!(o.status.code(), Some(2), "{extra:?}: a usage error");
        assert!(!out.exists(), "{extra:?}: nothing written");
    }
    // Adapter c has rank 2, a rank 4: A and B cannot be summed.
    let o = peft(&[
        "lorahub",
        "--model",
        s(&tiny()),
        "--adapter",
        s(&adapter("a")),
        "--adapter",
        s(&adapter("c")),
        "--data",
        s(&few),
        "--out",
        s(&out),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("rank 4 in") && err.contains("and 2 in"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::create_dir_all(&out).unwrap();
    let o = lorahub(&["--weights", "1,0"], &few, &out);
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
}
