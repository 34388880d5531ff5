//! What users get wrong and what goes wrong under them: options out of range (exit code 2, one
//! line naming the option), runs killed with SIGKILL at random moments (they resume to the
//! uninterrupted result), NaN/infinite losses, failed writes (the previous checkpoint survives),
//! and `--overwrite` never losing the old output before the new one exists.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{adapter_values, data, peft, s, stderr, tiny};
use std::time::{Duration, Instant};

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--r",
        "4",
        "--alpha",
        "8",
        "--steps",
        steps,
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--warmup",
        "1",
        "--save-every",
        "1",
        "--max-len",
        "32",
    ]
}

/// `args` with `flag` set to `value` (replaced where the flag is already there).
fn with<'a>(mut args: Vec<&'a str>, flag: &'a str, value: &'a str) -> Vec<&'a str> {
    match args.iter().position(|a| *a == flag) {
        Some(i) if !value.is_empty() => args[i + 1] = value,
        Some(_) => {}
        None => {
            args.push(flag);
            if !value.is_empty() {
                args.push(value);
            }
        }
    }
    args
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Exit code 2 and one line naming the option, for every option a user can give out of range.
#[test]
fn options_out_of_range_are_usage_errors_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let out = tmp.path().join("o");
    let bert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert_tiny/model");
    let base = train_args(s(&model), s(&data), s(&out), "2");
    let cases: &[(&[&str], &str)] = &[
        (&["--max-len", "0"], "--max-len 0: must be at least 2"),
        (
            &["--max-len", "65"],
            "--max-len 65: must be between 2 and 64",
        ),
        (&["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (&["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
        (&["--save-every", "0"], "--save-every 0: must be at least 1"),
        (&["--steps", "0"], "--steps 0: must be at least 1"),
        (&["--r", "0"], "--r 0: must be at least 1"),
        (
            &["--lr", "NaN"],
            "--lr NaN: must be a finite number greater than 0",
        ),
        (
            &["--lr", "inf"],
            "--lr inf: must be a finite number greater than 0",
        ),
        (&["--lr", "-1e-4"], "--lr -0.0001"),
        (
            &["--alpha", "-8"],
            "--alpha -8: must be a finite number greater than 0",
        ),
        (&["--dropout", "1"], "--dropout 1: must be in [0, 1)"),
        (&["--weight-decay", "-1"], "--weight-decay -1"),
        (&["--max-grad-norm", "0"], "--max-grad-norm 0"),
        (&["--method", "magic"], "--method magic: unknown method"),
        (&["--task", "magic"], "--task magic: unknown task"),
    ];
    for (extra, needle) in cases {
        let args = with(base.clone(), extra[0], extra[1]);
        let o = peft(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{extra:?}: {err}"
        );
        assert!(
            !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
            "{extra:?} left output behind"
        );
    }
    // Past BERT's position table, for training and evaluation.
    let csv = tmp.path().join("d.csv");
    std::fs::write(&csv, "text,label\na b,x\nc d,y\n").unwrap();
    let o = peft(&[
        "train",
        "--task",
        "classification",
        "--model",
        s(&bert),
        "--data",
        s(&csv),
        "--out",
        s(&out),
        "--max-len",
        "512",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--max-len 512: must be between 2 and 64"),
        "{}",
        stderr(&o)
    );
    let o = peft(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--max-len",
        "100",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A failure of the work itself (a bad data line) is exit code 1.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": 3}\n").unwrap();
    let o = peft(&train_args(s(&model), s(&bad), s(&out), "2"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("bad.jsonl:1"), "{}", stderr(&o));
}

/// Adapters load under their folder names: two folders of the same name are refused instead
/// of one silently replacing the other.
#[test]
fn two_adapters_with_the_same_folder_name_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let (a, b) = (tmp.path().join("a/chat"), tmp.path().join("b/chat"));
    for dir in [&a, &b] {
        let o = peft(&train_args(s(&model), s(&data), s(dir), "1"));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = peft(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&a),
        "--adapter",
        s(&b),
        "--use",
        "chat",
        "--prompt",
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("both named `chat`"), "{}", stderr(&o));
}

/// `--overwrite` replaces an output only once the new one exists: a run that fails keeps the old.
#[test]
fn overwrite_keeps_the_old_output_when_the_new_run_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let out = tmp.path().join("run");
    assert!(
        peft(&train_args(s(&model), s(&data), s(&out), "2"))
            .status
            .success()
    );
    let before = adapter_values(&out);
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "not json\n").unwrap();
    let mut args = train_args(s(&model), s(&bad), s(&out), "2");
    args.push("--overwrite");
    let o = peft(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("were put back"), "{}", stderr(&o));
    assert_eq!(adapter_values(&out), before);

    // merge / quantize / convert: the old folder stays until the new one is complete.
    let merged = tmp.path().join("merged");
    assert!(
        peft(&[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--out",
            s(&merged)
        ])
        .status
        .success()
    );
    let config = std::fs::read(merged.join("config.json")).unwrap();
    let o = peft(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&tmp.path().join("nothing")),
        "--out",
        s(&merged),
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(merged.join("config.json")).unwrap(), config);
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "temporary folders left: {names:?}"
    );
}

/// Resuming with other settings would change the schedule or the data order silently: refused.
#[test]
fn resume_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let out = tmp.path().join("run");
    assert!(
        peft(&with(
            train_args(s(&model), s(&data), s(&out), "6"),
            "--stop-after",
            "2"
        ))
        .status
        .success()
    );
    for (steps, extra) in [
        ("9", vec![]),
        ("6", vec!["--lr", "0.02"]),
        ("6", vec!["--r", "8"]),
    ] {
        let mut args = with(
            train_args(s(&model), s(&data), s(&out), steps),
            "--resume",
            "",
        );
        if let [flag, value] = extra[..] {
            args = with(args, flag, value);
        }
        let o = peft(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("the checkpoint has"), "{}", stderr(&o));
    }
}

/// A tiny LCG: deterministic "random" kill times.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Twenty runs, each killed with SIGKILL at a random moment (during a step, a checkpoint write
/// or the final save; some killed again while resuming), always resume and end on the
/// uninterrupted run's adapter.
#[test]
fn runs_killed_at_random_moments_resume_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let steps = "16";
    let reference = tmp.path().join("reference");
    let o = peft(&train_args(s(&model), s(&data), s(&reference), steps));
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = adapter_values(&reference);

    let mut rng = Lcg(2026);
    let (mut kills, mut trials, mut mid_checkpoint) = (0, 0, 0);
    let lines = |out: &Path| {
        std::fs::read(out.join("metrics.jsonl"))
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    };
    for trial in 0..20 {
        let out = tmp.path().join(format!("killed{trial}"));
        let mut attempts = 0;
        let mut trial_kills = 0;
        loop {
            attempts += 1;
            assert!(
                attempts < 20,
                "trial {trial}: no end after {attempts} attempts"
            );
            let mut args = train_args(s(&model), s(&data), s(&out), steps);
            if out.exists() {
                args.push("--resume");
            }
            let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // The first two attempts of a trial are killed at a random moment: once a random
            // number of steps (below the last) is logged, after a random few milliseconds more,
            // so the kill lands in a step, a checkpoint write or the final save, whatever the
            // machine's speed.
            let kill_at = (attempts <= 2).then(|| {
                let done = lines(&out);
                let at = done + (rng.next() * (15 - done.min(15)) as f64) as usize;
                (at, Duration::from_micros((rng.next() * 15000.0) as u64))
            });
            let mut reached: Option<Instant> = None;
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if let Some((at, _)) = kill_at
                    && reached.is_none()
                    && lines(&out) >= at
                {
                    reached = Some(Instant::now());
                }
                if let (Some((_, extra)), Some(t)) = (kill_at, reached)
                    && t.elapsed() >= extra
                {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    trial_kills += 1;
                    // Killed between writing a new checkpoint and swapping it in.
                    if out.join(".checkpoint.tmp").exists() || out.join(".checkpoint.old").exists()
                    {
                        mid_checkpoint += 1;
                    }
                    break None;
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            if let Some(status) = status {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "trial {trial}, attempt {attempts}: {err}");
                if trial_kills == 0 {
                    // The run outpaced its kill: start this trial again.
                    std::fs::remove_dir_all(&out).unwrap();
                    attempts = 0;
                    continue;
                }
                break;
            }
        }
        let diff = max_diff(&adapter_values(&out), &expected);
        assert!(
            diff <= 1e-6,
            "trial {trial}: resumed adapter differs by {diff}"
        );
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let steps_logged: Vec<u64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            steps_logged,
            (0..16).collect::<Vec<u64>>(),
            "trial {trial}: metrics.jsonl"
        );
        trials += 1;
    }
    assert_eq!(trials, 20);
    assert!(kills >= 20, "only {kills} kills landed");
    eprintln!(
        "kill/resume: {trials} trials, {kills} SIGKILLs ({mid_checkpoint} during a checkpoint write), all equal to the uninterrupted run"
    );
}

/// A copy of the tiny model with a NaN in its final norm: every loss on it is NaN.
fn poisoned_model(dir: &Path) -> PathBuf {
    let out = dir.join("poisoned");
    std::fs::create_dir(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), out.join(f)).unwrap();
    }
    let mut t =
        peft_core::tensors::TensorMap::read_safetensors(&tiny().join("model.safetensors")).unwrap();
    let mut norm = t.remove("model.norm.weight").unwrap();
    norm.data[0] = f32::NAN;
    t.insert("model.norm.weight", norm);
    t.write_safetensors(&out.join("model.safetensors")).unwrap();
    out
}

/// A NaN or infinite loss stops the run naming the step, before the update, and keeps the last
/// good checkpoint; `--skip-nonfinite` skips such batches and counts them.
#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let (model, poisoned) = (tiny(), poisoned_model(tmp.path()));
    let out = tmp.path().join("run");
    // Two good steps, then the run continues on weights that give a NaN loss.
    assert!(
        peft(&with(
            train_args(s(&model), s(&data), s(&out), "6"),
            "--stop-after",
            "2"
        ))
        .status
        .success()
    );
    let good = adapter_values(&out.join("checkpoint"));
    let o = peft(&with(
        train_args(s(&poisoned), s(&data), s(&out), "6"),
        "--resume",
        "",
    ));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("step 2: the loss is NaN") && last.contains("last good checkpoint"),
        "{err}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 2);
    assert_eq!(adapter_values(&out.join("checkpoint")), good);
    assert!(!out.join("adapter_model.safetensors").exists());

    // Skipped instead: no update lands, each skip is counted.
    let o = peft(&with(
        with(
            train_args(s(&poisoned), s(&data), s(&out), "6"),
            "--resume",
            "",
        ),
        "--skip-nonfinite",
        "",
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["skipped"].clone(), last["skipped_total"].clone()),
        (true.into(), 4.into()),
        "{metrics}"
    );
    assert_eq!(adapter_values(&out), good);
}

/// A folder we can make unwritable or full: a small tmpfs where mounting is allowed (root in CI),
/// else (not root) a folder made read-only.
struct Fault {
    dir: PathBuf,
    tmpfs: bool,
}

impl Fault {
    fn new(root: &Path) -> Option<Self> {
        let dir = root.join("disk");
        std::fs::create_dir(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", s(&dir)])
            .output();
        if mounted.is_ok_and(|o| o.status.success()) {
            return Some(Self { dir, tmpfs: true });
        }
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc_geteuid() } == 0;
        (!root_user).then_some(Self { dir, tmpfs: false })
    }

    fn read_only(&self, on: bool) {
        if self.tmpfs {
            let opt = if on { "remount,ro" } else { "remount,rw" };
            assert!(
                Command::new("mount")
                    .args(["-o", opt, s(&self.dir)])
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            for entry in walk(&self.dir) {
                let mut p = std::fs::metadata(&entry).unwrap().permissions();
                p.set_readonly(on);
                std::fs::set_permissions(&entry, p).unwrap();
            }
        }
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = Command::new("umount").arg(&self.dir).status();
        } else {
            self.read_only(false);
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A write that fails (read-only folder, full disk) stops the run naming the file, and the
/// previous checkpoint is intact: once the fault is gone the run resumes to the normal result.
#[test]
fn failed_writes_keep_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let model = tiny();
    let reference = tmp.path().join("reference");
    assert!(
        peft(&train_args(s(&model), s(&data), s(&reference), "6"))
            .status
            .success()
    );
    let Some(fault) = Fault::new(tmp.path()) else {
        eprintln!(
            "skipped: running as root without permission to mount a tmpfs, so no write can be made to fail"
        );
        return;
    };
    let out = fault.dir.join("run");
    assert!(
        peft(&with(
            train_args(s(&model), s(&data), s(&out), "6"),
            "--stop-after",
            "2"
        ))
        .status
        .success()
    );
    let checkpoint = adapter_values(&out.join("checkpoint"));
    let mut resume = train_args(s(&model), s(&data), s(&out), "6");
    resume.push("--resume");

    fault.read_only(true);
    let o = peft(&resume);
    fault.read_only(false);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.trim().lines().last().unwrap().contains(s(&out)),
        "the error must name the file: {err}"
    );
    assert_eq!(adapter_values(&out.join("checkpoint")), checkpoint);

    if fault.tmpfs {
        // Fill the disk: the next checkpoint cannot be written.
        let filler = fault.dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let o = peft(&resume);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.trim().lines().last().unwrap();
        assert!(
            last.contains("No space left") && last.contains(s(&out)),
            "{err}"
        );
        assert_eq!(adapter_values(&out.join("checkpoint")), checkpoint);
        std::fs::remove_file(&filler).unwrap();
    }
    let o = peft(&resume);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(max_diff(&adapter_values(&out), &adapter_values(&reference)) <= 1e-6);
}
