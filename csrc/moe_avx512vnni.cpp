// INT4 x int8 with AVX512-VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen4+): VPDPBUSD instead of VPMADDUBSW +
// VPMADDWD, 256-bit in the decode GEMV (one row's 32 columns per instruction) and 512-bit in the prefill GEMM (16 rows
// x 4 columns per instruction, kernels_q8_gemm.h). Built with -mavx512vnni; called only where the CPU has it.
#include "kernels_q8.h"
#include "kernels_q8_gemm.h"

namespace lvllm {
namespace {

struct Dpbusd {
    static __m256i dot(__m256i w, __m256i x) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x); }
};

}  // namespace

void int4_q8_rows_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    q8::int4_rows<Dpbusd>(m, r0, r1, xq, nt, y, ldy);
}

void int4_q8_gemm_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    q8gemm::int4_rows<q8gemm::Dpbusd512>(m, r0, r1, xq, nt, y, ldy);
}

}  // namespace lvllm
