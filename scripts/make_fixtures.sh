#!/usr/bin/env bash
# Build the reference venv (versions from shared DESIGN.md) and regenerate the fixtures under
# fixtures/. Needs the SmolLM2 GGUF (cargo xtask fetch) for the real-model reference.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PEFT_REF_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.15.0 transformers==5.23.0 peft==0.21.2 safetensors==0.8.0 gguf==0.19.0 bitsandbytes==0.50.2 numpy
fi
"$venv/bin/python" "$root/scripts/make_fixtures.py" "$@"
