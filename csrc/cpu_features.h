// CPU features the engine's kernel tables need, read once with CPUID + XGETBV (OS support).
#pragma once

namespace lvllm {

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512_bf16 = false, avx512_vnni = false;
    bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
    bool os_avx = false;     // XCR0 has SSE+AVX state
    bool os_avx512 = false;  // XCR0 has opmask + ZMM state
    bool os_amx = false;     // XCR0 has tile state and the kernel granted it to this process
};

// Detected once; this file is compiled without ISA flags so calling it on any x86-64 is safe.
const CpuFeatures& cpu_features();

}  // namespace lvllm
