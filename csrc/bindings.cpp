// Python binding `lvllm_runtime._cpu`: declares arrays (DLPack: torch and numpy, no libtorch link), checks dtype,
// shape, device and contiguity, releases the GIL and calls the core (engine.h). Every bad input is a ValueError or
// TypeError with the fix, never a crash.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "engine.h"

namespace nb = nanobind;
using namespace lvllm;

namespace {

using InArr = nb::ndarray<nb::ro>;
using OutArr = nb::ndarray<>;

[[noreturn]] void fail(const std::string& m) { throw nb::value_error(m.c_str()); }

std::string shape_str(const std::vector<int64_t>& s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

template <class A>
std::vector<int64_t> shape_of(const A& a) {
    std::vector<int64_t> s(a.ndim());
    for (size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<int64_t>(a.shape(i));
    return s;
}

template <class A>
Dtype dtype_of(const A& a, const char* name) {
    const nb::dlpack::dtype d = a.dtype();
    if (d.lanes == 1) {
        if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32) return Dtype::F32;
        if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return Dtype::BF16;
        // numpy has no bfloat16: raw bf16 bits may come as uint16/int16.
        if ((d.code == uint8_t(nb::dlpack::dtype_code::UInt) || d.code == uint8_t(nb::dlpack::dtype_code::Int)) && d.bits == 16)
            return Dtype::BF16;
        if ((d.code == uint8_t(nb::dlpack::dtype_code::Int) || d.code == uint8_t(nb::dlpack::dtype_code::UInt)) && d.bits == 32)
            return Dtype::I32;
        if (d.code == uint8_t(nb::dlpack::dtype_code::Int) && d.bits == 64) return Dtype::I64;
    }
    fail(std::string(name) + ": unsupported dtype (code " + std::to_string(d.code) + ", " + std::to_string(d.bits) +
         " bits); use float32, bfloat16, int32 or int64 as documented");
}

const char* dtype_name(Dtype d) {
    switch (d) {
        case Dtype::F32: return "float32";
        case Dtype::BF16: return "bfloat16";
        case Dtype::I32: return "int32";
        default: return "int64";
    }
}

// Checks device, rank, shape (-1 = any), C-contiguity and dtype; returns the data pointer.
template <class A>
void* check(const A& a, const char* name, const std::vector<int64_t>& want, std::initializer_list<Dtype> dtypes, Dtype* got = nullptr) {
    if (a.device_type() != nb::device::cpu::value)
        fail(std::string(name) + " is not in CPU memory: move it to the CPU (tensor.cpu()) first");
    const auto s = shape_of(a);
    bool ok = s.size() == want.size();
    for (size_t i = 0; ok && i < s.size(); ++i) ok = want[i] < 0 || want[i] == s[i];
    if (!ok) {
        std::string w = "[";
        for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + (want[i] < 0 ? std::string("*") : std::to_string(want[i]));
        fail(std::string(name) + " has shape " + shape_str(s) + ", expected " + w + "]");
    }
    int64_t expect = 1;
    for (size_t i = s.size(); i-- > 0;) {
        if (s[i] != 1 && a.stride(i) != expect)
            fail(std::string(name) + " is not C-contiguous: pass tensor.contiguous() (numpy: np.ascontiguousarray)");
        expect *= s[i];
    }
    const Dtype d = dtype_of(a, name);
    bool dt_ok = false;
    std::string names;
    for (Dtype x : dtypes) {
        dt_ok |= x == d;
        names += (names.empty() ? "" : " or ") + std::string(dtype_name(x));
    }
    if (!dt_ok) fail(std::string(name) + " has dtype " + dtype_name(d) + ", expected " + names);
    if (got) *got = d;
    if (!a.data() && expect != 0) fail(std::string(name) + " has a null data pointer");
    return const_cast<void*>(static_cast<const void*>(a.data()));
}

Act parse_act(const std::string& s) {
    if (s == "silu_glu") return Act::SiluGlu;
    if (s == "relu2") return Act::Relu2;
    if (s == "gptoss_glu") return Act::GptossGlu;
    if (s == "gelu_tanh_glu") return Act::GeluTanhGlu;
    fail("activation '" + s + "' is unknown; use one of silu_glu, relu2, gptoss_glu, gelu_tanh_glu");
}

ShardIn parse_shard(const Engine& eng, const nb::dict& d, size_t node) {
    const auto& c = eng.config();
    const int64_t E = c.experts, H = c.hidden, In = c.intermediate, R = eng.rows13();
    const std::string where = "shard " + std::to_string(node) + " ";
    auto get = [&](const char* key) -> InArr {
        if (!d.contains(key)) fail(where + "is missing key '" + key + "' (store layout: see DESIGN.md)");
        try {
            return nb::cast<InArr>(d[key]);
        } catch (const nb::cast_error&) {
            fail(where + "key '" + key + "' is not an array (pass a torch tensor or numpy array)");
        }
    };
    ShardIn s;
    if (c.int4) {
        const int64_t g = c.group;
        InArr a = get("w13.packed"), b = get("w13.scale"), p = get("w2.packed"), q = get("w2.scale");
        s.w13_packed = static_cast<const int32_t*>(check(a, (where + "w13.packed").c_str(), {E, R, H / 8}, {Dtype::I32}));
        s.w13_scale = static_cast<const uint16_t*>(check(b, (where + "w13.scale").c_str(), {E, R, H / g}, {Dtype::BF16}));
        s.w2_packed = static_cast<const int32_t*>(check(p, (where + "w2.packed").c_str(), {E, H, In / 8}, {Dtype::I32}));
        s.w2_scale = static_cast<const uint16_t*>(check(q, (where + "w2.scale").c_str(), {E, H, In / g}, {Dtype::BF16}));
    } else {
        InArr a = get("w13"), b = get("w2");
        s.w13 = static_cast<const uint16_t*>(check(a, (where + "w13").c_str(), {E, R, H}, {Dtype::BF16}));
        s.w2 = static_cast<const uint16_t*>(check(b, (where + "w2").c_str(), {E, H, In}, {Dtype::BF16}));
    }
    if (d.contains("w13.bias"))
        s.w13_bias = check(get("w13.bias"), (where + "w13.bias").c_str(), {E, R}, {Dtype::F32, Dtype::BF16}, &s.w13_bias_dtype);
    if (d.contains("w2.bias") && node > 0)
        fail(where + "has w2.bias: it belongs in node 0's shard only (the sum over nodes adds it once); drop it here");
    if (d.contains("w2.bias"))
        s.w2_bias = check(get("w2.bias"), (where + "w2.bias").c_str(), {E, H}, {Dtype::F32, Dtype::BF16}, &s.w2_bias_dtype);
    // A key this engine does not know (a newer store, a typo) must not be ignored silently.
    const std::vector<std::string> known = c.int4 ? std::vector<std::string>{"w13.packed", "w13.scale", "w2.packed", "w2.scale"}
                                                  : std::vector<std::string>{"w13", "w2"};
    for (auto item : d) {
        const std::string key = nb::isinstance<nb::str>(item.first) ? nb::cast<std::string>(item.first) : std::string("?");
        if (key != "w13.bias" && key != "w2.bias" && std::find(known.begin(), known.end(), key) == known.end())
            fail(where + "has unknown key '" + key + "' for a " + (c.int4 ? "int4" : "bf16") +
                 " engine: expected w13/w2 keys of the store layout (DESIGN.md), optionally w13.bias and w2.bias");
    }
    return s;
}

ForwardArgs parse_forward(const Engine& eng, int layer, const InArr& hidden, const InArr& ids, const InArr& weights, OutArr& out) {
    const int64_t H = eng.config().hidden;
    ForwardArgs a;
    a.layer = layer;
    a.hidden = check(hidden, "hidden", {-1, H}, {Dtype::F32, Dtype::BF16}, &a.hidden_dtype);
    a.tokens = static_cast<int64_t>(hidden.shape(0));
    a.topk_ids = check(ids, "topk_ids", {a.tokens, -1}, {Dtype::I32, Dtype::I64}, &a.ids_dtype);
    a.k = static_cast<int64_t>(ids.shape(1));
    a.topk_weights = static_cast<const float*>(check(weights, "topk_weights", {a.tokens, a.k}, {Dtype::F32}));
    Dtype od;
    a.out = check(out, "out", {a.tokens, H}, {Dtype::F32, Dtype::BF16}, &od);
    if (od != a.hidden_dtype)
        fail(std::string("out has dtype ") + dtype_name(od) + " but hidden is " + dtype_name(a.hidden_dtype) + ": give out the hidden dtype");
    if (a.tokens > 0 && a.out == a.hidden) fail("out must not alias hidden: pass a separate output array");
    return a;
}

// Submits without the GIL (and waits when `block`); a refused submit becomes a ValueError.
void run(Engine& e, const ForwardArgs& a, bool block) {
    std::string err;
    {
        nb::gil_scoped_release nogil;
        err = block ? e.forward(a) : e.submit(a);
    }
    if (!err.empty()) fail(err);
}

}  // namespace

NB_MODULE(_cpu, m) {
    m.doc() = "lvllm CPU expert engine (C++): NUMA-split INT4/BF16 MoE layers; see lvllm_runtime/engine.py";
    m.def("available_isas", &Engine::available_isas, "Kernel tables this CPU and build can run, best first.");
    m.def("cpu_features", []() {
        const CpuFeatures& f = cpu_features();
        nb::dict d;
        d["avx2"] = f.avx2; d["fma"] = f.fma; d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl; d["avx512_bf16"] = f.avx512_bf16; d["avx512_vnni"] = f.avx512_vnni;
        d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16; d["amx_int8"] = f.amx_int8;
        return d;
    });

    nb::class_<Engine>(m, "Engine")
        .def("__init__",
             [](Engine* self, int64_t hidden, int64_t intermediate, int experts, const std::string& activation, bool gated,
                const std::string& weight_format, int group_size, std::vector<std::vector<int>> nodes, int max_tokens,
                const std::string& isa, bool int8_activations, int spin_us) {
                 EngineConfig c;
                 c.hidden = hidden;
                 c.intermediate = intermediate;
                 c.experts = experts;
                 c.act = parse_act(activation);
                 c.gated = gated;
                 if (weight_format != "int4" && weight_format != "bf16")
                     fail("weight_format '" + weight_format + "' is unknown; use int4 or bf16");
                 c.int4 = weight_format == "int4";
                 c.group = group_size;
                 c.nodes = std::move(nodes);
                 c.max_tokens = max_tokens;
                 c.isa = isa;
                 c.int8_activations = int8_activations;
                 c.spin_us = spin_us;
                 try {
                     new (self) Engine(c);
                 } catch (const std::invalid_argument& e) {
                     fail(e.what());
                 }
             },
             nb::arg("hidden_size"), nb::arg("intermediate_size"), nb::arg("num_experts"), nb::arg("activation"),
             nb::arg("gated"), nb::arg("weight_format"), nb::arg("group_size"), nb::arg("nodes"), nb::arg("max_tokens"),
             nb::arg("isa") = "", nb::arg("int8_activations") = true, nb::arg("spin_us") = 50)
        .def_ro_static("TRACE_POINTS", &Engine::kTracePoints)
        .def_prop_ro("isa", [](const Engine& e) { return std::string(e.isa()); })
        .def_prop_ro("pin_failures", &Engine::pin_failures)
        .def_prop_ro("int8_activations_max_tokens", &Engine::int8_activations_max_tokens)
        .def_prop_ro("kernel_note", [](const Engine& e) { return e.kernel_note(); })
        .def("has_layer", &Engine::has_layer)
        .def("last_paths",
             [](Engine& e) {
                 uint32_t p;
                 {
                     nb::gil_scoped_release nogil;
                     p = e.last_paths();
                 }
                 static const char* const names[kKernelPaths] = {"int4_fp32_act", "int4_q8_gemv", "int4_q8_gemm",
                                                                 "bf16", "int4_q8_tiles"};
                 std::vector<std::string> out;
                 for (int i = 0; i < kKernelPaths; ++i)
                     if (p & (1u << i)) out.emplace_back(names[i]);
                 return out;
             },
             "Names of the kernel paths the last forward called (KernelPath in kernels.h).")
        .def("last_trace",
             [](Engine& e) {
                 nb::gil_scoped_release nogil;
                 return e.last_trace();
             },
             "Timeline of the last forward (ns after launch): Engine.kTracePoints values per thread, then routing ns.")
        .def("read_bandwidth",
             [](Engine& e, size_t bytes_per_node, int reps) {
                 nb::gil_scoped_release nogil;
                 return e.read_bandwidth(bytes_per_node, reps);
             },
             nb::arg("bytes_per_node"), nb::arg("reps") = 3)
        .def("load_layer",
             [](Engine& e, int layer, nb::list shards) {
                 if (shards.size() != e.config().nodes.size())
                     fail("load_layer got " + std::to_string(shards.size()) + " shards for " +
                          std::to_string(e.config().nodes.size()) + " nodes: pass one dict per node, in node order");
                 std::vector<InArr> keep;  // holds the arrays while the GIL is released
                 std::vector<ShardIn> in;
                 for (size_t n = 0; n < shards.size(); ++n) {
                     if (!nb::isinstance<nb::dict>(shards[n])) fail("shard " + std::to_string(n) + " is not a dict");
                     nb::dict d = nb::cast<nb::dict>(shards[n]);
                     in.push_back(parse_shard(e, d, n));
                     for (auto item : d) keep.push_back(nb::cast<InArr>(item.second));
                 }
                 nb::gil_scoped_release nogil;
                 e.load_layer(layer, in);
             })
        .def("submit",
             [](Engine& e, int layer, InArr hidden, InArr ids, InArr weights, OutArr out) {
                 run(e, parse_forward(e, layer, hidden, ids, weights, out), false);
             },
             nb::arg("layer"), nb::arg("hidden"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"))
        .def("wait",
             [](Engine& e) {
                 {
                     nb::gil_scoped_release nogil;
                     e.wait();
                 }
                 const std::string err = e.take_error();
                 if (!err.empty()) fail(err);
             })
        .def("forward",
             [](Engine& e, int layer, InArr hidden, InArr ids, InArr weights, OutArr out) {
                 run(e, parse_forward(e, layer, hidden, ids, weights, out), true);
             },
             nb::arg("layer"), nb::arg("hidden"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"))
        .def("arm",
             [](Engine& e, int layer, InArr hidden, InArr ids, InArr weights, OutArr out) {
                 e.arm(parse_forward(e, layer, hidden, ids, weights, out));
             },
             nb::arg("layer"), nb::arg("hidden"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"),
             "Store arguments for callback_submit (the arrays must stay alive and in place until wait()).")
        .def("callback_pointers",
             [](Engine& e) {
                 return nb::make_tuple(reinterpret_cast<uintptr_t>(&Engine::callback_submit),
                                       reinterpret_cast<uintptr_t>(&Engine::callback_wait), reinterpret_cast<uintptr_t>(&e));
             },
             "(submit_fn, wait_fn, user_data): C functions void(void*) a CUDA host callback can call with user_data.");
}
