#!/usr/bin/env bash
# The CPU engine on the GPU box in one call (issue 19): build it from this checkout, run its tests (real AMX there),
# then bench/cpu_moe.py at Qwen3-30B-A3B shapes, INT4 g128 + BF16, T = 1, 4, 32, 512, three runs per configuration,
# on 14 threads (cpus 2-15) and 16 (0-15), beside kt-kernel 0.7.2 in the same process when its extension is carried.
#
#   device run, carry [".whl/x", ".whl/t", ".whl/kt"], command: bash bench/cpu_moe_box.sh
#   (committed code only: rm -rf .carry/snap && mkdir -p .carry/snap && git archive HEAD | tar -x -C .carry/snap;
#    carry [".whl/x", ".whl/t", ".whl/kt", ".carry/snap"],
#    command: ln -sfn "$PWD/.whl" .carry/snap/.whl && cd .carry/snap && bash bench/cpu_moe_box.sh)
#
# .whl/x: nanobind (bench/vllm_gpu_serve.sh lists it); .whl/t: pytest, pluggy, iniconfig. .whl/kt: kt-kernel's AMX
# extension and its vendored libraries, cut from the 97 MiB wheel (over the carry limit) here:
#   pip download --no-deps --python-version 3.12 --only-binary :all: kt-kernel==0.7.2
#   unzip the wheel's kt_kernel/_kt_kernel_ext_amx*.so and kt_kernel.libs/ into one folder, then
#   python3 -m zipfile -c .whl/kt/kt_kernel-0.7.2-amx.zip kt_kernel kt_kernel.libs      (in that folder)
# Without .whl/kt the kt columns stay empty. Last, bench/cpu_decode.py on the 14 cpus, the process free to run on
# all 16 as a server's main thread is (per-thread phase times of decode calls, spinning as on the engine's own cores:
# --spin-us 1000), to tell a slow box from a fast one.
# $OUT: build.log, pytest.log, cpu_moe.json (one entry per run), cpu_moe.md, cpu_decode.json, cpu_decode.md.
# BENCH_ARGS adds to every cpu_moe.py call (e.g. "--min-seconds 2"); SANITIZE=0 skips the sanitizer build (~1 min);
# CPUS14 / CPUS16 name the two cpu sets (default 2-15 and 0-15: the box's 16 cores without and with vLLM's two).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site /tmp/kt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/x/nanobind-*.whl \
    .whl/t/*.whl > "$OUT/build.log" 2>&1 || { tail -5 "$OUT/build.log"; exit 1; }
NB=$(python3 -c 'import nanobind; print(nanobind.cmake_dir())')
# Always from this checkout's csrc/ (a .so left by an earlier call would be stale); CMake rebuilds only what changed.
cmake -S . -B /tmp/cpu-moe-build -DCMAKE_BUILD_TYPE=Release -Dnanobind_DIR="$NB" -DPython_EXECUTABLE="$(which python3)" \
    >> "$OUT/build.log" 2>&1 && cmake --build /tmp/cpu-moe-build -j16 >> "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
cp /tmp/cpu-moe-build/csrc/_cpu*.so lvllm_runtime/
echo "build_s=$(( $(date +%s) - t0 ))"
lscpu | grep -E "Model name|^CPU\(s\)|L3|NUMA node\(s\)"; grep -m1 microcode /proc/cpuinfo
python3 -c "from lvllm_runtime.engine import Engine; print('kernel tables', Engine.available_isas())"
tests=(tests/test_engine.py)
[ "${SANITIZE:-1}" = 1 ] && tests+=(tests/test_engine_sanitize.py)
python3 -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/pytest.log" | tail -12
echo "tests_s=$(( $(date +%s) - t0 ))"
kt=()
if ls .whl/kt/*.zip >/dev/null 2>&1; then
  python3 -m zipfile -e .whl/kt/*.zip /tmp/kt && kt=(--kt-ext "$(ls /tmp/kt/kt_kernel/_kt_kernel_ext_amx*.so)")
fi
runs=()
bench() {  # name, cpus, cpu_moe.py arguments...
  local name=$1 cpus=$2; shift 2
  echo "== $name: cpus $cpus, $*" | tee -a "$OUT/cpu_moe.md"
  taskset -c "$cpus" python3 bench/cpu_moe.py --shapes qwen3-30b-a3b --group 128 --cpus "$cpus" --no-torch \
      --repeat 3 --min-seconds 1 --json "/tmp/cpu_moe_$name.json" "$@" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/cpu_moe.md"
  [ -f "/tmp/cpu_moe_$name.json" ] && runs+=("/tmp/cpu_moe_$name.json")
  echo "after_${name}_s=$(( $(date +%s) - t0 ))"
}
: > "$OUT/cpu_moe.md"
bench t14 "${CPUS14:-2-15}" --formats int4,bf16 --tokens 1,4,32,512 "${kt[@]}"
bench t16 "${CPUS16:-0-15}" --formats int4,bf16 --tokens 1,4,32,512 "${kt[@]}"
# The INT4 prefill on AVX512-VNNI (the table every non-AMX box runs) beside the AMX one above.
bench t14-avx512 "${CPUS14:-2-15}" --formats int4 --tokens 4,32,512 --isa avx512
python3 - "$OUT/cpu_moe.json" "${runs[@]}" <<'EOF'
import json, sys
docs = [dict(json.load(open(p)), run=p.rsplit("cpu_moe_", 1)[1][:-5]) for p in sys.argv[2:]]
json.dump({"runs": docs}, open(sys.argv[1], "w"), indent=1)
print(f"wrote {sys.argv[1]}: {len(docs)} runs")
EOF
python3 bench/cpu_decode.py --cpus "${CPUS14:-2-15}" --spin-us 1000 --json "$OUT/cpu_decode.json" ${DECODE_ARGS:-} \
    2>&1 | tee "$OUT/cpu_decode.md"
echo "total_s=$(( $(date +%s) - t0 ))"
