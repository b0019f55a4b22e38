#!/usr/bin/env bash
# llama.cpp as the peer on the GPU box (issue 17), one call: unpack the trimmed llama.cpp, build llama-bench and
# llama-batched-bench with CUDA, write a random Qwen3-30B-A3B-shaped GGUF (bench/gguf_random.py: Q4_0 experts), then
# bench/llamacpp_peer.py's steps (experts on the CPU: prefill 1K/8K/32K, decode at depth 0/1K/16K, batch 1/4/16;
# --n-cpu-moe rows; everything on the GPU) within the time left.
#
#   device run, carry [".gl"], command: bash bench/llamacpp_peer.sh
#   (env: EXPERT_VRAM_GB=G adds the --n-cpu-moe row whose whole layers' Q4_0 experts fit G GB (1e9), 0 = skip;
#    STEPS=a,b runs only those llamacpp_peer.py steps (none: build and GGUF only); THREADS=16,14; LAYERS=48;
#    BUDGET_S=540; LLAMA_CUDA=0 builds CPU-only, with SMALL=1 for a check off the box)
#
# .gl/llama.cpp.tar.xz (2 MiB) is vendor/llama.cpp of the PyPI sdist llama_cpp_python-0.3.36.tar.gz, llama.cpp
# commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f, trimmed to what these two tools build from. Remake it here with
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sd
#   bash bench/llamacpp_peer.sh tree /tmp/sd/llama_cpp_python-0.3.36.tar.gz
# Every step prints its elapsed seconds; what is already there on a warm box (/tmp/glp: tree, build, GGUF, finished
# steps) is kept, so calling again carries on where the budget stopped the last call.
# $OUT: llamacpp_peer.{json,md}, raw/ (each step's llama.cpp output and log), build.log on a failed build.
set -uo pipefail
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

make_tree() {  # $1: the sdist; writes .gl/llama.cpp.tar.xz (temporary name, then rename)
  local sha d s t
  sha=$(sha256sum "$1" | cut -d' ' -f1) || exit 1
  [ "$sha" = "$SDIST_SHA256" ] || { echo "llamacpp_peer: $1 has sha256 $sha, not 0.3.36's $SDIST_SHA256"; exit 1; }
  d=$(mktemp -d); trap "rm -rf '$d'" EXIT
  tar -xzf "$1" -C "$d" llama_cpp_python-0.3.36/vendor/llama.cpp || exit 1
  s=$d/llama_cpp_python-0.3.36/vendor/llama.cpp; t=$d/tree/llama.cpp; mkdir -p "$t/ggml/src" "$t/tools" .gl
  cp -a "$s"/{CMakeLists.txt,LICENSE,licenses,cmake,include,src,common,vendor,gguf-py} "$t/"
  cp -a "$s"/ggml/{CMakeLists.txt,cmake,include} "$t/ggml/"
  find "$s/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$t/ggml/src/" \;
  cp -a "$s"/ggml/src/{ggml-cpu,ggml-cuda} "$t/ggml/src/"
  cp -a "$s"/tools/{llama-bench,batched-bench} "$t/tools/"
  rm -rf "$t"/vendor/{miniaudio,stb}
  # llama-batched-bench's log thread is not flushed at exit (the logger is leaked on purpose, llama.cpp issue 22142),
  # so the last result lines are sometimes lost; flush it before returning.
  sed -i 's|^    llama_backend_free();$|&\n    common_log_flush(common_log_main()); // lvllm: flush the async log|' \
      "$t/tools/batched-bench/batched-bench.cpp"
  grep -q "lvllm: flush" "$t/tools/batched-bench/batched-bench.cpp" \
      || { echo "llamacpp_peer: the flush line did not apply (batched-bench.cpp changed?)"; exit 1; }
  printf '%s\n' "# lvllm's trimmed tree: only the two benchmark tools (the other tools were removed)." \
      "find_package(Threads REQUIRED)" "llama_add_compile_flags()" \
      "add_subdirectory(batched-bench)" "add_subdirectory(llama-bench)" > "$t/tools/CMakeLists.txt"
  printf '%s\n' "# lvllm's trimmed tree: miniaudio and stb (used only by tools/mtmd, removed) are not vendored." \
      "add_subdirectory(hash)" "add_subdirectory(nlohmann)" "add_subdirectory(sheredom)" \
      "if (LLAMA_BUILD_COMMON)" "    add_subdirectory(cpp-httplib)" "endif()" > "$t/vendor/CMakeLists.txt"
  printf '%s\n' "# Trimmed llama.cpp for lvllm's bench/llamacpp_peer.sh" "" \
      "vendor/llama.cpp of llama_cpp_python-0.3.36.tar.gz (PyPI sdist, sha256 $SDIST_SHA256)," \
      "llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f. Kept: CMakeLists.txt, cmake/, include/, src/," \
      "common/, vendor/ (hash, nlohmann, sheredom, cpp-httplib), ggml/ with the CPU and CUDA backends only," \
      "tools/llama-bench, tools/batched-bench, gguf-py/, LICENSE, licenses/. Removed: everything else (models/," \
      "docs/, tests/, examples/, the other tools and ggml backends, vendor/miniaudio, vendor/stb). Changed:" \
      "tools/CMakeLists.txt (the two tools only), vendor/CMakeLists.txt (no miniaudio, stb), and one line in" \
      "tools/batched-bench/batched-bench.cpp that flushes the log before exit (its last results were lost)." \
      > "$t/TRIMMED.md"
  tar -cJf .gl/llama.cpp.tar.xz.partial --sort=name --owner=0 --group=0 --mtime=@0 -C "$d/tree" llama.cpp \
      && mv .gl/llama.cpp.tar.xz.partial .gl/llama.cpp.tar.xz && ls -l .gl/llama.cpp.tar.xz
}
[ "${1:-}" = tree ] && { make_tree "${2:?usage: bash bench/llamacpp_peer.sh tree SDIST.tar.gz}"; exit 0; }

OUT=${OUT:-/tmp/out}; W=/tmp/glp; mkdir -p "$OUT" "$W"
LAYERS=${LAYERS:-48}; THREADS=${THREADS:-16,14}; BUDGET_S=${BUDGET_S:-540}; EXPERT_VRAM_GB=${EXPERT_VRAM_GB:-0}
LLAMA_CUDA=${LLAMA_CUDA:-1}; SMALL=${SMALL:-0}
t0=$(date +%s)
since() { echo "$(( $(date +%s) - t0 ))"; }

if [ ! -f "$W/llama.cpp/TRIMMED.md" ]; then
  rm -rf "$W/llama.cpp" && tar -xJf .gl/llama.cpp.tar.xz -C "$W" \
      || { echo "llamacpp_peer: .gl/llama.cpp.tar.xz missing or broken: remake it (bash bench/llamacpp_peer.sh tree)"
           exit 1; }
fi
echo "unpack_s=$(since)"

B=$W/build-cuda; FLAGS=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_CUDA_FA_ALL_QUANTS=OFF)
[ "$LLAMA_CUDA" = 1 ] || { B=$W/build-cpu; FLAGS=(-DGGML_CUDA=OFF); }
if [ ! -x "$B/bin/llama-bench" ] || [ ! -x "$B/bin/llama-batched-bench" ]; then
  # under the budget: a build cut short carries on (ninja) in the next call on the warm box
  { cmake -S "$W/llama.cpp" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release "${FLAGS[@]}" -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMIT=0c1e570 -DLLAMA_BUILD_NUMBER=0 \
    && timeout $(( BUDGET_S - $(since) )) cmake --build "$B" -j "$(nproc)" --target llama-bench llama-batched-bench
  } > "$W/build.log" 2>&1
  rc=$?
  [ $rc = 124 ] && { echo "llamacpp_peer: build not finished at $(since) s (budget $BUDGET_S): run the same" \
                          "command again on the warm box, the build carries on"; exit 1; }
  [ $rc = 0 ] || { cp "$W/build.log" "$OUT/"; tail -30 "$W/build.log"; echo "llamacpp_peer: build failed (build.log)"
                   exit 1; }
fi
echo "build_s=$(since)"
"$B/bin/llama-bench" --version 2>&1 | tail -2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2

SIZE=(--layers "$LAYERS"); NAME=qwen3moe-${LAYERS}L-q4_0.gguf
[ "$SMALL" = 1 ] && { SIZE=(--small); NAME=qwen3moe-small-q4_0.gguf; LAYERS=2; }
for f in "$W"/*.gguf*; do [ "$f" = "$W/$NAME" ] || rm -f "$f"; done  # one model on the 64 GiB disk at a time
[ -f "$W/$NAME" ] || python3 bench/gguf_random.py --gguf-py "$W/llama.cpp/gguf-py" --out "$W/$NAME" "${SIZE[@]}" \
    || exit 1
echo "gguf_s=$(since)"

EXTRA=(); [ "$SMALL" = 1 ] && EXTRA=(--small)
python3 bench/llamacpp_peer.py --bin "$B/bin" --model "$W/$NAME" --work "$W/results-${NAME%.gguf}" --out "$OUT" \
    --deadline $(( t0 + BUDGET_S )) --threads "$THREADS" --expert-vram-gb "$EXPERT_VRAM_GB" --layers "$LAYERS" \
    --only "${STEPS:-}" "${EXTRA[@]}"
rc=$?
mkdir -p "$OUT/raw" && cp "$W/results-${NAME%.gguf}"/*.{out,log} "$OUT/raw/" 2>/dev/null
echo "total_s=$(since)"
exit $rc
