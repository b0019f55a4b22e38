// AVX2 + FMA kernels (8 fp32 lanes): the baseline every supported x86 CPU runs. Built with -mavx2 -mfma -mf16c only.
#include <immintrin.h>

#include "kernels_simd.h"

namespace lvllm {
namespace {

struct Avx2 {
    using V = __m256;
    using R = __m256i;  // one INT4 block, broadcast and pre-shifted so part j is (R >> 8j) & 0xF
    static constexpr int W = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float f) { return _mm256_set1_ps(f); }
    static V loadu(const float* p) { return _mm256_loadu_ps(p); }
    static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V min(V a, V b) { return _mm256_min_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static float hsum(V v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    // Lanes 0-3 read nibbles 0,2,4,6 of words 0-3 and lanes 4-7 nibbles 1,3,5,7: columns 8j..8j+7 for part j.
    static R int4_load(const uint8_t* p) {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    }
    static V int4_part(R raw, int j) {
        const __m256i u = _mm256_and_si256(_mm256_srl_epi32(raw, _mm_cvtsi32_si128(8 * j)), _mm256_set1_epi32(0xF));
        return _mm256_cvtepi32_ps(u);
    }
    static V bf16_load(const uint16_t* p) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    static V floor(V v) { return _mm256_floor_ps(v); }
    static V pow2(V n) {  // 2^n for integral n in [-127, 128]
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    }
};

}  // namespace

const KernelTable* kernels_avx2() {
    static const KernelTable t{"avx2", simd::int4_rows<Avx2>, simd::bf16_rows<Avx2>, simd::act<Avx2>};
    return &t;
}

}  // namespace lvllm
