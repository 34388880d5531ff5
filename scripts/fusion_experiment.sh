#!/usr/bin/env bash
# AdapterFusion on real data: two Pfeiffer adapters on SmolLM2-135M-Instruct, one per chatterbot
# topic (ai, trivia), then their fusion trained on the mix of both; prints the held-out loss
# on the mix (every 5th pair of each topic) of the base model, each adapter alone and the
# fusion. Needs the files `cargo xtask fetch` downloads ($PEFT_MODELS_DIR, else models/).
#
#     scripts/fusion_experiment.sh [WORK_DIR]     # ~15 minutes on 2 CPU cores
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="${PEFT_MODELS_DIR:-$root/models}"
work="${1:-$root/target/fusion-experiment}"
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$work"
cargo build -q -p peft-cli --bin peft
peft="${CARGO_TARGET_DIR:-$root/target}/debug/peft"

python3 - "$models/chatterbot-english" "$work" <<'EOF'
import json, os, random, sys
import yaml

corpus, work = sys.argv[1], sys.argv[2]
mix, held = [], []
for topic in ("ai", "trivia"):
    convs = yaml.safe_load(open(os.path.join(corpus, topic + ".yml")))["conversations"]
    pairs = [{"question": c[0], "answer": c[1]} for c in convs
             if len(c) >= 2 and isinstance(c[0], str) and isinstance(c[1], str)]
    train = [p for i, p in enumerate(pairs) if i % 5 != 4]
    held += [p for i, p in enumerate(pairs) if i % 5 == 4]
    mix += train
    with open(os.path.join(work, topic + ".jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in train)
random.Random(0).shuffle(mix)
for name, rows in (("mix", mix), ("heldout", held)):
    with open(os.path.join(work, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in rows)
EOF

train() {
  "$peft" train --model "$model" --overwrite --steps 60 --batch-size 8 --lr 1e-3 --warmup 5 \
    --save-every 60 --max-len 128 "$@"
}
train --method pfeiffer --data "$work/ai.jsonl" --out "$work/ai"
train --method pfeiffer --data "$work/trivia.jsonl" --out "$work/trivia"
train --method fusion --fuse "$work/ai,$work/trivia" --data "$work/mix.jsonl" --out "$work/fusion"

held="$work/heldout.jsonl"
echo "held-out loss on the mix of both topics ($(wc -l < "$held") pairs):"
printf 'base:           '; "$peft" eval --model "$model" --data "$held" --max-len 128
printf 'ai adapter:     '; "$peft" eval --model "$model" --adapter "$work/ai" --data "$held" --max-len 128
printf 'trivia adapter: '; "$peft" eval --model "$model" --adapter "$work/trivia" --data "$held" --max-len 128
printf 'fusion:         '; "$peft" eval --model "$model" --adapter "$work/ai" --adapter "$work/trivia" \
  --fusion "$work/fusion" --data "$held" --max-len 128
