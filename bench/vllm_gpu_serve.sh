#!/usr/bin/env bash
# The whole carry-install-serve-measure sequence for real vLLM 0.25 + lvllm on the GPU box (issue 10), one call:
#
#   device run, carry [".whl"], command: RUNS=int4-eager,... bash bench/vllm_gpu_serve.sh
#
# From committed code only (others may be editing csrc/ in the same checkout): here
#   rm -rf .carry/snap && mkdir -p .carry/snap && git archive HEAD | tar -x -C .carry/snap
# carry [".whl", ".carry/snap"], command: ln -sfn "$PWD/.whl" .carry/snap/.whl && cd .carry/snap && RUNS=... bash ...
#
# Here first: .whl/p0 .whl/p1 from ../shared/tools/vllm_gpu_wheels.sh (vLLM 0.25.0 and the server packages the box
# lacks, 52 MiB) and .whl/x/ = nanobind 3.1.0 + lvllm's CLI dependencies the box lacks (typer rich click shellingham
# markdown-it-py mdurl pygments py-cpuinfo nvidia-ml-py annotated-doc; pip download --no-deps, cp312 manylinux).
# On the box: join and unpack the parts into /tmp/site (4 s), pip-install .whl/x there, build the C++ engine with
# CMake + nanobind (as bench/gpu_hybrid.py's run did), install lvllm from this checkout (dist-info with the
# `vllm.general_plugins` entry point and the `lvllm` script; the package itself stays importable from the checkout),
# then bench/vllm_gpu_serve.py: zoo checkpoint at Qwen3-30B-A3B shapes, INT4 + BF16 stores, plans, servers (RUNS),
# measurements (SERVE_ARGS adds vllm_gpu_serve.py arguments, e.g. --from-store). Steps already done on a still-warm box are skipped. $OUT: vllm_gpu_serve.json, install.log,
# serve.log, logs.tgz (every server's full log).
set -uo pipefail
OUT=${OUT:-/tmp/out}; W=/tmp/vgs; mkdir -p "$OUT" /tmp/parts /tmp/site /tmp/bin "$W"
RUNS=${RUNS:-int4-eager}; LAYERS=${LAYERS:-4}; SECONDS_BUDGET=${SECONDS_BUDGET:-470}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 PATH=/tmp/bin:$PATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
{
if [ ! -f /tmp/site/.vllm-done ]; then
  cp .whl/p[0-9] /tmp/parts/ && cat /tmp/parts/p[0-9] | tar -xJ -C /tmp/site \
      || { echo "vLLM parts: join failed (a part missing or out of order)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/x/*.whl || exit 1
  touch /tmp/site/.vllm-done
fi
if ! ls lvllm_runtime/_cpu*.so >/dev/null 2>&1; then
  NB=$(python3 -c 'import nanobind; print(nanobind.cmake_dir())')
  cmake -S . -B /tmp/b -DCMAKE_BUILD_TYPE=Release -Dnanobind_DIR="$NB" -DPython_EXECUTABLE="$(which python3)" \
      > "$W/build.log" 2>&1 && cmake --build /tmp/b -j16 >> "$W/build.log" 2>&1 || { tail -30 "$W/build.log"; exit 1; }
  cp /tmp/b/csrc/_cpu*.so lvllm_runtime/
fi
D=/tmp/site/lvllm-0.1.0.dist-info; mkdir -p $D
printf 'Metadata-Version: 2.1\nName: lvllm\nVersion: 0.1.0\n' > $D/METADATA
{ printf '[vllm.general_plugins]\nlvllm = lvllm_runtime.vllm_plugin:register\n\n'
  printf '[console_scripts]\nlvllm = lvllm_cli.app:main\n'; } > $D/entry_points.txt
printf '#!/usr/bin/env python3\nfrom lvllm_cli.app import main\nmain()\n' > /tmp/bin/lvllm; chmod +x /tmp/bin/lvllm
python3 -c "
import importlib.metadata as m, torch, vllm
from lvllm_runtime import _cpu
print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())
print('engine isas', _cpu.available_isas())
print('entry points', [e.value for e in m.entry_points(group='vllm.general_plugins')])" 2>&1 | grep -v INFO
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
echo "install_s=$(( $(date +%s) - t0 ))"
} 2>&1 | tee "$OUT/install.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
python3 bench/vllm_gpu_serve.py --work $W --out "$OUT" --layers "$LAYERS" --runs "$RUNS" \
    --seconds $(( SECONDS_BUDGET - ($(date +%s) - t0) )) ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log"
tar -czf "$OUT/logs.tgz" -C "$W" logs build.log 2>/dev/null
echo "total_s=$(( $(date +%s) - t0 ))"
