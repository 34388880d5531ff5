#!/usr/bin/env bash
# LoRAHub on real data: SmolLM2-135M-Instruct and the chatterbot corpus. One LoRA adapter per
# training topic (rank 8 on q and v, 40 steps of 8 at lr 1e-3); then for each unseen topic,
# `peft lorahub` composes them from 5 of its pairs (the paper's 40 evaluations) and the
# composition's held-out loss on the topic's other pairs is printed next to the base model's
# and the uniform average's (every weight 1/n, composed the same way). Needs the files
# `cargo xtask fetch` downloads ($PEFT_MODELS_DIR, else models/) and python3 with PyYAML.
#
#     scripts/lorahub_experiment.sh [WORK_DIR]     # ~20 minutes on 2 CPU cores
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="${PEFT_MODELS_DIR:-$root/models}"
work="${1:-$root/target/lorahub-experiment}"
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
train_topics=(ai psychology literature emotion coding)
new_topics=(science movies sports)
mkdir -p "$work"
cargo build -q -p peft-cli --bin peft
peft="${CARGO_TARGET_DIR:-$root/target}/debug/peft"

python3 - "$models/chatterbot-english" "$work" "${train_topics[*]}" "${new_topics[*]}" <<'EOF'
import json, os, sys
import yaml

corpus, work, train_topics, new_topics = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()

def pairs(topic):
    convs = yaml.safe_load(open(os.path.join(corpus, topic + ".yml")))["conversations"]
    return [{"question": c[0], "answer": c[1]} for c in convs
            if len(c) >= 2 and isinstance(c[0], str) and isinstance(c[1], str)]

def write(name, rows):
    with open(os.path.join(work, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in rows)

for t in train_topics:
    write(f"train-{t}", pairs(t))
for t in new_topics:
    p = pairs(t)
    write(f"few-{t}", p[:5])
    write(f"held-{t}", p[5:])
EOF

adapters=()
for t in "${train_topics[@]}"; do
  if [ ! -f "$work/$t/adapter_model.safetensors" ]; then
    "$peft" train --model "$model" --data "$work/train-$t.jsonl" --out "$work/$t" --overwrite \
      --method lora --r 8 --alpha 16 --target q_proj,v_proj --steps 40 --batch-size 8 \
      --lr 1e-3 --warmup 4 --save-every 40 --max-len 128
  fi
  adapters+=(--adapter "$work/$t")
done
n=${#train_topics[@]}
uniform=$(python3 -c "print(','.join(['$(python3 -c "print(1/$n)")'] * $n))")

loss() { "$peft" eval --model "$model" --data "$1" --max-len 128 "${@:2}" |
  python3 -c "import json,sys; print(f\"{json.load(sys.stdin)['loss']:.4f}\")"; }
echo
echo "held-out loss of each unseen topic (adapters: ${train_topics[*]})"
printf '%-8s %7s %8s %8s  %s\n' topic base uniform lorahub "weights (lorahub)"
for t in "${new_topics[@]}"; do
  "$peft" lorahub --model "$model" "${adapters[@]}" --data "$work/few-$t.jsonl" --max-len 128 \
    --out "$work/hub-$t" --overwrite > /dev/null
  "$peft" lorahub --model "$model" "${adapters[@]}" --data "$work/few-$t.jsonl" --max-len 128 \
    --weights "$uniform" --out "$work/uniform-$t" --overwrite > /dev/null 2>&1
  held="$work/held-$t.jsonl"
  weights=$(python3 -c "import json; print(' '.join(f'{w:.2f}' for w in json.load(open('$work/hub-$t/lorahub.json'))['weights']))")
  printf '%-8s %7s %8s %8s  %s\n' "$t" "$(loss "$held")" "$(loss "$held" --adapter "$work/uniform-$t")" \
    "$(loss "$held" --adapter "$work/hub-$t")" "$weights"
done
