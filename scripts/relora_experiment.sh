#!/usr/bin/env bash
# ReLoRA against LoRA on real data, same budget: SmolLM2-135M-Instruct on the chatterbot corpus
# (every 5th pair of every topic held out), rank 8 on q and v, 80 steps of 8 examples at lr
# 1e-3 each; ReLoRA restarts every 20 steps (four cycles, 5 steps of warmup after each).
# Prints both held-out losses and, from each saved adapter, the numerical rank of every
# module's accumulated update s·B·A (singular values above 1e-3 of the largest). Needs the
# files `cargo xtask fetch` downloads ($PEFT_MODELS_DIR, else models/) and a Python with numpy
# and safetensors ($PEFT_REF_PYTHON, the reference venv of scripts/ref_venv.sh).
#
#     scripts/relora_experiment.sh [WORK_DIR]     # ~15 minutes on 2 CPU cores
#
# RANK, STEPS, LR and CYCLE (ReLoRA's restart period) override those settings, e.g.
# `RANK=2 STEPS=160 CYCLE=40 scripts/relora_experiment.sh`; METHODS picks the runs (default
# "lora relora") and RELORA_SET adds ReLoRA settings (e.g. "reset_adam_steps=false").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="${PEFT_MODELS_DIR:-$root/models}"
work="${1:-$root/target/relora-experiment}"
python="${PEFT_REF_PYTHON:?set PEFT_REF_PYTHON to the reference venv python (scripts/ref_venv.sh)}"
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$work"
cargo build -q -p peft-cli --bin peft
peft="${CARGO_TARGET_DIR:-$root/target}/debug/peft"

python3 - "$models/chatterbot-english" "$work" <<'EOF'
import glob, json, os, sys
import yaml

corpus, work = sys.argv[1], sys.argv[2]
train, held = [], []
for path in sorted(glob.glob(os.path.join(corpus, "*.yml"))):
    convs = yaml.safe_load(open(path))["conversations"]
    pairs = [{"question": c[0], "answer": c[1]} for c in convs
             if len(c) >= 2 and isinstance(c[0], str) and isinstance(c[1], str)]
    train += [p for i, p in enumerate(pairs) if i % 5 != 4]
    held += [p for i, p in enumerate(pairs) if i % 5 == 4]
for name, rows in (("train", train), ("heldout", held[:200])):
    with open(os.path.join(work, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in rows)
EOF

rank="${RANK:-8}" steps="${STEPS:-80}" lr="${LR:-1e-3}" cycle="${CYCLE:-20}"
echo "rank $rank, $steps steps at lr $lr; ReLoRA restarts every $cycle steps"
common=(--model "$model" --overwrite --steps "$steps" --batch-size 8 --lr "$lr" --warmup 5
        --save-every "$steps" --max-len 128 --r "$rank" --alpha "$((2 * rank))" --target q_proj,v_proj
        --data "$work/train.jsonl")
methods="${METHODS:-lora relora}"
relora_set=(--set relora_steps="$cycle" --set relora_warmup=5)
for s in ${RELORA_SET:-}; do relora_set+=(--set "$s"); done
for m in $methods; do
  if [ "$m" = relora ]; then extra=("${relora_set[@]}"); else extra=(); fi
  "$peft" train "${common[@]}" --method "$m" "${extra[@]}" --out "$work/$m"
done

held="$work/heldout.jsonl"
echo "held-out loss on chatterbot ($(wc -l < "$held") pairs):"
for m in $methods; do
  printf '%-7s' "$m:"; "$peft" eval --model "$model" --adapter "$work/$m" --data "$held" --max-len 128
done

"$python" - "$work" "$methods" <<'EOF'
import json, os, sys
import numpy as np
from safetensors.numpy import load_file

work = sys.argv[1]
for m in sys.argv[2].split():
    cfg = json.load(open(os.path.join(work, m, "adapter_config.json")))
    t = load_file(os.path.join(work, m, "adapter_model.safetensors"))
    ranks = []
    for k in sorted(t):
        if k.endswith("lora_A.weight"):
            d = t[k.replace("lora_A", "lora_B")].astype(np.float64) @ t[k].astype(np.float64)
            s = np.linalg.svd(d, compute_uv=False)
            ranks.append(int((s > 1e-3 * s[0]).sum()))
    print(f"{m}: saved r = {cfg['r']}; rank of the accumulated update per module: "
          f"min {min(ranks)}, median {int(np.median(ranks))}, max {max(ranks)} ({len(ranks)} modules)")
EOF
