//! `peft generate --per-prompt`: one batched pass where each prompt uses its own LoRA adapter
//! answers each prompt as that adapter alone does.

mod common;

use std::path::{Path, PathBuf};

use common::{peft, s, stderr, tiny};

fn adapter(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/combine_tiny/adapters")
        .join(name)
}

fn generate(adapters: &[PathBuf], prompts: &[&str], extra: &[&str]) -> std::process::Output {
    let model = tiny();
    let mut args = vec!["generate", "--model", s(&model)];
    for a in adapters {
        args.extend(["--adapter", s(a)]);
    }
    for p in prompts {
        args.extend(["--prompt", p]);
    }
    args.extend(["--raw", "--max-new-tokens", "6"]);
    args.extend(extra);
    peft(&args)
}

#[test]
fn each_prompt_is_answered_as_its_adapter_alone_answers_it() {
    let (a, c) = (adapter("a"), adapter("c"));
    let prompts = ["hello what is", "the capital", "what"];
    let o = generate(
        &[a.clone(), c.clone()],
        &prompts,
        &["--per-prompt", "a,c,__base__"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mixed: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(mixed.len(), 3);
    let alone = |adapters: &[PathBuf], p: &str| {
        let o = generate(adapters, &[p], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim_end().to_string()
    };
    assert_eq!(mixed[0], alone(std::slice::from_ref(&a), prompts[0]));
    assert_eq!(mixed[1], alone(std::slice::from_ref(&c), prompts[1]));
    assert_eq!(mixed[2], alone(&[], prompts[2]));

    for (extra, says) in [
        (&["--per-prompt", "a,c"][..], "2 adapters for 3 --prompt"),
        (&["--per-prompt", "a,zz,c"][..], "--per-prompt zz"),
        (
            &["--per-prompt", "a,c,a", "--use", "a"][..],
            "leave out --use",
        ),
    ] {
        let o = generate(&[a.clone(), c.clone()], &prompts, extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{extra:?}: {}", stderr(&o));
    }
}
