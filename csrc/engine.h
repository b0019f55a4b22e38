// The engine core: plain C++ over pointers and shapes, no Python, no torch. bindings.cpp checks arrays and calls it.
//
// One MoE layer's forward, per node n (its intermediate slice In of every expert):
//   phase 0  hidden bf16 -> fp32 X [T, H], and/or int8 X      (all threads; int8: INT4 tables, kernels.h Q8 records)
//   phase A  for each routed expert e, rows chunk of In:      h[slot, i] = act(W13_gate[e] x + b_g, W13_up[e] x + b_u)
//   phase B  for each chunk of H output rows, every expert:   Y_n[t, r] += w_tj * (W2[e] h[slot] + b2[e])[r]
//            (biases optional; b2 only in node 0's shard so the node sum adds it once)
//   phase C  out[t] = sum_n Y_n[t]                            (all threads; the one cross-node reduction)
// Slots are the (token, k) pairs with expert id != -1, grouped by expert so one pass over a weight chunk serves every
// token routed to that expert (decode: weights stream once; prefill: each chunk is reused across the group).
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace lvllm {

enum class Dtype : int { F32 = 0, BF16 = 1, I32 = 2, I64 = 3 };

struct EngineConfig {
    int64_t hidden = 0;        // H
    int64_t intermediate = 0;  // In: this engine's per-node slice of the expert intermediate size
    int experts = 0;           // E
    Act act = Act::SiluGlu;
    bool gated = true;
    bool int4 = true;
    int group = 0;                         // INT4 group size (32, 64, 128); unused for BF16
    std::vector<std::vector<int>> nodes;   // cpu ids per node, one thread each
    int max_tokens = 0;
    std::string isa;                       // "" = best available; else a name from available_isas()
    bool int8_activations = true;          // INT4: let the table quantize activations to int8 (kernels.h)
    int spin_us = 50;                      // idle workers spin this long before sleeping (thread_pool.h)
};

// One node's slice of one layer as the store holds it (see DESIGN.md); pointers stay owned by the caller.
struct ShardIn {
    const int32_t* w13_packed = nullptr;  // [E, R13, H/8]   R13 = 2 In gated, else In
    const uint16_t* w13_scale = nullptr;  // [E, R13, H/g]   bf16 bits
    const int32_t* w2_packed = nullptr;   // [E, H, In/8]
    const uint16_t* w2_scale = nullptr;   // [E, H, In/g]
    const uint16_t* w13 = nullptr;        // BF16 format: [E, R13, H]
    const uint16_t* w2 = nullptr;         //              [E, H, In]
    // Optional expert biases (gpt-oss), either format; null = zero. w2_bias only in node 0's shard (added once).
    const void* w13_bias = nullptr;       // [E, R13] F32 or BF16, rows as w13
    Dtype w13_bias_dtype = Dtype::F32;
    const void* w2_bias = nullptr;        // [E, H]   F32 or BF16
    Dtype w2_bias_dtype = Dtype::F32;
};

struct ForwardArgs {
    int layer = 0;
    const void* hidden = nullptr;  // [T, H] F32 or BF16
    Dtype hidden_dtype = Dtype::F32;
    const void* topk_ids = nullptr;  // [T, k] I32 or I64, -1 = skip
    Dtype ids_dtype = Dtype::I32;
    const float* topk_weights = nullptr;  // [T, k]
    void* out = nullptr;                  // [T, H], dtype = hidden_dtype
    int64_t tokens = 0;
    int64_t k = 0;
};

class Engine {
public:
    explicit Engine(const EngineConfig& cfg);  // throws std::invalid_argument with the reason
    ~Engine();

    const EngineConfig& config() const { return cfg_; }
    const char* isa() const { return kt_->name; }
    // Why the engine runs slower kernels than this CPU has ("" when it does not): for the caller's log, once.
    const std::string& kernel_note() const { return note_; }
    int rows13() const { return cfg_.gated ? 2 * static_cast<int>(cfg_.intermediate) : static_cast<int>(cfg_.intermediate); }
    int pin_failures() const { return pool_->pin_failures(); }
    // INT4 calls of up to this many tokens per expert multiply int8 activations (0: none do; kernels.h).
    int int8_activations_max_tokens() const {
        return cfg_.int4 && cfg_.int8_activations && kt_->int4_q8_rows ? kt_->int4_q8_max_tokens : 0;
    }
    bool int8_activations() const { return int8_activations_max_tokens() > 0; }

    // Copies (BF16) or repacks (INT4) every node's shard into memory first touched by that node's threads.
    void load_layer(int layer, const std::vector<ShardIn>& shards);
    bool has_layer(int layer) const { return layers_.count(layer) != 0; }

    // Validates, routes and launches; returns at once. Returns "" or the error (nothing launched then).
    std::string submit(const ForwardArgs& a);
    // Waits for any forward in flight, runs this one, waits for it: safe from several host threads at once.
    std::string forward(const ForwardArgs& a);
    void wait() {
        std::lock_guard<std::mutex> g(api_mu_);
        pool_->wait();
    }
    bool busy() const { return pool_->busy(); }

    // For a CUDA host callback (no Python, no exceptions): arm() stores the arguments, callback_submit(engine)
    // submits them, callback_wait(engine) waits; the last error, if any, is kept for last_error().
    void arm(const ForwardArgs& a) {
        std::lock_guard<std::mutex> g(api_mu_);
        armed_ = a;
    }
    static void callback_submit(void* engine);
    static void callback_wait(void* engine);
    std::string take_error();

    static std::vector<std::string> available_isas();

    // Timeline of the last forward, ns after its launch: per thread, when it started, then when it finished phase 0,
    // its phase A items, waiting for its node's phase A, its phase B items, waiting for every node's phase B, and
    // phase C (a late thread's points come after the others' work: it found none left); then the routing time before
    // the launch. Empty before the first forward.
    static constexpr int kTracePoints = 7;
    std::vector<int64_t> last_trace();
    // KernelPath bits of the kernels the last forward called (0 before the first).
    uint32_t last_paths();

    // Read bandwidth (GB/s) of this engine's own pinned threads over node-local buffers of `bytes_per_node`
    // (first touched by each node's threads), best of `reps` passes: the roofline the forward is measured against.
    double read_bandwidth(size_t bytes_per_node, int reps);

private:
    struct Buf {
        void* p = nullptr;
        size_t bytes = 0;
        Buf() = default;
        explicit Buf(size_t n);
        Buf(Buf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; o.bytes = 0; }
        Buf& operator=(Buf&& o) noexcept;
        ~Buf();
        template <class T> T* as() const { return static_cast<T*>(p); }
    };
    struct NodeWeights {
        Buf w13q, w13s, w2q, w2s;  // INT4 kernel layout / fp32 scales
        Buf w13, w2;               // BF16
        Buf b13, b2;               // fp32 biases [E, R13] / [E, H]; empty (p null) = none
    };
    struct Layer { std::vector<NodeWeights> nodes; };
    struct alignas(64) Cursor { std::atomic<int> v{0}; };

    static void load_job(void* ctx, int node, int tid, int gtid);
    static void read_job(void* ctx, int node, int tid, int gtid);
    static void forward_job(void* ctx, int node, int tid, int gtid);
    void repack_expert(const ShardIn& in, NodeWeights& w, int e) const;
    std::string submit_locked(const ForwardArgs& a);
    int phase_a(int node, int gtid);  // returns the items this thread did
    int phase_b(int node, int gtid);
    template <class T> static void grow(std::vector<T>& v, size_t n) { if (v.size() < n) v.resize(n); }
    // INT4 kernel calls of n tokens take the int8-activation kernel in this forward (see KernelTable::int4_q8_rows).
    bool q8_call(int n) const { return q8_ && n <= kt_->int4_q8_max_tokens; }
    // One INT4 kernel call of n tokens: int8 GEMM, int8 GEMV or fp32 activations, as the table and the call allow.
    void int4_call(const Int4Mat& m, int r0, int r1, int s0, int n, const int8_t* const* xq, const float* const* x,
                   const uint16_t* xb, int64_t ldxb, float* y, int ldy, int gtid);
    Int4Mat mat13(const NodeWeights& w, int e) const;
    Int4Mat mat2(const NodeWeights& w, int e) const;
    Bf16Mat bmat13(const NodeWeights& w, int e) const;
    Bf16Mat bmat2(const NodeWeights& w, int e) const;

    EngineConfig cfg_;
    const KernelTable* kt_;
    std::string note_;
    std::mutex api_mu_;  // submit/wait/load_layer/read_bandwidth from several host threads take turns
    std::unique_ptr<ThreadPool> pool_;
    std::map<int, Layer> layers_;

    // Load job state.
    const std::vector<ShardIn>* load_in_ = nullptr;
    Layer* load_out_ = nullptr;

    // Forward state, valid between submit() and the end of the job.
    ForwardArgs cur_;
    const Layer* cur_layer_ = nullptr;
    const float* x_ = nullptr;              // [T, H] fp32 (the input itself or xbuf_)
    std::vector<float> xbuf_;
    std::vector<int> active_, offset_, count_;  // per active expert
    std::vector<int> slot_tok_;
    std::vector<float> slot_w_;
    std::vector<const float*> xptr_;             // [S] rows of X per slot
    std::vector<std::vector<const float*>> hptr_;  // per node [S] rows of h per slot
    std::vector<std::vector<float>> hbuf_;       // per node [S, In]
    bool rows_ = false;                          // this forward prepares bf16 rows (see KernelTable::wants_bf16_rows)
    std::vector<uint16_t> xsb_;                  // [S + 16, H] bf16 rows of X in slot order
    std::vector<std::vector<uint16_t>> hsb_;     // per node [S + 16, In] bf16 copy of h
    bool q8_ = false;                            // this forward quantizes activations to int8 (INT4 tables with q8)
    bool q8_slots_ = false;                      // ... into one record per slot (KernelTable::q8_slot_records)
    std::vector<int8_t> xq_;                     // [T] or [S] Q8 records of X (kernels.h), q8_row_bytes(H) apart
    std::vector<std::vector<float>> xrow_;       // per thread [H]: a bf16 input row as fp32 (q8_slots_)
    std::vector<const int8_t*> xqptr_;           // [S] record of each slot's token
    std::vector<std::vector<int8_t>> hq_;        // per node [S] Q8 records of h, q8_row_bytes(In) apart
    std::vector<std::vector<const int8_t*>> hqptr_;
    std::vector<std::vector<float>> ybuf_;       // per node [T, H]
    std::vector<std::vector<float>> scratch_;    // per thread
    std::vector<Cursor> cur_a_, cur_b_;
    Cursor cur_0_, cur_c_;
    // Each phase ends when its items are done (thread_pool.h Progress), not when every thread has arrived: a late
    // worker finds its share taken by the others; phase A and B per node, 0 and C over all; C's end is the job's.
    uint32_t items_0_ = 0, items_a_ = 0, items_b_ = 0, items_c_ = 0;
    std::vector<Progress> prog_a_, prog_b_;
    Progress prog_0_, prog_c_;
    std::vector<int> eslot_;  // routing scratch
    struct alignas(64) TraceRow {
        int64_t t[kTracePoints] = {};
        uint32_t paths = 0;  // KernelPath bits this thread called
    };
    std::vector<TraceRow> trace_;  // per thread, now_ns() at each point of the last forward
    int64_t submit_ns_ = 0;
    bool traced_ = false;

    std::vector<Buf> bw_bufs_;  // read_bandwidth() buffers, one per node, alive during its jobs
    bool bw_touch_ = false;
    std::atomic<uint64_t> bw_sink_{0};

    ForwardArgs armed_;
    std::string error_;
};

}  // namespace lvllm
