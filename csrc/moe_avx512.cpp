// AVX-512F kernels (16 fp32 lanes) for Skylake-SP and later, Zen4 and later. Built with -mavx512f -mavx512bw
// -mavx512vl -mfma. Same tile shapes as AVX2 (kernels_simd.h); twice the lanes per instruction.
#include <immintrin.h>

#include "cpu_features.h"
#include "kernels_simd.h"

namespace lvllm {
namespace {

struct Avx512 {
    using V = __m512;
    using R = __m512i;  // one INT4 block, bytes zero-extended to 32-bit lanes
    static constexpr int kNR2 = 4;  // rows per tile at two tokens: 32 zmm registers hold 4x2x2 accumulators
    static constexpr int W = 16;
    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float f) { return _mm512_set1_ps(f); }
    static V loadu(const float* p) { return _mm512_loadu_ps(p); }
    static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V min(V a, V b) { return _mm512_min_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static float hsum(V v) { return _mm512_reduce_add_ps(v); }
    // The 16 bytes of a block zero-extended to 32 bits: low nibbles = columns 0-15, high nibbles = 16-31.
    static R int4_load(const uint8_t* p) {
        return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static V int4_part(R raw, int j) {  // u = q + 8 as float
        return _mm512_cvtepi32_ps(j == 0 ? _mm512_and_si512(raw, _mm512_set1_epi32(0xF)) : _mm512_srli_epi32(raw, 4));
    }
    static V bf16_load(const uint16_t* p) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    static V floor(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
    static V pow2(V n) {  // 2^n for integral n in [-127, 128]
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    }
};

// INT4 x int8 (GEMV and prefill GEMM): VPDPBUSD where the CPU has AVX512-VNNI (moe_avx512vnni.cpp), else the AVX2
// kernels (a subset ISA).
KernelTable make_table() {
    KernelTable t{"avx512", simd::int4_rows<Avx512>, simd::bf16_rows<Avx512>, simd::act<Avx512>, simd::stream_sum<Avx512>};
    const KernelTable* avx2 = kernels_avx2();
    t.int4_q8_rows = cpu_features().avx512_vnni ? int4_q8_rows_avx512vnni : avx2->int4_q8_rows;
    t.quantize_q8 = avx2->quantize_q8;
    t.int4_q8_max_tokens = avx2->int4_q8_max_tokens;
    if (cpu_features().avx512_vnni) {
        t.int4_q8_gemm = int4_q8_gemm_avx512vnni;
        t.int4_q8_gemm_rows = kInt4Q8GemmRowsAvx512;
    } else {
        t.int4_q8_gemm = avx2->int4_q8_gemm;
        t.int4_q8_gemm_rows = avx2->int4_q8_gemm_rows;
    }
    return t;
}

}  // namespace

const KernelTable* kernels_avx512() {
    static const KernelTable t = make_table();
    return &t;
}

}  // namespace lvllm
