// Host-callback driver of the engine (hostfn.h): one argument set per graph host node, core C++ calls only.
#include "hostfn.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "engine.h"

struct lvllm_hostcall {
    lvllm::Engine* engine = nullptr;
    lvllm::ForwardArgs args;
    std::string error;
    int64_t t_enter = 0, t_done = 0, runs = 0;
};

using lvllm::now_ns;

namespace {

// A failed forward inside a replayed graph has no caller to raise to: say so on stderr and make the output NaN, so
// the failure shows in the logits instead of as stale numbers (HostCall.check() still raises where a caller syncs).
void report_failure(lvllm_hostcall* c) {
    std::fprintf(stderr, "lvllm: engine forward in a CUDA host callback failed (layer %d): %s; its output is NaN\n",
                 c->args.layer, c->error.c_str());
    const int64_t n = c->args.tokens * c->engine->config().hidden;
    if (c->args.hidden_dtype == lvllm::Dtype::BF16)
        for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(c->args.out)[i] = 0x7FC0;
    else
        for (int64_t i = 0; i < n; ++i) static_cast<float*>(c->args.out)[i] = NAN;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) lvllm_hostcall* lvllm_hostcall_create(
    void* engine, int layer, const void* hidden, int hidden_dtype, const void* topk_ids, int ids_dtype,
    const float* topk_weights, void* out, int64_t tokens, int64_t k) {
    auto* c = new (std::nothrow) lvllm_hostcall;
    if (!c) return nullptr;
    c->engine = static_cast<lvllm::Engine*>(engine);
    c->args.layer = layer;
    c->args.hidden = hidden;
    c->args.hidden_dtype = static_cast<lvllm::Dtype>(hidden_dtype);
    c->args.topk_ids = topk_ids;
    c->args.ids_dtype = static_cast<lvllm::Dtype>(ids_dtype);
    c->args.topk_weights = topk_weights;
    c->args.out = out;
    c->args.tokens = tokens;
    c->args.k = k;
    return c;
}

__attribute__((visibility("default"))) void lvllm_hostcall_destroy(lvllm_hostcall* call) { delete call; }

__attribute__((visibility("default"))) void lvllm_hostcall_run(void* p) {
    auto* c = static_cast<lvllm_hostcall*>(p);
    c->t_enter = now_ns();
    try {
        std::string err = c->engine->submit(c->args);
        if (err.empty())
            c->engine->wait();
        else
            c->error = std::move(err);
    } catch (const std::exception& e) {  // nothing may unwind into the CUDA driver's thread
        c->error = e.what();
    } catch (...) {
        c->error = "unknown C++ exception in the engine";
    }
    if (!c->error.empty()) report_failure(c);
    c->t_done = now_ns();
    ++c->runs;
}

__attribute__((visibility("default"))) const char* lvllm_hostcall_error(lvllm_hostcall* call) {
    thread_local std::string last;
    last.swap(call->error);
    call->error.clear();
    return last.c_str();
}

__attribute__((visibility("default"))) void lvllm_hostcall_times(const lvllm_hostcall* call, int64_t* times,
                                                                 int64_t* runs) {
    times[0] = call->t_enter;
    times[1] = call->t_done;
    *runs = call->runs;
}
}
