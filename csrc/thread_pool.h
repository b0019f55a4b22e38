// Worker threads of the engine: one sub-pool per (real or virtual) NUMA node, each thread pinned to one cpu of its
// node. Hand-off is spin (for a set time), then yield, then futex sleep, so a decode step finds its workers awake (a
// few microseconds) while idle or oversubscribed workers give the core back (spinning against the caller is what made
// peers slow down 7-30x when their threads equalled the cores). The spin time is the caller's choice: cores kept for
// the engine (a GPU host) can spin through the GPU's part of a layer; cores shared with vLLM-CPU's own threads cannot.
// Neither the thread in wait() nor an idle worker spins on the cpu the launching thread ran on: the one would hold off
// the worker pinned there, the other the caller's own work between calls.
//
// A job may say its result is complete (job_done) before every worker has returned: wait() returns then, and a late
// worker (descheduled, or sharing its cpu) runs through the finished job later; the next launch waits for it first.
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
// Wait until `word` equals `target` (it only counts up to it), as wait_change waits.
void wait_for(const std::atomic<uint32_t>& word, uint32_t target, std::atomic<int>& sleepers, int64_t spin_ns);
// Wake every thread sleeping in wait_change on `word` (cheap when nobody sleeps).
void wake_all(const std::atomic<uint32_t>& word, const std::atomic<int>& sleepers);

// Items of one phase of a job done so far: each thread adds what it did once the phase's cursor runs dry, and the
// phase is over when the sum reaches the item count, however many threads took part (none has to arrive).
struct alignas(64) Progress {
    std::atomic<uint32_t> done{0};
    std::atomic<int> sleepers{0};
    // Adds n; true for the call that completes `items`.
    bool add(uint32_t n, uint32_t items);
    void wait(uint32_t items, int64_t spin_ns) { wait_for(done, items, sleepers, spin_ns); }
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

    void launch(JobFn fn, void* ctx);  // returns at once; one job at a time (waits for the last one's late workers)
    void wait();     // until the job is done: job_done() was called, or every worker returned (spins briefly, sleeps)
    void quiesce();  // until every worker has returned from the job too (its state may change after this)
    void job_done();  // from the job, once its result is complete: wait() need not wait for the workers still in it
    bool busy() const { return busy_; }
    int64_t launched_at() const { return launched_ns_; }  // now_ns() of the last launch()
    int64_t spin_ns() const { return spin_ns_; }

    int num_nodes() const { return static_cast<int>(node_threads_.size()); }
    int node_threads(int node) const { return node_threads_[node]; }
    int total_threads() const { return static_cast<int>(threads_.size()); }
    int pin_failures() const { return pin_failures_.load(); }

private:
    void worker(int node, int tid, int gtid, int cpu);
    int64_t waiter_spin_ns() const;

    std::vector<int> node_threads_;
    std::vector<int> cpus_;  // every worker's cpu
    std::vector<std::thread> threads_;
    JobFn fn_ = nullptr;
    void* ctx_ = nullptr;
    bool stop_ = false;
    bool busy_ = false;
    alignas(64) std::atomic<uint32_t> job_gen_{0};
    std::atomic<int> job_sleepers_{0};
    alignas(64) std::atomic<int> remaining_{0};
    std::atomic<bool> done_early_{false};
    alignas(64) std::atomic<uint32_t> done_gen_{0};  // = launched_ once the job is done
    std::atomic<int> done_sleepers_{0};
    alignas(64) std::atomic<uint32_t> idle_gen_{0};  // = launched_ once every worker has returned
    std::atomic<int> idle_sleepers_{0};
    std::atomic<int> caller_cpu_{-1};  // the cpu launch() ran on
    uint32_t launched_ = 0;
    int64_t launched_ns_ = 0;
    int64_t spin_ns_ = 0;
    std::atomic<int> pin_failures_{0};
};

}  // namespace lvllm
