// Portable reference kernels: the definition every ISA file is tested against, and the fallback on any CPU.
#include <cmath>

#include "kernels.h"

namespace lvllm {
namespace {

void int4_rows_ref(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy, const uint16_t*,
                   int64_t) {
    const int64_t ng = m.K / m.g;
    for (int r = r0; r < r1; ++r) {
        const uint8_t* row = int4_row(m, r);
        const float* sc = m.s + r * ng;
        for (int t = 0; t < nt; ++t) {
            float acc = 0.f;
            for (int64_t c = 0; c < m.K; ++c) acc += sc[c / m.g] * (int4_nibble(row, c) - 8) * x[t][c];
            y[t * ldy + (r - r0)] = acc;
        }
    }
}

void bf16_rows_ref(const Bf16Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy, const uint16_t*,
                   int64_t) {
    for (int r = r0; r < r1; ++r) {
        const uint16_t* row = m.w + static_cast<int64_t>(r) * m.K;
        for (int t = 0; t < nt; ++t) {
            float acc = 0.f;
            for (int64_t c = 0; c < m.K; ++c) acc += bf16_to_float(row[c]) * x[t][c];
            y[t * ldy + (r - r0)] = acc;
        }
    }
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

void act_ref(Act a, const float* gate, const float* up, float* out, int n) {
    constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
    for (int i = 0; i < n; ++i) {
        const float u = up[i];
        switch (a) {
            case Act::SiluGlu: out[i] = gate[i] * sigmoid(gate[i]) * u; break;
            case Act::Relu2: { const float r = u > 0.f ? u : 0.f; out[i] = r * r; break; }
            case Act::GptossGlu: {
                const float g = std::fmin(gate[i], 7.f), uc = std::fmin(std::fmax(u, -7.f), 7.f);
                out[i] = (uc + 1.f) * g * sigmoid(1.702f * g);
                break;
            }
            case Act::GeluTanhGlu: {
                // 0.5 * (1 + tanh(z)) == sigmoid(2 z)
                const float g = gate[i];
                out[i] = g * sigmoid(2.f * kGeluC * (g + 0.044715f * g * g * g)) * u;
                break;
            }
        }
    }
}

float stream_sum_ref(const float* p, size_t n) {
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < n; ++i) a += p[i];
    return a + b + c + d;
}

}  // namespace

const KernelTable& kernels_ref() {
    static const KernelTable t{"ref", int4_rows_ref, bf16_rows_ref, act_ref, stream_sum_ref};
    return t;
}

}  // namespace lvllm
