#!/usr/bin/env bash
# The hybrid runtime on the GPU box in one call (issue 17): build the engine, run the GPU-path tests on CUDA, then
# bench/gpu_hybrid.py through hybrid_runtime.HybridRuntime (layer, prefill crossover, model stages).
#
#   device run, carry [".whl", ".carry/snap"] (snapshot of committed code: others may be editing csrc/ here):
#     rm -rf .carry/snap && mkdir -p .carry/snap && git archive HEAD | tar -x -C .carry/snap
#     command: ln -sfn "$PWD/.whl" .carry/snap/.whl && cd .carry/snap && bash bench/runtime_box.sh
#
# .whl/x: lvllm's CLI dependencies and nanobind (bench/vllm_gpu_serve.sh says which); .whl/t: pytest, pluggy,
# iniconfig. GPU_HYBRID_ARGS adds to / overrides gpu_hybrid.py's arguments. $OUT: pytest.log, gpu_hybrid.{json,md}.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
[ -f /tmp/site/.deps-done ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/x/*.whl .whl/t/*.whl && touch /tmp/site/.deps-done; } || exit 1
if ! ls lvllm_runtime/_cpu*.so >/dev/null 2>&1; then
  NB=$(python3 -c 'import nanobind; print(nanobind.cmake_dir())')
  cmake -S . -B /tmp/b -DCMAKE_BUILD_TYPE=Release -Dnanobind_DIR="$NB" -DPython_EXECUTABLE="$(which python3)" \
      > "$OUT/build.log" 2>&1 && cmake --build /tmp/b -j16 >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  cp /tmp/b/csrc/_cpu*.so lvllm_runtime/
fi
echo "setup_s=$(( $(date +%s) - t0 ))"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_hybrid.py 2>&1 | tee "$OUT/pytest.log" | tail -15
echo "tests_s=$(( $(date +%s) - t0 ))"
python3 bench/gpu_hybrid.py --out "$OUT" --stages env,bw,layer,prefill,model --layers 12 --prefill-layers 6 \
    --hot 16 ${GPU_HYBRID_ARGS:-} 2>&1 | tee "$OUT/gpu_hybrid.log" | grep -v "^\[" | tail -60
echo "total_s=$(( $(date +%s) - t0 ))"
