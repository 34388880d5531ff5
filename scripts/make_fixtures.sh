#!/usr/bin/env bash
# Build the reference venv (versions from shared DESIGN.md) and regenerate the fixtures under
# fixtures/. Needs the SmolLM2 GGUF (cargo xtask fetch) for the real-model reference.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$("$root/scripts/ref_venv.sh")"
"$python" "$root/scripts/make_fixtures.py" "$@"
