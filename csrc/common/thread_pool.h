// A small process-wide thread pool for the engines' data-parallel loops.
//
// Why not OpenMP parallel regions: every region ends in a barrier that waits for all
// threads of the team. When another process keeps one of the two cores busy, a
// descheduled worker stalls every barrier for a scheduler quantum, and a decode step has
// hundreds of regions (measured here: 0.6 tok/s instead of 110 with one core taken).
// Here the caller works through the chunks itself and only waits for chunks a worker has
// already started; workers spin briefly, then sleep. If the pool is busy (another engine
// on another thread, or a nested call) the loop simply runs on the calling thread.
//
// When the caller keeps waiting on workers that were descheduled mid-chunk, or keeps
// doing every chunk itself because the workers never get a core in time (another process
// holds the other core, and a spinning worker only takes time from the caller), the pool
// runs the next jobs on the caller alone for a
// while, doubling that stretch each time the stalls come back: one thread at full speed
// beats two that take turns with a scheduler quantum in between.
//
// Work is split into chunks that are computed whole by one thread, so results do not
// depend on the thread count (batch invariance is kept).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace dovetail {

class ThreadPool {
 public:
  using ChunkFn = void (*)(void* ctx, int64_t chunk);

  static ThreadPool& instance();

  // Run fn(ctx, c) for every c in [0, n_chunks) on up to `threads` threads (the caller
  // is one of them). Returns when all chunks are done.
  void run(int threads, int64_t n_chunks, ChunkFn fn, void* ctx);

  template <typename F>
  void parallel_for(int threads, int64_t n_chunks, F&& f) {
    auto thunk = [](void* c, int64_t i) { (*static_cast<F*>(c))(i); };
    run(threads, n_chunks, thunk, &f);
  }

  ~ThreadPool();

  // Counters since start (or the last reset): jobs split across threads, jobs run on the
  // caller alone because of recent stalls, and how many such serial stretches began.
  struct Stats {
    int64_t parallel_jobs = 0, fallback_jobs = 0, stretches = 0;
  };
  Stats stats() const;
  void reset_stats();
  // Whether stalls send jobs to the caller alone (the default). Off, every job is offered
  // to the workers: for a machine known to be quiet, and for benchmarks of the kernels.
  void set_fallback(bool on);
  bool fallback() const { return fallback_.load(std::memory_order_relaxed); }

 private:
  ThreadPool() = default;
  void ensure_workers(int n);
  void worker_loop(int index);
  bool claim(uint32_t tag, int64_t& chunk);
  int64_t work(uint32_t tag);  // chunks this thread computed

  std::mutex run_mu_;  // one job at a time; others run inline
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  int sleepers_ = 0;

  // The current job. `claim_` packs the job's tag (high 32 bits) and the next chunk
  // index: a worker that woke for an older job fails its claim instead of running a
  // chunk of the new one. Job fields are written before the tag is published.
  std::atomic<uint32_t> generation_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<int> active_workers_{0};  // workers that may take part in the current job
  // Stall detection (touched only under run_mu_): see run().
  int stall_score_ = 0;
  int64_t serial_left_ = 0;   // jobs still to run on the caller alone
  int64_t serial_span_ = 0;   // length of the next serial stretch (doubles while stalls recur)
  std::atomic<bool> fallback_{true};
  std::atomic<int64_t> parallel_jobs_{0}, fallback_jobs_{0}, stretches_{0};
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

// Convenience: split [0, n) into up to `per_thread` chunks per thread, each of at least
// `grain` items, and call f(begin, end) per chunk.
template <typename F>
void parallel_range(int threads, int64_t n, int64_t grain, F&& f, int64_t per_thread = 2) {
  if (n <= 0) return;
  int64_t chunks = threads <= 1 ? 1 : std::min<int64_t>((n + grain - 1) / grain, per_thread * (int64_t)threads);
  if (chunks <= 1) {
    f((int64_t)0, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  chunks = (n + step - 1) / step;
  ThreadPool::instance().parallel_for(threads, chunks, [&](int64_t c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) f(b, e);
  });
}

}  // namespace dovetail
