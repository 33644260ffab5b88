#include "common/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DT_PAUSE() _mm_pause()
#else
#define DT_PAUSE() std::this_thread::yield()
#endif

namespace dovetail {

namespace {
constexpr int kSpinBeforeSleep = 20000;  // polling for the next job (~50-300 us) before sleeping
constexpr int kSpinBeforeYield = 2000;   // the caller's wait for started chunks
constexpr int kMaxWorkers = 255;
// A wait for started chunks longer than the caller's own share plus this is a stall.
constexpr int64_t kStallSlackNs = 50000;
constexpr int64_t kAloneNs = 10000;         // a job this long that no worker joined counts too
constexpr int kStallTrigger = 12;           // score at which the pool goes serial
constexpr int kCleanReset = 1024;           // clean parallel jobs that forget past stalls
constexpr int64_t kSerialFirst = 256;       // jobs in the first serial stretch (~1 decode step)
constexpr int64_t kSerialMax = 1 << 16;
}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int n) {
  n = std::min(n, kMaxWorkers);
  while ((int)workers_.size() < n) {
    const int index = (int)workers_.size();
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

bool ThreadPool::claim(uint32_t tag, int64_t& chunk) {
  uint64_t v = claim_.load(std::memory_order_acquire);
  for (;;) {
    if ((uint32_t)(v >> 32) != tag) return false;
    const int64_t i = (int64_t)(v & 0xffffffffu);
    if (i >= n_chunks_.load(std::memory_order_acquire)) return false;
    if (claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      chunk = i;
      return true;
    }
  }
}

int64_t ThreadPool::work(uint32_t tag) {
  int64_t c, n = 0;
  while (claim(tag, c)) {
    fn_(ctx_, c);
    done_.fetch_add(1, std::memory_order_acq_rel);
    ++n;
  }
  return n;
}

void ThreadPool::worker_loop(int index) {
  uint32_t seen = 0;
  for (;;) {
    // Poll for a new job for a short while, then sleep until one is posted.
    uint32_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinBeforeSleep; ++spin) {
      DT_PAUSE();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      ++sleepers_;
      cv_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
      --sleepers_;
      if (stop_) return;
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (index < active_workers_.load(std::memory_order_acquire)) work(gen);
  }
}

void ThreadPool::run(int threads, int64_t n_chunks, ChunkFn fn, void* ctx) {
  if (n_chunks <= 0) return;
  std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
  bool serial = threads <= 1 || n_chunks == 1 || !busy.owns_lock() || n_chunks > 0xffffffffLL;
  if (!serial && serial_left_ > 0) {  // recovering from stalls: the caller alone
    --serial_left_;
    serial = true;
    fallback_jobs_.fetch_add(1, std::memory_order_relaxed);
  }
  if (serial) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(ctx, c);  // serial, or the pool is in use
    return;
  }
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  ensure_workers(threads - 1);
  // Close the previous job's claims before its fields change: a worker still in claim()
  // for it (it read the old tag, then was descheduled) must fail there, not take a chunk
  // of this job under the old tag and count it done. Index 0xffffffff is never below
  // n_chunks, and the CAS of anyone holding the old value now fails.
  claim_.store(claim_.load(std::memory_order_relaxed) | 0xffffffffu, std::memory_order_seq_cst);
  fn_ = fn;
  ctx_ = ctx;
  n_chunks_.store(n_chunks, std::memory_order_release);
  active_workers_.store(threads - 1, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  uint32_t tag;
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tag = generation_.load(std::memory_order_relaxed) + 1;
    claim_.store((uint64_t)tag << 32, std::memory_order_release);
    generation_.store(tag, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) cv_.notify_all();
  const int64_t mine = work(tag);
  const auto t1 = clock::now();
  // Every chunk is claimed now; wait only for those a worker is still computing.
  bool waited = false;
  for (int spin = 0; done_.load(std::memory_order_acquire) < n_chunks; ++spin) {
    waited = true;
    if (spin < kSpinBeforeYield)
      DT_PAUSE();
    else
      std::this_thread::yield();
  }
  const int64_t own = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
  const int64_t wait = waited ? std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t1).count() : 0;
  const bool alone = mine == n_chunks && own > kAloneNs;  // a job the workers never joined
  parallel_jobs_.fetch_add(1, std::memory_order_relaxed);
  if (!fallback_.load(std::memory_order_relaxed)) return;
  if (wait > own + kStallSlackNs || alone) {
    stall_score_ = std::max(stall_score_, 0) + (alone ? 2 : 4);
    if (stall_score_ >= kStallTrigger) {
      serial_span_ = serial_span_ ? std::min(serial_span_ * 2, kSerialMax) : kSerialFirst;
      serial_left_ = serial_span_;
      stall_score_ = 0;
      stretches_.fetch_add(1, std::memory_order_relaxed);
    }
  } else if (--stall_score_ <= -kCleanReset) {  // a long clean stretch: stalls start short again
    stall_score_ = 0;
    serial_span_ = 0;
  }
}

ThreadPool::Stats ThreadPool::stats() const {
  Stats s;
  s.parallel_jobs = parallel_jobs_.load(std::memory_order_relaxed);
  s.fallback_jobs = fallback_jobs_.load(std::memory_order_relaxed);
  s.stretches = stretches_.load(std::memory_order_relaxed);
  return s;
}

void ThreadPool::reset_stats() {
  parallel_jobs_.store(0, std::memory_order_relaxed);
  fallback_jobs_.store(0, std::memory_order_relaxed);
  stretches_.store(0, std::memory_order_relaxed);
}

void ThreadPool::set_fallback(bool on) {
  std::lock_guard<std::mutex> lock(run_mu_);  // not in the middle of a job's bookkeeping
  fallback_.store(on, std::memory_order_relaxed);
  if (!on) {
    serial_left_ = 0;
    stall_score_ = 0;
    serial_span_ = 0;
  }
}

}  // namespace dovetail
