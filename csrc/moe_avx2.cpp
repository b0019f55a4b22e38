// AVX2 + FMA kernels (8 fp32 lanes): the baseline every supported x86 CPU runs. Built with -mavx2 -mfma -mf16c only.
#include <immintrin.h>

#include "kernels_q8.h"
#include "kernels_q8_gemm.h"
#include "kernels_simd.h"

namespace lvllm {
namespace {

struct Avx2 {
    using V = __m256;
    static constexpr int kNR2 = 2;  // rows per tile at two tokens: 16 ymm registers hold 2x2x2 accumulators
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
    // Bytes 0-7 and 8-15 of a block zero-extended to 32 bits: part j = columns 8j..8j+7 (kernels.h layout).
    struct R {
        __m256i lo, hi;
    };
    static R int4_load(const uint8_t* p) {
        return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
    }
    static V int4_part(const R& raw, int j) {  // u = q + 8 as float
        const __m256i b = (j & 1) ? raw.hi : raw.lo;
        return _mm256_cvtepi32_ps(j < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(0xF)) : _mm256_srli_epi32(b, 4));
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

// Unsigned nibbles x signed int8 -> 8 int32 sums of 4 products (VPMADDUBSW pairs never saturate: |sum| <= 3810).
struct Maddubs {
    static __m256i dot(__m256i w, __m256i x) { return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)); }
};

// The prefill GEMM's lanes (kernels_q8_gemm.h): 8 rows per ymm, a vector of rows = half a 4-row group's line.
struct MaddubsGemm {
    using V = __m256i;
    using F = __m256;
    static constexpr int kLanes = 2, kRows = 8, kTokens = 4;
    static V load_rows(const Int4Mat& m, int64_t r, int64_t b) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(int4_row(m, r) + b * kInt4BlockStride));
    }
    static V unpacklo32(V a, V b) { return _mm256_unpacklo_epi32(a, b); }
    static V unpackhi32(V a, V b) { return _mm256_unpackhi_epi32(a, b); }
    static V unpacklo64(V a, V b) { return _mm256_unpacklo_epi64(a, b); }
    static V unpackhi64(V a, V b) { return _mm256_unpackhi_epi64(a, b); }
    static V low_nibbles(V v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
    static V high_nibbles(V v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
    static V zero() { return _mm256_setzero_si256(); }
    static V set1(int32_t v) { return _mm256_set1_epi32(v); }
    static V dot(V acc, V w, V x) { return _mm256_add_epi32(acc, Maddubs::dot(w, x)); }
    static F fzero() { return _mm256_setzero_ps(); }
    static F fset1(float f) { return _mm256_set1_ps(f); }
    static F floadu(const float* p) { return _mm256_loadu_ps(p); }
    static void fstore(float* p, F v) { _mm256_store_ps(p, v); }
    static F cvt(V v) { return _mm256_cvtepi32_ps(v); }
    static F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
};

KernelTable make_table() {
    KernelTable t{"avx2", simd::int4_rows<Avx2>, simd::bf16_rows<Avx2>, simd::act<Avx2>, simd::stream_sum<Avx2>};
    t.int4_q8_rows = q8::int4_rows<Maddubs>;
    t.quantize_q8 = q8::quantize;
    t.int4_q8_max_tokens = 1 << 30;  // every call: see bench/README.md (CPU engine) for the measured crossover
    t.int4_q8_gemm = q8gemm::int4_rows<MaddubsGemm>;
    t.int4_q8_gemm_rows = MaddubsGemm::kRows;
    return t;
}

}  // namespace

const KernelTable* kernels_avx2() {
    static const KernelTable t = make_table();
    return &t;
}

}  // namespace lvllm
