#!/usr/bin/env bash
# Create (once) the AdapterHub reference venv and print its python. AdapterHub `adapters` 1.3.0
# needs transformers 4.57.x, so it cannot share the main reference venv (transformers 5.23);
# see shared formats.md §B.0. Location: $PEFT_ADAPTERS_VENV, else .venv-adapters at the root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PEFT_ADAPTERS_VENV:-$root/.venv-adapters}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating the AdapterHub venv in $venv (torch, transformers 4.57.6, adapters 1.3.0)" >&2
  rm -rf "$venv.partial"
  python3 -m venv "$venv.partial"
  "$venv.partial/bin/pip" install -q torch==2.15.0 transformers==4.57.6 adapters==1.3.0 \
    safetensors==0.8.0 numpy >&2
  # Only a complete install takes the final name, so an interrupted one is redone.
  mv "$venv.partial" "$venv"
fi
echo "$venv/bin/python"
