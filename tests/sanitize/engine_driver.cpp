// Drives the engine core (no Python) through random forwards, every activation and format, several node layouts,
// -1 ids, bf16 and fp32 I/O, the host-callback path and refused inputs; built with -fsanitize=address,undefined by
// tests/test_engine_sanitize.py. Compares the best kernel table against the portable reference one.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

using namespace lvllm;

static int failures = 0;
#define EXPECT(cond, ...)                          \
    do {                                           \
        if (!(cond)) {                             \
            std::fprintf(stderr, "FAIL: " __VA_ARGS__); \
            std::fprintf(stderr, "\n");            \
            ++failures;                            \
        }                                          \
    } while (0)

struct Layer {
    std::vector<int32_t> p13, p2;
    std::vector<uint16_t> s13, s2, w13, w2, b2;
    std::vector<float> b13;
};

static Layer make_layer(std::mt19937& rng, bool int4, int E, int R, int H, int In, int g) {
    Layer l;
    std::uniform_int_distribution<int32_t> bits(INT32_MIN, INT32_MAX);
    std::normal_distribution<float> nd(0.f, 1.f);
    if (int4) {
        l.p13.resize(size_t(E) * R * H / 8);
        l.p2.resize(size_t(E) * H * In / 8);
        for (auto& v : l.p13) v = bits(rng);
        for (auto& v : l.p2) v = bits(rng);
        l.s13.assign(size_t(E) * R * H / g, float_to_bf16(0.2f / std::sqrt(float(H))));
        l.s2.assign(size_t(E) * H * In / g, float_to_bf16(0.2f / std::sqrt(float(In))));
    } else {
        l.w13.resize(size_t(E) * R * H);
        l.w2.resize(size_t(E) * H * In);
        for (auto& v : l.w13) v = float_to_bf16(nd(rng) / std::sqrt(float(H)));
        for (auto& v : l.w2) v = float_to_bf16(nd(rng) / std::sqrt(float(In)));
    }
    l.b13.resize(size_t(E) * R);  // expert biases: f32 w13.bias, bf16 w2.bias (node 0 only, see shard())
    l.b2.resize(size_t(E) * H);
    for (auto& v : l.b13) v = 0.3f * nd(rng);
    for (auto& v : l.b2) v = float_to_bf16(0.3f * nd(rng));
    return l;
}

static ShardIn shard(const Layer& l, bool node0) {
    ShardIn s;
    s.w13_packed = l.p13.data();
    s.w13_scale = l.s13.data();
    s.w2_packed = l.p2.data();
    s.w2_scale = l.s2.data();
    s.w13 = l.w13.data();
    s.w2 = l.w2.data();
    s.w13_bias = l.b13.data();
    s.w13_bias_dtype = Dtype::F32;
    if (node0) {
        s.w2_bias = l.b2.data();
        s.w2_bias_dtype = Dtype::BF16;
    }
    return s;
}

static void run_case(std::mt19937& rng, bool int4, Act act, int H, int In, int E, int k, std::vector<std::vector<int>> nodes,
                     const std::string& best) {
    const bool gated = act != Act::Relu2;
    const int R = gated ? 2 * In : In, g = 32, T_max = 70;
    std::vector<Layer> layers;
    std::vector<ShardIn> shards;
    for (size_t n = 0; n < nodes.size(); ++n) layers.push_back(make_layer(rng, int4, E, R, H, In, g));
    for (auto& l : layers) shards.push_back(shard(l, shards.empty()));
    EngineConfig c;
    c.hidden = H; c.intermediate = In; c.experts = E; c.act = act; c.gated = gated; c.int4 = int4; c.group = g;
    c.nodes = nodes; c.max_tokens = T_max;
    // INT4 on amx: also its SIMD base table, which rounds activations to int8 the same way (AMX-INT8 tiles vs GEMM).
    const auto isas = Engine::available_isas();
    const std::string base = std::find(isas.begin(), isas.end(), "avx512") != isas.end() ? "avx512" : "avx2";
    std::vector<std::string> tables = {"ref", best};
    if (int4 && best == "amx") tables.push_back(base);
    std::vector<Engine*> engines;
    for (const std::string& isa : tables) {
        c.isa = isa;
        engines.push_back(new Engine(c));
        engines.back()->load_layer(0, shards);
    }
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> ud(0.f, 1.f);
    for (int T : {1, 3, 70}) {
        std::vector<float> x(size_t(T) * H), w(size_t(T) * k);
        std::vector<int64_t> ids(size_t(T) * k);
        for (auto& v : x) v = nd(rng);
        for (auto& v : w) v = ud(rng);
        for (auto& v : ids) v = ud(rng) < 0.2f ? -1 : int64_t(rng() % E);
        std::vector<uint16_t> xb(x.size());
        for (size_t i = 0; i < x.size(); ++i) xb[i] = float_to_bf16(x[i]);
        std::vector<std::vector<float>> outs;
        for (Engine* e : engines) {
            for (bool bf16 : {false, true}) {
                std::vector<float> out(x.size(), NAN);
                std::vector<uint16_t> outb(x.size(), 0x7fc0);
                ForwardArgs a;
                a.hidden = bf16 ? static_cast<const void*>(xb.data()) : x.data();
                a.hidden_dtype = bf16 ? Dtype::BF16 : Dtype::F32;
                a.topk_ids = ids.data();
                a.ids_dtype = Dtype::I64;
                a.topk_weights = w.data();
                a.out = bf16 ? static_cast<void*>(outb.data()) : out.data();
                a.tokens = T;
                a.k = k;
                if (bf16) {  // the host-callback path
                    e->arm(a);
                    Engine::callback_submit(e);
                    Engine::callback_wait(e);
                    EXPECT(e->take_error().empty(), "callback path reported an error");
                    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(outb[i]);
                } else {
                    EXPECT(e->submit(a).empty(), "submit refused a valid forward");
                    e->wait();
                }
                outs.push_back(out);
            }
        }
        // outs: ref f32, ref bf16, best f32, best bf16 (, base f32, base bf16)
        double num = 0, den = 0, numb = 0;
        for (size_t i = 0; i < x.size(); ++i) {
            EXPECT(!std::isnan(outs[2][i]) && !std::isnan(outs[3][i]), "NaN left in output at %zu", i);
            num += (outs[2][i] - outs[0][i]) * (outs[2][i] - outs[0][i]);
            numb += (outs[3][i] - outs[0][i]) * (outs[3][i] - outs[0][i]);
            den += outs[0][i] * outs[0][i];
        }
        // AMX multiplies bf16 activations (rounding ~2^-9 relative); INT4 tables with int8 activations round them per
        // 32-column block (~1.5e-2 relative, see tests/test_engine.py INT8_ACT_TOL); the rest is fp32 throughout.
        const bool int8_act = int4 && engines[1]->int8_activations();
        const double tol = int8_act ? 3e-2 : best == "amx" ? 1e-2 : 1e-4;
        EXPECT(std::sqrt(num / (den + 1e-30)) < tol, "%s vs ref rel err %g (T=%d)", best.c_str(), std::sqrt(num / den), T);
        EXPECT(std::sqrt(numb / (den + 1e-30)) < std::max(tol, 1e-2), "bf16 I/O rel err %g (T=%d)", std::sqrt(numb / den), T);
        if (outs.size() == 6) {  // same int8 arithmetic, other summation order: fp32 rounding apart
            double d = 0;
            for (size_t i = 0; i < x.size(); ++i) d += (outs[2][i] - outs[4][i]) * (outs[2][i] - outs[4][i]);
            EXPECT(std::sqrt(d / (den + 1e-30)) < 1e-5, "amx vs %s (int8 both) rel diff %g (T=%d)", base.c_str(),
                   std::sqrt(d / den), T);
        }
    }
    // Refused inputs: an error string, nothing launched, the engine still usable.
    Engine& e = *engines[1];
    std::vector<float> x(size_t(2) * H, 1.f), out(x.size()), w(2 * k, 1.f);
    std::vector<int32_t> ids(2 * k, 0);
    ForwardArgs a;
    a.hidden = x.data(); a.topk_ids = ids.data(); a.topk_weights = w.data(); a.out = out.data(); a.tokens = 2; a.k = k;
    ids[1] = E;
    EXPECT(e.submit(a).find("outside") != std::string::npos, "out-of-range id accepted");
    ids[1] = -5;
    EXPECT(e.submit(a).find("outside") != std::string::npos, "id -5 accepted");
    ids[1] = 0;
    a.tokens = T_max + 1;
    EXPECT(e.submit(a).find("max_tokens") != std::string::npos, "T over max_tokens accepted");
    a.tokens = 2;
    a.layer = 5;
    EXPECT(e.submit(a).find("not loaded") != std::string::npos, "unloaded layer accepted");
    a.layer = 0;
    a.out = nullptr;
    EXPECT(e.submit(a).find("null") != std::string::npos, "null out accepted");
    a.out = out.data();
    EXPECT(e.submit(a).empty(), "valid forward refused after refusals");
    e.wait();
    for (Engine* p : engines) delete p;
}

int main() {
    std::mt19937 rng(1234);
    for (const std::string& best : Engine::available_isas()) {
        if (best == "ref") continue;
        std::printf("kernel table under test: %s\n", best.c_str());
        run_case(rng, true, Act::SiluGlu, 96, 64, 6, 2, {{0}}, best);
        run_case(rng, true, Act::Relu2, 64, 96, 5, 3, {{0, 1}, {1}}, best);
        run_case(rng, true, Act::GptossGlu, 160, 32, 4, 1, {{0}, {1}, {0}}, best);
        run_case(rng, false, Act::GeluTanhGlu, 128, 64, 7, 4, {{0, 1}}, best);
        run_case(rng, false, Act::SiluGlu, 64, 32, 3, 2, {{1}, {0}}, best);
        run_case(rng, false, Act::Relu2, 96, 64, 5, 2, {{0}, {1}}, best);
    }
    EngineConfig bad;
    bad.hidden = 64; bad.intermediate = 48; bad.experts = 2; bad.int4 = true; bad.group = 32; bad.nodes = {{0}};
    bad.max_tokens = 4;
    bool threw = false;
    try {
        Engine e(bad);
    } catch (const std::invalid_argument&) {
        threw = true;
    }
    EXPECT(threw, "intermediate 48 not a multiple of 32 was accepted");
    EngineConfig bw = bad;
    bw.intermediate = 64;
    bw.nodes = {{0}, {1}};
    Engine probe(bw);
    EXPECT(probe.read_bandwidth(1 << 20, 1) > 0, "read_bandwidth returned nothing");
    std::mt19937 rng2(7);
    const Layer l0 = make_layer(rng2, true, 2, 128, 64, 64, 32), l1 = make_layer(rng2, true, 2, 128, 64, 64, 32);
    threw = false;
    try {
        probe.load_layer(0, {shard(l0, true), shard(l1, true)});  // w2.bias in node 1's shard too
    } catch (const std::invalid_argument& e) {
        threw = std::string(e.what()).find("node 0's shard only") != std::string::npos;
    }
    EXPECT(threw, "w2.bias outside node 0's shard was accepted");
    if (failures) {
        std::printf("%d failures\n", failures);
        return 1;
    }
    std::printf("OK\n");
    return 0;
}
