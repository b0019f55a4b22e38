#!/usr/bin/env bash
# Every zoo family through CUDA vLLM on the GPU box, stock vs the lvllm plugin (bench/families_gpu.py), one call:
#
#   device run, carry [".whl/p0", ".whl/p1", ".whl/x", ".carry/snap"] (59 MiB: the whole .whl with a snapshot passes
#   the 64 MiB carry limit; the snapshot of committed code because others may be editing csrc/ here):
#     rm -rf .carry/snap && mkdir -p .carry/snap && git archive HEAD | tar -x -C .carry/snap
#     command: ln -sfn "$PWD/.whl" .carry/snap/.whl && cd .carry/snap && bash bench/families_gpu.sh
#
# Installs with bench/gpu_box_install.sh, then runs families_gpu.py with 8 workers (FAMILIES_ARGS adds to its
# arguments, e.g. --families qwen3_moe,gemma4 or --dtype bfloat16). $OUT: install.log, build.log, families.log,
# families.json, worker*.log. Exit status: families_gpu.py's (1 when a row fails).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
source bench/gpu_box_install.sh
gpu_box_install "$OUT/build.log" 2>&1 | tee "$OUT/install.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
python3 bench/families_gpu.py --out "$OUT" --work /tmp/families --workers 8 ${FAMILIES_ARGS:-} 2>&1 \
    | grep -v "Writing model shards" | tee "$OUT/families.log"
rc=${PIPESTATUS[0]}
echo "total_s=$(( $(date +%s) - t0 ))"
exit "$rc"
