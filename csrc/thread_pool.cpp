// Pinned worker pool with spin-then-sleep hand-off (see thread_pool.h).
#include "thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <climits>

namespace lvllm {
namespace {

constexpr int kYields = 64;
constexpr int kPausesPerClock = 16;  // pauses between clock reads while spinning
// The thread in wait() spins at most this long, whatever the workers do: it has no core of its own (a CUDA host
// callback thread beside vLLM's main thread, itself spinning on the GPU); spinning there held each graph decode
// layer's engine call for a scheduler slice (4.2 ms instead of 0.2 on the H200 host).
constexpr int64_t kWaiterSpinNs = 20000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

long futex(const std::atomic<uint32_t>* addr, int op, uint32_t val) {
    static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");
    return syscall(SYS_futex, reinterpret_cast<const uint32_t*>(addr), op, val, nullptr, nullptr, 0);
}

}  // namespace

int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void wait_change(const std::atomic<uint32_t>& word, uint32_t old, std::atomic<int>& sleepers, int64_t spin_ns) {
    for (int64_t end = now_ns() + spin_ns;;) {
        for (int i = 0; i < kPausesPerClock; ++i) {
            if (word.load(std::memory_order_acquire) != old) return;
            cpu_relax();
        }
        if (now_ns() >= end) break;
    }
    for (int i = 0; i < kYields; ++i) {
        if (word.load(std::memory_order_acquire) != old) return;
        sched_yield();
    }
    while (word.load(std::memory_order_acquire) == old) {
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        if (word.load(std::memory_order_seq_cst) == old) futex(&word, FUTEX_WAIT_PRIVATE, old);
        sleepers.fetch_sub(1, std::memory_order_seq_cst);
    }
}

void wait_for(const std::atomic<uint32_t>& word, uint32_t target, std::atomic<int>& sleepers, int64_t spin_ns) {
    for (uint32_t v; (v = word.load(std::memory_order_acquire)) != target;) wait_change(word, v, sleepers, spin_ns);
}

void wake_all(const std::atomic<uint32_t>& word, const std::atomic<int>& sleepers) {
    if (sleepers.load(std::memory_order_seq_cst) > 0) futex(&word, FUTEX_WAKE_PRIVATE, INT_MAX);
}

bool Progress::add(uint32_t n, uint32_t items) {
    if (!n) return false;
    const bool last = done.fetch_add(n, std::memory_order_seq_cst) + n == items;
    wake_all(done, sleepers);
    return last;
}

ThreadPool::ThreadPool(const std::vector<std::vector<int>>& nodes, int spin_us) : spin_ns_(int64_t(spin_us) * 1000) {
    for (const auto& cpus : nodes) {
        node_threads_.push_back(static_cast<int>(cpus.size()));
        cpus_.insert(cpus_.end(), cpus.begin(), cpus.end());
    }
    int gtid = 0;
    for (size_t n = 0; n < nodes.size(); ++n)
        for (size_t t = 0; t < nodes[n].size(); ++t, ++gtid)
            threads_.emplace_back(&ThreadPool::worker, this, static_cast<int>(n), static_cast<int>(t), gtid,
                                  nodes[n][t]);
    launch([](void*, int, int, int) {}, nullptr);  // returns once every worker runs (and has tried to pin)
    wait();
}

ThreadPool::~ThreadPool() {
    quiesce();
    stop_ = true;
    job_gen_.fetch_add(1, std::memory_order_seq_cst);
    wake_all(job_gen_, job_sleepers_);
    for (auto& t : threads_) t.join();
}

void ThreadPool::launch(JobFn fn, void* ctx) {
    quiesce();
    fn_ = fn;
    ctx_ = ctx;
    busy_ = true;
    done_early_.store(false, std::memory_order_relaxed);
    remaining_.store(total_threads(), std::memory_order_relaxed);
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    ++launched_;
    launched_ns_ = now_ns();
    job_gen_.fetch_add(1, std::memory_order_seq_cst);  // publishes fn_/ctx_ (release)
    wake_all(job_gen_, job_sleepers_);
}

// No spinning in wait() where a worker is pinned to this thread's cpu: it would hold that worker off.
int64_t ThreadPool::waiter_spin_ns() const {
    const int cpu = sched_getcpu();
    return std::find(cpus_.begin(), cpus_.end(), cpu) != cpus_.end() ? 0 : std::min(spin_ns_, kWaiterSpinNs);
}

void ThreadPool::wait() {
    if (!busy_) return;
    wait_for(done_gen_, launched_, done_sleepers_, waiter_spin_ns());
    busy_ = false;
}

void ThreadPool::quiesce() {
    wait_for(idle_gen_, launched_, idle_sleepers_, waiter_spin_ns());
    busy_ = false;
}

void ThreadPool::job_done() {
    done_early_.store(true, std::memory_order_relaxed);  // ordered before this worker's remaining_ decrement
    done_gen_.fetch_add(1, std::memory_order_seq_cst);
    wake_all(done_gen_, done_sleepers_);
}

void ThreadPool::worker(int node, int tid, int gtid, int cpu) {
    bool pinned = false;
    if (cpu >= 0 && cpu < CPU_SETSIZE) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pinned = pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
    }
    if (!pinned) pin_failures_.fetch_add(1);
    const std::string name = "lvllm-n" + std::to_string(node) + "t" + std::to_string(tid);
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    uint32_t seen = 0;
    for (;;) {
        // Idle: no spinning on the cpu the caller ran on (its work between calls would share it with this spin).
        const bool callers_cpu = pinned && caller_cpu_.load(std::memory_order_relaxed) == cpu;
        wait_change(job_gen_, seen, job_sleepers_, callers_cpu ? 0 : spin_ns_);
        seen = job_gen_.load(std::memory_order_acquire);
        if (stop_) return;
        fn_(ctx_, node, tid, gtid);
        if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            if (!done_early_.load(std::memory_order_relaxed)) {
                done_gen_.fetch_add(1, std::memory_order_seq_cst);
                wake_all(done_gen_, done_sleepers_);
            }
            idle_gen_.fetch_add(1, std::memory_order_seq_cst);
            wake_all(idle_gen_, idle_sleepers_);
        }
    }
}

}  // namespace lvllm
