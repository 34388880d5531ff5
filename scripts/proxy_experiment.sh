#!/usr/bin/env bash
# Proxy-tuning on real data: SmolLM2-135M-Instruct steered by a LoRA-tuned copy of itself
# (expert: SmolLM2 + LoRA trained on the chatterbot corpus; anti-expert: SmolLM2). Prints the
# held-out loss (every 5th pair of every topic) of the untuned model, of the LoRA model and of
# the proxy at alpha 0.5 and 1. Needs the files `cargo xtask fetch` downloads
# ($PEFT_MODELS_DIR, else models/).
#
#     scripts/proxy_experiment.sh [WORK_DIR]     # ~10 minutes on 2 CPU cores
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="${PEFT_MODELS_DIR:-$root/models}"
work="${1:-$root/target/proxy-experiment}"
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

"$peft" train --model "$model" --overwrite --method lora --steps 60 --batch-size 8 --lr 1e-3 \
  --warmup 5 --save-every 60 --max-len 128 --data "$work/train.jsonl" --out "$work/lora"

held="$work/heldout.jsonl"
eval() { "$peft" eval --model "$model" --data "$held" --max-len 128 "$@"; }
echo "held-out loss on chatterbot ($(wc -l < "$held") pairs):"
printf 'untuned:           '; eval
printf 'LoRA model:        '; eval --adapter "$work/lora"
for alpha in 0.5 1; do
  printf 'proxy, alpha %-4s ' "$alpha:"
  eval --proxy-base "$model" --proxy-adapter "$work/lora" --proxy-alpha "$alpha"
done
