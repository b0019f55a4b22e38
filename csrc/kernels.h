// Kernel tables: one per ISA, same signatures, chosen once at engine construction (see dispatch in engine.cpp).
//
// Every kernel computes dot products of weight rows with fp32 activation rows:
//     y[t * ldy + (r - r0)] = sum_k W[r, k] * x[t][k]      for r in [r0, r1), t in [0, nt)
// The engine calls them per (expert, row chunk) so a chunk of weight rows stays in L1/L2 while every token routed to
// that expert passes over it (decode: one token, weights streamed once; prefill: tokens grouped by expert).
#pragma once
#include <cstddef>
#include <cstdint>

namespace lvllm {

enum class Act : int { SiluGlu = 0, Relu2 = 1, GptossGlu = 2, GeluTanhGlu = 3 };

// INT4 kernel layout (the store's `pack-quantized` int32 words are repacked into it at load): blocks of 32 columns =
// 16 bytes; byte b of a block holds column 32B + b in its low nibble and column 32B + 16 + b in its high nibble, as
// u = q + 8. One zero-extending byte load, then a mask or a shift, gives 8 (AVX2) or 16 (AVX-512) consecutive columns.
// Rows are interleaved in groups of kInt4Rows: block B of rows 4j..4j+3 lie side by side in one 64-byte line, so a
// kernel that reads 4 rows at once reads one sequential stream (the hardware prefetchers track one stream per page;
// four row streams side by side ran 1.3x slower on Sapphire Rapids and 1.7x on Zen3 with 15 / 1 threads). Row r's
// block B is at int4_row(m, r) + B * kInt4BlockStride. Scales: fp32, row-major [rows, K/g].
constexpr int kInt4Block = 32;
constexpr int kInt4BlockBytes = 16;
constexpr int kInt4Rows = 4;
constexpr int kInt4BlockStride = kInt4Rows * kInt4BlockBytes;
static_assert(kInt4Block / 2 == kInt4BlockBytes, "two columns per byte");

struct Int4Mat {
    const uint8_t* q;  // [rows, K/2] kernel layout above (rows a multiple of kInt4Rows)
    const float* s;    // [rows, K/g]
    int64_t K;         // columns, multiple of g
    int g;             // group size: 32, 64 or 128
};

struct Bf16Mat {
    const uint16_t* w;  // [rows, K] raw bf16 bits, row-major
    int64_t K;          // columns, multiple of 32
};

// Int8 activations for the INT4 x int8 kernels (kernels_q8.h): one record per token row of K columns,
//     int8 q[K] | float d[8 * K/32] (block b's scale, repeated 8 times: one vector load) | float ds[K/32] (d_b * sum q_b)
// with x[32 b + c] ~= d_b * q[32 b + c], q in [-127, 127]. Records start 64-byte aligned, q8_row_bytes(K) apart.
inline int64_t q8_row_bytes(int64_t K) { return (K + 36 * (K / kInt4Block) + 63) / 64 * 64; }
inline float* q8_scales(int8_t* rec, int64_t K) { return reinterpret_cast<float*>(rec + K); }
inline const float* q8_scales(const int8_t* rec, int64_t K) { return reinterpret_cast<const float*>(rec + K); }

// Activations reach a kernel twice over: x[t] (fp32 row pointers, any order) and, for tables that set
// `wants_bf16_rows`, xb: the same rows as bf16, contiguous with stride ldxb elements and readable for 15 rows past nt
// (tile kernels load whole 16-row tiles; rows past nt are padding whose results are discarded). Otherwise xb is null.
struct KernelTable {
    const char* name;
    void (*int4_rows)(const Int4Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy,
                      const uint16_t* xb, int64_t ldxb);
    void (*bf16_rows)(const Bf16Mat& m, int r0, int r1, const float* const* x, int nt, float* y, int ldy,
                      const uint16_t* xb, int64_t ldxb);
    // out[i] = act(gate[i], up[i]) for i < n; gate is unused (may be null) for Relu2.
    void (*act)(Act a, const float* gate, const float* up, float* out, int n);
    // Sum of n floats with the table's widest loads: the read-bandwidth probe (Engine::read_bandwidth) streams as the
    // kernels do, so "% of read bandwidth" compares like with like.
    float (*stream_sum)(const float* p, size_t n);
    bool wants_bf16_rows = false;
    // INT4 kernels use the bf16 rows only when a call has at least this many tokens; a forward where no expert has
    // that many skips preparing them (decode: the GEMV reads fp32 x).
    int int4_rows_min_tokens = 0;
    // BF16 weights in a kernel-specific layout: called at load for each expert matrix [rows, K]; null = row-major.
    void (*repack_bf16)(const uint16_t* src, uint16_t* dst, int64_t rows, int64_t K) = nullptr;
    // INT4 x int8 (null: the table has none): y as int4_rows, from Q8 records xq[t]; used for calls of at most
    // int4_q8_max_tokens tokens. quantize_q8 writes blocks [b0, b1) of fp32 row x [K] into record rec.
    void (*int4_q8_rows)(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) = nullptr;
    void (*quantize_q8)(const float* x, int64_t K, int64_t b0, int64_t b1, int8_t* rec) = nullptr;
    int int4_q8_max_tokens = 0;
    // INT4 x int8 GEMM for prefill (null: none), same contract as int4_q8_rows; the engine calls it instead for calls
    // of at least int4_q8_gemm_min_tokens tokens whose rows [r0, r1) start on a 4-row group and span a multiple of
    // int4_q8_gemm_rows (every engine chunk does; see KernelPath for how a test sees which one ran).
    void (*int4_q8_gemm)(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy) = nullptr;
    int int4_q8_gemm_rows = 16;
    int int4_q8_gemm_min_tokens = 4;
    // INT4 x int8 on tiles (AMX-INT8; null: none) for calls of at least kInt4Q8TileTokens tokens: token t's Q8 record
    // at xq + t * ldxq, readable up to the next multiple of 16 tokens (tiles load whole 16-token tiles; rows past nt are
    // dropped), rows [r0, r1) a multiple of 16 from a multiple of 16. For tables that set q8_slot_records the engine
    // lays X's records out per slot (in slot order, like h's, 16 spare records at the end) in forwards where some
    // expert has that many tokens, so one expert's records are equally spaced; a call whose records are not (decode
    // keeps one record per token) takes int4_q8_gemm / int4_q8_rows.
    void (*int4_q8_tiles)(const Int4Mat& m, int r0, int r1, const int8_t* xq, int64_t ldxq, int nt, float* y,
                          int ldy) = nullptr;
    bool q8_slot_records = false;
};
constexpr int kInt4Q8TileTokens = 16;

// Which kernels a forward called (bit set per KernelPath, Engine::last_paths): lets a test see the path it checks.
enum class KernelPath : int { Int4Fp32Act = 0, Int4Q8Gemv = 1, Int4Q8Gemm = 2, Bf16 = 3, Int4Q8Tiles = 4 };
constexpr int kKernelPaths = 5;

const KernelTable& kernels_ref();
// Each returns nullptr when the file was built without its ISA (the CPU check is the caller's).
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_amx();
// The VPDPBUSD INT4 x int8 kernels (moe_avx512vnni.cpp): GEMV and prefill GEMM; only for CPUs with AVX512-VNNI.
void int4_q8_rows_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy);
void int4_q8_gemm_avx512vnni(const Int4Mat& m, int r0, int r1, const int8_t* const* xq, int nt, float* y, int ldy);
constexpr int kInt4Q8GemmRowsAvx512 = 16;

// Where row r's first block starts; its block B is kInt4BlockStride * B further.
inline const uint8_t* int4_row(const Int4Mat& m, int64_t r) {
    return m.q + (r / kInt4Rows) * kInt4Rows * (m.K / 2) + (r % kInt4Rows) * kInt4BlockBytes;
}

// Column c of a row (from int4_row) as the stored unsigned nibble u = q + 8; used by the reference kernels.
inline int int4_nibble(const uint8_t* row, int64_t c) {
    const int w = static_cast<int>(c % kInt4Block);
    const uint8_t byte = row[(c / kInt4Block) * kInt4BlockStride + w % 16];
    return w < 16 ? (byte & 0xF) : (byte >> 4);
}

inline float bf16_to_float(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t bits;
    __builtin_memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

}  // namespace lvllm
