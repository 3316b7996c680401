// A tiny parallel layer: the kernels call erasus::parallel_blocks and never OpenMP directly, so a
// build without OpenMP (or a single-threaded test build) only changes this header.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <limits>
#include <thread>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace erasus {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Splits [0, n) into one contiguous block per thread and calls f(begin, end, thread_id).
// Contiguous blocks keep each thread's reads sequential, which is what the hardware prefetcher wants.
template <typename F>
inline void parallel_blocks(int64_t n, F&& f) {
#ifdef _OPENMP
  const int nt = static_cast<int>(std::min<int64_t>(max_threads(), std::max<int64_t>(n / 256, 1)));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int t = omp_get_num_threads();
    const int64_t begin = n * tid / t;
    const int64_t end = n * (tid + 1) / t;
    f(begin, end, tid);
  }
#else
  f(int64_t{0}, n, 0);
#endif
}

// Calls f(i, thread_id) for every i in [0, n), handing out one index at a time (uneven work per index).
template <typename F>
inline void parallel_for_each(int64_t n, F&& f) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
#else
  for (int64_t i = 0; i < n; ++i) f(i, 0);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// A team for loops of many short parallel steps (k-center, herding). Why not `omp parallel` per step (or per
// loop): a fork/join waits for every thread of the team, so a thread the OS has parked (another process on its
// core, or torch's own spinning threads) holds the step up until it runs again -- measured 8 ms/step for a
// 40 us step on a busy 2-core machine, and 2 ms for a one-step loop. Here a step's rows are cut into chunks
// that threads claim one at a time, the calling thread included; it waits only for chunks other threads have
// claimed and not finished, never for a thread that holds none, and never for the helpers to start or stop.
// The helpers are a few threads kept for the whole process (not OpenMP's), asleep between loops; a waiting
// thread spins briefly and then sleeps, so an idle team leaves the cores to others.

// CPUs this process may run on (its affinity mask), which can be fewer than omp_get_max_threads() assumes.
inline int usable_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(CPU_COUNT(&set), 1);
#endif
  return std::max(static_cast<int>(std::thread::hardware_concurrency()), 1);
}

namespace detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Sleep while `word` still holds `seen` (spurious wake-ups are fine: every caller re-checks its condition).
inline void sleep_while_equal(std::atomic<int32_t>& word, int32_t seen) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<int32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
  if (word.load() == seen) std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}

inline void wake_all(std::atomic<int32_t>& word) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<int32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// How long a waiting thread spins before it sleeps: long enough to cover the serial work between two steps on
// an idle machine (so the team never pays a wake-up there), short enough not to take a busy core for long.
constexpr std::chrono::microseconds kSpin{50};

// Spin until ready() or the spin time is over; returns ready().
template <typename Ready>
inline bool spin_until(Ready&& ready) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() - start > kSpin) return ready();
  }
}

// The process's helper threads and the state of the run they serve. One loop at a time owns it (claim());
// a loop that finds it owned runs on its calling thread alone.
class HelperPool {
 public:
  static constexpr int kMaxHelpers = 255;

  static HelperPool& instance() {
    static HelperPool* pool = [] {
      auto* p = new HelperPool();  // never destroyed: detached helpers may sleep in it until the process ends
#ifdef __linux__
      pthread_atfork(nullptr, nullptr, [] { instance().forget_threads_after_fork(); });
#endif
      return p;
    }();
    return *pool;
  }

  // Takes the pool for one loop with `helpers` helpers (started on first use); false if another loop has it.
  bool claim(int helpers) {
    if (owned_.exchange(true, std::memory_order_acquire)) return false;
    helpers = std::min(helpers, kMaxHelpers);
    while (started_ < helpers) {
      std::thread([this, index = started_] { serve(index); }).detach();
      ++started_;
    }
    active_.store(helpers, std::memory_order_relaxed);
    return true;
  }

  void release() { owned_.store(false, std::memory_order_release); }

  // Runs f(chunk) for every chunk in [0, n_chunks) with the active helpers; returns when all are done.
  template <typename F>
  void run(int32_t n_chunks, F& f) {
    fn_ = [](void* ctx, int64_t chunk) { (*static_cast<F*>(ctx))(chunk); };
    ctx_ = static_cast<void*>(&f);
    done_.store(0, std::memory_order_relaxed);
    generation_ += 1;
    // Publish: everything written before this store (f's inputs) is visible to a thread whose claim reads it.
    // The claim word packs (generation, chunk count, next chunk).
    claim_.store((uint64_t{generation_} << 32) | (uint64_t(uint32_t(n_chunks)) << 16), std::memory_order_seq_cst);
    published_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all(published_);
    work();
    // Every chunk is claimed; wait for those still running on helpers.
    auto all_done = [&] { return done_.load(std::memory_order_acquire) == n_chunks; };
    while (!spin_until(all_done)) {
      caller_sleeping_.store(1, std::memory_order_seq_cst);
      const int32_t seen = done_.load(std::memory_order_seq_cst);
      if (seen != n_chunks) sleep_while_equal(done_, seen);
      caller_sleeping_.store(0, std::memory_order_relaxed);
    }
  }

 private:
  HelperPool() = default;

  // Claims and runs chunks of the current run until none is left. A claim after the run's last chunk
  // (next >= count) changes nothing the run uses; the 16-bit next field has room for those extra claims.
  void work() {
    for (;;) {
      const uint64_t word = claim_.fetch_add(1, std::memory_order_acq_rel);
      const int32_t count = static_cast<int32_t>((word >> 16) & 0xffffu);
      const int32_t chunk = static_cast<int32_t>(word & 0xffffu);
      if (chunk >= count) return;
      // The run cannot end (nor fn_ / ctx_ change) while this chunk is claimed and not done.
      fn_(ctx_, chunk);
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == count &&
          caller_sleeping_.load(std::memory_order_seq_cst))
        wake_all(done_);
    }
  }

  // Helper `index`: joins each new run while it is among the active helpers; sleeps in between.
  void serve(int index) {
    uint32_t seen = static_cast<uint32_t>(claim_.load(std::memory_order_acquire) >> 32);
    for (;;) {
      auto fresh = [&] { return static_cast<uint32_t>(claim_.load(std::memory_order_seq_cst) >> 32) != seen; };
      while (!spin_until(fresh)) {
        const int32_t before = published_.load(std::memory_order_seq_cst);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        if (!fresh()) sleep_while_equal(published_, before);
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      }
      seen = static_cast<uint32_t>(claim_.load(std::memory_order_acquire) >> 32);
      if (index < active_.load(std::memory_order_acquire)) work();
    }
  }

  // A forked child has only the thread that forked: it starts its own helpers when it needs them. A loop the
  // parent was running is not the child's (that thread does not exist there).
  void forget_threads_after_fork() {
    started_ = 0;
    sleepers_.store(0);
    caller_sleeping_.store(0);
    owned_.store(false);
  }

  std::atomic<bool> owned_{false};
  int started_ = 0;  // helpers started; changed only by the owner
  std::atomic<int> active_{0};
  uint32_t generation_ = 0;
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int32_t> done_{0};
  std::atomic<int32_t> caller_sleeping_{0};
  alignas(64) std::atomic<int32_t> published_{0};
  std::atomic<int32_t> sleepers_{0};
};

}  // namespace detail

// The team of one loop: the calling thread, plus the pool's helpers when it got them.
class ChunkTeam {
 public:
  // Runs f(chunk) for every chunk in [0, n_chunks) and returns when all are done, on the team or, with
  // `alone` (see TeamOrAlone), on the calling thread only. Chunks must be independent; which thread runs which
  // chunk is not fixed, so a result that must not depend on the team (ties, sums) is merged by the caller in
  // chunk order. n_chunks < 2^15.
  template <typename F>
  void run(int32_t n_chunks, F& f, bool alone = false) {
    if (n_chunks <= 0) return;
    if (pool_ == nullptr || alone) {
      for (int32_t c = 0; c < n_chunks; ++c) f(int64_t{c});
      return;
    }
    pool_->run(n_chunks, f);
  }

  // Threads of the team (1: everything runs on the caller).
  int size() const { return size_; }

  template <typename Body>
  friend void with_chunk_team(int threads, Body&& body);

 private:
  detail::HelperPool* pool_ = nullptr;
  int size_ = 1;
};

// Chooses step by step whether a loop's step runs on the whole team or on the calling thread alone, from the
// step times it measures. The team wins on an idle machine; the calling thread alone wins when the other cores
// are taken (other processes, or spinning threads of this one): then a helper adds little and, parked by the OS
// in the middle of a chunk, holds the step up. The mode in use is kept while it is the faster: now and then
// the other mode runs a step (the team: two, the first may pay for waking the helpers) and takes over if its best
// step beat the best of the last two steps in the mode in use (preemption only ever lengthens a step, so bests
// are compared). A probe that loses doubles the gap to the next one (from 16 steps up to 1024), so a mode that
// stalls costs a few steps per call at most. The choice changes the time only, never the result.
class TeamOrAlone {
 public:
  // has_team: a team is there to choose; adapt: false keeps the team on every step (tests, benchmarks).
  TeamOrAlone(bool has_team, bool adapt) : alone_(!has_team), adapting_(has_team && adapt) {}

  bool alone(int64_t step) const { return probing(step) ? !alone_ : alone_; }

  void record(int64_t step, std::chrono::steady_clock::duration elapsed) {
    if (!adapting_ || step == 0) return;  // step 0 may wait for helpers to wake up: not a fair sample
    const double seconds = std::chrono::duration<double>(elapsed).count();
    if (!probing(step)) {
      recent_[step % 2] = seconds;
      return;
    }
    probe_best_ = step == next_probe_ ? seconds : std::min(probe_best_, seconds);
    if (step + 1 < next_probe_ + probe_steps()) return;
    if (probe_best_ < std::min(recent_[0], recent_[1])) {
      alone_ = !alone_;
      recent_[0] = recent_[1] = probe_best_;
      gap_ = kFirstGap;
    } else {
      gap_ = std::min(gap_ * 2, kLastGap);
    }
    next_probe_ = step + 1 + gap_;
  }

 private:
  static constexpr int64_t kFirstGap = 16, kLastGap = 1024;
  // A probe of the calling thread alone is one step: it wakes nobody, and every probe step costs up to a team's
  // speedup (k-center, 50k x 512, 100 steps: probes of 2 steps made a call 1-4% slower than a fixed team).
  int64_t probe_steps() const { return alone_ ? 2 : 1; }
  bool probing(int64_t step) const { return adapting_ && step >= next_probe_ && step < next_probe_ + probe_steps(); }

  bool alone_;
  bool adapting_;
  int64_t next_probe_ = 3;  // steps 0-2 run the team (step 0 wakes the helpers up; 1 and 2 are its samples)
  int64_t gap_ = kFirstGap;
  double recent_[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
  double probe_best_ = 0.0;
};

// Calls body(team) on the calling thread with a team of up to `threads` threads (1 or less, or another loop
// holding the helpers: the chunks run on the calling thread).
template <typename Body>
void with_chunk_team(int threads, Body&& body) {
  ChunkTeam team;
  detail::HelperPool* pool = threads > 1 ? &detail::HelperPool::instance() : nullptr;
  if (pool != nullptr && pool->claim(threads - 1)) {
    team.pool_ = pool;
    team.size_ = std::min(threads, detail::HelperPool::kMaxHelpers + 1);
  }
  struct Release {  // the helpers go back to the pool even if body throws
    detail::HelperPool* pool;
    ~Release() {
      if (pool != nullptr) pool->release();
    }
  } release{team.pool_};
  body(team);
}

}  // namespace erasus
