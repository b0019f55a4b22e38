// Width-generic kernel bodies shared by moe_avx2.cpp and moe_avx512.cpp; each includes this with its own traits `S`
// (vector type, lane count W, loads, FMA, INT4 block unpack, BF16 load, exp) and compiles it with its own ISA flags.
#pragma once
#include <algorithm>
#include <vector>

#include "kernels.h"

namespace lvllm {
namespace simd {

// NR weight rows x NT tokens per tile: decode (NT=1) keeps four rows in flight so four FMA chains hide latency;
// prefill widens over tokens so each unpacked weight vector feeds up to 8 FMAs.
// Few tokens (NT <= 2): per group g accumulate u.x with u = q + 8 unscaled, add scale * that per group, and apply the
// "- 8" once per row from the per-group sums of x (xsum[t][g]): one convert + one FMA per weight vector.
// More tokens: dequantize each weight vector once, w = u * s - 8 s, and share it across the tokens (the per-group
// accumulators would no longer fit in registers).
template <class S, int NR, int NT>
inline void int4_tile(const Int4Mat& m, int r, const float* const* x, const float* xsum, float* y, int ldy) {
    using V = typename S::V;
    constexpr int PB = kInt4Block / S::W;
    constexpr bool kGroupAcc = NT <= 2;
    const int64_t ng = m.K / m.g;
    const int bpg = m.g / kInt4Block;
    V acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = S::zero();
    const uint8_t* rows[NR];
    const float* sc[NR];
    for (int i = 0; i < NR; ++i) {
        rows[i] = int4_row(m, r + i);
        sc[i] = m.s + (r + i) * ng;
    }
    for (int64_t gi = 0; gi < ng; ++gi) {
        V ga[NR][kGroupAcc ? NT : 1], s[NR], off[NR];
        for (int i = 0; i < NR; ++i) {
            s[i] = S::set1(sc[i][gi]);
            off[i] = S::set1(-8.f * sc[i][gi]);
            if (kGroupAcc)
                for (int t = 0; t < NT; ++t) ga[i][t] = S::zero();
        }
        for (int bb = 0; bb < bpg; ++bb) {
            const int64_t b = gi * bpg + bb;
            typename S::R raw[NR];
            for (int i = 0; i < NR; ++i) raw[i] = S::int4_load(rows[i] + b * kInt4BlockStride);
            for (int j = 0; j < PB; ++j) {
                V xv[NT];
                for (int t = 0; t < NT; ++t) xv[t] = S::loadu(x[t] + b * kInt4Block + j * S::W);
                for (int i = 0; i < NR; ++i) {
                    const V u = S::int4_part(raw[i], j);
                    if (kGroupAcc) {
                        for (int t = 0; t < NT; ++t) ga[i][t] = S::fma(u, xv[t], ga[i][t]);
                    } else {
                        const V w = S::fma(u, s[i], off[i]);
                        for (int t = 0; t < NT; ++t) acc[i][t] = S::fma(w, xv[t], acc[i][t]);
                    }
                }
            }
        }
        if (kGroupAcc)
            for (int i = 0; i < NR; ++i)
                for (int t = 0; t < NT; ++t) acc[i][t] = S::fma(ga[i][t], s[i], acc[i][t]);
    }
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) {
            float corr = 0.f;
            if (kGroupAcc)
                for (int64_t gi = 0; gi < ng; ++gi) corr += sc[i][gi] * xsum[t * ng + gi];
            y[t * ldy + i] = S::hsum(acc[i][t]) - 8.f * corr;
        }
}

template <class S, int NR, int NT>
inline void bf16_tile(const Bf16Mat& m, int r, const float* const* x, float* y, int ldy) {
    using V = typename S::V;
    V acc[NR][NT];
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = S::zero();
    const uint16_t* rows[NR];
    for (int i = 0; i < NR; ++i) rows[i] = m.w + (r + i) * m.K;
    for (int64_t c = 0; c < m.K; c += S::W) {
        V xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = S::loadu(x[t] + c);
        for (int i = 0; i < NR; ++i) {
            const V w = S::bf16_load(rows[i] + c);
            for (int t = 0; t < NT; ++t) acc[i][t] = S::fma(w, xv[t], acc[i][t]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int t = 0; t < NT; ++t) y[t * ldy + i] = S::hsum(acc[i][t]);
}

// Tile functions behind one name so a single dispatcher serves both weight formats.
struct Int4Tiles {
    template <class S, int NR, int NT>
    static void run(const Int4Mat& m, int r, const float* const* x, const float* xsum, float* y, int ldy) {
        int4_tile<S, NR, NT>(m, r, x, xsum, y, ldy);
    }
    // Per token, per group: sum of x over the group's columns (the "- 8" of every row in one place).
    template <class S>
    static void prepare(const Int4Mat& m, const float* const* x, int nt, float* xsum) {
        const int64_t ng = m.K / m.g;
        for (int t = 0; t < nt; ++t)
            for (int64_t gi = 0; gi < ng; ++gi) {
                auto v = S::zero();
                for (int c = 0; c < m.g; c += S::W) v = S::add(v, S::loadu(x[t] + gi * m.g + c));
                xsum[t * ng + gi] = S::hsum(v);
            }
    }
};
struct Bf16Tiles {
    template <class S, int NR, int NT>
    static void run(const Bf16Mat& m, int r, const float* const* x, const float*, float* y, int ldy) {
        bf16_tile<S, NR, NT>(m, r, x, y, ldy);
    }
    template <class S>
    static void prepare(const Bf16Mat&, const float* const*, int, float*) {}
};

// Rows in steps of NR (tail one by one) for one block of NT tokens.
template <class S, class Tiles, class M, int NR, int NT>
inline void rows_block(const M& m, int r0, int r1, const float* const* x, const float* xs, float* y, int ldy) {
    int r = r0;
    for (; r + NR <= r1; r += NR) Tiles::template run<S, NR, NT>(m, r, x, xs, y + (r - r0), ldy);
    for (; r < r1; ++r) Tiles::template run<S, 1, NT>(m, r, x, xs, y + (r - r0), ldy);
}

// Tokens in blocks of at most 8; few tokens -> more rows per tile (independent FMA chains), many -> more tokens.
template <class S, class Tiles, class M>
void rows(const M& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy) {
    thread_local std::vector<float> xsum;  // [8, K/32] at most
    for (int t0 = 0; t0 < nt; t0 += 8) {
        const int n = std::min(8, nt - t0);
        const float* const* xt = x + t0;
        float* yt = y + t0 * ldy;
        xsum.resize(size_t(8) * (m.K / kInt4Block));
        if (n <= 2) Tiles::template prepare<S>(m, xt, n, xsum.data());  // only the group-accumulating tiles use it
        const float* xs = xsum.data();
        switch (n) {
            case 1: rows_block<S, Tiles, M, 4, 1>(m, r0, r1, xt, xs, yt, ldy); break;
            case 2: rows_block<S, Tiles, M, S::kNR2, 2>(m, r0, r1, xt, xs, yt, ldy); break;
            case 3: rows_block<S, Tiles, M, 2, 3>(m, r0, r1, xt, xs, yt, ldy); break;
            case 4: rows_block<S, Tiles, M, 2, 4>(m, r0, r1, xt, xs, yt, ldy); break;
            case 5: rows_block<S, Tiles, M, 1, 5>(m, r0, r1, xt, xs, yt, ldy); break;
            case 6: rows_block<S, Tiles, M, 1, 6>(m, r0, r1, xt, xs, yt, ldy); break;
            case 7: rows_block<S, Tiles, M, 1, 7>(m, r0, r1, xt, xs, yt, ldy); break;
            default: rows_block<S, Tiles, M, 1, 8>(m, r0, r1, xt, xs, yt, ldy); break;
        }
    }
}

template <class S>
void int4_rows(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy, const uint16_t*, int64_t) {
    rows<S, Int4Tiles>(m, r0, r1, x, nt, y, ldy);
}

template <class S>
void bf16_rows(const Bf16Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy, const uint16_t*, int64_t) {
    rows<S, Bf16Tiles>(m, r0, r1, x, nt, y, ldy);
}

// Cephes-style exp: range reduction by ln2, degree-5 polynomial; relative error ~1e-7 on [-87, 88].
template <class S>
inline typename S::V exp(typename S::V x) {
    x = S::min(S::max(x, S::set1(-87.3f)), S::set1(88.3f));
    const auto fx = S::floor(S::fma(x, S::set1(1.44269504088896341f), S::set1(0.5f)));
    x = S::sub(x, S::mul(fx, S::set1(0.693359375f)));
    x = S::sub(x, S::mul(fx, S::set1(-2.12194440e-4f)));
    auto y = S::set1(1.9875691500E-4f);
    y = S::fma(y, x, S::set1(1.3981999507E-3f));
    y = S::fma(y, x, S::set1(8.3334519073E-3f));
    y = S::fma(y, x, S::set1(4.1665795894E-2f));
    y = S::fma(y, x, S::set1(1.6666665459E-1f));
    y = S::fma(y, x, S::set1(5.0000001201E-1f));
    y = S::fma(y, S::mul(x, x), S::add(x, S::set1(1.f)));
    return S::mul(y, S::pow2(fx));
}

template <class S>
float stream_sum(const float* p, size_t n) {
    typename S::V a = S::zero(), b = S::zero(), c = S::zero(), d = S::zero();
    size_t i = 0;
    for (; i + 4 * S::W <= n; i += 4 * S::W) {  // four chains: the loads, not the adds, set the pace
        a = S::add(a, S::loadu(p + i));
        b = S::add(b, S::loadu(p + i + S::W));
        c = S::add(c, S::loadu(p + i + 2 * S::W));
        d = S::add(d, S::loadu(p + i + 3 * S::W));
    }
    float s = S::hsum(S::add(S::add(a, b), S::add(c, d)));
    for (; i < n; ++i) s += p[i];
    return s;
}

template <class S>
inline typename S::V sigmoid(typename S::V v) {
    const auto one = S::set1(1.f);
    return S::div(one, S::add(one, exp<S>(S::sub(S::zero(), v))));
}

template <class S>
void act(Act a, const float* gate, const float* up, float* out, int n) {
    using V = typename S::V;
    int i = 0;
    for (; i + S::W <= n; i += S::W) {
        const V u = S::loadu(up + i);
        V r;
        switch (a) {
            case Act::SiluGlu: {
                const V g = S::loadu(gate + i);
                r = S::mul(S::mul(g, sigmoid<S>(g)), u);
                break;
            }
            case Act::Relu2: {
                const V p = S::max(u, S::zero());
                r = S::mul(p, p);
                break;
            }
            case Act::GptossGlu: {
                const V g = S::min(S::loadu(gate + i), S::set1(7.f));
                const V uc = S::min(S::max(u, S::set1(-7.f)), S::set1(7.f));
                r = S::mul(S::mul(S::add(uc, S::set1(1.f)), g), sigmoid<S>(S::mul(S::set1(1.702f), g)));
                break;
            }
            default: {  // GeluTanhGlu: 0.5 (1 + tanh z) == sigmoid(2 z)
                const V g = S::loadu(gate + i);
                const V z = S::mul(S::set1(2.f * 0.7978845608028654f),
                                   S::fma(S::mul(S::set1(0.044715f), S::mul(g, g)), g, g));
                r = S::mul(S::mul(g, sigmoid<S>(z)), u);
                break;
            }
        }
        S::storeu(out + i, r);
    }
    if (i < n) kernels_ref().act(a, gate ? gate + i : nullptr, up + i, out + i, n - i);
}

}  // namespace simd
}  // namespace lvllm
