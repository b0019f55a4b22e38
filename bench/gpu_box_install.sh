#!/usr/bin/env bash
# Install CUDA vLLM and lvllm on the GPU box from the carried .whl (as bench/vllm_gpu_serve.sh says what it holds:
# p0 p1 = vLLM 0.25.0 and the server packages the box lacks, x = nanobind and lvllm's CLI dependencies) into
# /tmp/site, build the C++ engine into lvllm_runtime/, and register the plugin's entry point and the `lvllm` script.
# Source it from a bench script run in the checkout: it sets PYTHONPATH and PATH, and skips what a still-warm box
# already has. Prints the versions and install_s; returns non-zero on failure.
mkdir -p /tmp/parts /tmp/site /tmp/bin
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 PATH=/tmp/bin:$PATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpu_box_install() {
  local t0 nb d build_log=${1:-/tmp/build.log}
  t0=$(date +%s)
  if [ ! -f /tmp/site/.vllm-done ]; then
    cp .whl/p[0-9] /tmp/parts/ && cat /tmp/parts/p[0-9] | tar -xJ -C /tmp/site \
        || { echo "vLLM parts: join failed (a part missing or out of order)"; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/x/*.whl || return 1
    touch /tmp/site/.vllm-done
  fi
  if ! ls lvllm_runtime/_cpu*.so >/dev/null 2>&1; then
    nb=$(python3 -c 'import nanobind; print(nanobind.cmake_dir())')
    cmake -S . -B /tmp/b -DCMAKE_BUILD_TYPE=Release -Dnanobind_DIR="$nb" -DPython_EXECUTABLE="$(which python3)" \
        > "$build_log" 2>&1 && cmake --build /tmp/b -j16 >> "$build_log" 2>&1 || { tail -30 "$build_log"; return 1; }
    cp /tmp/b/csrc/_cpu*.so lvllm_runtime/
  fi
  d=/tmp/site/lvllm-0.1.0.dist-info; mkdir -p $d
  printf 'Metadata-Version: 2.1\nName: lvllm\nVersion: 0.1.0\n' > $d/METADATA
  { printf '[vllm.general_plugins]\nlvllm = lvllm_runtime.vllm_plugin:register\n\n'
    printf '[console_scripts]\nlvllm = lvllm_cli.app:main\n'; } > $d/entry_points.txt
  printf '#!/usr/bin/env python3\nfrom lvllm_cli.app import main\nmain()\n' > /tmp/bin/lvllm; chmod +x /tmp/bin/lvllm
  python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" \
      2>&1 | grep -v INFO
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  echo "install_s=$(( $(date +%s) - t0 ))"
}
