#!/usr/bin/env bash
# Create (once) the reference Python venv with the versions in shared DESIGN.md and print its
# python. Location: $PEFT_REF_VENV, else .venv at the repository root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PEFT_REF_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating the reference venv in $venv (torch, transformers, peft, bitsandbytes; ~6 GB)" >&2
  python3 -m venv "$venv.partial"
  "$venv.partial/bin/pip" install -q torch==2.15.0 transformers==5.23.0 peft==0.21.2 safetensors==0.8.0 \
    gguf==0.19.0 bitsandbytes==0.50.2 numpy scipy >&2
  # Only a complete install takes the final name, so an interrupted one is redone.
  mv "$venv.partial" "$venv"
fi
# Added later (PEFT's LoftQ config needs it): install into venvs made before.
"$venv/bin/python" -c "import scipy" 2>/dev/null || "$venv/bin/python" -m pip install -q scipy >&2
echo "$venv/bin/python"
