"""The engine core under AddressSanitizer + UndefinedBehaviorSanitizer (issue 3: a sanitizer build runs clean in CI).

Builds tests/sanitize/engine_driver.cpp with the csrc/ sources (each ISA file with its own flags, as CMake does) and
runs it; any sanitizer report aborts the driver with a non-zero exit. Where the CPU lacks AMX, moe_amx.cpp is built
with LVLLM_AMX_EMULATE (scalar tile instructions) so its VNNI layout and tiling run here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ISA_FLAGS = {  # keep in step with csrc/CMakeLists.txt
    "moe_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "moe_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "moe_avx512vnni.cpp": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "moe_amx.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mfma",
                    "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
CORE = ["cpu_features.cpp", "kernels_ref.cpp", "thread_pool.cpp", "engine.cpp"]
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


@pytest.mark.slow
def test_engine_core_is_sanitizer_clean(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH")
    from lvllm_runtime.engine import Engine

    emulate = "amx" not in Engine.available_isas()
    flags = dict(ISA_FLAGS, **({"moe_amx.cpp": ["-DLVLLM_AMX_EMULATE"]} if emulate else {}))
    objs = []
    jobs = [(src, f) for src, f in flags.items()] + [(src, ["-DLVLLM_AMX_EMULATE"] if emulate else []) for src in CORE]
    jobs.append((str(ROOT / "tests" / "sanitize" / "engine_driver.cpp"), []))
    for src, flags in jobs:
        obj = tmp_path / (Path(src).stem + ".o")
        cmd = [cxx, "-std=c++17", "-O1", "-g", *SAN, *flags, "-I", str(CSRC), "-c", str(CSRC / src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"compile {src} failed:\n{r.stderr[-3000:]}"
        objs.append(str(obj))
    exe = tmp_path / "engine_driver"
    r = subprocess.run([cxx, *SAN, "-pthread", *objs, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, f"link failed:\n{r.stderr[-3000:]}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), f"driver failed:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    assert "kernel table under test: amx" in r.stdout, r.stdout
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr[-6000:]
