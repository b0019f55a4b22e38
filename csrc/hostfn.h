// C entry points for CUDA host callbacks (cudaLaunchHostFunc / graph host nodes) that run one engine forward.
//
// engine.h's arm()/callback_submit() keep ONE armed argument set per Engine, so a graph with several MoE layers (or
// several batch sizes) cannot use them: each host node needs its own arguments. A HostCall is that argument set,
// created once per (layer, batch size) outside capture over caller-owned pinned buffers; lvllm_hostcall_run is a
// cudaHostFn_t: it submits and waits on the engine's C++ core with no CUDA calls, no Python and no GIL, and keeps
// the error and the host-clock times of its last run for the caller to read after the stream synchronizes.
#pragma once
#include <cstdint>

extern "C" {

typedef struct lvllm_hostcall lvllm_hostcall;

// engine: the lvllm::Engine* from _cpu.Engine.callback_pointers()[2]. dtype codes as lvllm::Dtype
// (0 f32, 1 bf16, 2 i32, 3 i64). Buffers: hidden [tokens, H], topk_ids/topk_weights [tokens, k], out [tokens, H]
// (hidden's dtype); they must outlive the HostCall. Returns nullptr only when out of memory.
lvllm_hostcall* lvllm_hostcall_create(void* engine, int layer, const void* hidden, int hidden_dtype,
                                      const void* topk_ids, int ids_dtype, const float* topk_weights, void* out,
                                      int64_t tokens, int64_t k);
void lvllm_hostcall_destroy(lvllm_hostcall* call);

// cudaHostFn_t: engine.submit(args) then engine.wait(); never throws.
void lvllm_hostcall_run(void* call);

// The last run's error ("" when none; cleared by this read) and its monotonic-clock times in ns:
// times[0] = callback entered, times[1] = engine done; runs = how many times the callback ran.
const char* lvllm_hostcall_error(lvllm_hostcall* call);
void lvllm_hostcall_times(const lvllm_hostcall* call, int64_t* times, int64_t* runs);
}
