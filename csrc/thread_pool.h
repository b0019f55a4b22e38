// Worker threads of the engine: one sub-pool per (real or virtual) NUMA node, each thread pinned to one cpu of its
// node. Hand-off is spin (for a set time), then yield, then futex sleep, so a decode step finds its workers awake (a
// few microseconds) while idle or oversubscribed workers give the core back (spinning against the caller is what made
// peers slow down 7-30x when their threads equalled the cores). The spin time is the caller's choice: cores kept for
// the engine (a GPU host) can spin through the GPU's part of a layer; cores shared with vLLM-CPU's own threads cannot.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace lvllm {

int64_t now_ns();  // CLOCK_MONOTONIC

// Wait until `word` differs from `old`: spin for spin_ns, then sched_yield, then FUTEX_WAIT.
void wait_change(const std::atomic<uint32_t>& word, uint32_t old, std::atomic<int>& sleepers, int64_t spin_ns);
// Wake every thread sleeping in wait_change on `word` (cheap when nobody sleeps).
void wake_all(const std::atomic<uint32_t>& word, const std::atomic<int>& sleepers);

class Barrier {
public:
    explicit Barrier(int n = 1, int64_t spin_ns = 0) : n_(n), spin_ns_(spin_ns) {}
    void reset(int n, int64_t spin_ns) { n_ = n; spin_ns_ = spin_ns; }
    void arrive_and_wait();

private:
    alignas(64) std::atomic<uint32_t> count_{0};
    alignas(64) std::atomic<uint32_t> gen_{0};
    std::atomic<int> sleepers_{0};
    int n_;
    int64_t spin_ns_;
};

// Called on every worker: node index, thread index within the node, global thread index.
using JobFn = void (*)(void* ctx, int node, int tid, int gtid);

class ThreadPool {
public:
    // nodes[n] = the cpu ids node n's threads pin to (one thread per entry). Pinning is best effort: a cpu the process
    // may not use leaves that thread unpinned (pin_failures() counts them), never an error. Idle workers spin for
    // spin_us before they yield and sleep.
    ThreadPool(const std::vector<std::vector<int>>& nodes, int spin_us);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    void launch(JobFn fn, void* ctx);  // returns at once; one job at a time
    void wait();                       // until every worker has returned from the job (spins briefly, then sleeps)
    bool busy() const { return busy_; }
    int64_t launched_at() const { return launched_ns_; }  // now_ns() of the last launch()

    int num_nodes() const { return static_cast<int>(node_threads_.size()); }
    int node_threads(int node) const { return node_threads_[node]; }
    int total_threads() const { return static_cast<int>(threads_.size()); }
    int pin_failures() const { return pin_failures_.load(); }
    Barrier& node_barrier(int node) { return *node_barriers_[node]; }
    Barrier& global_barrier() { return global_barrier_; }

private:
    void worker(int node, int tid, int gtid, int cpu);

    std::vector<int> node_threads_;
    std::vector<std::unique_ptr<Barrier>> node_barriers_;
    Barrier global_barrier_;
    std::vector<std::thread> threads_;
    JobFn fn_ = nullptr;
    void* ctx_ = nullptr;
    bool stop_ = false;
    bool busy_ = false;
    alignas(64) std::atomic<uint32_t> job_gen_{0};
    std::atomic<int> job_sleepers_{0};
    alignas(64) std::atomic<int> remaining_{0};
    alignas(64) std::atomic<uint32_t> done_gen_{0};
    std::atomic<int> done_sleepers_{0};
    uint32_t launched_ = 0;
    int64_t launched_ns_ = 0;
    int64_t spin_ns_ = 0;
    std::atomic<int> pin_failures_{0};
};

}  // namespace lvllm
