// INT4 weights x int8 activations (llama.cpp Q4_0 x Q8_0 style) on 256-bit integer lanes, shared by moe_avx2.cpp
// (VPMADDUBSW + VPMADDWD) and moe_avx512vnni.cpp (VPDPBUSD); each includes this with its own dot-product traits `D`.
//
// Per 32-column block b of a token: x ~= d_b * q_b (q int8 in [-127, 127], see kernels.h Q8 record). Per weight row:
//     y = sum_groups s_g * sum_{b in g} d_b * sum_c u_c q_c  -  8 * sum_groups s_g * sum_{b in g} d_b * sum_c q_c
// with u = q4 + 8 the stored nibble: the unsigned x signed byte product the instructions want; the "- 8" is applied
// once per row from the per-block sums kept in the record. The integer sums are exact (|pair sum| <= 2*15*127).
// Nibble unpack: one 16-byte block broadcast to both 128-bit halves, shifted 0 / 4 bits per half and masked:
// columns 0-15 (low nibbles) then 16-31 (high nibbles), the order q is stored in.
// Each tile also prefetches the next group of kInt4Rows rows as it goes, one line per block (the rows' blocks share
// it, kernels.h): on cold weights the hardware prefetchers alone left 15 Sapphire Rapids threads at 0.65x.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace lvllm {
namespace q8 {
namespace {  // each ISA file compiles its own copy with its own flags (no shared inline symbols across ISAs)

inline __m256i nibbles(const uint8_t* p) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// NR rows x NT tokens; gs[t * ng + gi] = sum over the group's blocks of d_b * sum(q_b) (the "- 8" term).
template <class D, int NR, int NT>
inline void tile(const Int4Mat& m, int r, const int8_t* const* xq, const float* gs, float* y, int ldy) {
    const int64_t ng = m.K / m.g;
    const int bpg = m.g / kInt4Block;
    __m256 acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
    const uint8_t* rows[NR];
    const float* sc[NR];
    for (int i = 0; i < NR; ++i) {
        rows[i] = int4_row(m, r + i);
        sc[i] = m.s + (r + i) * ng;
    }
    const uint8_t* next = int4_row(m, r - r % kInt4Rows + kInt4Rows);
    const float* dx[NT];
    for (int t = 0; t < NT; ++t) dx[t] = q8_scales(xq[t], m.K);
    for (int64_t gi = 0; gi < ng; ++gi) {
        __m256 ga[NR][NT];
        for (int i = 0; i < NR; ++i)
            for (int t = 0; t < NT; ++t) ga[i][t] = _mm256_setzero_ps();
        for (int bb = 0; bb < bpg; ++bb) {
            const int64_t b = gi * bpg + bb;
            __m256i xv[NT];
            for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + b * kInt4Block));
            _mm_prefetch(reinterpret_cast<const char*>(next + b * kInt4BlockStride), _MM_HINT_T0);
            for (int i = 0; i < NR; ++i) {
                const __m256i w = nibbles(rows[i] + b * kInt4BlockStride);
                for (int t = 0; t < NT; ++t)
                    ga[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(D::dot(w, xv[t])), _mm256_loadu_ps(dx[t] + 8 * b), ga[i][t]);
            }
        }
        for (int i = 0; i < NR; ++i) {
            const __m256 s = _mm256_set1_ps(sc[i][gi]);
            for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_fmadd_ps(ga[i][t], s, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) {
            float corr = 0.f;
            for (int64_t gi = 0; gi < ng; ++gi) corr += sc[i][gi] * gs[t * ng + gi];
            y[t * ldy + i] = hsum(acc[i][t]) - 8.f * corr;
        }
}

template <class D, int NR, int NT>
inline void rows_block(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, const float* gs, float* y, int ldy) {
    int r = r0;
    for (; r + NR <= r1; r += NR) tile<D, NR, NT>(m, r, xq, gs, y + (r - r0), ldy);
    for (; r < r1; ++r) tile<D, 1, NT>(m, r, xq, gs, y + (r - r0), ldy);
}

// Tokens in blocks of at most 4 (two accumulator sets per row x token must stay in the 16 ymm registers).
template <class D>
void int4_rows(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    const int64_t ng = m.K / m.g, nb = m.K / kInt4Block;
    const int bpg = m.g / kInt4Block;
    thread_local std::vector<float> gs;
    gs.resize(size_t(4) * ng);
    for (int t0 = 0; t0 < nt; t0 += 4) {
        const int n = std::min(4, nt - t0);
        for (int t = 0; t < n; ++t) {
            const float* ds = q8_scales(xq[t0 + t], m.K) + 8 * nb;
            for (int64_t gi = 0; gi < ng; ++gi) {
                float s = 0.f;
                for (int bb = 0; bb < bpg; ++bb) s += ds[gi * bpg + bb];
                gs[t * ng + gi] = s;
            }
        }
        const int8_t* const* xt = xq + t0;
        float* yt = y + t0 * ldy;
        switch (n) {
            case 1: rows_block<D, 4, 1>(m, r0, r1, xt, gs.data(), yt, ldy); break;
            case 2: rows_block<D, 2, 2>(m, r0, r1, xt, gs.data(), yt, ldy); break;
            case 3: rows_block<D, 1, 3>(m, r0, r1, xt, gs.data(), yt, ldy); break;
            default: rows_block<D, 1, 4>(m, r0, r1, xt, gs.data(), yt, ldy); break;
        }
    }
}

// Blocks [b0, b1) of one row x [K] fp32 into its Q8 record (kernels.h): symmetric, d = max|x| / 127.
inline void quantize(const float* x, int64_t K, int64_t b0, int64_t b1, int8_t* rec) {
    float* dx = q8_scales(rec, K);
    float* ds = dx + 8 * (K / kInt4Block);
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = b0; b < b1; ++b) {
        const float* p = x + b * kInt4Block;
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
            v[j] = _mm256_loadu_ps(p + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.f;
        const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i q[4];
        for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // round half to even
        // int32 -> int8 keeping column order: packs interleave 128-bit halves, the permute undoes it.
        const __m256i w = _mm256_packs_epi32(q[0], q[1]), z = _mm256_packs_epi32(q[2], q[3]);
        __m256i bytes = _mm256_packs_epi16(w, z);
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rec + b * kInt4Block), bytes);
        const __m256i s16 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes)),
                                                               _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1))),
                                              _mm256_set1_epi16(1));
        const int qsum = static_cast<int>(hsum(_mm256_cvtepi32_ps(s16)));
        _mm256_storeu_ps(dx + 8 * b, _mm256_set1_ps(d));
        ds[b] = d * static_cast<float>(qsum);
    }
}

}  // namespace
}  // namespace q8
}  // namespace lvllm
