// AMX kernels (Sapphire Rapids and later).
// BF16 weights: C[16 tokens x 16 rows] += A[16 x 32] . B[32 x 16] per TDPBF16PS. A = the activations as bf16 rows
// (the engine passes them contiguous, see kernels.h), B = weights repacked at load into 1 KiB VNNI tiles.
// INT4 weights x int8 activations: C[16 tokens x 16 rows] (int32) += A[16 x 32 int8] . B[8 quads x 16 rows x 4
// nibbles] per TDPBSUD, one 32-column Q8 block at a time (each block has its own activation scale), for each call's
// whole 16s of tokens; the rest of a call (decode, an expert's last few tokens) takes the AVX-512 table's int8 GEMM or
// GEMV (kernels_q8_gemm.h, kernels_q8.h): the same arithmetic, so one accuracy bound. With int8 activations off, INT4
// weights are dequantized per call to bf16 VNNI tiles and take the BF16 tile loop.
//
// Built with -mamx-tile -mamx-bf16 -mamx-int8 (+AVX-512, VNNI). With -DLVLLM_AMX_EMULATE the tile instructions become
// scalar code so the layouts and tiling are tested on machines without AMX (tests/test_engine_sanitize.py).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#ifdef LVLLM_AMX_EMULATE
#include "cpu_features.h"
#else
#include <immintrin.h>

#include "kernels_q8_gemm.h"
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

// Two tile layouts, loaded per thread when the kind of kernel changes (LDTILECFG):
//   Bf16: tiles 0-1 A (16 tokens x 32 bf16), 2-3 B (16 k-pairs x 16 rows x 2), 4-7 C (16 x 16 fp32): all 16 x 64 bytes.
//   Int8: tiles 0-1 A (16 tokens x one 32-column Q8 block), 2-3 B (8 k-quads x 16 rows x 4 nibbles), 4-5 C (int32).
enum class Tiles : int { None = 0, Bf16 = 1, Int8 = 2 };
struct TileShape {
    uint8_t rows[8];
    uint16_t colsb[8];
};
constexpr TileShape kShapes[3] = {
    {},
    {{16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64}},
    {{16, 16, 8, 8, 16, 16, 0, 0}, {32, 32, 64, 64, 64, 64, 0, 0}},
};

#ifdef LVLLM_AMX_EMULATE
// Scalar stand-ins with the instructions' semantics (tile t: up to 16 rows x 64 bytes).
thread_local unsigned char g_tiles[8][16 * 64];
thread_local Tiles g_shape = Tiles::None;
void tile_config(Tiles want) { g_shape = want; }
void tile_zero(int t) { std::memset(g_tiles[t], 0, sizeof g_tiles[t]); }
void tile_load(int t, const void* p, int64_t stride) {
    const TileShape& s = kShapes[int(g_shape)];
    for (int r = 0; r < s.rows[t]; ++r) std::memcpy(g_tiles[t] + r * 64, static_cast<const char*>(p) + r * stride, s.colsb[t]);
}
void tile_store(int t, void* p, int64_t stride) {
    const TileShape& s = kShapes[int(g_shape)];
    for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<char*>(p) + r * stride, g_tiles[t] + r * 64, s.colsb[t]);
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
void tile_dpbsud(int c, int a, int b) {  // C[m][n] += sum_k,j A[m][4k + j] (signed) . B[k][4n + j] (unsigned)
    const TileShape& s = kShapes[int(g_shape)];
    int32_t* C = reinterpret_cast<int32_t*>(g_tiles[c]);
    const int8_t* A = reinterpret_cast<const int8_t*>(g_tiles[a]);
    const uint8_t* B = g_tiles[b];
    for (int m = 0; m < s.rows[a]; ++m)
        for (int n = 0; n < s.colsb[c] / 4; ++n) {
            int32_t v = C[m * 16 + n];
            for (int k = 0; k < s.colsb[a] / 4; ++k)
                for (int j = 0; j < 4; ++j) v += int32_t(A[m * 64 + 4 * k + j]) * int32_t(B[k * 64 + 4 * n + j]);
            C[m * 16 + n] = v;
        }
}
#define TILE_ZERO(t) tile_zero(t)
#define TILE_LOAD(t, p, s) tile_load(t, p, s)
#define TILE_STORE(t, p, s) tile_store(t, p, s)
#define TILE_DP(c, a, b) tile_dp(c, a, b)
#define TILE_DPBSUD(c, a, b) tile_dpbsud(c, a, b)
#else
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, s) _tile_loadd(t, p, s)
#define TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define TILE_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
void tile_config(Tiles want) {
    thread_local Tiles loaded = Tiles::None;
    if (loaded == want) return;
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
        c.colsb[t] = kShapes[int(want)].colsb[t];
        c.rows[t] = kShapes[int(want)].rows[t];
    }
    _tile_loadconfig(&c);
    loaded = want;
}
#endif

// Tokens in tiles of 16 (two at a time), rows in tiles of 16 (two at a time): 4 C tiles per pass over K.
// bw: VNNI blocks of rows [0, nrows) (nrows a multiple of 16); y[t * ldy + row].
void amx_tiles(const uint16_t* bw, int64_t kbs, int nrows, int nt, const uint16_t* xb, int64_t ldxb, float* y, int ldy) {
    tile_config(Tiles::Bf16);
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

// ---- INT4 x int8 (AMX-INT8) ----

// Column n of an int8 C tile is weight row amx_row(n) of its 16: the order kernels_q8_gemm.h's unpack yields, so the
// B tiles need no shuffle back; scales are read and y written in that order.
constexpr int amx_row(int n) { return 4 * (n % 4) + n / 4; }
constexpr int kBTileBytes = 8 * 64;

// Block b (32 columns) of rows [r, r + 16) as an int8 B tile: row i = columns 4i..4i+3 of the 16 weight rows, as the
// stored unsigned nibbles u = q + 8.
void int4_block_b(const Int4Mat& m, int r, int64_t b, uint8_t* dst) {
#ifdef LVLLM_AMX_EMULATE
    for (int n = 0; n < 16; ++n) {
        const uint8_t* row = int4_row(m, r + amx_row(n));
        for (int i = 0; i < 8; ++i)
            for (int j = 0; j < 4; ++j) dst[i * 64 + 4 * n + j] = static_cast<uint8_t>(int4_nibble(row, 32 * b + 4 * i + j));
    }
#else
    static_assert(q8gemm::row_of<q8gemm::Dpbusd512>(5) == amx_row(5) && q8gemm::row_of<q8gemm::Dpbusd512>(14) == amx_row(14),
                  "the B tiles take the GEMM's row order");
    __m512i lo[4], hi[4];  // lo[i]: columns 4i..4i+3; hi[i]: 16+4i.. = B rows 4 + i
    q8gemm::unpack<q8gemm::Dpbusd512>(m, r, b, lo, hi);
    for (int i = 0; i < 4; ++i) {
        _mm512_store_si512(dst + 64 * i, lo[i]);
        _mm512_store_si512(dst + 64 * (4 + i), hi[i]);
    }
#endif
}

typedef float F16 __attribute__((vector_size(64)));      // 16 fp32 (one zmm on AVX-512, GCC's generic vectors)
typedef int32_t I16 __attribute__((vector_size(64)));

// grp[t] += d_b[t] C[t] for the first nv token rows of an int32 C tile c (d_b from each token's Q8 record).
inline void add_block(F16 grp[16], const int32_t* c, const int8_t* a, int64_t ldxq, int64_t K, int64_t b, int nv) {
#pragma GCC unroll 16
    for (int t = 0; t < nv; ++t) {
        I16 ci;
        std::memcpy(&ci, c + 16 * t, sizeof ci);
        grp[t] += __builtin_convertvector(ci, F16) * q8_scales(a + t * ldxq, K)[8 * b];
    }
}

// KernelTable::int4_q8_tiles: nt >= 1 tokens, records readable up to the next multiple of 16 (rows past nt are
// computed and dropped). Per 16 weight rows: their B tiles for every block first (K/32 x 512 bytes, reused by every
// 16 tokens); then per 16 tokens and group, its blocks two at a time into C tiles 4 and 5 (one computes while the
// other is scaled), summed per group as sum_b d_b C_b, then acc += s_g (that - 8 sum_b d_b sum q_b) as in
// kernels_q8_gemm.h.
void int4_q8_tiles_amx(const Int4Mat& m, int r0, int r1, const int8_t* xq, int64_t ldxq, int nt, float* y, int ldy) {
    tile_config(Tiles::Int8);
    const int64_t nb = m.K / kInt4Block, ng = m.K / m.g;
    const int bpg = m.g / kInt4Block;
    thread_local std::vector<uint8_t> bbuf;
    thread_local std::vector<F16> sbuf;  // [group] scales of the 16 rows, amx_row order
    bbuf.resize(size_t(nb) * kBTileBytes + 64);
    sbuf.resize(ng);
    uint8_t* const bt = bbuf.data() + (64 - reinterpret_cast<uintptr_t>(bbuf.data()) % 64) % 64;
    F16* const sc = sbuf.data();
    alignas(64) int32_t c[2][16 * 16];
    for (int r = r0; r < r1; r += 16) {
        for (int64_t b = 0; b < nb; ++b) int4_block_b(m, r, b, bt + b * kBTileBytes);
        for (int64_t gi = 0; gi < ng; ++gi)
            for (int n = 0; n < 16; ++n) sc[gi][n] = m.s[(r + amx_row(n)) * ng + gi];
        for (int t0 = 0; t0 < nt; t0 += 16) {
            const int nv = std::min(16, nt - t0);
            const int8_t* a = xq + t0 * ldxq;
            F16 acc[16] = {};
            for (int64_t gi = 0; gi < ng; ++gi) {
                F16 grp[16] = {};
                for (int bb = 0; bb < bpg; bb += 2) {
                    const int64_t b = gi * bpg + bb;
                    const bool two = bb + 1 < bpg;
                    TILE_ZERO(4);
                    TILE_LOAD(0, a + b * kInt4Block, ldxq);
                    TILE_LOAD(2, bt + b * kBTileBytes, 64);
                    TILE_DPBSUD(4, 0, 2);
                    if (two) {
                        TILE_ZERO(5);
                        TILE_LOAD(1, a + (b + 1) * kInt4Block, ldxq);
                        TILE_LOAD(3, bt + (b + 1) * kBTileBytes, 64);
                        TILE_DPBSUD(5, 1, 3);
                    }
                    TILE_STORE(4, c[0], 64);
                    add_block(grp, c[0], a, ldxq, m.K, b, nv);
                    if (two) {
                        TILE_STORE(5, c[1], 64);
                        add_block(grp, c[1], a, ldxq, m.K, b + 1, nv);
                    }
                }
                for (int t = 0; t < nv; ++t) {
                    const float* ds = q8_scales(a + t * ldxq, m.K) + 8 * nb + gi * bpg;  // d_b * sum q_b per block
                    float gs = 0.f;
                    for (int bb = 0; bb < bpg; ++bb) gs += ds[bb];
                    acc[t] += (grp[t] - 8.f * gs) * sc[gi];
                }
            }
            for (int t = 0; t < nv; ++t) {
                float* yt = y + (t0 + t) * ldy + (r - r0);
                for (int n = 0; n < 16; ++n) yt[amx_row(n)] = acc[t][n];
            }
        }
    }
}

// The SIMD table under the tiles: AVX-512 (emulated tiles: the best this CPU runs, so the int8 paths are the real ones).
const KernelTable* base_table() {
#ifdef LVLLM_AMX_EMULATE
    const CpuFeatures& f = cpu_features();
    if (!(f.avx512f && f.avx512bw && f.avx512vl && f.fma)) return kernels_avx2();
#endif
    return kernels_avx512();
}

}  // namespace

const KernelTable* kernels_amx() {
    static const KernelTable t = [] {
        const KernelTable* base = base_table();
        KernelTable k{"amx", int4_rows_amx, bf16_rows_amx, base->act, base->stream_sum, true, kTileRows, repack_vnni};
        k.int4_q8_rows = base->int4_q8_rows;
        k.quantize_q8 = base->quantize_q8;
        k.int4_q8_max_tokens = base->int4_q8_max_tokens;
        k.int4_q8_gemm = base->int4_q8_gemm;
        k.int4_q8_gemm_rows = base->int4_q8_gemm_rows;
        k.int4_q8_gemm_min_tokens = base->int4_q8_gemm_min_tokens;
        k.int4_q8_tiles = int4_q8_tiles_amx;
        k.q8_slot_records = true;
        return k;
    }();
    return &t;
}

namespace {

// Below 16 tokens a tile would be mostly padding: the base table's kernel is faster there.
void int4_rows_amx(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy,
                   const uint16_t* xb, int64_t ldxb) {
    const KernelTable* base = base_table();
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
