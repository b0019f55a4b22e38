// Engine core: kernel dispatch, node-local weight load/repack, routing, and the phased forward job (engine.h).
#include "engine.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "cpu_features.h"

namespace lvllm {
namespace {

constexpr int kRowsA = 32;     // In rows (of gate and of up) per phase-A work item
constexpr int kRowsB = 32;     // H rows per phase-B work item
constexpr int kTokBlock = 64;  // tokens per kernel call; bounds the per-thread scratch
constexpr int kColsC = 512;    // columns per phase-C work item
constexpr size_t kHuge = size_t(2) << 20;
static_assert(kRowsA == kInt4Block, "phase A quantizes each work item's h columns as one int8 block");

std::string str(int64_t v) { return std::to_string(v); }

// Starts pulling the first bytes of rows [r0, r1) of an INT4 matrix (and their scales) toward L2, so a kernel that
// switches to them does not begin on a cold stream: the kernels themselves prefetch only within the matrix they are
// in, one 4-row group ahead. Decode reads many short chunks (a phase-B item: 32 rows of each routed expert).
constexpr int64_t kPrefetchBytes = 4096;
void prefetch_rows(const Int4Mat& m, int r0, int r1) {
    const char* q = reinterpret_cast<const char*>(int4_row(m, r0 - r0 % kInt4Rows));
    for (int64_t o = 0, n = std::min<int64_t>(kPrefetchBytes, int64_t(r1 - r0) * (m.K / 2)); o < n; o += 64)
        __builtin_prefetch(q + o, 0, 2);
    const char* sc = reinterpret_cast<const char*>(m.s + int64_t(r0) * (m.K / m.g));
    for (int64_t o = 0, n = int64_t(r1 - r0) * (m.K / m.g) * 4; o < n; o += 64) __builtin_prefetch(sc + o, 0, 2);
}

const KernelTable* table_for(const std::string& name) {
    const CpuFeatures& f = cpu_features();
    if (name == "ref") return &kernels_ref();
    if (name == "avx2") return (f.avx2 && f.fma) ? kernels_avx2() : nullptr;
    if (name == "avx512") return (f.avx512f && f.avx512bw && f.avx512vl && f.fma) ? kernels_avx512() : nullptr;
#ifdef LVLLM_AMX_EMULATE
    if (name == "amx") return kernels_amx();  // scalar tile emulation, test builds only
#endif
    if (name == "amx") return (f.os_amx && f.amx_bf16 && f.amx_int8 && f.avx512bw && f.avx512_vnni) ? kernels_amx() : nullptr;
    return nullptr;
}

}  // namespace

Engine::Buf::Buf(size_t n) : bytes(n) {
    const size_t align = n >= kHuge ? kHuge : 64;
    if (posix_memalign(&p, align, std::max<size_t>(n, 64)) != 0) throw std::bad_alloc();
    if (n >= kHuge) madvise(p, n, MADV_HUGEPAGE);  // fewer TLB misses while streaming; advisory only
}

Engine::Buf& Engine::Buf::operator=(Buf&& o) noexcept {
    if (this != &o) {
        free(p);
        p = o.p;
        bytes = o.bytes;
        o.p = nullptr;
        o.bytes = 0;
    }
    return *this;
}

Engine::Buf::~Buf() { free(p); }

std::vector<std::string> Engine::available_isas() {
    std::vector<std::string> out;
    for (const char* n : {"amx", "avx512", "avx2", "ref"})
        if (table_for(n)) out.emplace_back(n);
    return out;
}

Engine::Engine(const EngineConfig& cfg) : cfg_(cfg) {
    auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
    const int64_t H = cfg.hidden, In = cfg.intermediate;
    if (H <= 0 || H % 32) bad("hidden_size=" + str(H) + " must be a positive multiple of 32");
    if (In <= 0 || In % 32) bad("intermediate_size (per node) =" + str(In) + " must be a positive multiple of 32");
    if (H > (1 << 24) || In > (1 << 24)) bad("hidden/intermediate size over 2^24 is not supported");
    if (cfg.experts <= 0) bad("num_experts=" + str(cfg.experts) + " must be positive");
    if (cfg.max_tokens <= 0) bad("max_tokens=" + str(cfg.max_tokens) + " must be positive");
    if ((cfg.act == Act::Relu2) == cfg.gated)
        bad(cfg.gated ? "activation relu2 has no gate: pass gated=False" : "this activation needs a gate: pass gated=True");
    if (cfg.int4) {
        if (cfg.group <= 0 || cfg.group % 8)
            bad("group_size=" + str(cfg.group) + " is not a positive multiple of 8 (the packed int32 words hold 8 "
                "columns); requantize with group_size 32, 64 or 128");
        if (H % cfg.group || In % cfg.group)
            bad("hidden_size=" + str(H) + " and per-node intermediate_size=" + str(In) +
                " must both be divisible by group_size=" + str(cfg.group));
    }
    if (cfg.nodes.empty()) bad("nodes is empty: give at least one node with at least one cpu");
    for (size_t n = 0; n < cfg.nodes.size(); ++n) {
        if (cfg.nodes[n].empty()) bad("node " + str(n) + " has no cpus");
        for (int c : cfg.nodes[n])
            if (c < 0) bad("cpu id " + str(c) + " in node " + str(n) + " is negative");
    }
    if (cfg.isa.empty()) {
        const CpuFeatures& f = cpu_features();
        if (!(f.avx2 && f.fma))
            bad("this CPU (or OS) lacks AVX2+FMA, which the engine needs; use a newer x86-64 CPU (Haswell/Zen or later)");
        kt_ = table_for(available_isas().front());
    } else {
        kt_ = table_for(cfg.isa);
        if (!kt_) {
            std::string names;
            for (const auto& n : available_isas()) names += (names.empty() ? "" : ", ") + n;
            bad("kernel table '" + cfg.isa + "' is not available on this CPU/build; available: " + names);
        }
    }
    if (cfg.int4 && cfg.group % kInt4Block && kt_ != &kernels_ref()) {  // every SIMD INT4 kernel steps whole 32-column blocks per group
        note_ = "INT4 group_size=" + str(cfg.group) + " is not a multiple of 32, which the '" + kt_->name +
                "' kernels tile: using the portable 'ref' kernels (much slower); requantize the store with group_size "
                "32, 64 or 128 for speed";
        kt_ = &kernels_ref();
    }
    if (cfg.spin_us < 0 || cfg.spin_us > 1000000) bad("spin_us=" + str(cfg.spin_us) + " must be in [0, 1000000]");
    const int nn = static_cast<int>(cfg.nodes.size());
    pool_ = std::make_unique<ThreadPool>(cfg.nodes, cfg.spin_us);
    trace_.resize(pool_->total_threads());
    cur_a_ = std::vector<Cursor>(nn);
    cur_b_ = std::vector<Cursor>(nn);
    prog_a_ = std::vector<Progress>(nn);
    prog_b_ = std::vector<Progress>(nn);
    hptr_.resize(nn);
    hq_.resize(nn);
    hqptr_.resize(nn);
    hsb_.resize(nn);
    hbuf_.resize(nn);
    ybuf_.resize(nn);
    scratch_.resize(pool_->total_threads());
    if (kt_->q8_slot_records) xrow_.assign(pool_->total_threads(), std::vector<float>(H));
    for (auto& s : scratch_) s.resize(size_t(2) * kTokBlock * kRowsA + size_t(kTokBlock) * kRowsB);
}

Engine::~Engine() { pool_->quiesce(); }

// ---- load -------------------------------------------------------------------------------------------------------

void Engine::repack_expert(const ShardIn& in, NodeWeights& w, int e) const {
    const int64_t H = cfg_.hidden, In = cfg_.intermediate, R13 = rows13();
    auto bias = [e](const void* src, Dtype dt, const Buf& dst, int64_t n) {
        if (!src) return;
        float* d = dst.as<float>() + e * n;
        for (int64_t i = 0; i < n; ++i)
            d[i] = dt == Dtype::BF16 ? bf16_to_float(static_cast<const uint16_t*>(src)[e * n + i])
                                     : static_cast<const float*>(src)[e * n + i];
    };
    bias(in.w13_bias, in.w13_bias_dtype, w.b13, R13);
    bias(in.w2_bias, in.w2_bias_dtype, w.b2, H);
    if (!cfg_.int4) {
        if (kt_->repack_bf16) {
            kt_->repack_bf16(in.w13 + e * R13 * H, w.w13.as<uint16_t>() + e * R13 * H, R13, H);
            kt_->repack_bf16(in.w2 + e * H * In, w.w2.as<uint16_t>() + e * H * In, H, In);
        } else {
            std::memcpy(w.w13.as<uint16_t>() + e * R13 * H, in.w13 + e * R13 * H, R13 * H * 2);
            std::memcpy(w.w2.as<uint16_t>() + e * H * In, in.w2 + e * H * In, H * In * 2);
        }
        return;
    }
    auto pack = [](const int32_t* src, const uint16_t* ssrc, uint8_t* dst, float* sdst, int64_t rows, int64_t K, int g) {
        const Int4Mat m{dst, nullptr, K, g};
        for (int64_t r = 0; r < rows; ++r) {
            const int32_t* s = src + r * (K / 8);
            uint8_t* d = const_cast<uint8_t*>(int4_row(m, r));
            auto u = [&](int64_t c) { return (static_cast<uint32_t>(s[c / 8]) >> (4 * (c % 8))) & 0xF; };
            for (int64_t b = 0; b < K / kInt4Block; ++b)
                for (int i = 0; i < 16; ++i)
                    d[b * kInt4BlockStride + i] = static_cast<uint8_t>(u(32 * b + i) | (u(32 * b + 16 + i) << 4));
            for (int64_t j = 0; j < K / g; ++j) sdst[r * (K / g) + j] = bf16_to_float(ssrc[r * (K / g) + j]);
        }
    };
    const int g = cfg_.group;
    pack(in.w13_packed + e * R13 * (H / 8), in.w13_scale + e * R13 * (H / g), w.w13q.as<uint8_t>() + e * R13 * (H / 2),
         w.w13s.as<float>() + e * R13 * (H / g), R13, H, g);
    pack(in.w2_packed + e * H * (In / 8), in.w2_scale + e * H * (In / g), w.w2q.as<uint8_t>() + e * H * (In / 2),
         w.w2s.as<float>() + e * H * (In / g), H, In, g);
}

void Engine::load_job(void* ctx, int node, int tid, int) {
    Engine* self = static_cast<Engine*>(ctx);
    const int nt = self->pool_->node_threads(node);
    for (int e = tid; e < self->cfg_.experts; e += nt)
        self->repack_expert((*self->load_in_)[node], self->load_out_->nodes[node], e);
}

void Engine::load_layer(int layer, const std::vector<ShardIn>& shards) {
    if (shards.size() != cfg_.nodes.size())
        throw std::invalid_argument("load_layer got " + str(shards.size()) + " shards for " + str(cfg_.nodes.size()) +
                                    " nodes: pass one dict per node, in node order");
    for (size_t n = 1; n < shards.size(); ++n)
        if (shards[n].w2_bias)
            throw std::invalid_argument("shard " + str(n) + " has w2.bias: it belongs in node 0's shard only (the sum "
                                        "over nodes adds it once); drop it from the other shards");
    std::lock_guard<std::mutex> g(api_mu_);
    pool_->quiesce();
    const size_t E = cfg_.experts, H = cfg_.hidden, In = cfg_.intermediate, R13 = rows13();
    Layer fresh;
    fresh.nodes.resize(shards.size());
    for (size_t n = 0; n < shards.size(); ++n) {
        if (shards[n].w13_bias) fresh.nodes[n].b13 = Buf(E * R13 * 4);
        if (shards[n].w2_bias) fresh.nodes[n].b2 = Buf(E * H * 4);
    }
    for (auto& w : fresh.nodes) {  // allocation only; pages are first touched by the node's own threads below
        if (cfg_.int4) {
            w.w13q = Buf(E * R13 * H / 2);
            w.w13s = Buf(E * R13 * (H / cfg_.group) * 4);
            w.w2q = Buf(E * H * In / 2);
            w.w2s = Buf(E * H * (In / cfg_.group) * 4);
        } else {
            w.w13 = Buf(E * R13 * H * 2);
            w.w2 = Buf(E * H * In * 2);
        }
    }
    load_in_ = &shards;
    load_out_ = &fresh;
    pool_->launch(&Engine::load_job, this);
    pool_->wait();
    load_in_ = nullptr;
    load_out_ = nullptr;
    layers_[layer] = std::move(fresh);
}

// ---- forward ----------------------------------------------------------------------------------------------------

Int4Mat Engine::mat13(const NodeWeights& w, int e) const {
    const int64_t H = cfg_.hidden, R13 = rows13();
    return {w.w13q.as<uint8_t>() + e * R13 * (H / 2), w.w13s.as<float>() + e * R13 * (H / cfg_.group), H, cfg_.group};
}
Int4Mat Engine::mat2(const NodeWeights& w, int e) const {
    const int64_t H = cfg_.hidden, In = cfg_.intermediate;
    return {w.w2q.as<uint8_t>() + e * H * (In / 2), w.w2s.as<float>() + e * H * (In / cfg_.group), In, cfg_.group};
}
Bf16Mat Engine::bmat13(const NodeWeights& w, int e) const {
    return {w.w13.as<uint16_t>() + int64_t(e) * rows13() * cfg_.hidden, cfg_.hidden};
}
Bf16Mat Engine::bmat2(const NodeWeights& w, int e) const {
    return {w.w2.as<uint16_t>() + int64_t(e) * cfg_.hidden * cfg_.intermediate, cfg_.intermediate};
}

std::string Engine::submit(const ForwardArgs& a) {
    std::lock_guard<std::mutex> g(api_mu_);
    return submit_locked(a);
}

std::string Engine::forward(const ForwardArgs& a) {
    std::lock_guard<std::mutex> g(api_mu_);
    pool_->wait();
    std::string err = submit_locked(a);
    pool_->wait();
    return err;
}

std::string Engine::submit_locked(const ForwardArgs& a) {
    submit_ns_ = now_ns();
    if (pool_->busy()) return "a forward is still in flight: call wait() before the next submit()";
    pool_->quiesce();  // a late worker may still be running through the last forward's (finished) job
    auto it = layers_.find(a.layer);
    if (it == layers_.end()) return "layer " + str(a.layer) + " is not loaded: call load_layer(" + str(a.layer) + ", shards) first";
    if (a.tokens < 0 || a.tokens > cfg_.max_tokens)
        return "T=" + str(a.tokens) + " tokens is over max_tokens=" + str(cfg_.max_tokens) +
               ": split the batch or build the Engine with a larger max_tokens";
    if (a.k <= 0 || a.k > cfg_.experts) return "top-k=" + str(a.k) + " must be in [1, num_experts=" + str(cfg_.experts) + "]";
    if (a.tokens == 0) return "";
    if (!a.hidden || !a.topk_ids || !a.topk_weights || !a.out) return "null pointer among hidden/topk_ids/topk_weights/out";
    const int64_t T = a.tokens, K = a.k, H = cfg_.hidden, In = cfg_.intermediate, E = cfg_.experts;

    // Route: slots grouped by expert, tokens in order within an expert.
    std::vector<int>& cnt = eslot_;
    cnt.assign(E, 0);
    auto id_at = [&](int64_t i) -> int64_t {
        return a.ids_dtype == Dtype::I64 ? static_cast<const int64_t*>(a.topk_ids)[i] : static_cast<const int32_t*>(a.topk_ids)[i];
    };
    int64_t S = 0;
    for (int64_t i = 0; i < T * K; ++i) {
        const int64_t id = id_at(i);
        if (id == -1) continue;
        if (id < -1 || id >= E)
            return "topk_ids[" + str(i / K) + ", " + str(i % K) + "] = " + str(id) + " is outside [-1, " + str(E) +
                   "): expert ids must be < num_experts (-1 skips)";
        ++cnt[id];
        ++S;
    }
    active_.clear();
    offset_.clear();
    count_.clear();
    int off = 0;
    for (int e = 0; e < E; ++e) {
        if (!cnt[e]) continue;
        active_.push_back(e);
        offset_.push_back(off);
        count_.push_back(cnt[e]);
        const int c = cnt[e];
        cnt[e] = off;  // becomes the fill cursor
        off += c;
    }
    slot_tok_.resize(S);
    slot_w_.resize(S);
    for (int64_t i = 0; i < T * K; ++i) {
        const int64_t id = id_at(i);
        if (id == -1) continue;
        const int s = cnt[id]++;
        slot_tok_[s] = static_cast<int>(i / K);
        slot_w_[s] = a.topk_weights[i];
    }
    if (a.hidden_dtype == Dtype::BF16) {
        grow(xbuf_, T * H);
        x_ = xbuf_.data();
    } else {
        x_ = static_cast<const float*>(a.hidden);
    }
    xptr_.resize(S);
    for (int64_t s = 0; s < S; ++s) xptr_[s] = x_ + int64_t(slot_tok_[s]) * H;
    const int most = count_.empty() ? 0 : *std::max_element(count_.begin(), count_.end());
    q8_ = int8_activations();
    q8_slots_ = q8_ && kt_->q8_slot_records && most >= kInt4Q8TileTokens;  // decode keeps one record per token
    const int64_t xr = q8_row_bytes(H), hr = q8_row_bytes(In);
    if (q8_) {
        grow(xq_, (q8_slots_ ? S + kInt4Q8TileTokens : T) * xr);
        xqptr_.resize(S);
        for (int64_t s = 0; s < S; ++s) xqptr_[s] = xq_.data() + (q8_slots_ ? s : slot_tok_[s]) * xr;
    }
    const bool int4_fp32 = cfg_.int4 && !(q8_ && most <= kt_->int4_q8_max_tokens);  // some INT4 call reads x, not xq
    rows_ = kt_->wants_bf16_rows && (!cfg_.int4 || (int4_fp32 && most >= kt_->int4_rows_min_tokens));
    if (rows_ && xsb_.size() < size_t(S + 16) * H) xsb_.resize(size_t(S + 16) * H);
    for (size_t n = 0; n < cfg_.nodes.size(); ++n) {
        grow(hbuf_[n], std::max<int64_t>(S, 1) * In);
        if (rows_ && hsb_[n].size() < size_t(S + 16) * In) hsb_[n].resize(size_t(S + 16) * In);
        grow(ybuf_[n], T * H);
        hptr_[n].resize(S);
        for (int64_t s = 0; s < S; ++s) hptr_[n][s] = hbuf_[n].data() + s * In;
        if (q8_) {
            grow(hq_[n], (S + (q8_slots_ ? kInt4Q8TileTokens : 1)) * hr);
            hqptr_[n].resize(S);
            for (int64_t s = 0; s < S; ++s) hqptr_[n][s] = hq_[n].data() + s * hr;
        }
        cur_a_[n].v.store(0, std::memory_order_relaxed);
        cur_b_[n].v.store(0, std::memory_order_relaxed);
    }
    const bool tok0 = a.hidden_dtype == Dtype::BF16 || (q8_ && !q8_slots_), slot0 = rows_ || q8_slots_;
    items_0_ = uint32_t((tok0 ? T : 0) + (slot0 ? S : 0));
    items_a_ = uint32_t(active_.size() * ((In + kRowsA - 1) / kRowsA));
    items_b_ = uint32_t((H + kRowsB - 1) / kRowsB);
    items_c_ = uint32_t(T * ((H + kColsC - 1) / kColsC));
    for (size_t n = 0; n < cfg_.nodes.size(); ++n) {
        prog_a_[n].done.store(0, std::memory_order_relaxed);
        prog_b_[n].done.store(0, std::memory_order_relaxed);
    }
    prog_0_.done.store(0, std::memory_order_relaxed);
    prog_c_.done.store(0, std::memory_order_relaxed);
    cur_0_.v.store(0, std::memory_order_relaxed);
    cur_c_.v.store(0, std::memory_order_relaxed);
    cur_ = a;
    cur_layer_ = &it->second;
    traced_ = true;
    pool_->launch(&Engine::forward_job, this);
    return "";
}

void Engine::int4_call(const Int4Mat& m, int r0, int r1, int s0, int n, const int8_t* const* xq, const float* const* x,
                       const uint16_t* xb, int64_t ldxb, float* y, int ldy, int gtid) {
    uint32_t& paths = trace_[gtid].paths;
    if (!q8_call(n)) {
        kt_->int4_rows(m, r0, r1, x + s0, n, y, ldy, xb, ldxb);
        paths |= 1u << int(KernelPath::Int4Fp32Act);
        return;
    }
    xq += s0;
    if (kt_->int4_q8_tiles && n >= kInt4Q8TileTokens && r0 % 16 == 0 && (r1 - r0) % 16 == 0) {
        const int64_t ld = xq[1] - xq[0];
        bool even = q8_slots_;  // records in slot order (with the spare ones the tiles may read) ...
        for (int t = 2; t < n && even; ++t) even = xq[t] - xq[t - 1] == ld;  // ... and equally spaced
        if (even) {
            kt_->int4_q8_tiles(m, r0, r1, xq[0], ld, n, y, ldy);
            paths |= 1u << int(KernelPath::Int4Q8Tiles);
            return;
        }
    }
    if (kt_->int4_q8_gemm && n >= kt_->int4_q8_gemm_min_tokens && r0 % kInt4Rows == 0 &&
        (r1 - r0) % kt_->int4_q8_gemm_rows == 0) {
        kt_->int4_q8_gemm(m, r0, r1, xq, n, y, ldy);
        paths |= 1u << int(KernelPath::Int4Q8Gemm);
    } else {
        kt_->int4_q8_rows(m, r0, r1, xq, n, y, ldy);
        paths |= 1u << int(KernelPath::Int4Q8Gemv);
    }
}

int Engine::phase_a(int node, int gtid) {
    const NodeWeights& W = cur_layer_->nodes[node];
    const int In = static_cast<int>(cfg_.intermediate);
    const int cpe = (In + kRowsA - 1) / kRowsA;
    const int items = static_cast<int>(items_a_);
    float* gt = scratch_[gtid].data();
    float* ut = gt + kTokBlock * kRowsA;
    float* hb = hbuf_[node].data();
    const bool wb = rows_;
    const int64_t H = cfg_.hidden;
    uint16_t* hsb = wb ? hsb_[node].data() : nullptr;
    const int64_t hr = q8_row_bytes(In);
    auto rows = [&](int e, int r0, int r1, int s0, const uint16_t* xb, int n, float* y) {
        if (cfg_.int4) return int4_call(mat13(W, e), r0, r1, s0, n, xqptr_.data(), xptr_.data(), xb, H, y, kRowsA, gtid);
        kt_->bf16_rows(bmat13(W, e), r0, r1, xptr_.data() + s0, n, y, kRowsA, xb, H);
        trace_[gtid].paths |= 1u << int(KernelPath::Bf16);
    };
    // One item ahead: the next item is taken (and its gate rows prefetched) before this one is computed.
    int did = 0;
    for (int it = cur_a_[node].v.fetch_add(1, std::memory_order_relaxed), next; it < items; it = next, ++did) {
        next = cur_a_[node].v.fetch_add(1, std::memory_order_relaxed);
        if (cfg_.int4 && next < items) {
            const int n0 = (next % cpe) * kRowsA;
            prefetch_rows(mat13(W, active_[next / cpe]), n0, std::min(In, n0 + kRowsA));
        }
        const int a = it / cpe, i0 = (it % cpe) * kRowsA, i1 = std::min(In, i0 + kRowsA), nr = i1 - i0;
        const int e = active_[a], off = offset_[a], cnt = count_[a];
        for (int t0 = 0; t0 < cnt; t0 += kTokBlock) {
            const int n = std::min(kTokBlock, cnt - t0);
            const int s0 = off + t0;
            const uint16_t* xb = wb ? xsb_.data() + int64_t(s0) * H : nullptr;
            if (cfg_.gated) {
                if (cfg_.int4 && t0 == 0) prefetch_rows(mat13(W, e), In + i0, In + i1);  // up rows, read next
                rows(e, i0, i1, s0, xb, n, gt);
                rows(e, In + i0, In + i1, s0, xb, n, ut);
            } else {
                rows(e, i0, i1, s0, xb, n, ut);
            }
            if (const float* b = W.b13.as<float>()) {  // gate rows then up rows, as w13
                b += int64_t(e) * rows13();
                for (int t = 0; t < n; ++t)
                    for (int i = 0; i < nr; ++i) {
                        if (cfg_.gated) gt[t * kRowsA + i] += b[i0 + i];
                        ut[t * kRowsA + i] += b[(cfg_.gated ? In : 0) + i0 + i];
                    }
            }
            const bool hq = cfg_.int4 && q8_call(n);  // phase B calls this expert with the same n tokens
            for (int t = 0; t < n; ++t) {
                float* h = hb + int64_t(s0 + t) * In + i0;
                kt_->act(cfg_.act, cfg_.gated ? gt + t * kRowsA : nullptr, ut + t * kRowsA, h, nr);
                if (wb)
                    for (int i = 0; i < nr; ++i) hsb[int64_t(s0 + t) * In + i0 + i] = float_to_bf16(h[i]);
                if (hq) kt_->quantize_q8(h - i0, In, i0 / kInt4Block, i0 / kInt4Block + 1, hq_[node].data() + (s0 + t) * hr);
            }
        }
    }
    return did;
}

int Engine::phase_b(int node, int gtid) {
    const NodeWeights& W = cur_layer_->nodes[node];
    const int H = static_cast<int>(cfg_.hidden);
    const int64_t T = cur_.tokens, In = cfg_.intermediate;
    const int items = static_cast<int>(items_b_);
    float* tmp = scratch_[gtid].data() + 2 * kTokBlock * kRowsA;
    float* y = ybuf_[node].data();
    int did = 0;
    for (int it; (it = cur_b_[node].v.fetch_add(1, std::memory_order_relaxed)) < items; ++did) {
        const int h0 = it * kRowsB, h1 = std::min(H, h0 + kRowsB), nr = h1 - h0;
        for (int64_t t = 0; t < T; ++t) std::memset(y + t * H + h0, 0, sizeof(float) * nr);
        for (size_t a = 0; a < active_.size(); ++a) {
            const int e = active_[a], off = offset_[a], cnt = count_[a];
            if (cfg_.int4 && a + 1 < active_.size()) prefetch_rows(mat2(W, active_[a + 1]), h0, h1);
            for (int t0 = 0; t0 < cnt; t0 += kTokBlock) {
                const int n = std::min(kTokBlock, cnt - t0);
                const float* const* hs = hptr_[node].data() + off + t0;
                const uint16_t* hb = rows_ ? hsb_[node].data() + int64_t(off + t0) * In : nullptr;
                if (cfg_.int4) {
                    int4_call(mat2(W, e), h0, h1, off + t0, n, hqptr_[node].data(), hptr_[node].data(), hb, In, tmp,
                              kRowsB, gtid);
                } else {
                    kt_->bf16_rows(bmat2(W, e), h0, h1, hs, n, tmp, kRowsB, hb, In);
                    trace_[gtid].paths |= 1u << int(KernelPath::Bf16);
                }
                const float* b2 = W.b2.as<float>() ? W.b2.as<float>() + int64_t(e) * H + h0 : nullptr;
                for (int t = 0; t < n; ++t) {
                    const int s = off + t0 + t;
                    const float w = slot_w_[s];
                    float* yy = y + int64_t(slot_tok_[s]) * H + h0;
                    const float* src = tmp + t * kRowsB;
                    if (b2)
                        for (int r = 0; r < nr; ++r) yy[r] += w * (src[r] + b2[r]);
                    else
                        for (int r = 0; r < nr; ++r) yy[r] += w * src[r];
                }
            }
        }
    }
    return did;
}

void Engine::forward_job(void* ctx, int node, int, int gtid) {
    Engine* self = static_cast<Engine*>(ctx);
    int64_t* tr = self->trace_[gtid].t;
    tr[0] = now_ns();
    self->trace_[gtid].paths = 0;
    ThreadPool& pool = *self->pool_;
    const ForwardArgs& a = self->cur_;
    const int64_t T = a.tokens, H = self->cfg_.hidden;
    const bool in_bf16 = a.hidden_dtype == Dtype::BF16, wb = self->rows_, q8 = self->q8_, q8s = self->q8_slots_;
    const int64_t spin = pool.spin_ns();
    if (self->items_0_) {  // phase 0: fp32 rows and/or int8 records per token; bf16 rows, int8 records per slot
        const int64_t tok = (in_bf16 || (q8 && !q8s)) ? T : 0, xr = q8_row_bytes(H);
        uint32_t did = 0;
        for (int64_t it; (it = self->cur_0_.v.fetch_add(1, std::memory_order_relaxed)) < self->items_0_; ++did) {
            if (it < tok) {
                if (in_bf16) {
                    const uint16_t* src = static_cast<const uint16_t*>(a.hidden) + it * H;
                    float* dst = self->xbuf_.data() + it * H;
                    for (int64_t c = 0; c < H; ++c) dst[c] = bf16_to_float(src[c]);
                }
                if (q8 && !q8s) self->kt_->quantize_q8(self->x_ + it * H, H, 0, H / kInt4Block, self->xq_.data() + it * xr);
                continue;
            }
            const int64_t s = it - tok, t = self->slot_tok_[s];
            if (wb) {
                uint16_t* dst = self->xsb_.data() + s * H;
                if (in_bf16) std::memcpy(dst, static_cast<const uint16_t*>(a.hidden) + t * H, H * 2);
                else
                    for (int64_t c = 0; c < H; ++c) dst[c] = float_to_bf16(static_cast<const float*>(a.hidden)[t * H + c]);
            }
            if (q8s) {  // from the input itself: xbuf_'s row may be another thread's item of this phase
                const float* x = static_cast<const float*>(a.hidden) + t * H;
                if (in_bf16) {
                    float* row = self->xrow_[gtid].data();
                    for (int64_t c = 0; c < H; ++c) row[c] = bf16_to_float(static_cast<const uint16_t*>(a.hidden)[t * H + c]);
                    x = row;
                }
                self->kt_->quantize_q8(x, H, 0, H / kInt4Block, self->xq_.data() + s * xr);
            }
        }
        self->prog_0_.add(did, self->items_0_);
        self->prog_0_.wait(self->items_0_, spin);
    }
    tr[1] = now_ns();
    self->prog_a_[node].add(self->phase_a(node, gtid), self->items_a_);
    tr[2] = now_ns();
    self->prog_a_[node].wait(self->items_a_, spin);
    tr[3] = now_ns();
    self->prog_b_[node].add(self->phase_b(node, gtid), self->items_b_);
    tr[4] = now_ns();
    const int nn = pool.num_nodes();
    for (int n = 0; n < nn; ++n) self->prog_b_[n].wait(self->items_b_, spin);
    tr[5] = now_ns();
    const int cb = static_cast<int>((H + kColsC - 1) / kColsC);
    uint32_t did = 0;
    for (int64_t it; (it = self->cur_c_.v.fetch_add(1, std::memory_order_relaxed)) < self->items_c_; ++did) {
        const int64_t t = it / cb, c0 = (it % cb) * kColsC, c1 = std::min<int64_t>(H, c0 + kColsC);
        for (int64_t c = c0; c < c1; ++c) {
            float s = 0.f;
            for (int n = 0; n < nn; ++n) s += self->ybuf_[n][t * H + c];
            if (a.hidden_dtype == Dtype::BF16) static_cast<uint16_t*>(a.out)[t * H + c] = float_to_bf16(s);
            else static_cast<float*>(a.out)[t * H + c] = s;
        }
    }
    tr[6] = now_ns();
    if (self->prog_c_.add(did, self->items_c_)) pool.job_done();  // out is complete: the caller may go on
}

std::vector<int64_t> Engine::last_trace() {
    std::lock_guard<std::mutex> g(api_mu_);
    pool_->quiesce();
    std::vector<int64_t> out;
    if (!traced_) return out;
    const int64_t t0 = pool_->launched_at();
    for (const TraceRow& r : trace_)
        for (int i = 0; i < kTracePoints; ++i) out.push_back(r.t[i] - t0);
    out.push_back(t0 - submit_ns_);
    return out;
}

uint32_t Engine::last_paths() {
    std::lock_guard<std::mutex> g(api_mu_);
    pool_->quiesce();
    uint32_t p = 0;
    for (const TraceRow& r : trace_) p |= r.paths;
    return p;
}

// ---- read bandwidth -----------------------------------------------------------------------------------------------

void Engine::read_job(void* ctx, int node, int tid, int) {
    Engine* self = static_cast<Engine*>(ctx);
    const Buf& b = self->bw_bufs_[node];
    const int nt = self->pool_->node_threads(node);
    const size_t words = b.bytes / 8, per = (words + nt - 1) / nt;
    const size_t w0 = std::min(words, per * tid), w1 = std::min(words, w0 + per);
    uint64_t* p = b.as<uint64_t>();
    if (self->bw_touch_) {
        for (size_t i = w0; i < w1; ++i) p[i] = 0;
        return;
    }
    const float s = self->kt_->stream_sum(reinterpret_cast<const float*>(p + w0), 2 * (w1 - w0));
    uint32_t bits;
    std::memcpy(&bits, &s, sizeof bits);
    self->bw_sink_.fetch_xor(bits, std::memory_order_relaxed);
}

double Engine::read_bandwidth(size_t bytes_per_node, int reps) {
    std::lock_guard<std::mutex> g(api_mu_);
    pool_->quiesce();
    bw_bufs_.clear();
    for (size_t n = 0; n < cfg_.nodes.size(); ++n) bw_bufs_.emplace_back(bytes_per_node);
    bw_touch_ = true;
    pool_->launch(&Engine::read_job, this);
    pool_->wait();
    bw_touch_ = false;
    double best = 0;
    for (int r = 0; r < std::max(reps, 1); ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        pool_->launch(&Engine::read_job, this);
        pool_->wait();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, bytes_per_node * cfg_.nodes.size() / s / 1e9);
    }
    bw_bufs_.clear();
    return best;
}

// ---- host-callback face -------------------------------------------------------------------------------------------

void Engine::callback_submit(void* engine) {
    Engine* self = static_cast<Engine*>(engine);
    std::lock_guard<std::mutex> g(self->api_mu_);
    std::string err = self->submit_locked(self->armed_);
    if (!err.empty()) self->error_ = std::move(err);
}

void Engine::callback_wait(void* engine) { static_cast<Engine*>(engine)->wait(); }

std::string Engine::take_error() {
    std::lock_guard<std::mutex> g(api_mu_);
    std::string e;
    e.swap(error_);
    return e;
}

}  // namespace lvllm
