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

// The prefill GEMM's lanes: 16 rows per zmm, one 4-row group's 64-byte line per loaded vector.
struct DpbusdGemm {
    using V = __m512i;
    using F = __m512;
    static constexpr int kLanes = 4, kRows = kInt4Q8GemmRowsAvx512, kTokens = 4;
    static V load_rows(const Int4Mat& m, int64_t r, int64_t b) {
        return _mm512_loadu_si512(int4_row(m, r) + b * kInt4BlockStride);
    }
    static V unpacklo32(V a, V b) { return _mm512_unpacklo_epi32(a, b); }
    static V unpackhi32(V a, V b) { return _mm512_unpackhi_epi32(a, b); }
    static V unpacklo64(V a, V b) { return _mm512_unpacklo_epi64(a, b); }
    static V unpackhi64(V a, V b) { return _mm512_unpackhi_epi64(a, b); }
    static V low_nibbles(V v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
    static V high_nibbles(V v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
    static V zero() { return _mm512_setzero_si512(); }
    static V set1(int32_t v) { return _mm512_set1_epi32(v); }
    static V dot(V acc, V w, V x) { return _mm512_dpbusd_epi32(acc, w, x); }
    static F fzero() { return _mm512_setzero_ps(); }
    static F fset1(float f) { return _mm512_set1_ps(f); }
    static F floadu(const float* p) { return _mm512_loadu_ps(p); }
    static void fstore(float* p, F v) { _mm512_store_ps(p, v); }
    static F cvt(V v) { return _mm512_cvtepi32_ps(v); }
    static F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
};

}  // namespace

void int4_q8_rows_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    q8::int4_rows<Dpbusd>(m, r0, r1, xq, nt, y, ldy);
}

void int4_q8_gemm_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    q8gemm::int4_rows<DpbusdGemm>(m, r0, r1, xq, nt, y, ldy);
}

}  // namespace lvllm
