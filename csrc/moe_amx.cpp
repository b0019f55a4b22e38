// AMX-BF16 kernels (Sapphire Rapids and later) for BF16 weights: C[16 tokens x 16 rows] += A[16 x 32] . B[32 x 16]
// per TDPBF16PS. A = the activations as bf16 rows (the engine passes them contiguous, see kernels.h), B = weights
// repacked at load into 1 KiB VNNI tiles. INT4 weights with >= 16 tokens per call are dequantized per call, 16 rows
// x 32 columns at a time, into the same VNNI tiles (scale applied, bf16) and take the same tile loop; fewer tokens
// (decode) use the AVX-512 table's INT4 x int8 GEMV (kernels_q8.h), which streams the nibbles once.
//
// Built with -mamx-tile -mamx-bf16 (+AVX-512). With -DLVLLM_AMX_EMULATE the tile instructions become scalar code so
// the layout and tiling are tested on machines without AMX (tests/test_engine_sanitize.py).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#ifndef LVLLM_AMX_EMULATE
#include <immintrin.h>
#endif

namespace lvllm {
namespace {

constexpr int kTileRows = 16;            // tokens (A, C) or k pairs (B) per tile
constexpr int kTileK = 32;               // bf16 columns of A per tile
constexpr int kBlockElems = 16 * 32;     // one B tile: 16 k-pairs x 16 rows x 2
static_assert(kBlockElems * 2 == 1024, "a B tile is 1 KiB");

// VNNI layout of one expert matrix W [rows, K]: block (nb, kb) = rows 16nb.., columns 32kb.. at element offset
// (nb * K/32 + kb) * 512; inside, element (i, n, p) = W[16nb + n][32kb + 2i + p] at i*32 + n*2 + p.
void repack_vnni(const uint16_t* src, uint16_t* dst, int64_t rows, int64_t K) {
    const int64_t kbs = K / kTileK;
    for (int64_t nb = 0; nb < rows / 16; ++nb)
        for (int64_t kb = 0; kb < kbs; ++kb) {
            uint16_t* d = dst + (nb * kbs + kb) * kBlockElems;
            for (int i = 0; i < 16; ++i)
                for (int n = 0; n < 16; ++n)
                    for (int p = 0; p < 2; ++p) d[i * 32 + n * 2 + p] = src[(16 * nb + n) * K + 32 * kb + 2 * i + p];
        }
}

#ifdef LVLLM_AMX_EMULATE
// Scalar stand-ins with the instructions' semantics (tile t: 16 rows x 64 bytes).
thread_local unsigned char g_tiles[8][16 * 64];
void tile_zero(int t) { std::memset(g_tiles[t], 0, sizeof g_tiles[t]); }
void tile_load(int t, const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(g_tiles[t] + r * 64, static_cast<const char*>(p) + r * stride, 64);
}
void tile_store(int t, void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(p) + r * stride, g_tiles[t] + r * 64, 64);
}
void tile_dp(int c, int a, int b) {  // C[m][n] += sum_i A[m][2i..2i+1] . B[i][n][0..1]
    float* C = reinterpret_cast<float*>(g_tiles[c]);
    const uint16_t* A = reinterpret_cast<const uint16_t*>(g_tiles[a]);
    const uint16_t* B = reinterpret_cast<const uint16_t*>(g_tiles[b]);
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            float s = C[m * 16 + n];
            for (int i = 0; i < 16; ++i)
                for (int p = 0; p < 2; ++p) s += bf16_to_float(A[m * 32 + 2 * i + p]) * bf16_to_float(B[i * 32 + n * 2 + p]);
            C[m * 16 + n] = s;
        }
}
#define TILE_ZERO(t) tile_zero(t)
#define TILE_LOAD(t, p, s) tile_load(t, p, s)
#define TILE_STORE(t, p, s) tile_store(t, p, s)
#define TILE_DP(c, a, b) tile_dp(c, a, b)
void tile_config() {}
#else
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, s) _tile_loadd(t, p, s)
#define TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
void tile_config() {  // tiles 0-1: A (tokens), 2-3: B (weights), 4-7: C; all 16 rows x 64 bytes
    thread_local bool done = false;
    if (done) return;
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
    done = true;
}
#endif

// Tokens in tiles of 16 (two at a time), rows in tiles of 16 (two at a time): 4 C tiles per pass over K.
// bw: VNNI blocks of rows [0, nrows) (nrows a multiple of 16); y[t * ldy + row].
void amx_tiles(const uint16_t* bw, int64_t kbs, int nrows, int nt, const uint16_t* xb, int64_t ldxb, float* y, int ldy) {
    tile_config();
    alignas(64) float c[4][16 * 16];
    for (int t0 = 0; t0 < nt; t0 += 2 * kTileRows) {
        const bool two_a = t0 + kTileRows < nt;
        for (int r = 0; r < nrows; r += 32) {
            const bool two_b = r + 16 < nrows;
            const uint16_t* b0 = bw + (static_cast<int64_t>(r) / 16) * kbs * kBlockElems;
            const uint16_t* b1 = b0 + kbs * kBlockElems;
            const uint16_t* a0 = xb + t0 * ldxb;
            const uint16_t* a1 = a0 + kTileRows * ldxb;
            TILE_ZERO(4);
            TILE_ZERO(5);
            TILE_ZERO(6);
            TILE_ZERO(7);
            for (int64_t kb = 0; kb < kbs; ++kb) {
                TILE_LOAD(0, a0 + kb * kTileK, ldxb * 2);
                TILE_LOAD(2, b0 + kb * kBlockElems, 64);
                TILE_DP(4, 0, 2);
                if (two_b) {
                    TILE_LOAD(3, b1 + kb * kBlockElems, 64);
                    TILE_DP(5, 0, 3);
                }
                if (two_a) {
                    TILE_LOAD(1, a1 + kb * kTileK, ldxb * 2);
                    TILE_DP(6, 1, 2);
                    if (two_b) TILE_DP(7, 1, 3);
                }
            }
            TILE_STORE(4, c[0], 64);
            TILE_STORE(5, c[1], 64);
            TILE_STORE(6, c[2], 64);
            TILE_STORE(7, c[3], 64);
            for (int q = 0; q < 4; ++q) {
                const int tt = t0 + (q / 2) * kTileRows, rr = r + (q % 2) * 16;
                if ((q / 2 && !two_a) || (q % 2 && !two_b)) continue;
                for (int t = tt; t < std::min(nt, tt + kTileRows); ++t)
                    for (int n = 0; n < 16; ++n) y[t * ldy + rr + n] = c[q][(t - tt) * 16 + n];
            }
        }
    }
}

void bf16_rows_amx(const Bf16Mat& m, int r0, int r1, const float* const*, int nt, float* y, int ldy, const uint16_t* xb,
                   int64_t ldxb) {
    const int64_t kbs = m.K / kTileK;
    amx_tiles(m.w + (static_cast<int64_t>(r0) / 16) * kbs * kBlockElems, kbs, r1 - r0, nt, xb, ldxb, y, ldy);
}

// Rows [r, r+16) x columns [32 kb, 32 kb + 32) of an INT4 matrix, dequantized to bf16, as one VNNI tile (layout above).
void int4_block_vnni(const Int4Mat& m, int r, int64_t kb, uint16_t* dst) {
    const int64_t ng = m.K / m.g;
#ifdef LVLLM_AMX_EMULATE
    for (int n = 0; n < 16; ++n) {
        const uint8_t* row = int4_row(m, r + n);
        for (int i = 0; i < 16; ++i)
            for (int p = 0; p < 2; ++p) {
                const int64_t col = kb * kTileK + 2 * i + p;
                const float s = m.s[(r + n) * ng + col / m.g];
                dst[i * 32 + n * 2 + p] = float_to_bf16(static_cast<float>(int4_nibble(row, col) - 8) * s);
            }
    }
#else
    // Row n's 32 columns become 16 dwords (bf16 pairs); dword i goes to tile row i, slot n: a scatter of stride 16.
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    const int64_t gcol = kb * kTileK / m.g;
    for (int n = 0; n < 16; ++n) {
        const uint8_t* p = int4_row(m, r + n) + kb * kInt4BlockStride;
        const float sc = m.s[(r + n) * ng + gcol];
        const __m512 s = _mm512_set1_ps(sc), off = _mm512_set1_ps(-8.f * sc);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF))), s, off);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), s, off);
        const __m512i pairs = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // bf16 of columns 0..31
        _mm512_i32scatter_epi32(reinterpret_cast<int*>(dst) + n, idx, pairs, 4);
    }
#endif
}

void int4_rows_amx(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy,
                   const uint16_t* xb, int64_t ldxb);

}  // namespace

const KernelTable* kernels_amx() {
#ifdef LVLLM_AMX_EMULATE
    const KernelTable* base = &kernels_ref();
#else
    const KernelTable* base = kernels_avx512();
#endif
    static const KernelTable t = [base] {
        KernelTable k{"amx", int4_rows_amx, bf16_rows_amx, base->act, base->stream_sum, true, kTileRows, repack_vnni};
        k.int4_q8_rows = base->int4_q8_rows;  // INT4 below a tile's 16 tokens: the base table's int8 GEMV
        k.quantize_q8 = base->quantize_q8;
        k.int4_q8_max_tokens = kTileRows - 1;
        return k;
    }();
    return &t;
}

namespace {

// Below 16 tokens a tile would be mostly padding: the GEMV of the base table is faster there.
void int4_rows_amx(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy,
                   const uint16_t* xb, int64_t ldxb) {
#ifdef LVLLM_AMX_EMULATE
    const KernelTable* base = &kernels_ref();
#else
    const KernelTable* base = kernels_avx512();
#endif
    if (nt < kTileRows || !xb || (r1 - r0) % 16 || r0 % 16) return base->int4_rows(m, r0, r1, x, nt, y, ldy, xb, ldxb);
    const int64_t kbs = m.K / kTileK;
    thread_local std::vector<uint16_t> buf;
    buf.resize(static_cast<size_t>(r1 - r0) / 16 * kbs * kBlockElems);
    for (int nb = 0; nb < (r1 - r0) / 16; ++nb)
        for (int64_t kb = 0; kb < kbs; ++kb) int4_block_vnni(m, r0 + 16 * nb, kb, buf.data() + (nb * kbs + kb) * kBlockElems);
    amx_tiles(buf.data(), kbs, r1 - r0, nt, xb, ldxb, y, ldy);
}

}  // namespace

}  // namespace lvllm
