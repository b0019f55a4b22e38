// INT4 weights x int8 activations for calls with many tokens (prefill): a register-tiled GEMM on the integer dot
// instructions, shared by moe_avx2.cpp (VPMADDUBSW + VPMADDWD, 8 rows per ymm) and moe_avx512vnni.cpp (VPDPBUSD,
// 16 rows per zmm: Dpbusd512 below); moe_amx.cpp builds its AMX-INT8 B tiles with the same unpack.
//
// Weights stay in the load layout (kernels.h: 4-row groups, one 64-byte line per group and 32-column block), which
// the decode GEMV streams; no second copy. One 128-bit lane of a line is one row's block: 4 dwords of 4 bytes, each
// byte holding columns c (low nibble) and c + 16 (high). A 4x4 dword transpose inside each 128-bit lane of 4 such
// vectors gives, for dword i, a vector whose element e holds columns 4i..4i+3 (low nibbles) and 16+4i.. (high) of
// row L * (e % 4) + e / 4 of the tile (L lanes per vector): the unsigned x signed byte-quad operand of the dot
// instructions, one weight row per int32 lane. Rows come out in that permuted order; scales are read and results
// written in the same order (row_of), so nothing is shuffled back.
//
// Per 32-column block b of token t (Q8 record, kernels.h): x ~= d_b q. Integer sums over the block are exact; then
//     acc[row, t] += (s_g[row] * d_b[t]) * sum_c u_c q_c     per block,    acc -= 8 s_g[row] * sum_{b in g} d_b sum q_b
// per group (u = q4 + 8, the stored nibble): the same arithmetic as the GEMV in kernels_q8.h, so both paths share
// one accuracy bound.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace lvllm {
namespace q8gemm {
namespace {  // each ISA file compiles its own copy with its own flags

// Row (within a tile of G::kRows) that int32 element e of an unpacked vector belongs to.
template <class G>
constexpr int row_of(int e) {
    return G::kLanes * (e % 4) + e / 4;
}

// Block b of the G::kRows rows from r (r a multiple of kInt4Rows): lo[i] = columns 4i..4i+3, hi[i] = 16+4i..16+4i+3.
template <class G>
inline void unpack(const Int4Mat& m, int64_t r, int64_t b, typename G::V lo[4], typename G::V hi[4]) {
    typename G::V v[4];
    for (int k = 0; k < 4; ++k) v[k] = G::load_rows(m, r + G::kLanes * k, b);
    const typename G::V t0 = G::unpacklo32(v[0], v[1]), t1 = G::unpackhi32(v[0], v[1]);
    const typename G::V t2 = G::unpacklo32(v[2], v[3]), t3 = G::unpackhi32(v[2], v[3]);
    const typename G::V o[4] = {G::unpacklo64(t0, t2), G::unpackhi64(t0, t2), G::unpacklo64(t1, t3),
                                G::unpackhi64(t1, t3)};
    for (int i = 0; i < 4; ++i) {
        lo[i] = G::low_nibbles(o[i]);
        hi[i] = G::high_nibbles(o[i]);
    }
}

#ifdef __AVX512VNNI__
// The zmm lanes: 16 rows per vector, one 4-row group's 64-byte line per load.
struct Dpbusd512 {
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
#endif

inline int32_t quad(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

// RV vectors of rows (RV * G::kRows rows from r) x NT tokens. sc: this call's scales in unpack order,
// [row tile][group][G::kRows]; gs[t * ng + gi] = sum over the group's blocks of d_b * sum(q_b).
template <class G, int RV, int NT>
inline void tile(const Int4Mat& m, int r, const int8_t* const* xq, const float* sc, const float* gs, float* y, int ldy) {
    using V = typename G::V;
    using F = typename G::F;
    const int64_t ng = m.K / m.g;
    const int bpg = m.g / kInt4Block;
    F acc[RV][NT];
    for (int v = 0; v < RV; ++v)
        for (int t = 0; t < NT; ++t) acc[v][t] = G::fzero();
    const float* dx[NT];
    for (int t = 0; t < NT; ++t) dx[t] = q8_scales(xq[t], m.K);
    for (int64_t gi = 0; gi < ng; ++gi) {
        F s[RV];
        for (int v = 0; v < RV; ++v) s[v] = G::floadu(sc + (v * ng + gi) * G::kRows);
        for (int bb = 0; bb < bpg; ++bb) {
            const int64_t b = gi * bpg + bb;
            V lo[RV][4], hi[RV][4];
            for (int v = 0; v < RV; ++v) unpack<G>(m, r + v * G::kRows, b, lo[v], hi[v]);
            V ai[RV][NT];
            for (int v = 0; v < RV; ++v)
                for (int t = 0; t < NT; ++t) ai[v][t] = G::zero();
            for (int i = 0; i < 4; ++i)
                for (int t = 0; t < NT; ++t) {
                    const int8_t* xb = xq[t] + b * kInt4Block + 4 * i;
                    const V xl = G::set1(quad(xb)), xh = G::set1(quad(xb + 16));
                    for (int v = 0; v < RV; ++v) ai[v][t] = G::dot(G::dot(ai[v][t], lo[v][i], xl), hi[v][i], xh);
                }
            for (int t = 0; t < NT; ++t) {
                const F d = G::fset1(dx[t][8 * b]);
                for (int v = 0; v < RV; ++v) acc[v][t] = G::fma(G::cvt(ai[v][t]), G::fmul(s[v], d), acc[v][t]);
            }
        }
        for (int t = 0; t < NT; ++t) {
            const F c = G::fset1(8.f * gs[t * ng + gi]);
            for (int v = 0; v < RV; ++v) acc[v][t] = G::fnma(s[v], c, acc[v][t]);
        }
    }
    alignas(64) float out[G::kRows];
    for (int v = 0; v < RV; ++v)
        for (int t = 0; t < NT; ++t) {
            G::fstore(out, acc[v][t]);
            for (int e = 0; e < G::kRows; ++e) y[t * ldy + v * G::kRows + row_of<G>(e)] = out[e];
        }
}

template <class G, int NT>
inline void rows_block(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, const float* sc, const float* gs,
                       float* y, int ldy) {
    const int64_t ng = m.K / m.g;
    int r = r0;
    for (; r + 2 * G::kRows <= r1; r += 2 * G::kRows)
        tile<G, 2, NT>(m, r, xq, sc + (r - r0) / G::kRows * ng * G::kRows, gs, y + (r - r0), ldy);
    for (; r < r1; r += G::kRows) tile<G, 1, NT>(m, r, xq, sc + (r - r0) / G::kRows * ng * G::kRows, gs, y + (r - r0), ldy);
}

// y as KernelTable::int4_q8_rows, for rows [r0, r1) from a 4-row group spanning a multiple of G::kRows (the engine
// checks). Tokens in blocks of G::kTokens.
template <class G>
void int4_rows(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) {
    const int64_t ng = m.K / m.g, nb = m.K / kInt4Block;
    const int bpg = m.g / kInt4Block;
    thread_local std::vector<float> sc, gs;
    sc.resize(size_t(r1 - r0) * ng);
    for (int v = 0; v < (r1 - r0) / G::kRows; ++v)
        for (int64_t gi = 0; gi < ng; ++gi)
            for (int e = 0; e < G::kRows; ++e)
                sc[(v * ng + gi) * G::kRows + e] = m.s[(r0 + v * G::kRows + row_of<G>(e)) * ng + gi];
    gs.resize(size_t(nt) * ng);
    for (int t = 0; t < nt; ++t) {
        const float* ds = q8_scales(xq[t], m.K) + 8 * nb;
        for (int64_t gi = 0; gi < ng; ++gi) {
            float s = 0.f;
            for (int bb = 0; bb < bpg; ++bb) s += ds[gi * bpg + bb];
            gs[t * ng + gi] = s;
        }
    }
    constexpr int NT = G::kTokens;
    for (int t0 = 0; t0 < nt; t0 += NT) {
        const int n = std::min(NT, nt - t0);
        const int8_t* const* xt = xq + t0;
        const float* g = gs.data() + t0 * ng;
        float* yt = y + t0 * ldy;
        switch (n) {
            case 1: rows_block<G, 1>(m, r0, r1, xt, sc.data(), g, yt, ldy); break;
            case 2: rows_block<G, 2>(m, r0, r1, xt, sc.data(), g, yt, ldy); break;
            case 3: rows_block<G, 3>(m, r0, r1, xt, sc.data(), g, yt, ldy); break;
            default: rows_block<G, NT>(m, r0, r1, xt, sc.data(), g, yt, ldy); break;
        }
    }
}

}  // namespace
}  // namespace q8gemm
}  // namespace lvllm
